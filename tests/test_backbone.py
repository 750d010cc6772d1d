"""Tests for maskrcnn.model.backbone: outputs, freezing, FrozenBatchNorm2d, and loading weights offline."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from maskrcnn.model.backbone import FrozenBatchNorm2d, ResNetBottomUp, WeightsUnavailable, load_pretrained


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2).eval()


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return ResNetBottomUp(depth=50, norm="frozen_bn", freeze_at=2).eval()


@pytest.mark.parametrize("depth,channels", [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))])
def test_outputs_keys_channels_strides(depth, channels, request):
    net = request.getfixturevalue("r18" if depth == 18 else "r50")
    assert net.out_channels == dict(zip(("c2", "c3", "c4", "c5"), channels, strict=True))
    assert net.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = net(x)
    assert list(out) == ["c2", "c3", "c4", "c5"]
    for (name, t), c in zip(out.items(), channels, strict=True):
        s = net.strides[name]
        assert t.shape == (1, c, 64 // s, 96 // s), name


def test_bad_depth_and_norm():
    with pytest.raises(ValueError):
        ResNetBottomUp(depth=19)
    with pytest.raises(ValueError):
        ResNetBottomUp(depth=18, norm="layernorm")


def _frozen_names(net: nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_freeze_at_2_freezes_stem_and_res2(norm):
    net = ResNetBottomUp(depth=18, norm=norm, freeze_at=2)
    for name, p in net.named_parameters():
        top = name.split(".")[0]
        should_freeze = top in ("conv1", "bn1", "layer1")
        assert p.requires_grad != should_freeze, name
    assert any(n.startswith("layer1.") for n in _frozen_names(net))
    assert "conv1.weight" in _frozen_names(net)


def test_freeze_at_2_with_bn_keeps_frozen_stage_statistics():
    """A frozen stage computes the same function before and after a training-mode forward (detectron2
    converts the BatchNorm of frozen stages to FrozenBatchNorm2d)."""
    torch.manual_seed(0)
    net = ResNetBottomUp(depth=18, norm="bn", freeze_at=2)
    frozen_before = {k: v.clone() for k, v in net.state_dict().items() if k.split(".")[0] in ("bn1", "layer1")}
    net.train()
    net(torch.randn(2, 3, 32, 32) * 3 + 1)
    after = net.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), k


def test_freeze_at_0_nothing_frozen():
    net = ResNetBottomUp(depth=18, norm="bn", freeze_at=0)
    assert _frozen_names(net) == set()


def test_freeze_at_1_only_stem():
    net = ResNetBottomUp(depth=18, norm="bn", freeze_at=1)
    # the stem's BatchNorm became a FrozenBatchNorm2d (buffers only), so its conv is the one frozen parameter
    assert _frozen_names(net) == {"conv1.weight"}
    assert isinstance(net.bn1, FrozenBatchNorm2d)
    assert isinstance(net.layer1[0].bn1, torch.nn.BatchNorm2d)


def test_freeze_at_5_everything():
    net = ResNetBottomUp(depth=18, norm="bn", freeze_at=5)
    assert all(not p.requires_grad for p in net.parameters())


def test_frozen_bn_has_no_parameters(r18):
    assert isinstance(r18.bn1, FrozenBatchNorm2d)
    assert list(r18.bn1.parameters()) == []
    assert set(dict(r18.bn1.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}


def test_frozen_bn_equals_batchnorm_eval():
    torch.manual_seed(0)
    c = 6
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)
    bn.eval()
    frozen = FrozenBatchNorm2d(num_features=c)
    frozen.load_state_dict(bn.state_dict())  # includes num_batches_tracked, which must be accepted
    x = torch.randn(3, c, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-5, rtol=1e-5)
    # frozen stays frozen in train mode
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-5, rtol=1e-5)


def test_frozen_bn_no_grad_to_stats_but_grad_to_input():
    frozen = FrozenBatchNorm2d(num_features=3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad is not None
    assert all(not b.requires_grad for b in frozen.buffers())


# ------------------------------------------------------------------------------------ load_pretrained
def test_imagenet_loads_from_the_hub_cache(offline_hub):
    """The path once the file is in torch.hub's cache: a torchvision state dict (with its fc head) under a
    name carrying its hash, loaded weights-only."""
    torch.manual_seed(4)
    tv = torchvision.models.resnet18(weights=None)
    filename = offline_hub.place(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, tv.state_dict())
    net = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)
    desc = load_pretrained(net, "imagenet")
    assert filename in desc
    assert torch.equal(net.layer2[0].downsample[0].weight, tv.layer2[0].downsample[0].weight)
    assert torch.equal(net.layer1[0].bn2.running_mean, tv.layer1[0].bn2.running_mean)


def test_none_weights_is_noop(r18):
    before = {k: v.clone() for k, v in r18.state_dict().items()}
    assert "random" in load_pretrained(r18, "none")
    load_pretrained(r18, "")
    for k, v in r18.state_dict().items():
        assert torch.equal(v, before[k])


def test_local_path_loads(tmp_path):
    torch.manual_seed(1)
    src = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)
    with torch.no_grad():  # distinguishable buffers too
        for name, b in src.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    dst = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)
    assert not torch.equal(dst.conv1.weight, src.conv1.weight)
    desc = load_pretrained(dst, str(path))
    assert str(path) in desc
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_local_torchvision_resnet_state_dict_loads(tmp_path):
    """A torchvision ImageNet-style file (BatchNorm with num_batches_tracked, an fc head) loads key for key."""
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    dst = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)
    load_pretrained(dst, str(path))
    torch.testing.assert_close(dst.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
    torch.testing.assert_close(dst.bn1.running_var, tv.bn1.running_var)
    # same features as the torchvision trunk in eval mode
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(dst(x)["c5"], ref, atol=1e-4, rtol=1e-4)


def test_checkpoint_with_model_key_loads(tmp_path):
    src = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)
    load_pretrained(dst, str(path))
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_missing_path_raises(tmp_path, r18):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(r18, str(missing))
    assert str(missing) in str(info.value)


def test_wrong_depth_file_raises(tmp_path, r18, r50):
    path = tmp_path / "r50.pth"
    torch.save(r50.state_dict(), path)
    with pytest.raises(WeightsUnavailable):
        load_pretrained(r18, str(path))
