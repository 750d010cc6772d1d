"""The structure the README promises, checked from the code itself: model constructors are keyword-only, the
training engine imports nothing above it, no module imports another's private names, and the RoI heads share
one interface."""
from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from torch import nn

import maskrcnn.model as model_package

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskrcnn"


def model_classes() -> list[type]:
    """Every class defined in maskrcnn/model/ that is a module or a stateless helper with a constructor."""
    import importlib
    import pkgutil

    classes = []
    for info in pkgutil.iter_modules(model_package.__path__):
        module = importlib.import_module(f"maskrcnn.model.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "__init__" in cls.__dict__ and not inspect.isabstract(cls):
                classes.append(cls)
    return classes


def test_model_constructors_are_keyword_only():
    classes = model_classes()
    names = {c.__name__ for c in classes}
    assert {"AnchorGenerator", "FrozenBatchNorm2d", "ResNetBottomUp", "BoxCoder", "FPN", "LatentNoise", "Matcher",
            "MultiScaleRoIAlign", "RPNHead", "BalancedSampler", "RPN", "BoxHead", "MaskHead", "RoIHeads",
            "MaskRCNN", "ImageTransform"} <= names, names
    for cls in classes:
        if issubclass(cls, BaseException) or cls.__name__.startswith("_") or dataclasses.is_dataclass(cls):
            continue  # errors, autograd functions and data records (ImageList, Precision) are not stages
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # after self
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert not positional, f"{cls.__name__}({', '.join(positional)}, ...) takes positional arguments"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in a package file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_the_engine_imports_nothing_above_it():
    """Evaluation, drawing and torchvision's weights reach the trainer from train.py (Hooks), never by import."""
    above = ("maskrcnn.evaluation", "maskrcnn.vis", "maskrcnn.torchvision_weights", "maskrcnn.bench")
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        for module, _ in imports(path):
            assert not module.startswith(above), f"{path.name} imports {module}"
    for path in sorted((PACKAGE / "model").glob("*.py")):  # the model: nothing but itself and the config
        for module, _ in imports(path):
            assert not module.startswith("maskrcnn.") or module.startswith(("maskrcnn.model", "maskrcnn.config")), \
                f"model/{path.name} imports {module}"


def test_no_module_imports_private_names_of_another():
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, names in imports(path):
            if module.startswith("maskrcnn"):
                private = [n for n in names if n.startswith("_") and n != "__future__"]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"


def test_heads_share_one_interface():
    """RoIHeads routes any RoIHead; the box and mask heads implement every method of it."""
    from maskrcnn.model.box_head import BoxHead
    from maskrcnn.model.mask_head import MaskHead
    from maskrcnn.model.roi_heads import RoIHead

    abstract = RoIHead.__abstractmethods__
    assert {"select", "forward", "targets", "losses", "inference_rois", "inference", "reset_predictor"} <= abstract
    for head in (BoxHead, MaskHead):
        assert issubclass(head, RoIHead) and issubclass(head, nn.Module) and not inspect.isabstract(head)
    for name in abstract:  # each written once, with its one-line meaning
        assert inspect.getdoc(getattr(RoIHead, name)), name

    class Incomplete(RoIHead):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_drawing_builds_no_training_and_the_page_no_model():
    """vis draws and the report measures and renders: none of them builds an optimiser or reaches into the
    trainer or its recipe (timing a training step is the engine's: maskrcnn/engine/step.py, which the report
    calls), vis imports no engine module at all, and the report's page reads report.json with no torch, numpy or
    model code."""
    allowed = {"vis": set(), "report": {"maskrcnn.engine.checkpoint", "maskrcnn.engine.device", "maskrcnn.engine.step"}}
    for package, engine_modules in allowed.items():
        for path in sorted((PACKAGE / package).glob("*.py")):
            for module, names in imports(path):
                where = f"{path.relative_to(ROOT)} imports {module}"
                assert not module.startswith("maskrcnn.engine") or module in engine_modules, where
                assert not module.startswith("torch.optim") and "build_optimizer" not in names, where
    model_code = ("torch", "numpy", "maskrcnn.model", "maskrcnn.engine", "maskrcnn.data", "maskrcnn.evaluation")
    for module, _ in imports(PACKAGE / "report" / "page.py"):
        assert not module.startswith(model_code), f"report/page.py imports {module}"


def test_the_data_rules_live_in_one_module():
    """The dataset (coco.py) and the checker (check.py) take the data rules from rules.py and never import each
    other; the rules import neither, and neither defines a rule of its own (a ``*_problem(s)`` function)."""
    data = PACKAGE / "data"
    modules = {name: {module for module, _ in imports(data / f"{name}.py")} for name in ("coco", "check", "rules")}
    assert "maskrcnn.data.check" not in modules["coco"], "coco.py imports check.py"
    assert "maskrcnn.data.coco" not in modules["check"], "check.py imports coco.py"
    assert not modules["rules"] & {"maskrcnn.data.coco", "maskrcnn.data.check"}, modules["rules"]
    assert "maskrcnn.data.rules" in modules["coco"] and "maskrcnn.data.rules" in modules["check"]
    for name in ("coco", "check"):
        tree = ast.parse((data / f"{name}.py").read_text())
        rules = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                 and n.name.rstrip("s").endswith("_problem")]
        assert not rules, f"{name}.py defines the rules {rules}: they belong in maskrcnn/data/rules.py"


