"""The device a command runs on, from a name ("auto", "cpu", "cuda", "cuda:1"), and deterministic kernels."""
from __future__ import annotations

import os
import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device name that is not one of DEVICE_CHOICES, or a CUDA device this machine does not have: a user
    error, which the command-line tools print as one line (exit status 2)."""


def check_device_name(name: str) -> str:
    """`name` if it is auto, cpu, cuda or cuda:N (case and spaces ignored), else a DeviceError naming the choices."""
    text = str(name).strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise DeviceError(f"unknown device '{name}' (choose {DEVICE_CHOICES})")
    return text


def check_cuda(name: str) -> None:
    """A DeviceError unless the CUDA device `name` (cuda, cuda:N) exists on this machine."""
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name} asked for, but no CUDA device is available (choose auto or cpu)")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}; or auto, cpu)")


def select_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; an unknown name, or a CUDA name without that CUDA device, is a
    DeviceError (one line from the command-line tools)."""
    name = check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        check_cuda(name)
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
