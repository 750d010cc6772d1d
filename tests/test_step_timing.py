"""maskrcnn.engine.step.time_training_steps: the first-day report's seconds per iteration, measured on the
trainer's own step with the run's optimiser (a fake clock makes the median and the warm-up exact)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from maskrcnn.config import load_config
from maskrcnn.engine import step


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, images, targets):
        return {"loss_cls": (self.w * images[0].mean()).sum()}


class Clock:
    """perf_counter for time_training_steps: each step takes the next of `durations` seconds."""

    def __init__(self, durations):
        self.times = iter(itertools.accumulate(d for s in durations for d in (0.0, s)))

    def perf_counter(self):
        return next(self.times)


def test_median_of_the_steps_after_the_warm_up(monkeypatch):
    cfg = load_config("configs/tiny.yaml")
    model = Tiny()
    batches = itertools.repeat(([torch.ones(3, 4, 4)], [{}]))
    monkeypatch.setattr(step, "time", Clock([10.0, 1.0, 4.0, 2.0]))  # the warm-up step (10 s) is not counted
    ticks = []
    seconds, precision = step.time_training_steps(cfg, model, batches, 3, tick=lambda: ticks.append(1))
    assert seconds == 2.0 and len(ticks) == 4
    assert precision.name == "fp32" and not precision.autocast  # configs/tiny.yaml: train.cpu_amp=false
    assert model.training and (model.w.detach() < 1).all()  # the run's optimiser updated the weights


def test_at_least_one_timed_step():
    with pytest.raises(ValueError, match="n must be >= 1"):
        step.time_training_steps(load_config("configs/tiny.yaml"), Tiny(), [], 0)
