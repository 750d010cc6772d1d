"""Tests for maskrcnn.model.roi_align against torchvision and a from-the-definition reference."""

import math

import pytest
import torch
import torchvision

from maskrcnn.model.roi_align import roi_align

ATOL = 1e-5


def make_boxes(num_images, H, W, gen, k_random=24):
    """Tensor[K, 5] (batch idx, x1, y1, x2, y2) in image pixels covering the edge cases:
    normal, partly / wholly outside the map, sub-pixel, larger than the map,
    zero-size and inverted (x2 < x1) boxes."""
    fixed = [
        [0, 1.0, 1.0, 6.0, 5.0],  # ordinary
        [0, -3.0, -2.0, 4.0, 3.0],  # partly outside (top-left)
        [0, W - 3.0, H - 2.5, W + 4.0, H + 3.0],  # partly outside (bottom-right)
        [0, W + 2.0, 1.0, W + 6.0, 5.0],  # wholly outside: right of the map
        [0, -9.0, -9.0, -2.5, -1.5],  # wholly outside: above-left, beyond the -1 margin
        [0, -1.8, 2.0, -0.6, 4.0],  # inside the 1-pixel margin on the left
        [0, 2.3, 3.1, 2.6, 3.3],  # tiny (sub-pixel)
        [0, 4.0, 4.0, 4.0, 4.0],  # zero size
        [0, -2.0 * W, -1.5 * H, 2.5 * W, 2.0 * H],  # huge, much larger than the map
        [0, 6.0, 5.0, 2.0, 1.0],  # inverted
        [0, 0.0, 0.0, float(W), float(H)],  # exactly the whole map
    ]
    rows = [torch.tensor(r, dtype=torch.float32) for r in fixed]
    centre = torch.rand(k_random, 2, generator=gen) * torch.tensor([1.6 * W, 1.6 * H]) - torch.tensor([0.3 * W, 0.3 * H])
    # log-uniform sizes from 0.1 px to ~1.5x the map
    size = torch.exp(torch.empty(k_random, 2).uniform_(math.log(0.1), math.log(1.5 * max(H, W)), generator=gen))
    idx = torch.randint(0, num_images, (k_random, 1), generator=gen).float()
    rand = torch.cat([idx, centre - size / 2, centre + size / 2], dim=1)
    boxes = torch.cat([torch.stack(rows), rand], dim=0)
    if num_images > 1:  # also put the hand-made boxes on the last image
        extra = torch.stack(rows).clone()
        extra[:, 0] = num_images - 1
        boxes = torch.cat([boxes, extra], dim=0)
    return boxes


def _tv_and_ours(x, boxes, out_size, scale, sr, aligned):
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ours = roi_align(xa, boxes, out_size, scale, sr, aligned)
    ref = torchvision.ops.roi_align(xb, boxes, out_size, scale, sr, aligned)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    return ours, ref, xa.grad, xb.grad


# ---------------------------------------------------------------------------
# torchvision equivalence
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3, 0, -1])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    gen = torch.Generator().manual_seed(1000 + sampling_ratio + 10 * aligned + int(100 * spatial_scale))
    N, C, H, W = 2, 5, 13, 17
    x = torch.randn(N, C, H, W, generator=gen)
    # boxes live in image coordinates; the map is `spatial_scale` times smaller
    boxes = make_boxes(N, H, W, gen)
    boxes[:, 1:] /= spatial_scale
    ours, ref, g_ours, g_ref = _tv_and_ours(x, boxes, (7, 5), spatial_scale, sampling_ratio, aligned)
    assert ours.shape == ref.shape == (boxes.shape[0], C, 7, 5)
    assert ref.abs().sum() > 0 and g_ref.abs().sum() > 0  # the comparison is not vacuous
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_matches_torchvision_square_and_int_output_size(sampling_ratio):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 20, 20, generator=gen)
    boxes = make_boxes(1, 20, 20, gen)
    ours, ref, g_ours, g_ref = _tv_and_ours(x, boxes, 4, 1.0, sampling_ratio, False)
    assert ours.shape == (boxes.shape[0], 3, 4, 4)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
