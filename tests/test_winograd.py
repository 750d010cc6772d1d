"""Winograd's F(2x2, 3x3) convolution (maskrcnn/model/winograd.py) against F.conv2d, and the model it is put in."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.model.winograd import (WinogradConv2d, _Conv3x3, _window, conv3x3, eligible, filter_transform,
                                     weight_grad, winograd_convs)


def _rel_err(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("shape, k", [((2, 8, 10, 12), 6), ((1, 5, 7, 9), 3), ((3, 16, 1, 1), 4),
                                      ((2, 4, 2, 3), 5), ((1, 32, 14, 14), 32)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_conv2d(shape, k, channels_last, bias):
    """Even and odd sizes (an odd one computes one extra row or column and drops it), 1x1 maps, fewer or more
    output than input channels, either memory format, with and without a bias."""
    g = torch.Generator().manual_seed(sum(shape) + k)
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, shape[1], 3, 3, generator=g), (torch.randn(k, generator=g) if bias else None)
    ref = F.conv2d(x, w, b, padding=1)
    got = conv3x3(x, filter_transform(w), b)
    assert got.shape == ref.shape
    assert _rel_err(got, ref) < 1e-5  # float rounding: ~1e-6 seen; a wrong transform is off by O(1)


@pytest.mark.parametrize("tiles", [1, 3, 8, 100])
def test_chunks_of_images_and_bands_of_rows_give_the_same(tiles):
    """A chunk is whole images (an image with few tiles) or a band of tile rows of one image (a big one): every
    split computes the same convolution as one chunk."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 4, 9, 11, generator=g), torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, generator=g)
    u = filter_transform(w)
    torch.testing.assert_close(conv3x3(x, u, b, tiles_per_chunk=tiles), conv3x3(x, u, b, tiles_per_chunk=10_000))
    assert _rel_err(conv3x3(x, u, b, tiles_per_chunk=tiles), F.conv2d(x, w, b, padding=1)) < 1e-5


