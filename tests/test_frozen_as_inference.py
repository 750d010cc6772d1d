"""train.frozen_as_inference (model/fuse.py: frozen_as_inference): the frozen stem and stages of the ResNet computed
as inference computes them in training, each FrozenBatchNorm2d inside its convolution and channels-last, what they
give back in the standard layout; the same features and gradients to float rounding, the same state dict."""
import pytest
import torch
from torch import nn

from maskrcnn.model.backbone import FrozenBatchNorm2d, ResNetBottomUp
from maskrcnn.model.fuse import FrozenBNConv2d, frozen_as_inference, prepare_inference, prepare_training
from maskrcnn.model.winograd import WinogradConv2d, winograd_convs


class Wrapper(nn.Module):  # what frozen_as_inference reads of a model: its bottom_up
    def __init__(self, freeze_at: int):
        super().__init__()
        torch.manual_seed(freeze_at)
        self.bottom_up = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=freeze_at)
        for m in self.bottom_up.modules():  # statistics that are not the identity, so a fold changes the weights
            if isinstance(m, FrozenBatchNorm2d):
                for name in ("weight", "bias", "running_mean"):
                    getattr(m, name).copy_(torch.randn_like(getattr(m, name)) * 0.2 + (name == "weight"))
                m.running_var.uniform_(0.5, 2.0)


def layouts(bottom_up: ResNetBottomUp) -> dict[str, bool]:
    """Whether each stage's input was channels-last in the last forward."""
    seen = {}
    for name in ("layer1", "layer2"):
        getattr(bottom_up, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].is_contiguous(memory_format=torch.channels_last)
                                                        and not args[0].is_contiguous()))
    return seen


@pytest.mark.parametrize("freeze_at", [1, 2, 3])
def test_same_features_and_gradients_standard_layout_out(freeze_at):
    plain, fast = Wrapper(freeze_at), Wrapper(freeze_at)
    fast.load_state_dict(plain.state_dict())
    keys = list(fast.state_dict())
    n = frozen_as_inference(fast, True, "cpu")
    assert n == {1: 1, 2: 5, 3: 10}[freeze_at]  # the stem's conv, then 2 blocks of 2 convs, then layer2's 4 + 1
    assert list(fast.state_dict()) == keys  # the same checkpoints
    folded = {name for name, m in fast.bottom_up.named_modules() if isinstance(m, FrozenBNConv2d)}
    assert all(name == "conv1" or name.split(".")[0] in ("layer1", "layer2")[:freeze_at - 1] for name in folded)
    seen = layouts(fast.bottom_up)
    x = torch.randn(2, 3, 64, 96)
    out_plain, out_fast = plain.bottom_up(x), fast.bottom_up(x)
    assert seen["layer1"] is (freeze_at >= 2) and seen["layer2"] is (freeze_at >= 3)  # frozen: channels-last
    for level in out_plain:
        assert out_fast[level].is_contiguous()  # what they give back: the standard layout
        torch.testing.assert_close(out_fast[level], out_plain[level], rtol=1e-4, atol=1e-4)
    sum(v.square().sum() for v in out_plain.values()).backward()
    sum(v.square().sum() for v in out_fast.values()).backward()
    grads = [(a, b) for a, b in zip(plain.parameters(), fast.parameters()) if a.requires_grad]
    assert grads
    # The same gradients to float rounding, but not element by element: the features differ by ~1e-6 relative, so
    # where a ReLU's input in a trained stage is within that of 0 it passes the gradient in one model and not in the
    # other, and the gradients upstream of it move (on AVX-512 a few to a few thousand elements past rtol 1e-3).
    # Per parameter, |grad - grad_plain| / |grad_plain| measured 4e-7 to 8.7e-4 (20 inputs x freeze_at 1-3, AVX-512
    # and the AVX2 variables, 1 and 2 threads): 1e-2 is 11x the worst; a wrong fold or a lost gradient is of order 1.
    for a, b in grads:
        assert ((b.grad - a.grad).norm() / a.grad.norm()).item() < 1e-2


def test_nothing_to_do_without_frozen_stages_or_where_not_measured(monkeypatch):
    model = Wrapper(0)
    assert frozen_as_inference(model, True, "cpu") == 0 and not model.bottom_up.frozen_channels_last
    model = Wrapper(2)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # ATen's scalar kernels
    assert frozen_as_inference(model, "auto", "cpu") == 0 and not model.bottom_up.frozen_channels_last
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert frozen_as_inference(model, False, "cpu") == 0
    assert frozen_as_inference(model, "auto", "cuda") == 0
    assert frozen_as_inference(model, "auto", "cpu") == 5 and model.bottom_up.frozen_channels_last
    # on a model in channels-last already (train.channels_last) only Winograd's choice is made
    model = Wrapper(2)
    assert prepare_training(model, "cpu", False, True, channels_last=True) == (0, 0)
    assert not model.bottom_up.frozen_channels_last


def test_winograd_convolutions_and_channels_last_inputs_keep_their_way():
    """A frozen stage's Winograd convolution is not folded (it computes its own way); an input in channels-last, or
    under autocast, runs as without the option (the model is in that layout already, or not in fp32)."""
    model = Wrapper(3)
    winograd_convs([model], min_channels=128)  # layer2's 3x3 convolutions (128 channels) stride 1
    assert frozen_as_inference(model, True, "cpu") == 7  # 10, less layer2's three Winograd convolutions
    assert sum(isinstance(m, WinogradConv2d) for m in model.bottom_up.layer2.modules()) == 3
    seen = layouts(model.bottom_up)
    with torch.no_grad():
        model.bottom_up(torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
        assert seen == {"layer1": True, "layer2": True}  # the model's own layout all along, none converted
        model.bottom_up(torch.randn(1, 3, 64, 64))
        assert seen == {"layer1": True, "layer2": True}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.bottom_up(torch.randn(1, 3, 64, 64))
        assert seen == {"layer1": False, "layer2": False}


def test_inference_chooses_its_own_layout():
    """prepare_inference folds everything and picks the layout for the whole model: the training option is off in
    what it gives back (else the frozen stages would hand the standard layout to a channels-last model)."""
    model = Wrapper(2)
    frozen_as_inference(model, True, "cpu")
    ready = prepare_inference(model, "cpu", channels_last=True, winograd=False)
    assert not ready.bottom_up.frozen_channels_last and model.bottom_up.frozen_channels_last
    assert not any(isinstance(m, (FrozenBNConv2d, FrozenBatchNorm2d)) and not isinstance(m, FrozenBatchNorm2d)
                   for m in ready.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ready.bottom_up(x)["c5"], model.bottom_up(x)["c5"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("choice, setting", [("auto", "auto"), ("never", False)])
def test_the_benchmark_measures_with_or_without_it(monkeypatch, choice, setting):
    """python -m maskrcnn.bench --frozen-as-inference auto|never: ours' training row with the option as chosen."""
    from maskrcnn import bench

    seen = []

    class Stop(Exception):
        pass

    def run(s, *args, **kwargs):
        seen.append(s.frozen_as_inference)
        raise Stop

    monkeypatch.setattr(bench, "run", run)
    with pytest.raises(Stop):
        bench.main(["--quick", "--device", "cpu", "--frozen-as-inference", choice])
    assert seen == [setting]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert prepare_training(Wrapper(2), "cpu", False, setting)[1] == (5 if setting else 0)