# ------------------------------------------------------------------------------------- the engine's rooms
ENGINE_MODEL_FUNCTIONS = {"maskrcnn.model.build": {"build_model"},  # the model's one public builder
                          "maskrcnn.model.precision": {"autocast", "choose_precision", "training_precision"},
                          "maskrcnn.model.fuse": {"fold_batchnorm", "inference_channels_last",
                                                                   "prepare_inference", "prepare_training"}}


def engine_model_imports(path: Path) -> list[str]:
    """What a file of maskrcnn/engine/ imports from maskrcnn.model that is not one of the functions it may use."""
    wrong = []
    for module, names in imports(path):
        if module == "maskrcnn.model" or module.startswith("maskrcnn.model."):
            allowed = ENGINE_MODEL_FUNCTIONS.get(module, set())
            wrong += [f"{module} (the module)"] if not names else [f"{module}.{n}" for n in names if n not in allowed]
    return wrong


def test_the_engine_names_no_model_class():
    """The engine builds the model with build_model and reaches it through nn.Module and the model's own methods
    (rng_state / set_rng_state for its generators): from maskrcnn.model it imports functions only, and only
    those listed here (the builder, the precision policy, BatchNorm folding, the inference layout and the training
    one), never a class."""
    import importlib

    for module, names in ENGINE_MODEL_FUNCTIONS.items():  # the list itself names no class
        for name in names:
            assert inspect.isfunction(getattr(importlib.import_module(module), name)), f"{module}.{name}"
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        assert not engine_model_imports(path), f"engine/{path.name} imports {engine_model_imports(path)}"


def test_the_model_class_rule_catches_a_class_import(tmp_path, monkeypatch):
    import sys

    engine = tmp_path / "maskrcnn" / "engine"
    engine.mkdir(parents=True)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)  # imports() resolves relative imports from ROOT
    bad = engine / "bad.py"
    bad.write_text("from ..model.latent_noise import LatentNoise\nfrom ..model.build import build_model\n"
                   "import maskrcnn.model.mask_rcnn\n")
    assert engine_model_imports(bad) == ["maskrcnn.model.latent_noise.LatentNoise",
                                         "maskrcnn.model.mask_rcnn (the module)"]


MAX_ENGINE_FUNCTION_LINES = 60


def long_functions(path: Path, limit: int = MAX_ENGINE_FUNCTION_LINES) -> list[str]:
    """Functions and methods of a file longer than `limit` lines, decorators, docstring and comments included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if node.end_lineno - first + 1 > limit:
                out.append(f"{node.name} ({node.end_lineno - first + 1} lines)")
    return out


def test_no_function_in_the_engine_is_longer_than_60_lines(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_ENGINE_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"class A:\n    @staticmethod\n    def f():\n{body}")
    assert long_functions(tmp_path / "long.py") == [f"f ({MAX_ENGINE_FUNCTION_LINES + 2} lines)"]  # the rule bites
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        assert not long_functions(path), f"engine/{path.name}: {', '.join(long_functions(path))} (split them)"
