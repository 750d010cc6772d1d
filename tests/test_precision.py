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


X86_CASES = [  # (ATen capability, oneDNN bf16, AVX-512 BF16, AMX) -> native
    (("AVX512", True, True, False), True),
    (("AVX512", True, False, True), True),
    (("AVX512", True, False, False), False),  # plain AVX-512: oneDNN says yes, but emulates bf16
    (("AVX2", True, True, True), False),  # ATen limited to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    (("AVX512", False, True, True), False),  # oneDNN limited (ONEDNN_MAX_CPU_ISA=AVX2)
    (("AVX512", None, True, False), False),  # a build without oneDNN's check
    (("AVX512", True, None, None), False),  # a build without the instruction checks
]


def _fake_cpu(monkeypatch, machine: str, capability: str, onednn, avx512_bf16=None, amx=None) -> list[str]:
    """cpu_bf16_native's inputs replaced by the given answers; returns the names of the checks it asked."""
    asked = []
    answers = {"_is_mkldnn_bf16_supported": onednn, "_is_avx512_bf16_supported": avx512_bf16,
               "_is_amx_tile_supported": amx}

    def probe(name, owner):
        asked.append(name)
        return answers[name]

    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_probe", probe)
    return asked


@pytest.mark.parametrize("case", X86_CASES, ids=lambda c: "-".join(map(str, c[0])))
def test_native_on_x86_needs_avx512_kernels_onednn_and_the_instructions(monkeypatch, case):
    """The rule on any CPU, both ways: native needs ATen's AVX512 kernels, oneDNN's bf16 and the chip's AVX-512
    BF16 or AMX; the evidence names each."""
    (capability, onednn, avx512_bf16, amx), expected = case
    asked = _fake_cpu(monkeypatch, "x86_64", capability, onednn, avx512_bf16, amx)
    native, evidence = cpu_bf16_native()
    assert native is expected
    assert set(asked) == {"_is_mkldnn_bf16_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"}
    assert evidence.startswith(f"CPU capability {capability}, oneDNN bf16: {'yes' if onednn else 'no'}, ")
    named = [n for n, ok in (("AVX-512 BF16", avx512_bf16), ("AMX", amx)) if ok]
    assert evidence.endswith(f"the chip's bf16 instructions: {' and '.join(named) or 'none'}")
    # and what a run does with it: auto follows native, an explicit true warns only where emulated
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (native, evidence))
    assert choose_precision("cpu", "auto", "train.cpu_amp").autocast is expected
    assert (choose_precision("cpu", True, "train.cpu_amp").warning is None) is expected


@pytest.mark.parametrize("onednn, expected", [(True, True), (False, False), (None, False)])
def test_native_on_arm_is_onednns_check(monkeypatch, onednn, expected):
    asked = _fake_cpu(monkeypatch, "aarch64", "DEFAULT", onednn)
    native, evidence = cpu_bf16_native()
    assert native is expected and asked == ["_is_mkldnn_bf16_supported"]
    assert evidence == f"aarch64, CPU capability DEFAULT, oneDNN bf16: {'yes' if onednn else 'no'}"


def test_native_check_follows_pytorchs_own_checks():
    """On this machine, with PyTorch's real checks, whichever way the answer goes: native exactly when (on x86)
    ATen's kernels are AVX512, oneDNN's bf16 is there and the chip has AVX-512 BF16 or AMX."""
    native, evidence = cpu_bf16_native()
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"CPU capability {capability}" in evidence
    onednn = precision._probe("_is_mkldnn_bf16_supported", torch.ops.mkldnn)
    if platform.machine().lower() in ("x86_64", "amd64"):
        instructions = (precision._probe("_is_avx512_bf16_supported", torch.cpu)
                        or precision._probe("_is_amx_tile_supported", torch.cpu))
        assert native is bool(capability.startswith("AVX512") and onednn and instructions), evidence
    else:
        assert native is bool(onednn), evidence


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
