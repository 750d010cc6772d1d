"""maskrcnn.engine.rng: a checkpoint's RNG state, captured and restored. The model gives and takes its own
generators' state (MaskRCNN.rng_state / set_rng_state, LatentNoise's seeded streams), so the engine names no model
class; a model without generators of its own (a test's toy module) has none to give."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskrcnn.config import load_config
from maskrcnn.engine.rng import rng_state, set_rng_state
from maskrcnn.model.build import build_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def draws(model) -> list:
    x = torch.ones(1, 4, 3, 3)
    return [random.random(), float(np.random.rand()), float(torch.rand(())),
            model.noise({"c5": x})["c5"].flatten().tolist()]


def test_every_stream_continues_where_it_was_captured():
    cfg = load_config(CONFIG, ["stage=rpn", "model.backbone.weights=none", "model.noise.enabled=true",
                               "model.noise.seed=3"])
    model = build_model(cfg, load_weights=False).train()
    draws(model)  # the noise generator exists and has moved
    state = rng_state(model)
    assert set(state["noise"]) == {"noise"} and set(state["noise"]["noise"]) == {"cpu"}
    expected = draws(model)
    assert set_rng_state(state, model) == []
    assert draws(model) == expected  # python, numpy, torch and the model's own noise stream alike
    other = build_model(cfg, load_weights=False).train()  # a fresh model: its noise restarts from the seed
    set_rng_state(state, other)
    assert draws(other) == expected


def test_generators_the_model_lacks_are_reported():
    cfg = load_config(CONFIG, ["stage=rpn", "model.backbone.weights=none", "model.noise.enabled=true",
                               "model.noise.seed=3"])
    model = build_model(cfg, load_weights=False)
    state = rng_state(model)
    state["noise"]["elsewhere"] = {}
    assert set_rng_state(state, model) == ["LatentNoise generator 'elsewhere'"]
    toy = nn.Linear(2, 2)  # no generators of its own: gives none, and says which it cannot take
    assert rng_state(toy)["noise"] == {}
    assert set_rng_state(state, toy) == ["the model's generator 'noise'", "the model's generator 'elsewhere'"]
