"""Checkpoints: atomic saving (a crash never leaves a half-written file), loading, and partial loading
of a compatible checkpoint into a model with a report of what was loaded, new or skipped."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: the previous checkpoint stays intact until this line


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our checkpoints hold the config dataclass, so they are not weights-only pickles.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    if "model" not in state:  # a bare state dict
        state = {"model": state}
    return state


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    skipped: list[str] = field(default_factory=list)  # shape mismatch
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    @staticmethod
    def _modules(keys: list[str], depth: int = 2) -> list[str]:
        return sorted({".".join(k.split(".")[:depth]) for k in keys})

    def summary(self) -> str:
        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.new)} new, "
                 f"{len(self.skipped)} skipped (shape mismatch), {len(self.unused)} unused"]
        if self.loaded:
            lines.append("  loaded: " + ", ".join(self._modules(self.loaded)))
        if self.new:
            lines.append("  new:    " + ", ".join(self._modules(self.new)))
        if self.skipped:
            lines.append("  skipped: " + ", ".join(self.skipped))
        if self.unused:
            lines.append("  unused: " + ", ".join(self._modules(self.unused)))
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
                          device: str = "cpu"):
    """(model in eval mode, config) from a training checkpoint. The checkpoint's own config is used unless
    `config` names a YAML file; `overrides` apply on top of either."""
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
        first = str(e).splitlines()[0]
        raise ValueError(f"{path}: weights do not fit the model built from the config ({first})") from None
    model.class_names = state.get("class_names")  # index 0 is the background
    return model.to(device).eval(), cfg
