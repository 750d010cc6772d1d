"""Every random stream of a training run, captured for a checkpoint and restored from one: python's, numpy's,
torch's CPU and CUDA generators, and the model's own generators (which the model gives and takes itself, through
its `rng_state()` / `set_rng_state()` methods, so the engine names no model class).

The state is weights-only (tensors, lists and tuples of ints), so a checkpoint loads with weights_only=True.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s RNGs after the model is built (rank 0 keeps the run's own stream)."""
    return int(np.random.SeedSequence([int(seed), int(rank), 0x5EED]).generate_state(1)[0])


def rng_state(model: torch.nn.Module) -> dict:
    """Every RNG the training loop draws from, as weights-only values (tensors, lists and tuples of ints)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    own = getattr(model, "rng_state", None)  # a model without generators of its own (a test's toy) has none
    return {"python": random.getstate(),
            "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            # Only when this process uses CUDA: get_rng_state_all() would initialise it.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "noise": own() if own is not None else {}}


def set_rng_state(state: dict, model: torch.nn.Module) -> list[str]:
    """Restore `rng_state`; returns what could not be restored (e.g. CUDA states on a CPU-only machine)."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    missing = []
    if state["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            missing.append(f"CUDA RNG of {len(state['cuda'])} device(s)")
    own = getattr(model, "set_rng_state", None)
    if own is not None:
        missing += own(state["noise"])
    else:
        missing += [f"the model's generator {n!r}" for n in state["noise"]]
    return missing
