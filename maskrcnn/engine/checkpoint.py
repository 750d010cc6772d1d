"""Checkpoints: safe to load, written atomically, pruned to the newest K; partial loading of a compatible
checkpoint into a model with a report of what was loaded, new or skipped.

A checkpoint is a dict of tensors and plain Python values only (the config as YAML text, the class names as
a list, RNG states as tensors, lists and tuples of ints), so it loads with `torch.load(weights_only=True)`,
which cannot run code. Every checkpoint is loaded that way; an older checkpoint of this project (which held
the config object) is converted once, explicitly:

    python -m maskrcnn.engine.checkpoint upgrade runs/old/model_final.pth --trust
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 2  # state["format"]: 2 = weights-only (config as YAML text); older checkpoints have no "format"
LAST = "last_checkpoint.pth"
NUMBERED = re.compile(r"model_(\d{7})\.pth")  # model_0005000.pth: the periodic checkpoint at iteration 5000


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, ...); the previous one is intact."""


def numbered_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


# ------------------------------------------------------------------------------------------------ saving
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def unsafe_entry(obj: Any, where: str = "checkpoint") -> str | None:
    """The first entry of `obj` that a weights-only load would refuse, e.g. "checkpoint['config'] (Config)";
    None when every value is a tensor or a plain Python value."""
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = unsafe_entry(k, f"{where} key") or unsafe_entry(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            bad = unsafe_entry(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically: a crash, a kill or a full disk leaves the previous file at `path`
    intact and no temporary file behind (the data is flushed to disk before the rename)."""
    bad = unsafe_entry(state)
    if bad:
        raise TypeError(f"{path}: {bad} would make the checkpoint unloadable with weights_only=True")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: the previous checkpoint stays intact until this line
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointWriteError(e.errno, f"could not write {path} ({e.strerror or e}); "
                                                f"the previous {path.name}, if any, is intact") from e
        raise


def link_checkpoint(source: Path, dest: Path) -> None:
    """Make `dest` the same file as `source` (a hard link: no second copy on disk; a copy where the file
    system has no hard links), atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(e.errno, f"could not write {dest} ({e.strerror or e}); "
                                            f"the previous {dest.name}, if any, is intact") from e


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` numbered checkpoints (model_<iter>.pth) of `run_dir`."""
    numbered = sorted((int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := NUMBERED.fullmatch(p.name)))
    removed = [p for _, p in numbered[:max(0, len(numbered) - keep)]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


# ----------------------------------------------------------------------------------------------- loading
def _upgrade_hint(path: Path) -> str:
    return f"if you trust it, convert it once with `python -m maskrcnn.engine.checkpoint upgrade {path} --trust`"


class UnreadableCheckpoint(ValueError):
    """The file is no PyTorch checkpoint at all (random bytes, a text file) or a truncated one (a copy or a
    download cut short): nothing can be recovered from it, not even with `upgrade --trust`."""

    def __init__(self, path: Path, reason: str = "not a PyTorch checkpoint file"):
        super().__init__(f"{path} could not be read ({reason})")
        self.path, self.reason = path, reason


class ObjectsInCheckpoint(ValueError):
    """A real PyTorch file holding Python objects (e.g. an older checkpoint of this project): weights-only
    loading refused it without running anything; `upgrade --trust` converts it."""


def _torch_file_header(path: Path) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, or (the legacy format) a pickle of protocol 2+."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True); UnreadableCheckpoint or ObjectsInCheckpoint (one line) when it fails."""
    with open(path, "rb") as f:  # a file that cannot be opened (permissions) says so itself
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # The weights-only unpickler refuses an object at its GLOBAL opcode ("Unsupported global: GLOBAL
            # posix.system ..."); any other refusal ("Unsupported operand 100") means bytes that are no pickle.
            # The header check keeps random bytes that happen to decode as a GLOBAL from being called a pickle.
            if "global" in str(e).lower() and _torch_file_header(path):
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                what = f"it holds a {found.group(1)} object" if found else "it holds Python objects"
                raise ObjectsInCheckpoint(f"{path}: not a weights-only checkpoint ({what}, which would need to "
                                          "run code to load); " + _upgrade_hint(path)) from None
            raise UnreadableCheckpoint(path) from None
        except OSError as e:
            if e.errno == errno.EIO:  # the disk, not the file
                raise
            raise UnreadableCheckpoint(path) from None  # a truncated zip can end in a seek past its end (EINVAL)
        except Exception:  # truncated zip ("failed finding central directory"), text (KeyError), empty (EOFError)
            raise UnreadableCheckpoint(path) from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint as a dict, loaded with weights_only=True (no code runs): "model" (a bare state dict is
    wrapped as {"model": ...}), and when present "config" (a Config), "class_names" (a list), "stage",
    "iteration", "optimizer", "scheduler", "scaler", "rng", "data", "history". A file that is no checkpoint or
    a truncated one is an UnreadableCheckpoint; one holding Python objects an ObjectsInCheckpoint (both
    ValueErrors with a one-line message)."""
    from ..config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _load_weights_only(path)
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(path, f"a PyTorch file holding a {type(state).__name__}, not a checkpoint dict")
    if "model" not in state:  # a bare state dict
        state = {"model": state}
    if isinstance(state.get("config"), str):
        try:
            state["config"] = config_from_yaml(state["config"])
        except ConfigError as e:
            raise ValueError(f"{path}: the config it holds does not fit this code ({e})") from None
    if state.get("class_names") is not None:
        state["class_names"] = list(state["class_names"])
    return state


def resume_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a run can continue from, in the order to try them: last_checkpoint.pth, then the numbered
    ones (model_<iter>.pth), newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    numbered = sorted(((int(m.group(1)), p) for p in run_dir.iterdir() if (m := NUMBERED.fullmatch(p.name))),
                      reverse=True)
    return [p for p in [run_dir / LAST] + [p for _, p in numbered] if p.is_file()]


def load_resume_checkpoint(run_dir: Path) -> tuple[Path, dict, str | None]:
    """(path, state, note) of the newest checkpoint of `run_dir` that can be read: last_checkpoint.pth, or when
    that is unreadable (truncated by a copy, overwritten) the newest numbered one that is; `note` is one line
    naming what was skipped and why, None when nothing was. No readable checkpoint: one UnreadableCheckpoint line
    naming them all. Any other problem (a checkpoint holding objects, a config that does not fit) is raised as is."""
    candidates = resume_candidates(run_dir)
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} to continue from ({LAST} or model_<iter>.pth)")
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except UnreadableCheckpoint as e:
            skipped.append(f"{path.name} ({e.reason})")
            continue
        note = (f"warning: --resume skipped unreadable {', '.join(skipped)}; continuing from {path} at iteration "
                f"{state.get('iteration')}") if skipped else None
        return path, state, note
    raise ValueError(f"--resume: no checkpoint of {run_dir} can be read: {', '.join(skipped)}")


def config_to_yaml(cfg) -> str:
    import yaml

    from ..config import config_to_dict
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_yaml(text: str):
    import yaml

    from ..config import config_from_dict
    return config_from_dict(yaml.safe_load(text) or {})


def _first_problem(error: RuntimeError) -> str:
    """load_state_dict's error in one line: its first specific problem (a size mismatch, missing or unexpected
    keys, cut at 200 characters) and how many there are, not only its header ("Error(s) in loading ...")."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    if not lines:
        return str(error).splitlines()[0]
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    return first + (f"; {len(lines) - 1} more problem(s)" if len(lines) > 1 else "")


# ------------------------------------------------------------------------------------- partial loading
def _unit(key: str) -> str:
    """The module a tensor belongs to in the --init report: bottom_up, fpn, rpn.head, roi_heads.box_head, ..."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("rpn", "roi_heads") and len(parts) > 2 else parts[0]


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    skipped: list[str] = field(default_factory=list)  # shape mismatch: "name (shape) -> (shape)"
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    def modules(self) -> dict[str, tuple[str, str]]:
        """Each module of the model (bottom_up, fpn, rpn.head, roi_heads.box_head, ...) -> (status, detail): "loaded"
        (every tensor), "partly loaded" (detail: "2 of 6 tensors; 4 shape mismatch"), "not loaded (shape mismatch)"
        (in the checkpoint, no tensor fits) or "new" (not in the checkpoint)."""
        counts: dict[str, dict[str, int]] = {}
        for kind, keys in (("loaded", self.loaded), ("shape mismatch", [k.split(" ")[0] for k in self.skipped]),
                           ("new", self.new)):
            for k in keys:
                c = counts.setdefault(_unit(k), {"loaded": 0, "shape mismatch": 0, "new": 0})
                c[kind] += 1
        out = {}
        for unit, c in sorted(counts.items()):
            total = sum(c.values())
            if c["loaded"] == total:
                out[unit] = ("loaded", "")
            elif c["loaded"]:
                why = ", ".join(f"{n} {kind}" for kind, n in c.items() if kind != "loaded" and n)
                out[unit] = ("partly loaded", f"{c['loaded']} of {total} tensors; {why}")
            else:
                out[unit] = ("not loaded (shape mismatch)" if c["shape mismatch"] else "new", "")
        return out

    def summary(self) -> str:
        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.new)} new, "
                 f"{len(self.skipped)} skipped (shape mismatch), {len(self.unused)} unused"]
        modules = self.modules()
        for status in ("loaded", "partly loaded", "not loaded (shape mismatch)", "new"):
            names = [f"{u} ({detail})" if detail else u for u, (st, detail) in modules.items() if st == status]
            if names:
                lines.append(f"  {status}: " + ", ".join(names))
        if self.skipped:
            more = len(self.skipped) - 8
            lines.append("  shape mismatch: " + ", ".join(self.skipped[:8])
                         + (f", ... ({more} more)" if more > 0 else ""))
        if self.unused:
            lines.append("  unused: " + ", ".join(sorted({_unit(k) for k in self.unused})))
        return "\n".join(lines)


def partial_load(model: nn.Module, source: str | Path | dict) -> LoadReport:
    """Load every tensor of `source` whose name and shape match the model; report the rest."""
    state = source if isinstance(source, dict) else load_checkpoint(source)["model"]
    report = LoadReport(str(source) if not isinstance(source, dict) else "state dict")
    own = model.state_dict()
    to_load = {}
    for k, v in state.items():
        if k not in own:
            report.unused.append(k)
        elif own[k].shape != v.shape:
            report.skipped.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
        else:
            to_load[k] = v
            report.loaded.append(k)
    report.new = [k for k in own if k not in state]
    model.load_state_dict(to_load, strict=False)
    return report


def model_from_checkpoint(path: str | Path, config: str | None = None, overrides: list[str] | None = None,
                          device: str = "cpu", fold_bn: bool = False):
    """(model in eval mode, config) from a training checkpoint. The checkpoint's own config is used unless
    `config` names a YAML file; `overrides` apply on top of either. `fold_bn`: for inference only, every BatchNorm
    folded into its convolution (`maskrcnn.model.fuse`) and, as test.channels_last and test.winograd say (auto: on
    a CPU where each was measured to gain, `fuse.prepare_inference`), the weights in channels-last memory format and
    the 3x3 convolutions computed by Winograd's F(2x2, 3x3): the same outputs to float rounding, faster."""
    from ..model.build import build_model
    from ..config import Config, apply_overrides, load_config

    state = load_checkpoint(path)
    if config is not None:
        cfg = load_config(config, overrides)
    elif isinstance(state.get("config"), Config):
        cfg = apply_overrides(state["config"], list(overrides or []))
    else:
        raise ValueError(f"{path}: the checkpoint holds no config; pass --config")
    cfg.stage = state.get("stage", cfg.stage)
    model = build_model(cfg, load_weights=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model built from the config ({_first_problem(e)})") from None
    model.class_names = state.get("class_names")  # index 0 is the background
    model = model.to(device).eval()
    if fold_bn:
        from ..model.fuse import prepare_inference
        model = prepare_inference(model, device, cfg.test.channels_last, cfg.test.winograd, inplace=True)
    return model, cfg


# ------------------------------------------------------------------------------- one-time conversion
def _plain(obj: Any, where: str) -> Any:
    """`obj` with numpy values turned into tensors / Python numbers; anything else unsafe is an error."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj  # tensors, plain values, state-dict OrderedDicts (checked by unsafe_entry afterwards)


def upgrade_state(state: Any, source: str) -> dict:
    """An older checkpoint (loaded with weights_only=False) in the weights-only format."""
    import dataclasses

    from ..config import Config

    if not isinstance(state, dict):
        raise ValueError(f"{source}: not a checkpoint dict ({type(state).__name__})")
    if "model" not in state:
        state = {"model": state}
    out = {}
    for key, value in state.items():
        if key == "config" and isinstance(value, Config):
            value = config_to_yaml(value)
        elif key == "config" and dataclasses.is_dataclass(value):
            raise ValueError(f"{source}: its config is a {type(value).__name__}, not this project's Config")
        elif key == "class_names" and value is not None:
            value = [str(v) for v in value]
        out[key] = _plain(value, f"checkpoint[{key!r}]")
    out["format"] = FORMAT
    bad = unsafe_entry(out)
    if bad:
        raise ValueError(f"{source}: cannot convert {bad} to a weights-only value")
    return out


def upgrade(path: str | Path, out: str | Path | None, trust: bool) -> Path:
    path = Path(path)
    out = Path(out) if out else path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        _load_weights_only(path)
        safe = True
    except ObjectsInCheckpoint:
        safe = False
    if safe:
        print(f"{path}: already a weights-only checkpoint, nothing to do")
        return path
    if not trust:
        raise ValueError(f"{path}: converting means loading it with pickle, which runs any code the file holds; "
                         "pass --trust only if you know where it came from (e.g. an older run of this project)")
    print(f"warning: loading {path} with weights_only=False: a malicious file could run code now", file=sys.stderr)
    state = upgrade_state(torch.load(path, map_location="cpu", weights_only=False), str(path))
    save_checkpoint(state, out)
    load_checkpoint(out)  # proof: it loads without running code
    print(f"{out}: weights-only checkpoint written ({len(state['model'])} tensors"
          f"{', config' if 'config' in state else ''}{', optimizer' if 'optimizer' in state else ''})")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m maskrcnn.engine.checkpoint",
                                description="Convert an older checkpoint of this project to the weights-only format.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="rewrite a checkpoint that needs code to load as a weights-only one")
    up.add_argument("checkpoint")
    up.add_argument("--trust", action="store_true",
                    help="load it with pickle (weights_only=False) once: only for a file you trust")
    up.add_argument("--out", help="where to write the converted checkpoint (default: in place)")
    args = p.parse_args(argv)
    from ..cli import one_line_errors
    with one_line_errors():
        upgrade(args.checkpoint, args.out, args.trust)


if __name__ == "__main__":
    from maskrcnn.engine.checkpoint import main as _main  # the importable module, so its exception classes match
    _main()
