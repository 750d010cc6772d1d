"""The device a command runs on, from a name ("auto", "cpu", "cuda", "cuda:1"), and deterministic kernels."""
from __future__ import annotations

import os

import torch


def select_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; a CUDA name without a CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} asked for, but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def use_deterministic_algorithms() -> str:
    """Deterministic kernels for the rest of the process (train.deterministic), so that a resumed CUDA run repeats
    the uninterrupted one as a CPU run does: PyTorch's deterministic algorithms (an op that has none warns, once,
    naming itself), deterministic cuDNN without autotuning, and the cuBLAS workspace setting that makes its
    matmuls repeatable (it must be set before cuBLAS starts: here, before the model meets the GPU). Returns the
    line that says so."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return ("train.deterministic: deterministic algorithms (cuDNN deterministic, no autotuning, "
            f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}); a CUDA op without a deterministic "
            "version warns once")
