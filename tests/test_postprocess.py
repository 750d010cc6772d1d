"""Tests for maskrcnn.model.postprocess.paste_masks against a grid_sample reference (detectron2's paste rule)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.model.postprocess import paste_masks, postprocess_detections


def reference_paste(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """One grid_sample per mask: the centre p + 0.5 of image pixel p maps to ((p + 0.5 - x0) / (x1 - x0)) * 2 - 1
    in the mask's normalised coordinates (align_corners=False, zeros outside)."""
    h, w = image_size
    out = torch.zeros(masks.shape[0], 1, h, w, dtype=torch.float64)
    px = torch.arange(w, dtype=torch.float64) + 0.5
    py = torch.arange(h, dtype=torch.float64) + 0.5
    for i in range(masks.shape[0]):
        x0, y0, x1, y1 = boxes[i].double().tolist()
        gx = (px - x0) / (x1 - x0) * 2 - 1  # [W]
        gy = (py - y0) / (y1 - y0) * 2 - 1  # [H]
        grid = torch.stack((gx[None, :].expand(h, w), gy[:, None].expand(h, w)), dim=-1)[None]  # [1, H, W, 2]
        out[i] = F.grid_sample(masks[i: i + 1].double(), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0]
    return out.float()


def random_case(d: int, m: int, image_size: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    masks = torch.rand(d, 1, m, m, generator=g)
    x0 = torch.rand(d, generator=g) * w * 1.1 - 0.1 * w  # some boxes start outside the image
    y0 = torch.rand(d, generator=g) * h * 1.1 - 0.1 * h
    bw = 1 + torch.rand(d, generator=g) * w * 0.7
    bh = 1 + torch.rand(d, generator=g) * h * 0.7
    return masks, torch.stack((x0, y0, x0 + bw, y0 + bh), 1)


def test_all_ones_integer_box():
    m = 28
    masks = torch.ones(1, 1, m, m)
    box = torch.tensor([[10.0, 20.0, 40.0, 50.0]])  # x0, y0, x1, y1
    out = paste_masks(masks, box, (64, 80))
    assert out.shape == (1, 1, 64, 80)
    img = out[0, 0]
    # interior (pixels whose neighbours are inside the box too): exactly 1
    torch.testing.assert_close(img[21:49, 11:39], torch.ones(28, 28), atol=1e-5, rtol=0)
    # pixels at the box's own border are still mostly inside
    assert (img[20:50, 10:40] > 0.9).all()
    # well outside (2 or more pixels away): 0
    outside = torch.ones(64, 80, dtype=torch.bool)
    outside[18:52, 8:42] = False
    assert (img[outside] == 0).all()
    # total mass ~ box area
    assert img.sum().item() == pytest.approx(30 * 30, rel=0.02)


@pytest.mark.parametrize("m", [28, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_grid_sample_reference(m, seed):
    size = (37, 53)
    masks, boxes = random_case(9, m, size, seed)
    got = paste_masks(masks, boxes, size)
    ref = reference_paste(masks, boxes, size)
    assert got.shape == (9, 1, *size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_chunks_give_the_same_result():
    size = (30, 40)
    masks, boxes = random_case(11, 14, size, seed=3)
    full = paste_masks(masks, boxes, size)
    chunked = paste_masks(masks, boxes, size, chunk=4)  # 4 + 4 + 3
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked, reference_paste(masks, boxes, size), atol=1e-5, rtol=0)


def test_tiny_and_subpixel_boxes_match_reference():
    size = (20, 24)
    masks = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    boxes = torch.tensor([[3.2, 4.7, 4.1, 5.3], [10.0, 10.0, 10.5, 12.0], [0.0, 0.0, 24.0, 20.0]])
    torch.testing.assert_close(paste_masks(masks, boxes, size), reference_paste(masks, boxes, size),
                               atol=1e-5, rtol=0)


def test_box_outside_image_gives_zeros():
    masks = torch.ones(1, 1, 28, 28)
    out = paste_masks(masks, torch.tensor([[100.0, 100.0, 150.0, 150.0]]), (32, 32))
    assert (out == 0).all()


def test_empty_detections():
    out = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (30, 40))
    assert out.shape == (0, 1, 30, 40)


def test_fp16_masks_pasted_in_fp32():
    size = (16, 16)
    masks, boxes = random_case(2, 14, size, seed=5)
    out = paste_masks(masks.half(), boxes, size)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_paste(masks.half().float(), boxes, size), atol=1e-3, rtol=0)


def test_postprocess_detections_rescales_boxes_and_pastes():
    masks = torch.ones(1, 1, 28, 28)
    results = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 50.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1]), "masks": masks}]
    out = postprocess_detections(results, [(64, 80)], [(32, 40)])  # resized frame is 2x the input
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[5.0, 10.0, 20.0, 25.0]]))
    assert out[0]["masks"].shape == (1, 1, 32, 40)
    torch.testing.assert_close(out[0]["masks"], reference_paste(masks, out[0]["boxes"], (32, 40)),
                               atol=1e-5, rtol=0)
    # the input dicts are not modified
    assert results[0]["masks"].shape == (1, 1, 28, 28)
