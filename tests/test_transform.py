"""Tests for maskrcnn.model.transform: resize rules (detectron2's rounding, torchvision's floor, checked against
torchvision's own transform), the short side drawn per image, and mask resizing that keeps masks on their boxes
(pixel-centre) against torchvision's nearest rule (half a pixel right and down)."""
from __future__ import annotations

import random

import pytest
import torch

from maskrcnn.model.transform import ImageTransform, resize_boxes, resize_masks, resized_size

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# (h, w), short side, max side -> detectron2 (int(x + 0.5)), torchvision (floor); worked out by hand:
#   480x640 -> 800: 640 * 800 / 480 = 1066.67;  333x500 -> 640: 500 * 640 / 333 = 960.96;
#   400x1000 -> 800 would be 800x2000, capped at 1333: 1333 * 400 / 1000 = 533.2
RESIZE_TABLE = [
    ((480, 640), 800, 1333, (800, 1067), (800, 1066)),
    ((640, 480), 800, 1333, (1067, 800), (1066, 800)),
    ((333, 500), 640, 1333, (640, 961), (640, 960)),
    ((400, 1000), 800, 1333, (533, 1333), (533, 1333)),
    ((612, 612), 800, 1333, (800, 800), (800, 800)),
    ((427, 640), 800, 1333, (800, 1199), (800, 1199)),
]


@pytest.mark.parametrize("hw,short,long,d2,tv", RESIZE_TABLE)
def test_resized_size_table(hw, short, long, d2, tv):
    assert resized_size(*hw, short, long, "detectron2") == d2
    assert resized_size(*hw, short, long, "torchvision") == tv


def test_torchvision_rule_matches_torchvision_transform(one_thread):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    rng = random.Random(0)
    tv = GeneralizedRCNNTransform(min_size=96, max_size=160, image_mean=MEAN, image_std=STD).eval()
    for _ in range(25):
        h, w = rng.randint(20, 150), rng.randint(20, 150)
        images, _ = tv([torch.rand(3, h, w)])
        assert tuple(images.image_sizes[0]) == resized_size(h, w, 96, 160, "torchvision"), (h, w)


def test_unknown_rules_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown resize rounding 'round'"):
        resized_size(10, 10, 5, 10, "round")
    with pytest.raises(ValueError, match="unknown mask resize 'bicubic'"):
        ImageTransform(min_size_train=[8], max_size_train=16, min_size_test=8, max_size_test=16, pixel_mean=MEAN,
                       pixel_std=STD, mask_resize="bicubic")
    with pytest.raises(ValueError, match="unknown resize rounding 'x'"):
        ImageTransform(min_size_train=[8], max_size_train=16, min_size_test=8, max_size_test=16, pixel_mean=MEAN,
                       pixel_std=STD, resize_rounding="x")


def test_short_side_drawn_per_image():
    t = ImageTransform(min_size_train=[64, 80, 96, 112], max_size_train=400, min_size_test=64, max_size_test=400,
                       pixel_mean=MEAN, pixel_std=STD, resize_rounding="detectron2").train()
    random.seed(0)
    images = [torch.rand(3, 50, 60) for _ in range(12)]
    batch, _ = t(images)
    short_sides = {min(s) for s in batch.image_sizes}
    assert len(short_sides) > 1, "every image of the batch got the same size: chosen per batch?"
    assert short_sides <= {64, 80, 96, 112}
    t.eval()
    batch, _ = t(images)
    assert {min(s) for s in batch.image_sizes} == {64}


def random_box_masks(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """Images of random size, each with one rectangle mask and its box (pixel edges)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h, w = torch.randint(30, 100, (2,), generator=g).tolist()
        x0, x1 = sorted(torch.randint(0, w + 1, (2,), generator=g).tolist())
        y0, y1 = sorted(torch.randint(0, h + 1, (2,), generator=g).tolist())
        x1, y1 = max(x1, x0 + 3), max(y1, y0 + 3)
        x1, y1 = min(x1, w), min(y1, h)
        x0, y0 = min(x0, x1 - 3), min(y0, y1 - 3)
        mask = torch.zeros(1, h, w, dtype=torch.uint8)
        mask[0, y0:y1, x0:x1] = 1
        out.append((mask, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), (h, w)))
    return out


def mean_signed_edge_offset(mode: str, n: int = 300, seed: int = 0) -> float:
    """Mean over masks and edges of (resized mask edge - resized box edge) in px: > 0 is right / down."""
    g = torch.Generator().manual_seed(seed + 1)
    offsets = []
    for mask, box, (h, w) in random_box_masks(n, seed):
        short = int(torch.randint(100, 300, (1,), generator=g))  # enlarging ~1-10x, as COCO to 800 (1.25x)
        new = resized_size(h, w, short, 1333, "detectron2")
        m = resize_masks(mask, new, mode)[0]
        b = resize_boxes(box, (h, w), new)[0]
        ys, xs = torch.nonzero(m, as_tuple=True)
        edges = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        offsets.append((edges - b).mean().item())
    return sum(offsets) / len(offsets)


@pytest.fixture
def one_thread():
    """Hundreds of small interpolations: one thread avoids waiting on OpenMP barriers on a busy CPU (20x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mask_edges_stay_on_their_boxes(one_thread):
    centre, nearest = mean_signed_edge_offset("centre"), mean_signed_edge_offset("nearest")
    # measured over 300 masks: centre -0.017 px, nearest +0.476 px
    assert abs(centre) < 0.05
    assert 0.35 < nearest < 0.6


def test_resize_masks_empty_and_values():
    assert resize_masks(torch.zeros(0, 5, 7, dtype=torch.uint8), (10, 14)).shape == (0, 10, 14)
    m = (torch.rand(3, 17, 23) > 0.5).to(torch.uint8)
    for mode in ("centre", "nearest"):
        r = resize_masks(m, (40, 31), mode)
        assert r.dtype == torch.uint8 and r.shape == (3, 40, 31) and set(r.unique().tolist()) <= {0, 1}


def test_transform_resizes_masks_with_the_configured_rule():
    mask = torch.zeros(1, 50, 60, dtype=torch.uint8)
    mask[0, 10:30, 20:45] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 45.0, 30.0]]), "labels": torch.tensor([1]), "masks": mask}
    for mode in ("centre", "nearest"):
        t = ImageTransform(min_size_train=[100], max_size_train=400, min_size_test=100, max_size_test=400,
                           pixel_mean=MEAN, pixel_std=STD, resize_rounding="detectron2", mask_resize=mode).eval()
        _, (out,) = t([torch.rand(3, 50, 60)], [target])
        assert out["masks"].shape == (1, 100, 120)
        torch.testing.assert_close(out["masks"], resize_masks(mask, (100, 120), mode), atol=0, rtol=0)
        torch.testing.assert_close(out["boxes"], torch.tensor([[40.0, 20.0, 90.0, 60.0]]))
    ys, xs = torch.nonzero(resize_masks(mask, (100, 120), "centre")[0], as_tuple=True)
    assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (40, 20, 90, 60)


def test_constructor_defaults_are_the_standard_rules():
    t = ImageTransform(min_size_train=[800], max_size_train=1333, min_size_test=800, max_size_test=1333,
                       pixel_mean=MEAN, pixel_std=STD)
    assert (t.resize_rounding, t.mask_resize) == ("detectron2", "centre")
