"""The device a command runs on, from a name ("auto", "cpu", "cuda", "cuda:1")."""
from __future__ import annotations

import torch


def select_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; a CUDA name without a CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} asked for, but no CUDA device is available (use auto or cpu)")
    return torch.device(name)
