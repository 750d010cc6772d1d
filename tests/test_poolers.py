"""Tests for maskrcnn.model.poolers: FPN level assignment (k = floor(4 + log2(sqrt(wh) / 224)) clamped to 2..5),
MultiScaleRoIAlign against torchvision.ops.roi_align called RoI by RoI on the assigned level, RoI order,
empty inputs and rois_from_boxes."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from maskrcnn.model.poolers import MultiScaleRoIAlign, assign_levels, rois_from_boxes

STRIDES = [4, 8, 16, 32]  # P2..P5
K_MIN, K_MAX = 2, 5



IMPLS = ["torchvision", "ours"]
MAPPERS = ["detectron2", "torchvision"]


def square(side: float, x0: float = 3.0, y0: float = 5.0) -> list[float]:
    return [x0, y0, x0 + side, y0 + side]


def fpn_level(box: list[float], k0: int = 4, s0: float = 224.0) -> int:
    """The FPN paper's rule in plain Python (float64): the level k (2..5), not an index."""
    w, h = box[2] - box[0], box[3] - box[1]
    k = math.floor(k0 + math.log2(math.sqrt(w * h) / s0))
    return min(max(k, K_MIN), K_MAX)


# ------------------------------------------------------------------------------------------ assign_levels
@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("side,level", [(224, 4), (112, 3), (448, 5), (10, 2), (2000, 5),
                                        (223, 3), (225, 4), (447, 4), (111, 2), (56, 2), (1, 2)])
def test_assign_levels_table(mapper, side, level):
    boxes = torch.tensor([square(side)], dtype=torch.float32)
    idx = assign_levels(boxes, K_MIN, K_MAX, 224.0, 4, mapper)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [level - K_MIN]


@pytest.mark.parametrize("mapper", MAPPERS)
def test_assign_levels_rectangles_use_sqrt_area(mapper):
    # 112 x 448 has sqrt(wh) = 224 -> level 4; 56 x 224 -> 112 -> level 3; 896 x 224 -> 448 -> level 5.
    boxes = torch.tensor([[0, 0, 112, 448], [10, 10, 66, 234], [0, 0, 896, 224], [5, 5, 5, 5]], dtype=torch.float32)
    idx = assign_levels(boxes, K_MIN, K_MAX, 224.0, 4, mapper)
    assert idx.tolist() == [4 - K_MIN, 3 - K_MIN, 5 - K_MIN, 2 - K_MIN]  # empty box -> the finest level


@pytest.mark.parametrize("mapper", MAPPERS)
def test_assign_levels_random_boxes_match_formula(mapper):
    g = torch.Generator().manual_seed(0)
    wh = torch.exp(torch.empty(400, 2).uniform_(math.log(2.0), math.log(1500.0), generator=g))
    xy = torch.rand(400, 2, generator=g) * 100
    boxes = torch.cat((xy, xy + wh), 1).double()
    expected, keep = [], []
    for i, b in enumerate(boxes.tolist()):
        s = math.sqrt((b[2] - b[0]) * (b[3] - b[1])) / 224.0
        if abs(math.log2(s) - round(math.log2(s))) < 1e-4:  # too close to a level boundary: eps-dependent
            continue
        keep.append(i)
        expected.append(fpn_level(b) - K_MIN)
    assert len(keep) > 350
    idx = assign_levels(boxes[keep].float(), K_MIN, K_MAX, 224.0, 4, mapper)
    assert idx.tolist() == expected
    assert set(expected) == {0, 1, 2, 3}  # every level is exercised


def test_assign_levels_other_canonical_size():
    # shapes.yaml uses canonical_box_size 112: a 112 px box then goes to level 4, 56 px to 3.
    boxes = torch.tensor([square(112), square(56), square(224), square(20)], dtype=torch.float32)
    assert assign_levels(boxes, K_MIN, K_MAX, 112.0, 4).tolist() == [2, 1, 3, 0]


# -------------------------------------------------------------------------------------- rois_from_boxes
def test_rois_from_boxes():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    b = torch.zeros(0, 4)
    c = torch.tensor([[9.0, 10.0, 11.0, 12.0]])
    rois = rois_from_boxes([a, b, c])
    assert rois.shape == (3, 5)
    assert rois.dtype == a.dtype
    assert rois[:, 0].tolist() == [0.0, 0.0, 2.0]
    assert torch.equal(rois[:, 1:], torch.cat((a, c)))


