"""Which precision a run uses (maskrcnn.model.precision.choose_precision): auto takes bf16 on a CPU only where
the CPU computes it natively, an explicit true runs with a one-line warning where it would be emulated, and on
CUDA mixed precision means fp16. The config keys take true, false or auto."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn.config import ConfigError, load_config
from maskrcnn.model import precision
from maskrcnn.model.precision import choose_precision, cpu_bf16_native, parse_setting

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction sets")


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_native(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (native, "CPU capability TEST"))
    p = choose_precision("cpu", "auto", "train.cpu_amp")
    assert p.autocast is native and p.name == ("bf16 autocast" if native else "fp32") and p.warning is None
    assert p.line().startswith(f"precision: {p.name} (train.cpu_amp=auto: ") and "CPU capability TEST" in p.line()
    if not native:
        assert "no native bfloat16" in p.reason
    forced = choose_precision("cpu", True, "train.cpu_amp")
    assert forced.autocast and forced.name == "bf16 autocast"
    assert (forced.warning is None) is native  # emulated: runs, with one line that says so
    if not native:
        assert forced.warning.startswith("warning: train.cpu_amp=true") and "\n" not in forced.warning
        assert "emulated" in forced.warning and "auto" in forced.warning
    off = choose_precision("cpu", False, "test.amp")
    assert not off.autocast and off.name == "fp32" and off.reason == "test.amp=false"


def test_cuda_mixed_precision_is_fp16_for_true_and_auto(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: pytest.fail("the CPU is not asked on CUDA"))
    for setting in (True, "auto"):
        p = choose_precision(torch.device("cuda"), setting, "train.amp")  # resolving needs no GPU
        assert p.autocast and p.name == "fp16 autocast" and p.warning is None


def test_settings_and_config_keys_take_true_false_auto():
    assert [parse_setting(v, "k") for v in (True, False, "auto", "true", "False", "AUTO")] == \
        [True, False, "auto", True, False, "auto"]
    with pytest.raises(ValueError, match="k: expected true, false or auto"):
        parse_setting("maybe", "k")
    for key in ("train.cpu_amp", "train.amp", "test.amp"):
        for value, expected in (("auto", "auto"), ("true", True), ("false", False)):
            section, name = key.split(".")
            assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == expected
        with pytest.raises(ConfigError, match=rf"{key}: expected true, false or auto, got 'bf16'"):
            load_config(None, [f"{key}=bf16"])
    shapes = load_config(ROOT / "configs" / "shapes.yaml")
    assert shapes.train.cpu_amp == "auto"  # the default preset chooses by CPU


def test_native_check_follows_pytorchs_own_checks():
    """Native needs ATen's AVX512 kernels, oneDNN's bf16 and (on x86) the chip's AVX-512 BF16 or AMX."""
    native, evidence = cpu_bf16_native()
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"CPU capability {capability}" in evidence
    if native and platform.machine().lower() in ("x86_64", "amd64"):
        assert capability.startswith("AVX512") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@x86
def test_a_cpu_limited_to_avx2_is_not_native_and_auto_is_fp32():
    """The stand-in for a CPU with AVX2 only (the variables `make test-avx2` sets): whatever this machine has,
    bf16 is then not native, auto picks fp32 and an explicit true warns."""
    code = ("import json; from maskrcnn.model.precision import choose_precision, cpu_bf16_native; "
            "a = choose_precision('cpu', 'auto', 'train.cpu_amp'); t = choose_precision('cpu', True, 'train.cpu_amp'); "
            "print(json.dumps([cpu_bf16_native()[0], a.name, t.name, t.warning]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **AVX2}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    native, auto, forced, warning = json.loads(out.stdout.strip().splitlines()[-1])
    assert native is False and auto == "fp32" and forced == "bf16 autocast"
    assert warning and "CPU capability AVX2" in warning
