"""Mixed precision helpers: which precision a run uses, and the few places that must stay fp32 under autocast
(CPU bfloat16, CUDA float16).

Which precision: `choose_precision(device, setting, key)` turns a config value (true, false or "auto") into a
`Precision`. On CUDA, autocast means fp16. On a CPU it means bf16, which is fast only where the processor
computes bfloat16 natively (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm): elsewhere PyTorch emulates
it, correct but 7-16x slower than fp32. So "auto" takes bf16 only where `cpu_bf16_native()` says so and fp32
elsewhere, and an explicit true on such a CPU runs with a warning.

Under `torch.autocast` the convolutions and matmuls run in the low-precision dtype; what comes out of them is
rounded to 8 (bf16) or 11 (fp16) significant bits. That is harmless for features, but not for the numbers
that become pixel coordinates or rankings: box deltas (a bf16 dw of 1.0 is only known to +-0.004, i.e. 2 px
on a 500 px box), objectness logits (bf16 ties reorder the top-k before NMS), and the mask pasting matmuls
(bf16 mask probabilities thresholded at 0.5). Those small prediction layers run in fp32 through `fp32`,
and the post-processing in `full_precision` blocks.
"""
from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from typing import Optional, Union

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


def cast_as_autocast(x: Tensor) -> Tensor:
    """x contiguous and, under autocast, an fp32 x in autocast's dtype (as a matmul would cast it): one pass
    instead of a layout copy followed by autocast's cast (the box head's channels-last RoI features: its forward
    1.35x faster under bf16 autocast, 1024 RoIs on an AVX-512 BF16 CPU). The same values either way."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device_type), memory_format=torch.contiguous_format)
    return x.contiguous()


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's dtype: fp16 on CUDA (with a grad scaler in training), bf16 on a CPU (fast on processors
    with AVX-512 BF16 or AMX; the model keeps boxes, rankings, losses and masks in fp32)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """torch.autocast with autocast_dtype(device), or a no-op when not enabled."""
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device), enabled=enabled)


def precision_name(device: torch.device, enabled: bool) -> str:
    return f"{'fp16' if device.type == 'cuda' else 'bf16'} autocast" if enabled else "fp32"


# ------------------------------------------------------------------------------------ which precision
def _probe(fn_name: str, owner) -> Optional[bool]:
    """One of PyTorch's private CPU-feature checks, or None where this build has no such function."""
    fn = getattr(owner, fn_name, None)
    try:
        return bool(fn()) if fn is not None else None
    except Exception:  # an op missing from this build
        return None


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and the evidence in words. PyTorch's own checks:

    - the ATen kernels' instruction set (`torch.backends.cpu.get_cpu_capability()`, which ATEN_CPU_CAPABILITY
      lowers): below AVX512 ATen's bf16 kernels convert every element to fp32 and back;
    - oneDNN's bf16 support (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`, which ONEDNN_MAX_CPU_ISA lowers):
      the convolutions and matmuls;
    - on x86 the instructions themselves (cpuinfo: AVX-512 BF16 or AMX), since oneDNN also says yes on plain
      AVX-512, where it emulates bf16 with fp32 arithmetic.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = _probe("_is_mkldnn_bf16_supported", torch.ops.mkldnn)
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        avx512_bf16 = _probe("_is_avx512_bf16_supported", torch.cpu)
        amx = _probe("_is_amx_tile_supported", torch.cpu)
        instructions = [n for n, ok in (("AVX-512 BF16", avx512_bf16), ("AMX", amx)) if ok]
        native = bool(instructions) and bool(onednn) and capability.startswith("AVX512")
        evidence = (f"CPU capability {capability}, oneDNN bf16: {'yes' if onednn else 'no'}, the chip's bf16 "
                    f"instructions: {' and '.join(instructions) or 'none'}")
    else:  # Arm and others: oneDNN's check is the instruction check (the BF16 extension)
        native = bool(onednn)
        evidence = f"{machine}, CPU capability {capability}, oneDNN bf16: {'yes' if onednn else 'no'}"
    return native, evidence


Setting = Union[bool, str]  # true, false or "auto" (the config's train.cpu_amp, test.amp; evaluate.py --amp)


@dataclass(frozen=True)
class Precision:
    """The precision a run uses: autocast on or off, what that means on its device, and why."""
    autocast: bool
    name: str  # "bf16 autocast", "fp16 autocast" or "fp32"
    reason: str  # one line: the setting and what it was resolved from
    warning: Optional[str] = None  # one line when the choice is slow on this machine (explicit bf16, emulated)

    def line(self) -> str:
        return f"precision: {self.name} ({self.reason})"

    def as_dict(self) -> dict:
        return {"name": self.name, "autocast": self.autocast, "reason": self.reason}


def parse_setting(value: Setting, key: str) -> Setting:
    """true / false / "auto" (also as the strings "true" / "false" of a command line) or a ValueError."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("true", "false", "auto"):
        return {"true": True, "false": False}.get(text, "auto")
    raise ValueError(f"{key}: expected true, false or auto, got {value!r}")


def training_precision(train_cfg, device: torch.device | str, setting: Optional[Setting] = None,
                       key: str = "--amp") -> Precision:
    """The precision of training on `device`: `setting` (named `key`) where given, else the config's train.amp
    on CUDA and train.cpu_amp on a CPU (`train_cfg` is the config's train section)."""
    device = torch.device(device)
    if setting is not None:
        return choose_precision(device, setting, key)
    if device.type == "cuda":
        return choose_precision(device, train_cfg.amp, "train.amp")
    return choose_precision(device, train_cfg.cpu_amp, "train.cpu_amp")


def choose_precision(device: torch.device | str, setting: Setting, key: str) -> Precision:
    """Resolve `setting` (the value of config key `key`) on `device`: on CUDA autocast means fp16 (true and
    auto alike); on a CPU bf16, which auto takes only where cpu_bf16_native() is true."""
    device = torch.device(device)
    setting = parse_setting(setting, key)
    if setting is False:
        return Precision(False, "fp32", f"{key}=false")
    low = precision_name(device, True)
    if device.type != "cpu":
        return Precision(True, low, f"{key}={str(setting).lower()} on {device.type}")
    native, evidence = cpu_bf16_native()
    if setting == "auto":
        if native:
            return Precision(True, low, f"{key}=auto: this CPU computes bfloat16 natively; {evidence}")
        return Precision(False, "fp32", f"{key}=auto: no native bfloat16 on this CPU (bf16 would be emulated, "
                                        f"several times slower than fp32); {evidence}")
    if native:
        return Precision(True, low, f"{key}=true; {evidence}")
    return Precision(True, low, f"{key}=true on a CPU without native bfloat16; {evidence}",
                     warning=f"warning: {key}=true on a CPU without native bfloat16 ({evidence}): bf16 is emulated "
                             f"here, correct but 7-16x slower than fp32; {key}=auto chooses fp32 on this CPU")