def test_rois_from_boxes_all_empty():
    rois = rois_from_boxes([torch.zeros(0, 4), torch.zeros(0, 4)])
    assert rois.shape == (0, 5)


# ---------------------------------------------------------------------------------- MultiScaleRoIAlign
def make_features(n: int = 2, c: int = 3, h: int = 256, w: int = 320, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h // s, w // s, generator=g) for s in STRIDES]


def make_boxes(seed: int = 1) -> list[torch.Tensor]:
    """Boxes on two images whose sizes span all four levels, including the level boundaries' neighbours."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (13, 9):
        side = torch.exp(torch.empty(n, 2).uniform_(math.log(6.0), math.log(300.0), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 240.0]) - 20
        out.append(torch.cat((xy, xy + side), 1))
    extra = [square(10), square(100), square(200), square(250, 2, 2), square(460, -20, -40)]  # levels 2..5
    out[0] = torch.cat((out[0], torch.tensor(extra)))
    return out


def reference_pool(features, boxes, output_size, sampling_ratio, aligned):
    """torchvision.ops.roi_align called once per RoI, on the level the FPN rule assigns."""
    outs = []
    for i, b in enumerate(boxes):
        for box in b.tolist():
            k = fpn_level(box)
            level = k - K_MIN
            roi = torch.tensor([[float(i), *box]])
            outs.append(tv_roi_align(features[level], roi, (output_size, output_size),
                                     spatial_scale=1.0 / STRIDES[level], sampling_ratio=sampling_ratio,
                                     aligned=aligned))
    return torch.cat(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("output_size,sampling_ratio,aligned", [(7, 0, True), (14, 2, False), (7, 2, True)])
def test_pooler_matches_per_roi_roi_align(impl, output_size, sampling_ratio, aligned):
    features = make_features()
    boxes = make_boxes()
    levels = {fpn_level(bx) for b in boxes for bx in b.tolist()}
    assert levels == {2, 3, 4, 5}  # the case covers every level
    pooler = MultiScaleRoIAlign(output_size=output_size, strides=STRIDES, sampling_ratio=sampling_ratio, aligned=aligned, impl=impl)
    out = pooler(features, boxes)
    ref = reference_pool(features, boxes, output_size, sampling_ratio, aligned)
    assert out.shape == (sum(len(b) for b in boxes), 3, output_size, output_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooler_keeps_input_roi_order(impl):
    features = make_features()
    boxes = make_boxes()
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)
    out = pooler(features, boxes)
    # Permute the RoIs of each image: the output rows follow the same permutation.
    g = torch.Generator().manual_seed(3)
    perms = [torch.randperm(len(b), generator=g) for b in boxes]
    out_perm = pooler(features, [b[p] for b, p in zip(boxes, perms)])
    n0 = len(boxes[0])
    expected = torch.cat((out[:n0][perms[0]], out[n0:][perms[1]]))
    torch.testing.assert_close(out_perm, expected, atol=1e-6, rtol=1e-6)
    # Interleaved levels: a big box, a small box, a big box -> rows differ and match one-RoI calls.
    mixed = [torch.tensor([square(250, 1, 1), square(10, 20, 20), square(120, 30, 30)]), torch.zeros(0, 4)]
    rows = pooler(features, mixed)
    for j in range(3):
        single = pooler(features, [mixed[0][j: j + 1], torch.zeros(0, 4)])
        torch.testing.assert_close(rows[j: j + 1], single, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooler_uses_right_image_of_batch(impl):
    features = make_features()
    box = torch.tensor([square(60, 40, 40)])
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)
    on_first = pooler(features, [box, torch.zeros(0, 4)])
    on_second = pooler(features, [torch.zeros(0, 4), box])
    level = fpn_level(box[0].tolist()) - K_MIN
    ref1 = tv_roi_align(features[level][1:2], torch.cat((torch.zeros(1, 1), box), 1), (7, 7),
                        spatial_scale=1.0 / STRIDES[level], sampling_ratio=2, aligned=True)
    torch.testing.assert_close(on_second, ref1, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on_first, on_second)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooler_no_rois(impl):
    features = make_features(c=5)
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=0, aligned=True, impl=impl)
    out = pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.shape == (0, 5, 7, 7)
    assert out.dtype == features[0].dtype


@pytest.mark.parametrize("impl", IMPLS)
def test_pooler_gradient_reaches_only_assigned_level(impl):
    features = [f.clone().requires_grad_(True) for f in make_features()]
    box = torch.tensor([square(112, 30, 30)])  # level 3 -> index 1
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)
    pooler(features, [box, torch.zeros(0, 4)]).sum().backward()
    for i, f in enumerate(features):
        has_grad = f.grad is not None and f.grad.abs().sum() > 0
        assert has_grad == (i == 1), i
    assert features[1].grad[1].abs().sum() == 0  # nothing flows into the other image


def test_pooler_level_range_from_strides():
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=0, aligned=True, impl="torchvision")
    assert (pooler.k_min, pooler.k_max) == (2, 5)
    assert pooler.scales == [0.25, 0.125, 0.0625, 0.03125]


# ------------------------------------------------------------------------------- fp32 RoIs under AMP
def big_image_case(seed: int = 3):
    """A 1600x2400 image: box coordinates above 1024, where fp16 keeps only whole pixels (2048+: even ones)."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, 4, 1600 // s, 2400 // s, generator=g) for s in STRIDES]
    xy = torch.rand(40, 2, generator=g) * torch.tensor([2000.0, 1300.0]) + 0.37
    wh = torch.exp(torch.empty(40, 2).uniform_(math.log(8.0), math.log(400.0), generator=g))
    boxes = torch.cat((xy, xy + wh), 1)
    return feats, [boxes]


@pytest.mark.parametrize("impl", IMPLS)
def test_rois_stay_fp32_with_bf16_features(impl):
    feats, boxes = big_image_case()
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)
    seen = []
    inner = pooler._roi_align

    def spy(feature, rois, *args, **kwargs):
        seen.append(rois.dtype)
        return inner(feature, rois, *args, **kwargs)

    ref = pooler(feats, boxes)
    pooler._roi_align = spy
    low = [f.to(torch.bfloat16) for f in feats]
    if impl == "ours":  # ours takes fp32 RoIs with bf16 features directly
        out = pooler(low, boxes)
    else:  # torchvision's kernel wants one dtype: fp32 RoIs only where autocast casts both (as AMP does)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pooler(low, boxes)
    assert seen and all(d == torch.float32 for d in seen)
    assert out.dtype == torch.bfloat16
    # against the fp32 result on the same (bf16-rounded) features: only the output rounding differs
    exact = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)([f.float() for f in low], boxes)
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=1e-2)
    assert (out.float() - ref).abs().max() < 0.1
    # bf16 RoIs instead would move samples by up to 8 px at x > 2048: the results would differ by far more
    shifted = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)(
        [f.float() for f in low], [boxes[0].to(torch.bfloat16).float()])
    assert (shifted - exact).abs().max() > 0.2