def test_big_maps_go_in_bands_of_half_a_chunk_and_rois_in_whole_chunks():
    """The measured split: a map with more tiles than a chunk goes in bands of its tile rows of at most half a
    chunk's tiles (P2 of a 512 px batch: 64 x 64 tiles -> bands of 8 rows), small maps (RoIs) in chunks of whole
    images up to a chunk's tiles; every tile is covered exactly once."""
    from maskrcnn.model.winograd import TILES_PER_CHUNK, _chunks

    def covered(n, th, tw, chunks):
        seen = torch.zeros(n, th, dtype=torch.int64)
        for i0, i1, r0, r1 in chunks:
            seen[i0:i1, r0:r1] += 1
        return bool((seen == 1).all())

    p2 = list(_chunks(2, 64, 64, TILES_PER_CHUNK))  # 2 images of 64 x 64 tiles
    assert {(i1 - i0, r1 - r0) for i0, i1, r0, r1 in p2} == {(1, TILES_PER_CHUNK // 2 // 64)} and covered(2, 64, 64, p2)
    p3 = list(_chunks(2, 32, 32, TILES_PER_CHUNK))  # an image of exactly one chunk's tiles goes in two bands
    assert len(p3) == 4 and covered(2, 32, 32, p3)
    rois = list(_chunks(200, 7, 7, TILES_PER_CHUNK))  # 200 RoIs of 14x14: 20 whole RoIs per chunk
    assert {(i1 - i0, r1 - r0) for i0, i1, r0, r1 in rois[:-1]} == {(TILES_PER_CHUNK // 49, 7)}
    assert covered(200, 7, 7, rois)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_chunks_window_is_the_padded_maps_slice(channels_last):
    """Each chunk pads only its own window (never the whole map): the window equals the slice of the map padded
    with zeros, at the borders and inside; where nothing is padded it is a view, else a copy in the map's layout."""
    x = torch.randn(3, 5, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    padded = F.pad(x, (2, 2, 2, 2)).permute(0, 2, 3, 1)  # [N, H + 4, W + 4, C]
    for i0, i1, top, rows, left, cols in [(0, 3, -1, 9, -1, 11), (1, 2, -1, 4, -1, 11), (0, 1, 4, 4, -1, 11),
                                          (2, 3, 2, 3, 0, 9), (0, 3, 0, 8, 0, 10), (1, 3, 5, 2, 3, 4)]:
        got = _window(x, i0, i1, top, rows, left, cols)
        assert torch.equal(got, padded[i0:i1, top + 2:top + 2 + rows, left + 2:left + 2 + cols])
    assert _window(x, 0, 2, 1, 4, 2, 5).data_ptr() == x[0:2, :, 1:, 2:].data_ptr()  # inside the map: a view
    copy = _window(x, 0, 2, -1, 4, 2, 5)
    assert copy.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert (copy.stride(-1) == 1) == channels_last  # a copy in the map's memory format


@pytest.mark.parametrize("tiles", [1, 3, 100])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_weights_gradient_over_chunks_is_the_convolutions(tiles, channels_last):
    """weight_grad over bands of rows and whole images, odd and even sizes: the gradient of F.conv2d's weight."""
    g = torch.Generator().manual_seed(2)
    for shape in [(2, 4, 9, 11), (3, 4, 8, 6)]:
        x, gy = torch.randn(shape, generator=g), torch.randn(shape[0], 3, *shape[2:], generator=g)
        if channels_last:
            x, gy = x.contiguous(memory_format=torch.channels_last), gy.contiguous(memory_format=torch.channels_last)
        w = torch.randn(3, shape[1], 3, 3, generator=g, requires_grad=True)
        F.conv2d(x, w, padding=1).backward(gy)
        assert _rel_err(weight_grad(x, gy, tiles_per_chunk=tiles), w.grad) < 1e-5


def test_the_module_with_autograd_gives_the_convolutions_gradients(monkeypatch):
    """With autograd the forward and backward run through Winograd's transforms (_Conv3x3): the output, the input's
    gradient and the weight's and bias's equal the plain convolution's to float rounding; in float64 they pass
    torch's gradcheck (finite differences)."""
    from maskrcnn.model import winograd

    monkeypatch.setattr(winograd, "MIN_TILES_WITH_AUTOGRAD", 0)  # these maps are small
    torch.manual_seed(0)
    conv, plain = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    keys = list(conv.state_dict())
    assert winograd_convs([conv]) == 1 and isinstance(conv, WinogradConv2d) and list(conv.state_dict()) == keys
    x = torch.randn(2, 8, 9, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = conv(x), plain(x2)
    assert y.grad_fn is not None and "Conv3x3" in type(y.grad_fn).__name__  # Winograd's, not the convolution's
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-4)
    # float64, odd sizes, chunks of 5 tiles (bands of rows within an image) and of whole images: the gradients by
    # finite differences
    xd = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)  # 2 x 3 x 4 tiles
    wd = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for tiles in (5, 12, 1024):
        monkeypatch.setattr(winograd, "TILES_PER_CHUNK", tiles)
        assert torch.autograd.gradcheck(lambda a, w, b: _Conv3x3.apply(a, w, b), (xd, wd, bd))
    # weight_grad on its own, chunked into single tiles
    torch.testing.assert_close(weight_grad(x.detach(), g, tiles_per_chunk=1), plain.weight.grad, rtol=1e-5,
                               atol=1e-4)


def test_the_module_without_autograd_caches_the_filter_transform():
    torch.manual_seed(0)
    conv, plain = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    winograd_convs([conv])
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)
        assert hasattr(conv, "_winograd_key")  # the filter transform was computed and kept
        conv.weight.mul_(2)  # a changed weight is transformed again
        plain.weight.mul_(2)
        torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)
        conv.train()  # training drops the cache (it would go stale and it holds 1.8x the weight's memory)
        assert not hasattr(conv, "_winograd_u") and not hasattr(conv, "_winograd_key")
        conv.eval()
        torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the plain convolution, bit for bit
            assert torch.equal(conv(x), plain(x))
        conv.double()  # other dtypes: the plain convolution, bit for bit
        assert torch.equal(conv(x.double()), F.conv2d(x.double(), conv.weight, conv.bias, padding=1))


def test_a_geometry_it_does_not_compute_or_an_unbatched_input_is_the_plain_convolution():
    for conv in (nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        plain = nn.Conv2d(4, 4, 3, stride=conv.stride, padding=conv.padding, padding_mode=conv.padding_mode)
        plain.load_state_dict(conv.state_dict())
        conv.__class__ = WinogradConv2d  # as if converted by hand
        with torch.no_grad():
            x = torch.randn(2, 4, 8, 8)
            assert torch.equal(conv(x), plain(x))
    conv = nn.Conv2d(4, 4, 3, padding=1)
    winograd_convs([conv])
    with torch.no_grad():
        torch.testing.assert_close(conv(torch.randn(4, 6, 6)).shape, torch.Size([4, 6, 6]))


def test_the_setting_is_true_false_or_auto():
    from maskrcnn.model.fuse import resolve_winograd

    assert resolve_winograd(False, "cpu") is False and resolve_winograd(True, "cuda") is True
    # (a string other than auto is an error: tests/test_checkpoint.py); the benchmark's and the profile's
    # --winograd never: off, whatever the CPU
    from maskrcnn.bench import Settings, winograd_setting

    assert resolve_winograd(winograd_setting("never"), "cpu") is False
    assert resolve_winograd(winograd_setting("auto"), "cpu") is resolve_winograd("auto", "cpu")
    assert Settings().winograd == "auto"


def test_a_training_step_of_a_model_gives_the_plain_losses_and_gradients(monkeypatch):
    """The tiny config's model, one training step with every eligible convolution by Winograd's (the tile rule
    lowered to 0: its maps are small) against the plain model from the same weights: the same losses and
    gradients to float rounding (measured: losses 3e-5 relative, the worst parameter 4e-3 of its gradient's
    largest element)."""
    import copy

    from maskrcnn.config import load_config
    from maskrcnn.model import winograd
    from maskrcnn.model.build import build_model

    monkeypatch.setattr(winograd, "MIN_TILES_WITH_AUTOGRAD", 0)
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["stage=full"])
    plain = build_model(cfg, load_weights=False).train()
    fast = copy.deepcopy(plain)
    assert winograd_convs([fast], min_channels=128) > 0
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 110.0, 80.0]])
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 12:70, 10:60] = 1
    masks[1, 20:80, 50:110] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks} for _ in images]
    results = []
    for model in (plain, fast):
        torch.manual_seed(1)  # the same sampling of anchors and RoIs
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (lp, gp), (lf, gf) = results
    for k in lp:
        torch.testing.assert_close(lf[k], lp[k], rtol=1e-3, atol=1e-5)
    assert gp.keys() == gf.keys()
    for n in gp:
        scale = gp[n].abs().max().item() + 1e-12
        assert (gf[n] - gp[n]).abs().max().item() <= 2e-2 * scale, n


