"""The guided-tour notebooks (notebooks/inspect_*.py, percent format) executed top to bottom in a fresh kernel,
as `make notebooks` renders them (notebooks/render.py: jupytext -> nbformat -> nbclient), on configs/tiny.yaml
with freshly generated shapes data, with the noise on and off; each checked for something real from the
`summary` its last cell builds. A cell that raises fails the test with the cell's error."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from maskrcnn.config import load_config
from maskrcnn.data.build import build_eval_dataset
from maskrcnn.model.build import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
_spec = importlib.util.spec_from_file_location("render", ROOT / "notebooks" / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)


def require_packages() -> None:
    missing = render.missing_packages()
    if missing:
        pytest.fail(f"the notebook tests need {', '.join(missing)}: `make test` installs them "
                    f"(requirements-test.txt)", pytrace=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tour") / "shapes-tiny")


def run(name: str, noise: bool, data_root: str, monkeypatch, **params: str) -> dict:
    """Execute notebooks/<name>.py with these parameters (Python source of each value); its `summary`."""
    require_packages()
    import nbformat

    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it: no display, no inline images
    nb = render.load(name, {"noise": repr(noise), "overrides": repr([f"data.root={data_root}"]), "gallery": "None",
                            **params})
    nb.cells.append(nbformat.v4.new_code_cell("import json\nprint(json.dumps(summary))"))
    render.execute(nb, timeout=300)
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def config(data_root: str, noise: bool = False):
    return load_config(CONFIG, [f"data.root={data_root}", f"model.noise.enabled={str(noise).lower()}"])


def test_every_notebook_has_a_parameters_cell_first():
    require_packages()
    for name in render.NOTEBOOKS:
        nb = render.load(name, {})
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), name
        for param in ("config", "overrides", "checkpoint", "images", "seed", "noise", "gallery"):
            assert f"\n{param} = " in "\n" + code[0].source, (name, param)


def test_render_without_the_packages_says_make_test_installs_them(monkeypatch, capsys):
    monkeypatch.setattr(render, "missing_packages", lambda: ["jupytext"])
    assert render.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "make test" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("noise", [False, True], ids=["noise-off", "noise-on"])
def test_inspect_data(noise, data_root, monkeypatch):
    s = run("inspect_data", noise, data_root, monkeypatch)
    train = build_eval_dataset(config(data_root), "train")
    instances = sum(len(train[k][1]["labels"]) for k in range(len(train)))
    assert s["images"] == len(train) and s["instances"] == instances > 0
    assert sum(s["class_counts"].values()) == instances and list(s["class_counts"]) == train.class_names[1:]
    # boxes recomputed from the resized masks agree with the stored ones to a pixel
    assert s["box_from_mask_diff"] and max(s["box_from_mask_diff"]) <= 1.0
    # the 28x28 targets pasted back cover the shapes' masks (shapes are simple: a high IoU)
    assert len(s["mask_iou"]) == len(s["box_from_mask_diff"]) and min(s["mask_iou"]) > 0.85
    assert s["regression_error"] < 1e-3  # positive anchors + their targets = the GT boxes
    assert all(0 <= v <= 1 for v in s["best_anchor_iou"]) and max(s["best_anchor_iou"]) > 0.5
    sampled = sum(c["positive"] + c["negative"] for c in s["sampled"].values())
    assert 0 < sampled <= 64  # tiny.yaml: 64 anchors per image
    assert 0 < s["roi_fg_share"] <= 1


@pytest.mark.parametrize("noise", [False, True], ids=["noise-off", "noise-on"])
def test_inspect_model(noise, data_root, monkeypatch):
    s = run("inspect_model", noise, data_root, monkeypatch)
    num_classes = config(data_root).model.num_classes
    assert len(s["refinement_counts"]) == len(s["output_detections"]) == 2
    for counts, detections in zip(s["refinement_counts"], s["output_detections"]):
        proposals, class_boxes, *rest = counts
        assert class_boxes == proposals * num_classes > 0
        steps = [class_boxes, *rest]
        assert steps == sorted(steps, reverse=True), counts  # every step keeps at most what it was given
        assert rest[-1] == detections > 0  # and ends at the detections forward returns
    if not noise:
        assert s["forward_detections"] == s["output_detections"]  # a plain forward gives the same
    assert s["pasted_max_diff"] == 0  # the model's paste of the probe's masks is its output mask
    change = s["noise_change"]  # the configured noise: c5 only (tiny.yaml's bottom_up site)
    assert change["c5"] > 0.01 and change["c2"] == change["c3"] == change["c4"] == 0 and change["p5"] > 0
    assert set(s["feature_stats"]) == {"c2", "c3", "c4", "c5", "p2", "p3", "p4", "p5", "p6"}
    assert all(0 <= v["zeros"] < 1 and v["std"] > 0 for v in s["feature_stats"].values())
    assert set(s["rpn_recall"]) == {"0.5", "0.7"} and s["rpn_recall"]["0.5"] >= s["rpn_recall"]["0.7"]


@pytest.mark.parametrize("noise", [False, True], ids=["noise-off", "noise-on"])
def test_inspect_weights(noise, data_root, monkeypatch):
    s = run("inspect_weights", noise, data_root, monkeypatch)
    model = build_model(config(data_root, noise))
    params = {n for n, _ in model.named_parameters()}
    norm_buffers = {f"{m}.{b}" for m, mod in model.named_modules() if "BatchNorm" in type(mod).__name__
                    for b, t in mod.named_buffers(recurse=False) if t.is_floating_point()}
    assert norm_buffers and set(s["table_names"]) == params | norm_buffers  # every parameter and BN buffer
    assert len(s["table_names"]) == len(params | norm_buffers)  # each once
    assert not s["overflow"]
    # a fresh model's BatchNorm running means are constant (zeros): flagged; its conv weights are not
    assert "bottom_up.bn1.running_mean" in s["dead"] and "bottom_up.conv1.weight" not in s["dead"]
    stages = {"stem", "res2", "res3", "res4", "res5", "FPN", "RPN", "box head", "mask head"}
    # the histograms count every element of every weight tensor of a stage, not one slice
    assert sum(s["histogram_counts"].values()) == sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert set(s["grad_norms"]) == stages and all(0 < g < math.inf for g in s["grad_norms"].values())
    assert set(s["relative_change"]) == stages and all(r > 0 for r in s["relative_change"].values())
    assert len(s["step_losses"]) == 3 and all(math.isfinite(v) for v in s["step_losses"])


def test_inspect_model_on_a_checkpoint_and_image_files(data_root, tmp_path, monkeypatch):
    """A user's trained model (its checkpoint's own config) on their own image files (no ground truth)."""
    from maskrcnn.engine.checkpoint import config_to_yaml, save_checkpoint

    cfg = load_config(CONFIG, [f"data.root={data_root}", "model.roi_heads.detections_per_image=7"])
    model = build_model(cfg)
    path = tmp_path / "model_final.pth"
    save_checkpoint({"format": 2, "model": model.state_dict(), "config": config_to_yaml(cfg), "stage": "full",
                     "class_names": build_eval_dataset(cfg, "val").class_names}, path)
    files = sorted(str(p) for p in (Path(data_root) / "val").glob("*.png"))[:2]
    s = run("inspect_model", False, data_root, monkeypatch, config="None", checkpoint=repr(str(path)),
            images=repr(files))
    assert len(files) == 2 and s["rpn_recall"] is None and s["best_detection_iou"] == []  # no ground truth
    assert all(0 < counts[-1] <= 7 for counts in s["refinement_counts"])  # the checkpoint's config
    assert s["forward_detections"] == s["output_detections"] == [c[-1] for c in s["refinement_counts"]]
