"""Tests for maskrcnn.model.anchors: explicit expected tables of cell and grid anchors."""
from __future__ import annotations

import math
import time

import pytest
import torch

from maskrcnn.model.anchors import AnchorGenerator, cell_anchors

# Size 32, ratios (0.5, 1, 2), worked out by hand: w * h = 32^2 and h / w = r give
#   r = 0.5: w = 32 * sqrt(2) = 45.2548, h = 32 / sqrt(2) = 22.6274
#   r = 1  : w = h = 32
#   r = 2  : w = 22.6274, h = 45.2548
# and the anchors are (-w/2, -h/2, w/2, h/2).
_A = 16 * math.sqrt(2)  # 22.6274 = half of 45.2548
_B = 8 * math.sqrt(2)  # 11.3137 = half of 22.6274
CELL_32 = [
    [-_A, -_B, _A, _B],
    [-16.0, -16.0, 16.0, 16.0],
    [-_B, -_A, _B, _A],
]
# torchvision's rounding of the same base anchors to whole pixels.
CELL_32_ROUNDED = [
    [-23.0, -11.0, 23.0, 11.0],
    [-16.0, -16.0, 16.0, 16.0],
    [-11.0, -23.0, 11.0, 23.0],
]


def test_cell_anchors_table():
    got = cell_anchors(32, (0.5, 1.0, 2.0))
    assert got.shape == (3, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(CELL_32), atol=1e-4, rtol=0)


def test_cell_anchors_table_round_base():
    got = cell_anchors(32, (0.5, 1.0, 2.0), round_base=True)
    torch.testing.assert_close(got, torch.tensor(CELL_32_ROUNDED), atol=0, rtol=0)


@pytest.mark.parametrize("size", [16.0, 32.0, 100.0])
def test_cell_anchors_area_and_ratio(size):
    ratios = (0.25, 0.5, 1.0, 2.0, 4.0)
    a = cell_anchors(size, ratios).double()
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    torch.testing.assert_close(w * h, torch.full((5,), size * size, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(h / w, torch.tensor(ratios, dtype=torch.float64), rtol=1e-5, atol=0)
    # centred at the origin
    torch.testing.assert_close(a[:, 0] + a[:, 2], torch.zeros(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:, 1] + a[:, 3], torch.zeros(5, dtype=torch.float64), atol=1e-5, rtol=0)


def _expected_grid(cell: list[list[float]], h: int, w: int, stride: float, offset: float) -> torch.Tensor:
    """Slow reference: loop over y, then x, then ratio."""
    rows = []
    for y in range(h):
        for x in range(w):
            sx, sy = (x + offset) * stride, (y + offset) * stride
            for c in cell:
                rows.append([c[0] + sx, c[1] + sy, c[2] + sx, c[3] + sy])
    return torch.tensor(rows)


def test_grid_anchors_2x3_stride8_first_rows():
    gen = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[8])
    (anchors,) = gen([(2, 3)])
    assert anchors.shape == (2 * 3 * 3, 4)  # H * W * A
    first = torch.tensor([
        # location (y=0, x=0), ratios 0.5, 1, 2
        [-_A, -_B, _A, _B],
        [-16.0, -16.0, 16.0, 16.0],
        [-_B, -_A, _B, _A],
        # location (y=0, x=1): shifted by (8, 0)
        [8 - _A, -_B, 8 + _A, _B],
        [-8.0, -16.0, 24.0, 16.0],
        [8 - _B, -_A, 8 + _B, _A],
    ])
    torch.testing.assert_close(anchors[:6], first, atol=1e-4, rtol=0)
    # row 9 = location 3 = (y=1, x=0): shifted by (0, 8), ratio 0.5
    torch.testing.assert_close(anchors[9], torch.tensor([-_A, 8 - _B, _A, 8 + _B]), atol=1e-4, rtol=0)
    # the last row = location (y=1, x=2), ratio 2: shifted by (16, 8)
    torch.testing.assert_close(anchors[-1], torch.tensor([16 - _B, 8 - _A, 16 + _B, 8 + _A]), atol=1e-4, rtol=0)
    torch.testing.assert_close(anchors, _expected_grid(CELL_32, 2, 3, 8, 0.0), atol=1e-4, rtol=0)


def test_grid_anchors_offset_half():
    gen = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[8], offset=0.5)
    (anchors,) = gen([(2, 3)])
    # first location centred at (4, 4)
    torch.testing.assert_close(anchors[1], torch.tensor([-12.0, -12.0, 20.0, 20.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(anchors, _expected_grid(CELL_32, 2, 3, 8, 0.5), atol=1e-4, rtol=0)
    centres_x = (anchors[:, 0] + anchors[:, 2]) / 2
    centres_y = (anchors[:, 1] + anchors[:, 3]) / 2
    assert set(centres_x.round().tolist()) == {4.0, 12.0, 20.0}
    assert set(centres_y.round().tolist()) == {4.0, 12.0}


def test_grid_anchors_round_base():
    gen = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[8], round_base=True)
    (anchors,) = gen([(2, 3)])
    torch.testing.assert_close(anchors, _expected_grid(CELL_32_ROUNDED, 2, 3, 8, 0.0), atol=0, rtol=0)


def test_multiple_levels_sizes_and_strides():
    gen = AnchorGenerator(sizes=[32, 64], ratios=[0.5, 1.0, 2.0], strides=[4, 8])
    a0, a1 = gen([(4, 5), (2, 3)])
    assert a0.shape == (4 * 5 * 3, 4) and a1.shape == (2 * 3 * 3, 4)
    # ratio-1 anchor of level 1 at location (y=1, x=2): size 64 centred at (16, 8)
    idx = (1 * 3 + 2) * 3 + 1
    torch.testing.assert_close(a1[idx], torch.tensor([-16.0, -24.0, 48.0, 40.0]), atol=1e-5, rtol=0)
    assert gen.num_anchors == 3


def test_mismatched_sizes_and_strides_raise():
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=[32, 64], ratios=[1.0], strides=[4])


def test_grid_anchors_cached_same_object():
    gen = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[8])
    first = gen.grid_anchors(0, 2, 3)
    second = gen.grid_anchors(0, 2, 3)
    assert first is second
    (third,) = gen([(2, 3)])
    assert third is first
    other = gen.grid_anchors(0, 3, 2)  # a different size is a different entry
    assert other is not first and other.shape == first.shape


