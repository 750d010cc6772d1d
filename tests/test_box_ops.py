"""Tests for maskrcnn.model.box_ops: area, IoU (by hand and against torchvision), clipping, nonempty."""
from __future__ import annotations

import torch
import torchvision

from maskrcnn.model.box_ops import box_area, box_iou, clip_boxes, nonempty


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [2.0, 3.0, 2.0, 8.0], [5.0, 5.0, 3.0, 3.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([50.0, 0.0, 0.0]))


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0],
                      [2.0, 2.0, 4.0, 4.0]])
    # a0 vs b1: intersection 5x10 = 50, union 100 + 100 - 50 = 150
    # a1 vs b0: intersection 5x5 = 25, union 175
    # a1 vs b1: intersection [5,5]-[15,10] = 10x5 = 50, union 150
    # a0 vs b3: b3 inside a0: 4 / 100
    expected = torch.tensor([
        [1.0, 50 / 150, 0.0, 4 / 100],
        [25 / 175, 50 / 150, 0.0, 0.0],
    ])
    got = box_iou(a, b)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    def rand_boxes(n):
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 60 + 0.5
        return torch.cat((xy, xy + wh), 1)
    a, b = rand_boxes(37), rand_boxes(53)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(box_iou(a, a).diagonal(), torch.ones(37), atol=1e-6, rtol=0)


def test_box_iou_zero_area_is_zero_not_nan():
    a = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    got = box_iou(a, b)
    assert torch.isfinite(got).all()
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(got, expected)


def test_box_iou_empty():
    assert box_iou(torch.zeros(0, 4), torch.rand(3, 4)).shape == (0, 3)
    assert box_iou(torch.rand(2, 4), torch.zeros(0, 4)).shape == (2, 0)


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 20.0], [10.0, 10.0, 200.0, 300.0], [1.0, 2.0, 3.0, 4.0]])
    got = clip_boxes(boxes, (40, 100))  # (height, width)
    expected = torch.tensor([[0.0, 0.0, 50.0, 20.0], [10.0, 10.0, 100.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(got, expected)
    # the input is not modified in place
    assert boxes[0, 0].item() == -5.0


def test_clip_boxes_batched_shape():
    boxes = torch.rand(2, 7, 4) * 200 - 50
    got = clip_boxes(boxes, (60, 80))
    assert got.shape == (2, 7, 4)
    assert (got[..., 0::2] >= 0).all() and (got[..., 0::2] <= 80).all()
    assert (got[..., 1::2] >= 0).all() and (got[..., 1::2] <= 60).all()
    # boxes already inside are unchanged
    inside = torch.tensor([[[1.0, 2.0, 70.0, 59.0]]])
    torch.testing.assert_close(clip_boxes(inside, (60, 80)), inside)


def test_nonempty():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 10.0, 0.5],
                          [5.0, 5.0, 4.0, 8.0], [0.0, 0.0, 1.0, 1.0]])
    assert nonempty(boxes).tolist() == [True, False, True, False, True]
    assert nonempty(boxes, min_size=1.0).tolist() == [True, False, False, False, False]


def test_box_iou_in_fp32_for_half_boxes_and_under_autocast():
    """Anchor matching stays fp32: bf16 boxes are compared in fp32, and autocast changes nothing."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 400
    a = torch.cat((xy, xy + 50 + torch.rand(20, 2, generator=g) * 300), 1)
    b = a + torch.randn(20, 4, generator=g) * 3
    ref = box_iou(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(box_iou(a, b), ref, atol=0, rtol=0)
    half = box_iou(a.bfloat16(), b.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, box_iou(a.bfloat16().float(), b.bfloat16().float()), atol=0, rtol=0)