def test_only_plain_3x3_stride1_convolutions_with_enough_channels_are_chosen():
    assert eligible(nn.Conv2d(256, 256, 3, padding=1), 128)
    assert not eligible(nn.Conv2d(64, 64, 3, padding=1), 128)  # measured slower at 64 channels
    assert not eligible(nn.Conv2d(256, 256, 3, stride=2, padding=1))
    assert not eligible(nn.Conv2d(256, 256, 1))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=2, dilation=2))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=1, groups=2))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=0))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect"))


def test_the_model_gives_the_same_detections():
    """The benchmark's model (ResNet-18 at 128 px, seeded weights: its 100 detections per image) with and without
    Winograd's convolutions, both BatchNorm-folded and channels-last as inference runs them: the same detections
    to float rounding."""
    from maskrcnn import bench
    from maskrcnn.model.fuse import prepare_inference

    s = bench.Settings(height=128, width=128, depth=18)
    state = bench.seeded_state(s)
    ours, _ = bench.load_pair(s, state)
    images, _ = bench.make_batch(s)
    plain = prepare_inference(ours, "cpu", channels_last=True, winograd=False).eval()
    fast = prepare_inference(ours, "cpu", channels_last=True, winograd=True).eval()
    assert sum(isinstance(m, WinogradConv2d) for m in fast.modules()) > 0
    with torch.no_grad():
        a, b = plain(images), fast(images)
    for x, y in zip(a, b):
        assert len(x["scores"]) > 10 and torch.equal(x["labels"], y["labels"])
        torch.testing.assert_close(y["scores"], x["scores"], rtol=0, atol=1e-3)
        # box regression amplifies the features' rounding; seen 0.03 px on 512 px images
        torch.testing.assert_close(y["boxes"], x["boxes"], rtol=0, atol=0.25)
        torch.testing.assert_close(y["masks"], x["masks"], rtol=0, atol=1e-3)


def test_with_autograd_small_maps_keep_the_plain_convolution(monkeypatch):
    """With autograd, Winograd pays a filter transform per call and a weight gradient that grows with the channels,
    not the tiles: below MIN_TILES_WITH_AUTOGRAD tiles (images x 2x2 blocks) the plain convolution is faster and
    is used; without autograd (the transform cached) every size is Winograd's."""
    from maskrcnn.model import winograd

    conv = nn.Conv2d(4, 4, 3, padding=1)
    winograd_convs([conv])
    monkeypatch.setattr(winograd, "MIN_TILES_WITH_AUTOGRAD", 2 * 3 * 3)
    small, big = torch.randn(2, 4, 5, 4, requires_grad=True), torch.randn(2, 4, 6, 6, requires_grad=True)  # 12, 18
    assert "Conv3x3" not in type(conv(small).grad_fn).__name__
    assert "Conv3x3" in type(conv(big).grad_fn).__name__
    with torch.no_grad():
        conv(small.detach())
    assert hasattr(conv, "_winograd_key")


def test_the_trainer_uses_it_as_train_winograd_says(tmp_path):
    """train.winograd: true turns the 3x3 convolutions of 128 channels or more (the tiny config's ResNet-18 layer2-4)
    into WinogradConv2d, false leaves none, auto follows the CPU."""
    from maskrcnn.config import load_config
    from maskrcnn.engine.trainer import Trainer
    from maskrcnn.model.fuse import resolve_winograd

    for setting in ("true", "false", "auto"):
        cfg = load_config("configs/tiny.yaml", ["stage=rpn", f"train.winograd={setting}", "solver.max_iter=1",
                                                f"train.output_dir={tmp_path}", "train.device=cpu",
                                                "train.eval_at_end=false"])
        model = Trainer(cfg, tmp_path / setting, progress=False).model
        n = sum(isinstance(m, WinogradConv2d) for m in model.modules())
        assert (n > 0) == (setting == "true" or (setting == "auto" and resolve_winograd("auto", "cpu"))), setting
        assert all(min(m.in_channels, m.out_channels) >= 128 for m in model.modules() if isinstance(m, WinogradConv2d))