def test_huge_adaptive_grid(aligned):
    # A box 40x larger than the map -> adaptive grid of ~80x80 samples per bin.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    boxes = torch.tensor([[0, -150.0, -170.0, 160.0, 150.0], [0, 1.0, 2.0, 3.0, 7.0]])
    ours, ref, g_ours, g_ref = _tv_and_ours(x, boxes, (2, 2), 1.0, -1, aligned)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_list_of_boxes(sampling_ratio):
    gen = torch.Generator().manual_seed(11)
    N, C, H, W = 3, 4, 12, 10
    x = torch.randn(N, C, H, W, generator=gen)
    per_image = [torch.rand(5, 2, generator=gen) * 8 for _ in range(N)]
    per_image = [torch.cat([p, p + torch.rand(5, 2, generator=gen) * 6 + 0.2], 1) for p in per_image]
    per_image[1] = per_image[1][:0]  # an image without boxes
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours = roi_align(xa, per_image, (3, 4), 1.0, sampling_ratio, True)
    ref = torchvision.ops.roi_align(xb, per_image, (3, 4), 1.0, sampling_ratio, True)
    assert ours.shape == (10, C, 3, 4)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # the list form is the same as the explicit [K, 5] form
    as_tensor = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    torch.testing.assert_close(ours, roi_align(x, as_tensor, (3, 4), 1.0, sampling_ratio, True), atol=0, rtol=0)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=ATOL, rtol=0)
    assert xa.grad[1].abs().sum() == 0  # no boxes on image 1 -> no gradient there


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("boxes", ["tensor", "list", "empty_list"])
def test_no_boxes(sampling_ratio, boxes):
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    b = {"tensor": torch.zeros(0, 5), "list": [torch.zeros(0, 4), torch.zeros(0, 4)], "empty_list": []}[boxes]
    out = roi_align(x, b, (7, 7), 0.5, sampling_ratio, False)
    assert out.shape == (0, 6, 7, 7)
    assert out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() == 0


def test_all_samples_degenerate_aligned_adaptive():
    # aligned=True with zero-size boxes gives a 0x0 adaptive grid: output must be 0.
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    boxes = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0], [0, 3.0, 1.0, 3.0, 5.0]])
    ours, ref, g_ours, g_ref = _tv_and_ours(x, boxes, 2, 1.0, -1, True)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert ours.abs().sum() == 0
    torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=0)


def test_memory_layouts():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 11, 14, generator=gen)
    boxes = make_boxes(2, 11, 14, gen)
    ref = torchvision.ops.roi_align(x, boxes, 3, 1.0, 2, True)
    cl = x.contiguous(memory_format=torch.channels_last)
    nc = torch.randn(2, 14, 11, 8, generator=gen).permute(0, 3, 2, 1)  # non-contiguous
    nc.copy_(x)
    for inp in (cl, nc):
        torch.testing.assert_close(roi_align(inp, boxes, 3, 1.0, 2, True), ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------
# A slow float64 reference written straight from the definition
# ---------------------------------------------------------------------------


def _bilinear(fm, y, x):
    """fm: [C, H, W]; value at (y, x) with torchvision's border rules."""
    H, W = fm.shape[-2:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return fm.new_zeros(fm.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return hy * hx * fm[:, y0, x0] + hy * lx * fm[:, y0, x1] + ly * hx * fm[:, y1, x0] + ly * lx * fm[:, y1, x1]


def reference_roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    oh, ow = output_size
    out = []
    for roi in rois.tolist():
        n = int(roi[0])
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (v * spatial_scale - off for v in roi[1:])
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / oh), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / ow), 0)
        count = max(gh * gw, 1)
        bins = []
        for ph in range(oh):
            for pw in range(ow):
                acc = x.new_zeros(x.shape[1])
                for iy in range(gh):
                    yy = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                        acc = acc + _bilinear(x[n], yy, xx)
                bins.append(acc / count)
        out.append(torch.stack(bins, dim=1).view(x.shape[1], oh, ow))
    return torch.stack(out)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, -1])