def test_big_map_fast_and_right_shape():
    gen = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[4])
    t0 = time.perf_counter()
    (anchors,) = gen([(200, 300)])
    elapsed = time.perf_counter() - t0
    assert anchors.shape == (200 * 300 * 3, 4)
    assert elapsed < 1.0, f"200x300 anchors took {elapsed:.2f}s: a Python loop?"
    # the last location (y=199, x=299), ratio 1, size 32 at stride 4: centre (1196, 796)
    torch.testing.assert_close(anchors[-2], torch.tensor([1180.0, 780.0, 1212.0, 812.0]), atol=1e-3, rtol=0)


def test_cache_is_bounded_lru():
    """A multi-scale run meets a new padded size almost every batch: the cache must not grow with them."""
    gen = AnchorGenerator(sizes=[32, 64], ratios=[0.5, 1.0, 2.0], strides=[4, 8], cache_size=16)
    sizes = [(h, w) for h in range(20, 60, 2) for w in (30, 40, 50)]  # 60 distinct batch shapes, 120 grids
    kept = gen.grid_anchors(0, 7, 9)
    for h, w in sizes:
        gen([(h, w), (h // 2, w // 2)])
        gen.grid_anchors(0, 7, 9)  # used every step: stays in the cache
        assert len(gen._cache) <= 16
    assert len(gen._cache) == 16
    assert gen.grid_anchors(0, 7, 9) is kept
    largest = max(t.numel() * t.element_size() for t in gen._cache.values())
    assert sum(t.numel() * t.element_size() for t in gen._cache.values()) <= 16 * largest
    # the least recently used grids went first: the first batch shapes are gone, the last ones kept
    assert (0, sizes[0][0], sizes[0][1], 4, 4, torch.device("cpu")) not in gen._cache
    assert (0, sizes[-1][0], sizes[-1][1], 4, 4, torch.device("cpu")) in gen._cache


def test_cache_size_zero_keeps_nothing_and_same_values():
    cached = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[8])
    uncached = AnchorGenerator(sizes=[32], ratios=[0.5, 1.0, 2.0], strides=[8], cache_size=0)
    (a,) = cached([(5, 6)])
    (b,) = uncached([(5, 6)])
    assert len(uncached._cache) == 0
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cache_cleared_when_moved():
    gen = AnchorGenerator(sizes=[32], ratios=[1.0], strides=[8])
    gen([(3, 3)])
    gen.to(torch.float64)
    assert len(gen._cache) == 0
    (a,) = gen([(3, 3)])
    assert a.dtype == torch.float64