def test_bf16_boxes_are_computed_in_fp32():
    feats, boxes = big_image_case()
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl="ours")
    out = pooler([f.to(torch.bfloat16) for f in feats], [boxes[0].to(torch.bfloat16)])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_pooler_gradient_matches_roi_by_roi_reference(impl):
    """The backward hands each level the gradient of its own RoIs' rows: every level's map gradient equals the one
    of pooling each RoI alone on its level (float64, a different weight for every output value)."""
    features = [f.double().requires_grad_(True) for f in make_features()]
    boxes = [b.double() for b in make_boxes()]
    pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=True, impl=impl)
    out = pooler(features, boxes)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * weights).sum().backward()
    reference = [f.detach().clone().requires_grad_(True) for f in features]
    total, row = 0.0, 0
    for i, image_boxes in enumerate(boxes):
        for box in image_boxes.tolist():
            k = fpn_level(box) - K_MIN
            roi = torch.tensor([[i, *box]], dtype=torch.float64)
            pooled = tv_roi_align(reference[k], roi, 7, spatial_scale=1.0 / STRIDES[k], sampling_ratio=2, aligned=True)
            total = total + (pooled * weights[row:row + 1]).sum()
            row += 1
    total.backward()
    assert {fpn_level(b) for image_boxes in boxes for b in image_boxes.tolist()} == {2, 3, 4, 5}  # every level
    for k, (f, ref) in enumerate(zip(features, reference)):
        torch.testing.assert_close(f.grad, ref.grad, rtol=1e-10, atol=1e-12, msg=f"level index {k}")