def test_matches_python_reference_float64(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(21 + sampling_ratio + 5 * aligned)
    N, C, H, W = 2, 3, 7, 9
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    boxes = make_boxes(N, H, W, gen, k_random=6).double()
    boxes = boxes[(boxes[:, 3] - boxes[:, 1]).abs() < 2 * W]  # keep the Python loops short
    boxes[:, 1:] *= 2.0  # exercise spatial_scale
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours = roi_align(xa, boxes, (3, 2), 0.5, sampling_ratio, aligned)
    ref = reference_roi_align(xb, boxes, (3, 2), 0.5, sampling_ratio, aligned)
    assert ours.dtype == torch.float64
    assert ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_gradcheck(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(
        [[0, 0.3, 0.6, 4.1, 3.7], [1, -1.2, 1.1, 2.5, 6.4], [1, 2.2, 0.4, 9.0, 2.9], [0, 1.1, 1.2, 1.5, 1.4]],
        dtype=torch.float64,
    )
    assert torch.autograd.gradcheck(
        lambda inp: roi_align(inp, boxes, (2, 3), 1.0, sampling_ratio, aligned), (x,), eps=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------
# Low precision, module wrapper, CUDA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_half_precision(dtype, tol, sampling_ratio):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 8, 16, 16, generator=gen).to(dtype)
    boxes = make_boxes(1, 16, 16, gen)
    xh = x.clone().requires_grad_()
    xf = x.float().requires_grad_()  # same (rounded) values in float32
    out_h = roi_align(xh, boxes.to(dtype), 5, 1.0, sampling_ratio, True)
    out_f = roi_align(xf, boxes, 5, 1.0, sampling_ratio, True)
    assert out_h.dtype == dtype
    # half-precision boxes move the sample points a little, so compare loosely
    torch.testing.assert_close(out_h.float(), out_f, atol=10 * tol, rtol=0)
    # with float32 boxes only the final rounding to `dtype` differs
    out_h32 = roi_align(xh, boxes, 5, 1.0, sampling_ratio, True)
    torch.testing.assert_close(out_h32.float(), out_f, atol=tol, rtol=tol)
    grad = torch.randn(out_f.shape, generator=gen)
    out_h32.backward(grad.to(dtype))
    out_f.backward(grad)
    assert xh.grad.dtype == dtype
    torch.testing.assert_close(xh.grad.float(), xf.grad, atol=4 * tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(sampling_ratio, dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 20, 24, generator=gen)
    boxes = make_boxes(2, 20, 24, gen)
    xc = x.cuda().to(dtype).requires_grad_()
    out = roi_align(xc, boxes.cuda(), (7, 7), 1.0, sampling_ratio, False)
    assert out.is_cuda and out.dtype == dtype
    x_cpu = x.to(dtype).float().requires_grad_()
    ref = roi_align(x_cpu, boxes, (7, 7), 1.0, sampling_ratio, False)
    tol = ATOL if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
    grad = torch.randn(ref.shape, generator=gen)
    out.backward(grad.cuda().to(dtype))
    ref.backward(grad)
    torch.testing.assert_close(xc.grad.float().cpu(), x_cpu.grad, atol=4 * tol, rtol=tol)
    if dtype == torch.float32:
        tv = torchvision.ops.roi_align(x.cuda(), boxes.cuda(), (7, 7), 1.0, sampling_ratio, False)
        torch.testing.assert_close(out, tv, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------
# Chunked processing of large inputs, fp32 boxes with low-precision features
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_chunked_equals_whole(aligned, sampling_ratio):
    """Above max_entries the RoIs go in chunks (forward, and the backward rebuilds each chunk): the same
    numbers, bit for bit in the forward (each bin is one bag either way) and to float rounding in the backward
    (a feature row's gradient is summed chunk by chunk)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 23, 31, generator=gen, dtype=torch.float64)
    boxes = make_boxes(2, 23, 31, gen, k_random=40).double()
    grad = torch.randn(boxes.shape[0], 6, 5, 4, generator=gen, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    whole = roi_align(xa, boxes, (5, 4), 1.0, sampling_ratio, aligned)
    whole.backward(grad)
    for budget in (1, 700, 5000):
        xb = x.clone().requires_grad_()
        chunked = roi_align(xb, boxes, (5, 4), 1.0, sampling_ratio, aligned, max_entries=budget)
        assert torch.equal(chunked, whole)
        chunked.backward(grad)
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-12, rtol=0)


def test_chunked_gradcheck():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0, 0.3, 0.6, 4.1, 3.7], [1, -1.2, 1.1, 2.5, 6.4], [1, 2.2, 0.4, 9.0, 2.9],
                          [0, 1.1, 1.2, 5.5, 5.4]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda inp: roi_align(inp, boxes, (2, 3), 1.0, -1, True, max_entries=60), (x,),
                                    eps=1e-6, atol=1e-6)


def test_chunking_bounds_memory():
    """64 RoIs of ~400 px, 28x28, adaptive sampling (the old mask-target load): ~45M entries, built at most
    budget + one RoI at a time (the chunk sizes bound the memory; a peak-RSS check would be flaky here)."""
    from maskrcnn.model.roi_align import _chunks, _entries_per_roi, _geometry

    rois = torch.cat((torch.zeros(64, 1), torch.rand(64, 2) * 300, torch.rand(64, 2) * 300 + 400), 1)
    rois[:, 3:] = torch.maximum(rois[:, 3:], rois[:, 1:3] + 350)
    _, _, bh, bw = _geometry(rois, 28, 28, 1.0, True)
    counts = _entries_per_roi(bh, bw, 28, 28, 0)
    bounds, totals = _chunks(counts, 1 << 20)
    assert sum(totals) == int(counts.sum()) > 40 * (1 << 20) // 2
    assert bounds[0] == 0 and bounds[-1] == 64 and len(bounds) > 2
    assert max(totals) <= (1 << 20) + int(counts.max())


def test_fp32_boxes_with_bf16_features_keep_their_precision():
    """AMP: features bf16/fp16, boxes fp32 with coordinates > 1024 (fp16 would round them to whole pixels)."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(1, 4, 40, 60, generator=gen)
    boxes = torch.tensor([[0, 1025.3, 300.7, 1700.45, 600.2], [0, 2047.6, 10.3, 2300.9, 200.1]])
    ref = roi_align(x, boxes, 7, 1 / 40, 2, True)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        out = roi_align(x.to(dtype), boxes, 7, 1 / 40, 2, True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), roi_align(x.to(dtype).float(), boxes, 7, 1 / 40, 2, True),
                                   atol=tol, rtol=tol)
        assert (out.float() - ref).abs().max() < 5 * tol
