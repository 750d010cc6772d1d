"""Mixed precision helpers: the few places that must stay fp32 under autocast (CPU bfloat16, CUDA float16).

Under `torch.autocast` the convolutions and matmuls run in the low-precision dtype; what comes out of them is
rounded to 8 (bf16) or 11 (fp16) significant bits. That is harmless for features, but not for the numbers
that become pixel coordinates or rankings: box deltas (a bf16 dw of 1.0 is only known to +-0.004, i.e. 2 px
on a 500 px box), objectness logits (bf16 ties reorder the top-k before NMS), and the mask pasting matmuls
(bf16 mask probabilities thresholded at 0.5). Those small prediction layers run in fp32 through `fp32`,
and the post-processing in `full_precision` blocks.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A block where autocast is off on `device` (no-op context when autocast is not enabled there)."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fp32(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) computed in fp32 even under autocast (weights fp32, input upcast). Outside autocast it is
    exactly layer(x). Used for the small prediction layers whose outputs are boxes and ranking scores."""
    if not torch.is_autocast_enabled(x.device.type):
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's dtype: fp16 on CUDA (with a grad scaler in training), bf16 on a CPU (fast on processors
    with AVX-512 BF16 or AMX; the model keeps boxes, rankings, losses and masks in fp32)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """torch.autocast with autocast_dtype(device), or a no-op when not enabled."""
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device), enabled=enabled)


def precision_name(device: torch.device, enabled: bool) -> str:
    return f"{'fp16' if device.type == 'cuda' else 'bf16'} autocast" if enabled else "fp32"
