"""What a newcomer meets first: the `python -m` tools name themselves as they are run, and a preset's data loader
workers fit the machine instead of making PyTorch warn."""
from __future__ import annotations

import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import maskrcnn.data.loader as loader_module
from maskrcnn.config import load_config
from maskrcnn.data.loader import build_loader, usable_workers

ROOT = Path(__file__).resolve().parents[1]


def command_line_modules() -> list[str]:
    """Every module of the package that runs as `python -m maskrcnn...`."""
    found = []
    for path in sorted((ROOT / "maskrcnn").rglob("*.py")):
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), flags=re.M):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_the_command_line_modules_are_found():
    assert {"maskrcnn.data.subset", "maskrcnn.data.check", "maskrcnn.bench"} <= set(command_line_modules())


@pytest.mark.parametrize("module", command_line_modules())
def test_help_names_the_command_as_run(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(ROOT / (module.replace(".", "/") + ".py")), "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
        with pytest.raises(SystemExit) as exc:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exc.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith(f"usage: python -m {module} "), usage


class _Items(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.zeros(3, 4, 4), {"index": i}


def test_workers_beyond_the_cpus_are_clamped_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(loader_module, "available_cpus", lambda: 1)
    assert usable_workers(0) == 0 and usable_workers(1) == 1
    assert capsys.readouterr().out == ""
    loader = build_loader(_Items(), 2, shuffle=True, num_workers=4, seed=0)
    out = capsys.readouterr().out.strip().splitlines()
    assert loader.loader.num_workers == 1
    assert out == ["data loader: 4 workers asked for (data.num_workers), this machine has 1 CPU(s) available: "
                   "using 1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert [t["index"] for _, targets in batches for t in targets] and not [
        w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_coco_preset_workers_fit_a_two_core_machine(monkeypatch, capsys):
    monkeypatch.setattr(loader_module, "available_cpus", lambda: 2)
    cfg = load_config("configs/coco_r50_fpn_1x.yaml")
    assert cfg.data.num_workers == 4  # the preset's, for a GPU machine
    assert usable_workers(cfg.data.num_workers) == 2 and "using 2" in capsys.readouterr().out


def test_available_cpus_is_what_pytorch_counts():
    assert loader_module.available_cpus() == (torch._utils.cpu_count() or 1)
