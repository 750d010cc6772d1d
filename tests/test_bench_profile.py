"""The per-stage profile (`python -m maskrcnn.bench_profile`): every stage of both models is timed (each hook
finds its module), a stage excludes the stages inside it, and the stages add up to the step."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from maskrcnn import bench_profile as bp


def test_stage_timer_excludes_the_timed_stages_inside():
    """A planted model: outer sleeps 30 ms around an inner module that sleeps 50 ms."""
    class Inner(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            time.sleep(0.03)
            return self.inner(x)

    model = nn.Sequential(Outer())
    timer = bp.StageTimer(model, {"outer": ["0"], "inner": ["0.inner"]}, lambda: None)
    model(torch.zeros(1))
    timer.remove()
    assert timer.seconds["inner"] == pytest.approx(0.05, abs=0.02)
    assert timer.seconds["outer"] == pytest.approx(0.03, abs=0.02)
    model(torch.zeros(1))  # hooks removed: nothing more counted
    assert timer.seconds["inner"] < 0.08


def test_profile_times_every_stage_of_both_models(capsys):
    torch.set_num_threads(1)
    result = bp.main(["--size", "96", "96", "--batch", "1", "--repeats", "1", "--depth", "18"])
    for which in ("ours", "torchvision"):
        for kind in ("training", "inference"):
            row = result[which][kind]
            stages = [k for k in row if k != "total"]
            assert sum(row[k] for k in stages) == pytest.approx(row["total"], rel=1e-9)
            assert all(row[stage] > 0 for stage in bp.STAGES), (which, kind, row)  # every hook found its module
            assert ("backward" in row) == (kind == "training")
    printed = capsys.readouterr().out
    assert "\nCPU capability " in printed and "| mask head (convs + predictor) |" in printed
