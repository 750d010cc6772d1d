"""The per-stage profile (`python -m maskrcnn.bench_profile`): every stage of both models is timed (each hook
finds its module), a stage excludes the stages inside it, and the stages add up to the step."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maskrcnn import bench_profile as bp


def test_stage_timer_excludes_the_timed_stages_inside():
    """A planted model: outer sleeps 30 ms around an inner module that sleeps 50 ms."""
    class Inner(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            time.sleep(0.03)
            return self.inner(x)

    model = nn.Sequential(Outer())
    timer = bp.StageTimer(model, {"outer": ["0"], "inner": ["0.inner"]}, lambda: None)
    model(torch.zeros(1))
    timer.remove()
    assert timer.seconds["inner"] == pytest.approx(0.05, abs=0.02)
    assert timer.seconds["outer"] == pytest.approx(0.03, abs=0.02)
    model(torch.zeros(1))  # hooks removed: nothing more counted
    assert timer.seconds["inner"] < 0.08


def test_profile_times_every_stage_of_both_models(capsys):
    torch.set_num_threads(1)
    result = bp.main(["--size", "96", "96", "--batch", "1", "--repeats", "1", "--depth", "18"])
    for which in ("ours", "torchvision"):
        for kind in ("training", "inference"):
            row = result[which][kind]
            stages = [k for k in row if k != "total"]
            assert sum(row[k] for k in stages) == pytest.approx(row["total"], rel=1e-9)
            assert all(row[stage] > 0 for stage in bp.STAGES), (which, kind, row)  # every hook found its module
            assert ("backward" in row) == (kind == "training")
    printed = capsys.readouterr().out
    assert "\nCPU capability " in printed and "| mask head (convs + predictor) |" in printed
    # the arithmetic: the same architecture computes the same multiply-adds stage by stage (ours' BatchNorm folded,
    # torchvision's not: BatchNorm is no convolution), and the same detections reach both mask heads, where ours'
    # per-class predictor does less than torchvision's 91 maps
    ours, tv = result["arithmetic"]["ours"], result["arithmetic"]["torchvision"]
    for stage in ("bottom-up (ResNet)", "FPN", "RPN head (conv)", "box head (FCs + predictor)"):
        assert ours[stage] > 0 and ours[stage] == pytest.approx(tv[stage], rel=1e-9), stage
    assert 0.9 * tv["mask head (convs + predictor)"] < ours["mask head (convs + predictor)"] \
        < tv["mask head (convs + predictor)"]
    assert ours[bp.OTHER] == tv[bp.OTHER] == 0
    assert result["arithmetic"]["reference"]["gflop_per_s"] > 0
    assert "| mask head (convs + predictor) | " in printed.split("inference arithmetic")[1]
    assert "\nreference: a 3x3 convolution of the mask head's shape alone" in printed


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9, 7)),
    (nn.Conv2d(3, 8, (1, 3)), (1, 3, 6, 6)),
    (nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (3, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=1), (1, 4, 5, 5)),
    (nn.Linear(7, 5), (3, 2, 7)),
])
def test_layer_flops_agree_with_torchs_flop_counter(layer, shape):
    x = torch.randn(shape)
    with FlopCounterMode(display=False) as counter:
        out = layer(x)
    assert bp.layer_flops(layer, x, out) == counter.get_total_flops() > 0


def test_count_flops_puts_each_layer_in_its_innermost_stage():
    """outer holds a conv and the inner stage's linear; a layer outside every stage is "other"."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.outer = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Sequential(nn.Linear(64, 8)))
            self.loose = nn.Linear(8, 2)

        def forward(self, images):
            return self.loose(self.outer(torch.stack(images)))

    net = Net()
    images = [torch.rand(3, 6, 6)]
    gflop = bp.count_flops(net, {"outer": ["outer"], "inner": ["outer.2"]}, images)
    assert gflop["outer"] * 1e9 == pytest.approx(2 * (4 * 4 * 4) * 3 * 9, rel=1e-12)
    assert gflop["inner"] * 1e9 == pytest.approx(2 * 8 * 64, rel=1e-12)
    assert gflop[bp.OTHER] * 1e9 == pytest.approx(2 * 2 * 8, rel=1e-12)
    with FlopCounterMode(display=False) as counter:
        net(images)
    assert gflop["total"] * 1e9 == pytest.approx(counter.get_total_flops(), rel=1e-12)
    assert not any(m._forward_hooks for m in net.modules())  # the hooks are gone
    assert net.training  # and the mode is the one it had


def test_format_arithmetic_states_the_floor():
    """Ours' GFLOP at the reference rate, against torchvision's inference time."""
    stages = {"FPN": 1.0, bp.OTHER: 0.0}
    result = {"ours": {"inference": {"FPN": 10.0, bp.OTHER: 5.0, "total": 20.0}},
              "torchvision": {"inference": {"FPN": 20.0, bp.OTHER: 5.0, "total": 40.0}},
              "arithmetic": {"ours": dict(stages, FPN=1.0, total=1.0), "torchvision": dict(stages, FPN=1.0, total=1.0),
                             "reference": {"what": "a conv", "gflop": 1.0, "gflop_per_s": 100.0}}}
    lines = bp.format_arithmetic(result)
    assert "| FPN | 1.0 | 1.0 | 100 | 50 |" in lines
    assert not any(line.startswith(f"| {bp.OTHER}") for line in lines)  # no arithmetic there
    assert lines[-1] == ("reference: a conv: 100 GFLOP/s. Ours' 1 GFLOP at that rate: 10 ms, 0.25 of torchvision's "
                         "inference (40 ms)")


def test_one_step_bf16_runs_the_forward_under_autocast():
    """bf16=True: the forward of a training step and of an inference runs under bf16 autocast (a convolution gives
    bf16), the backward and the optimiser as usual; bf16=False: fp32. (A toy model: bf16 is emulated, slow, on a
    CPU without it.)"""
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.seen = []

        def forward(self, images, targets=None):
            out = self.conv(torch.stack(images))
            self.seen.append(out.dtype)
            return {"loss": out.float().square().mean()} if self.training else [{"out": out}]

    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        net = Toy()
        timer = bp.StageTimer(net, {"conv": ["conv"]}, lambda: None)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        before = net.conv.weight.detach().clone()
        for kind in ("training", "inference"):
            row = bp.one_step(net, kind, timer, opt, [torch.rand(3, 8, 8)], [{}], lambda: None, bf16)
            assert row["conv"] > 0 and ("backward" in row) == (kind == "training")
        assert net.seen == [dtype, dtype]
        assert net.conv.weight.dtype == torch.float32 and not torch.equal(net.conv.weight, before)  # a step taken


def test_profile_bf16_option_reaches_the_run(monkeypatch, capsys):
    seen = {}

    def fake_run(*args):
        seen["bf16"] = args[-1]
        return {"cpu": {"capability": "AVX2", "bf16_native": False, "evidence": "-"}, "settings": {}, "ours": {},
                "torchvision": {}}

    monkeypatch.setattr(bp, "run", fake_run)
    monkeypatch.setattr(bp, "format_table", lambda result: "")
    bp.main(["--bf16"])
    assert seen["bf16"] is True
    bp.main([])
    assert seen["bf16"] is False


def test_profile_bf16_is_a_cpu_option(capsys):
    with pytest.raises(SystemExit) as e:
        bp.main(["--bf16", "--device", "cuda"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_profile_wrong_out_path_is_one_line_before_anything_is_measured(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bp, "run", lambda *a, **k: pytest.fail("measured before checking --out"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        bp.main(["--out", str(tmp_path / "a_file" / "profile.json")])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
