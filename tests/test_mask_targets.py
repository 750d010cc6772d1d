"""Tests for maskrcnn.model.mask_targets: the cropped, separable construction gives the targets of
RoIAlign(sampling_ratio=0) over the full-resolution GT masks (what mask_loss computed before), for hard and
soft targets, aligned or not, RoIs inside, across and outside the mask, in chunks or not; and it is fast."""
from __future__ import annotations

import time

import pytest
import torch

from maskrcnn.model.mask_targets import mask_targets
from maskrcnn.model.roi_align import roi_align


def blob_masks(m: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, h, w] uint8 ellipses with ragged (noisy) edges, and their boxes [m, 4]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float() + 0.5, torch.arange(w).float() + 0.5, indexing="ij")
    c = torch.rand(m, 2, generator=g) * torch.tensor([w, h])
    r = torch.rand(m, 2, generator=g) * torch.tensor([w, h]) * 0.3 + 2
    dx = (xx - c[:, 0, None, None]) / r[:, 0, None, None]
    dy = (yy - c[:, 1, None, None]) / r[:, 1, None, None]
    d = dx ** 2 + dy ** 2
    d = d + 0.3 * torch.rand(m, h, w, generator=g)  # ragged edges, holes near the border
    return (d <= 1).to(torch.uint8), torch.cat((c - r, c + r), 1)


def sampled_rois(boxes: torch.Tensor, num: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIs like sampled foreground proposals (jittered GT boxes), plus edge cases."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, boxes.shape[0], (num,), generator=g)
    wh = (boxes[idx, 2:] - boxes[idx, :2])
    rois = boxes[idx] + torch.randn(num, 4, generator=g) * wh.repeat(1, 2) * 0.15
    extra = torch.tensor([[-50.0, -40.0, w + 60.0, h + 30.0],  # larger than the mask
                          [3.0, 3.0, 3.2, 3.1],  # sub-pixel
                          [10.0, 10.0, 5.0, 5.0],  # inverted
                          [w - 10.0, h - 8.0, w + 12.0, h + 15.0],  # across the bottom-right corner
                          [-9.0, -9.0, -2.0, -1.5],  # outside, beyond the 1-pixel margin
                          [0.0, 0.0, float(w), float(h)]])  # exactly the mask
    idx = torch.cat((idx, torch.arange(len(extra)) % boxes.shape[0]))
    return torch.cat((rois, extra)), idx


def reference(gt: torch.Tensor, idx: torch.Tensor, rois: torch.Tensor, size: int, aligned: bool) -> torch.Tensor:
    """The targets as mask_loss built them: RoIAlign (adaptive sampling) of the full float masks."""
    r = torch.cat((idx[:, None].float(), rois), 1)
    return roi_align(gt[:, None].float(), r, (size, size), 1.0, 0, aligned)[:, 0]


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("shape,size", [((96, 128), 28), ((201, 157), 28), ((60, 75), 14)])
def test_matches_roi_align_targets(aligned, shape, size):
    h, w = shape
    gt, boxes = blob_masks(7, h, w, seed=h)
    rois, idx = sampled_rois(boxes, 150, h, w, seed=w)
    ref = reference(gt, idx, rois, size, aligned)
    soft = mask_targets(gt, idx, rois, size, aligned, soft=True)
    hard = mask_targets(gt, idx, rois, size, aligned, soft=False)
    assert soft.shape == hard.shape == (len(rois), size, size)
    assert soft.dtype == hard.dtype == torch.float32
    assert 0.05 < ref.mean() < 0.95  # not vacuous: the targets hold both values
    err = (soft - ref).abs()
    # measured: max 5.4e-7, mean 2e-8 (float rounding only)
    assert err.max() < 1e-5 and err.mean() < 1e-6
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    disagree = (hard != (ref >= 0.5).float()).float().mean().item()
    # measured: <= 0.03% of the pixels (0 to 2.9e-4), all ties (RoIAlign gives 0.5 within float rounding)
    assert disagree < 1e-3
    flipped = hard != (ref >= 0.5).float()
    assert ((ref[flipped] - 0.5).abs() < 1e-5).all()


def test_chunks_give_the_same_targets():
    gt, boxes = blob_masks(5, 120, 90, seed=3)
    rois, idx = sampled_rois(boxes, 80, 120, 90, seed=4)
    whole = mask_targets(gt, idx, rois, 28, True, soft=True)
    for budget in (1, 3000, 40000):
        chunked = mask_targets(gt, idx, rois, 28, True, soft=True, max_intermediate=budget)
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_matched_index_selects_the_mask():
    gt = torch.zeros(2, 20, 20, dtype=torch.uint8)
    gt[1, 5:15, 5:15] = 1
    box = torch.tensor([[5.0, 5.0, 15.0, 15.0]] * 2)
    t = mask_targets(gt, torch.tensor([0, 1]), box, 8, aligned=True)
    assert t[0].sum() == 0 and t[1].min() == 1  # the box of the square on mask 1 is all foreground


def test_no_rois():
    gt = torch.ones(2, 10, 10, dtype=torch.uint8)
    t = mask_targets(gt, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), 28, True)
    assert t.shape == (0, 28, 28) and t.dtype == torch.float32


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"gt_masks must be \[M, H, W\]") as e:
        mask_targets(torch.ones(10, 10, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 4), 28,
                     True)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="one matched_idx each"):
        mask_targets(torch.ones(1, 10, 10, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 4),
                     28, True)


def test_big_rois_are_cheap():
    """32 RoIs of ~400 px on an 800x1067 mask: RoIAlign over the full mask took 0.7-4 s here, this 30-130 ms."""
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(10, 100, 134, generator=g) > 0.5).to(torch.uint8)
    gt = gt.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :800, :1067].contiguous()
    xy = torch.rand(32, 2, generator=g) * 300
    rois = torch.cat((xy, xy + 400), 1)
    idx = torch.randint(0, 10, (32,), generator=g)
    mask_targets(gt, idx, rois, 28, True)  # warm-up
    t0 = time.perf_counter()
    t = mask_targets(gt, idx, rois, 28, True)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.5, f"{elapsed:.2f} s"
    ref = reference(gt, idx[:4], rois[:4], 28, True)  # a few RoIs of the reference suffice
    assert (t[:4] != (ref >= 0.5).float()).float().mean() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    gt, boxes = blob_masks(6, 150, 170, seed=8)
    rois, idx = sampled_rois(boxes, 100, 150, 170, seed=9)
    cpu = mask_targets(gt, idx, rois, 28, True, soft=True)
    gpu = mask_targets(gt.cuda(), idx.cuda(), rois.cuda(), 28, True, soft=True)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
