"""Tests for maskrcnn.model.roi_heads, box_head and mask_head: proposal labelling and sampling (GT boxes added,
IoU 0.5, 25% positives), losses on empty and half-empty batches, class-specific box regression, mask targets
(their size read from the logits), and the inference output format."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_head import BoxHead
from maskrcnn.model.mask_head import MaskHead
from maskrcnn.model.matcher import Matcher
from maskrcnn.model.poolers import MultiScaleRoIAlign
from maskrcnn.model.roi_heads import RoIHeads
from maskrcnn.model.sampler import BalancedSampler

K = 4  # object classes
C = 8  # feature channels
STRIDES = [4, 8, 16, 32]
LEVELS = ["p2", "p3", "p4", "p5"]
PAD = (128, 160)  # padded batch size (h, w)



# RoIAlign implementations of the poolers.
IMPLS = ["torchvision", "ours"]
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def box_head_kwargs(score_thresh: float = 0.05, detections_per_image: int = 100) -> dict:
    return dict(in_channels=C, resolution=7, fc_dim=32, num_classes=K, box_coder=BoxCoder(weights=BOX_WEIGHTS),
                smooth_l1_beta=0.0, score_thresh=score_thresh, nms_thresh=0.5,
                detections_per_image=detections_per_image)


def mask_head_kwargs() -> dict:
    return dict(in_channels=C, conv_dim=8, num_convs=1, num_classes=K, aligned=True)


def make_heads(batch_size_per_image: int = 32, positive_fraction: float = 0.25, add_gt: bool = True,
               score_thresh: float = 0.05, detections_per_image: int = 100, seed: int = 0,
               impl: str = "torchvision") -> RoIHeads:
    torch.manual_seed(seed)
    box_pooler = MultiScaleRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=0, aligned=True, impl=impl)
    mask_pooler = MultiScaleRoIAlign(output_size=14, strides=STRIDES, sampling_ratio=0, aligned=True, impl=impl)
    return RoIHeads(
        in_features=LEVELS, box_pooler=box_pooler, box_head=BoxHead(**box_head_kwargs(score_thresh, detections_per_image)),
        mask_pooler=mask_pooler, mask_head=MaskHead(**mask_head_kwargs()), matcher=Matcher(high_threshold=0.5, low_threshold=0.5),
        sampler=BalancedSampler(batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction), add_gt_as_proposals=add_gt)


def make_features(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, C, PAD[0] // s, PAD[1] // s, generator=g)
            for name, s in zip(LEVELS, STRIDES, strict=True)}


def box_mask(boxes: torch.Tensor, size=PAD) -> torch.Tensor:
    """uint8 [M, H, W] masks filling each (integer) box."""
    masks = torch.zeros(len(boxes), *size, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    return masks


def target(boxes, labels, size=PAD) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": box_mask(boxes, size)}


def jitter(box, n: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.tensor(box, dtype=torch.float32)
    w, h = b[2] - b[0], b[3] - b[1]
    return b + torch.randn(n, 4, generator=g) * scale * torch.stack((w, h, w, h))


def random_boxes(n: int, seed: int, size=PAD, min_side=4.0, max_side=60.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * (max_side - min_side) + min_side
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([size[1], size[0]]) - wh)
    return torch.cat((xy, xy + wh), 1)


# ------------------------------------------------------------------------------------------- sampling
def test_gt_box_is_added_and_becomes_positive():
    heads = make_heads()
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [110.0, 0.0, 125.0, 12.0]])]  # far from the GT
    t = target([[60.0, 60.0, 100.0, 100.0]], [3])
    (s,) = heads.sample_proposals(proposals, [t])
    pos = s["labels"] > 0
    assert pos.sum().item() == 1
    assert s["labels"][pos].tolist() == [3]
    assert torch.equal(s["boxes"][pos], t["boxes"])
    assert s["matched_idx"][pos].tolist() == [0]
    assert (s["labels"] == 0).sum().item() == 2  # both proposals are background
    assert len(s["boxes"]) == len(s["labels"]) == len(s["matched_idx"]) == 3


def test_without_add_gt_no_positive_when_nothing_overlaps():
    heads = make_heads(add_gt=False)
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [110.0, 0.0, 125.0, 12.0]])]
    (s,) = heads.sample_proposals(proposals, [target([[60.0, 60.0, 100.0, 100.0]], [3])])
    assert s["labels"].tolist() == [0, 0]


def test_labels_come_from_matched_gt_and_iou_threshold():
    heads = make_heads(batch_size_per_image=10_000, positive_fraction=1.0)  # keep every proposal
    gt = [[10.0, 10.0, 50.0, 50.0], [70.0, 20.0, 120.0, 90.0], [30.0, 80.0, 60.0, 120.0]]
    gt_labels = [2, 4, 1]
    proposals = torch.cat([jitter(gt[0], 40, 0.12, 1), jitter(gt[1], 40, 0.12, 2), jitter(gt[2], 40, 0.12, 3),
                           random_boxes(60, 4)])
    t = target(gt, gt_labels)
    (s,) = heads.sample_proposals([proposals], [t])
    all_boxes = torch.cat((proposals, t["boxes"]))
    assert len(s["boxes"]) == len(all_boxes)  # nothing dropped with this sampler
    iou = tv_box_iou(s["boxes"], t["boxes"])  # [R, 3], independent IoU
    best_iou, best = iou.max(1)
    expected_labels = torch.where(best_iou >= 0.5, torch.tensor(gt_labels)[best], torch.zeros_like(best))
    assert torch.equal(s["labels"], expected_labels)
    pos = s["labels"] > 0
    assert torch.equal(s["matched_idx"][pos], best[pos])
    # The case is not degenerate: every GT has several positives and there are plenty of negatives.
    assert (s["labels"] == 0).sum() > 20
    for lab in gt_labels:
        assert (s["labels"] == lab).sum() >= 5
    n_pos_expected = int((tv_box_iou(all_boxes, t["boxes"]).max(1).values >= 0.5).sum())
    assert pos.sum().item() == n_pos_expected


def test_sample_counts_and_positive_fraction():
    heads = make_heads()  # 32 per image, 25% positive
    gt = [[20.0, 20.0, 80.0, 90.0]]
    many_pos = jitter(gt[0], 100, 0.03, 5)
    assert (tv_box_iou(many_pos, torch.tensor(gt)) >= 0.5).all()
    far = random_boxes(100, 6, max_side=15.0)
    far = far[tv_box_iou(far, torch.tensor(gt)).max(1).values < 0.5]
    cases = [
        (torch.cat((many_pos, far)), 8, 32),  # both plentiful: 8 positives, 24 negatives
        (far, 1, 32),  # only the added GT is positive
        (many_pos, 8, 8),  # no negative available: 8 positives only
        (far[:3], 1, 4),  # fewer than the batch size: everything
    ]
    for props, n_pos, n_total in cases:
        torch.manual_seed(0)
        (s,) = heads.sample_proposals([props], [target(gt, [1])])
        assert (s["labels"] > 0).sum().item() == n_pos
        assert len(s["labels"]) == n_total
        assert len(s["labels"]) <= 32
        assert (s["labels"] > 0).sum().item() <= int(0.25 * 32)
        assert (s["labels"] >= 0).all()  # nothing ignored with fg_iou == bg_iou


def test_image_without_objects_is_all_background():
    heads = make_heads()
    props = random_boxes(50, 7)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, *PAD, dtype=torch.uint8)}
    (s,) = heads.sample_proposals([props], [empty])
    assert len(s["labels"]) == 32
    assert (s["labels"] == 0).all()


def test_per_image_sampling_in_a_batch():
    heads = make_heads()
    t0 = target([[20.0, 20.0, 80.0, 90.0]], [2])
    t1 = target([[10.0, 50.0, 40.0, 110.0], [90.0, 10.0, 150.0, 70.0]], [3, 4])
    props = [random_boxes(80, 8), random_boxes(80, 9)]
    s0, s1 = heads.sample_proposals(props, [t0, t1])
    assert set(s0["labels"][s0["labels"] > 0].tolist()) == {2}
    assert set(s1["labels"][s1["labels"] > 0].tolist()) == {3, 4}  # both GTs were added
    assert len(s0["labels"]) == len(s1["labels"]) == 32


# --------------------------------------------------------------------------------------------- losses
def half_empty_batch():
    t_obj = target([[20.0, 20.0, 80.0, 90.0], [90.0, 10.0, 150.0, 70.0]], [1, 3])
    t_empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
               "masks": torch.zeros(0, *PAD, dtype=torch.uint8)}
    props = [torch.cat((jitter([20.0, 20.0, 80.0, 90.0], 10, 0.05, 1), random_boxes(40, 2))), random_boxes(40, 3)]
    return props, t_obj, t_empty


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", ["empty_first", "empty_second"])
def test_losses_half_empty_batch(order, impl):
    heads = make_heads(impl=impl).train()
    props, t_obj, t_empty = half_empty_batch()
    targets = [t_empty, t_obj] if order == "empty_first" else [t_obj, t_empty]
    if order == "empty_first":
        props = props[::-1]
    feats = make_features()
    dets, losses = heads(feats, props, [PAD, PAD], targets)
    assert dets == []
    assert set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    for name, v in losses.items():
        assert v.dim() == 0 and math.isfinite(v.item()), name
    assert losses["loss_cls"].item() > 0
    assert losses["loss_box"].item() > 0  # jittered positives have non-zero regression targets
    assert losses["loss_mask"].item() > 0
    sum(losses.values()).backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert heads.box_head.bbox_pred.weight.grad.abs().sum() > 0
    assert heads.mask_head.predictor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_losses_batch_without_objects(impl):
    heads = make_heads(impl=impl).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, *PAD, dtype=torch.uint8)}
    feats = make_features()
    _, losses = heads(feats, [random_boxes(40, 1), random_boxes(30, 2)], [PAD, PAD], [empty, dict(empty)])
    assert losses["loss_box"].item() == 0.0
    assert losses["loss_mask"].item() == 0.0
    assert math.isfinite(losses["loss_cls"].item()) and losses["loss_cls"].item() > 0
    total = sum(losses.values())
    assert total.requires_grad
    total.backward()
    g = heads.box_head.cls_score.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # Nothing to regress: the box-delta layer gets no (or zero) gradient.
    gb = heads.box_head.bbox_pred.weight.grad
    assert gb is None or gb.abs().sum() == 0


def empty_target() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, *PAD, dtype=torch.uint8)}


def test_losses_image_without_proposals():
    """An image for which the RPN kept nothing: its GT boxes (added as proposals) still train the heads."""
    heads = make_heads().train()
    _, losses = heads(make_features(), [torch.zeros(0, 4), torch.zeros(0, 4)], [PAD, PAD],
                      [target([[10.0, 10.0, 50.0, 50.0]], [1]), empty_target()])
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_mask"].item() > 0
    _, losses = heads(make_features(), [torch.zeros(0, 4), random_boxes(5, 1)], [PAD, PAD],
                      [empty_target(), empty_target()])
    assert losses["loss_box"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    assert math.isfinite(losses["loss_cls"].item())


def test_losses_batch_without_any_roi():
    heads = make_heads().train()
    _, losses = heads(make_features(), [torch.zeros(0, 4), torch.zeros(0, 4)], [PAD, PAD],
                      [empty_target(), empty_target()])
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()


def test_losses_need_targets_in_training():
    heads = make_heads().train()
    with pytest.raises(ValueError):
        heads(make_features(), [random_boxes(5, 1), random_boxes(5, 2)], [PAD, PAD], None)


class FakeBoxHead(BoxHead):
    """A box head whose layers return fixed scores and deltas [R, 4(K+1)] built by `make` from the number of
    RoIs (kept in .out); its loss and inference are the real ones."""

    def __init__(self, make):
        super().__init__(**box_head_kwargs())
        self.make = make
        self.out = None

    def forward(self, x):
        self.out = self.make(x.shape[0])
        return self.out


# The proposal and GT of the class-specific regression case, and their deltas computed by hand with
# weights (10, 10, 5, 5): proposal w 60, h 48, centre (54, 50); GT w 60, h 40, centre (50, 50).
REG_PROPOSAL = [24.0, 26.0, 84.0, 74.0]
REG_GT = [20.0, 30.0, 80.0, 70.0]
REG_DELTAS = [10 * (50 - 54) / 60, 0.0, 5 * math.log(60 / 60), 5 * math.log(40 / 48)]


@pytest.mark.parametrize("gt_label", [1, 2, 4])
def test_box_regression_uses_gt_class_deltas(gt_label):
    heads = make_heads(add_gt=False)
    heads.train()

    def make(r):  # zeros everywhere
        return torch.zeros(r, K + 1, requires_grad=True), torch.zeros(r, 4 * (K + 1), requires_grad=True)

    heads.box_head = FakeBoxHead(make)
    props = [torch.tensor([REG_PROPOSAL, [100.0, 100.0, 120.0, 120.0]])]  # one positive, one negative
    t = target([REG_GT], [gt_label])
    _, losses = heads(make_features(1), props, [PAD], [t])
    scores, deltas = heads.box_head.out
    assert deltas.shape == (2, 4 * (K + 1))
    # L1 on the GT-class block of the one positive, normalised by the 2 sampled RoIs.
    expected = sum(abs(d) for d in REG_DELTAS) / 2
    assert losses["loss_box"].item() == pytest.approx(expected, rel=1e-5)
    losses["loss_box"].backward()
    grad = deltas.grad.view(2, K + 1, 4)
    nonzero_blocks = {(r, c) for r in range(2) for c in range(K + 1) if grad[r, c].abs().sum() > 0}
    assert len(nonzero_blocks) == 1
    ((row, cls),) = nonzero_blocks
    assert cls == gt_label


@pytest.mark.parametrize("gt_label", [1, 3])
def test_box_regression_exact_deltas_in_gt_block_give_zero_loss(gt_label):
    heads = make_heads(add_gt=False)
    heads.train()

    def make(r):  # the right deltas in the GT-class block, garbage in every other block
        d = torch.full((r, K + 1, 4), 3.0)
        d[:, gt_label] = torch.tensor(REG_DELTAS)
        return torch.zeros(r, K + 1), d.view(r, -1)

    heads.box_head = FakeBoxHead(make)
    props = [torch.tensor([REG_PROPOSAL, [100.0, 100.0, 120.0, 120.0]])]
    _, losses = heads(make_features(1), props, [PAD], [target([REG_GT], [gt_label])])
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------------------- mask targets
def sample(boxes: torch.Tensor, matched_idx: list[int], labels: list[int] | None = None) -> dict:
    """One image's sampled RoIs as RoIHeads.sample_proposals gives them."""
    labels = labels if labels is not None else [1] * len(matched_idx)
    return {"boxes": boxes, "labels": torch.tensor(labels), "matched_idx": torch.tensor(matched_idx)}


class FakeMaskHead(MaskHead):
    """A mask head whose layers return logits [F, K+1, S, S] with channel c holding c + offset; its targets,
    loss and inference are the real ones."""

    def __init__(self, size: int = 28, offset: float = 0.0):
        super().__init__(**mask_head_kwargs())
        self.size, self.offset = size, offset

    def forward(self, x):
        channels = torch.arange(K + 1, dtype=torch.float32).view(1, -1, 1, 1) + self.offset
        return channels.expand(x.shape[0], K + 1, self.size, self.size)


def test_mask_targets_from_gt_masks():
    """A proposal equal to a GT box whose mask fills it -> all-ones 28x28 target; a proposal twice as wide
    (or tall) -> ones on the left (top) part only."""
    heads = make_heads()
    gt_box = [20.0, 30.0, 84.0, 94.0]
    t = target([gt_box], [2])
    assert t["masks"][0].sum().item() == 64 * 64
    boxes = torch.tensor([gt_box, [20.0, 30.0, 140.0, 94.0], [20.0, 30.0, 84.0, 150.0]])
    tg = heads.mask_head.targets([sample(boxes, [0, 0, 0])], [t], 28)
    assert tg.shape == (3, 28, 28) and tg.dtype == torch.float32
    assert torch.equal(tg[0], torch.ones(28, 28))
    # Wide box: the GT covers x in [20, 84) of [20, 140) -> the first 64/120 * 28 = 14.9 columns.
    assert (tg[1][:, :14] == 1).all() and (tg[1][:, 16:] == 0).all()
    # Tall box: the GT covers the first 14.9 rows.
    assert (tg[2][:14] == 1).all() and (tg[2][16:] == 0).all()
    assert set(tg.unique().tolist()) <= {0.0, 1.0}  # hard targets unless soft_targets


def test_mask_targets_follow_matched_index_and_soft_option():
    heads = make_heads()
    t = target([[10.0, 10.0, 40.0, 40.0], [60.0, 20.0, 100.0, 80.0]], [1, 2])
    box = torch.tensor([[50.0, 20.0, 100.0, 80.0]])  # covers GT 1 partly, GT 0 not at all
    tg1 = heads.mask_head.targets([sample(box, [1])], [t], 28)
    tg0 = heads.mask_head.targets([sample(box, [0])], [t], 28)
    assert tg1.sum() > 0 and tg0.sum() == 0
    heads.mask_head.soft_targets = True
    soft = heads.mask_head.targets([sample(box, [1])], [t], 28)
    assert ((soft > 0) & (soft < 1)).any()  # the boundary column is partly covered


def test_mask_loss_uses_logits_of_gt_class():
    """The mask head names its own loss; it is computed on the logits of each RoI's ground-truth class."""
    head = FakeMaskHead()
    logits = head(torch.zeros(1, C, 14, 14))
    gt_box = [20.0, 30.0, 84.0, 94.0]  # the RoI is its GT box, whose mask fills it: an all-ones target
    losses = head.losses(logits, [sample(torch.tensor([gt_box]), [0], labels=[3])], [target([gt_box], [3])])
    # All-ones target, logit 3 everywhere: BCE = log(1 + exp(-3)).
    assert set(losses) == {"loss_mask"}
    assert losses["loss_mask"].item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-5)


def test_each_head_selects_its_rois_and_names_its_losses():
    """The box head learns from every sampled RoI, the mask head from the foreground ones; each returns its
    losses named (RoIHeads only routes)."""
    heads = make_heads()
    s = sample(torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 20, 20], [1.0, 1, 30, 30]]), [0, 0, 0], labels=[2, 0, 1])
    assert torch.equal(heads.box_head.select([s])[0]["labels"], s["labels"])
    fg = heads.mask_head.select([s])[0]
    assert fg["labels"].tolist() == [2, 1] and torch.equal(fg["boxes"], s["boxes"][[0, 2]])
    heads.train()
    t = target([[10.0, 10.0, 60.0, 60.0]], [2])
    _, losses = heads(make_features(1), [random_boxes(20, 1)], [PAD], [t])
    assert set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    from maskrcnn.model.roi_heads import RoIHead
    assert isinstance(heads.box_head, RoIHead) and isinstance(heads.mask_head, RoIHead)


@pytest.mark.parametrize("size", [20, 28])
def test_mask_size_comes_from_the_logits(size):
    """A mask head of another output size trains without any other change: targets follow the logits."""
    heads = make_heads().train()
    heads.mask_head = FakeMaskHead(size)
    gt_box = [20.0, 30.0, 84.0, 94.0]
    _, losses = heads(make_features(1), [torch.tensor([gt_box])], [PAD], [target([gt_box], [3])])
    # The GT box itself is the only positive RoI; its target is all ones: BCE = log(1 + exp(-3)).
    assert losses["loss_mask"].item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-5)


# ------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("detections_per_image", [100, 5])
def test_inference_output_format(detections_per_image, impl):
    heads = make_heads(detections_per_image=detections_per_image, impl=impl).eval()
    sizes = [PAD, (100, 120)]
    props = [random_boxes(60, 1), random_boxes(60, 2, size=sizes[1])]
    dets, losses = heads(make_features(), props, sizes)
    assert losses == {}
    assert len(dets) == 2
    for d, (h, w) in zip(dets, sizes, strict=True):
        n = d["boxes"].shape[0]
        assert 0 < n <= detections_per_image
        if detections_per_image == 5:
            assert n == 5  # near-uniform scores (~0.2) leave far more than 5 candidates
        assert d["boxes"].shape == (n, 4) and d["boxes"].dtype == torch.float32
        assert d["labels"].shape == (n,) and d["labels"].dtype == torch.int64
        assert d["scores"].shape == (n,)
        assert ((d["labels"] >= 1) & (d["labels"] <= K)).all()
        assert (d["scores"] > heads.box_head.score_thresh).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()  # sorted, best first
        b = d["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert d["masks"].shape == (n, 1, 28, 28)
        assert d["masks"].min() >= 0 and d["masks"].max() <= 1


def test_inference_high_threshold_gives_empty_outputs():
    heads = make_heads(score_thresh=0.9).eval()  # untrained scores are ~1/(K+1)
    dets, _ = heads(make_features(), [random_boxes(30, 1), random_boxes(30, 2)], [PAD, PAD])
    for d in dets:
        assert d["boxes"].shape == (0, 4)
        assert d["scores"].shape == (0,) and d["labels"].shape == (0,)
        assert d["masks"].shape == (0, 1, 28, 28)


def test_inference_image_without_proposals():
    heads = make_heads().eval()
    dets, _ = heads(make_features(), [torch.zeros(0, 4), random_boxes(10, 1)], [PAD, PAD])
    assert dets[0]["boxes"].shape == (0, 4) and dets[0]["masks"].shape == (0, 1, 28, 28)
    assert dets[1]["boxes"].shape[0] > 0


def test_inference_class_specific_decoding_and_mask_channel():
    """Class 3 scores high everywhere; its deltas shift boxes right by 10% of their width, every other class's
    deltas are garbage. Detections must be class 3, the shifted proposals, and masks from channel 3."""
    heads = make_heads().eval()
    props = torch.tensor([[10.0, 10.0, 40.0, 30.0], [60.0, 10.0, 100.0, 50.0], [10.0, 70.0, 50.0, 120.0]])

    def make(r):
        scores = torch.zeros(r, K + 1)
        scores[:, 3] = 10.0
        d = torch.full((r, K + 1, 4), 2.0)
        d[:, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # dx = 1 / 10 of the width
        return scores, d.view(r, -1)

    heads.box_head = FakeBoxHead(make)
    heads.mask_head = FakeMaskHead(offset=-2.5)
    (d,) = heads(make_features(1), [props], [PAD])[0]
    assert d["labels"].tolist() == [3, 3, 3]
    order = d["boxes"][:, 0].argsort()
    w = props[:, 2] - props[:, 0]
    expected = props + torch.stack((w * 0.1, torch.zeros(3), w * 0.1, torch.zeros(3)), 1)
    torch.testing.assert_close(d["boxes"][order], expected[props[:, 0].argsort()], atol=1e-4, rtol=0)
    p3 = math.exp(10) / (math.exp(10) + K)
    torch.testing.assert_close(d["scores"], torch.full((3,), p3), atol=1e-6, rtol=0)
    torch.testing.assert_close(d["masks"], torch.full((3, 1, 28, 28), 1 / (1 + math.exp(-0.5))))


def test_mask_inference_computes_each_detections_class_only():
    """In inference the mask head gives the deconvolution's features (channels-last where that gains) and
    class_logits applies the 1x1 predictor of each detection's class only: the same logits as every class's map
    indexed by the label, which is what training's forward gives."""
    from maskrcnn.model.mask_head import MaskFeatures

    torch.manual_seed(0)
    head = MaskHead(**mask_head_kwargs())
    torch.nn.init.normal_(head.predictor.weight, std=0.3)
    torch.nn.init.normal_(head.predictor.bias, std=0.3)
    x, labels = torch.rand(6, C, 14, 14), torch.tensor([1, 3, 3, 2, 1, 4])
    train_logits = head.train()(x)
    assert train_logits.shape == (6, K + 1, 28, 28)
    out = head.eval()(x)
    from maskrcnn.model.fuse import inference_channels_last

    assert isinstance(out, MaskFeatures)
    assert out.features.is_contiguous(memory_format=torch.channels_last) == inference_channels_last("auto", "cpu")
    picked = train_logits[torch.arange(6), labels]
    torch.testing.assert_close(head.class_logits(out, labels), picked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.class_logits(train_logits, labels), picked, rtol=0, atol=0)
    with torch.no_grad():
        (d,) = head.inference(out, [{"boxes": torch.zeros(6, 4), "labels": labels}])
    torch.testing.assert_close(d["masks"][:, 0], picked.sigmoid(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_mask_head_layout_follows_the_cpu_not_the_pooler(monkeypatch, capability):
    """The pooler gives channels-last RoI features; the head's convolutions run channels-last only where that was
    measured to gain (AVX2, AVX-512), in training and inference, and in the standard layout elsewhere (with ATen's
    scalar kernels the channels-last head took 1.14x torchvision's time)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    head = MaskHead(**mask_head_kwargs())
    seen = []
    head.convs[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    x = torch.rand(3, C, 14, 14).contiguous(memory_format=torch.channels_last)
    head.train()(x)
    with torch.no_grad():
        head.eval()(x)
    assert seen == [capability == "DEFAULT"] * 2


@pytest.mark.parametrize("bf16", [False, True])
def test_box_head_casts_channels_last_features_in_one_pass(bf16):
    """The pooler's channels-last RoI features reach fc6 in the standard layout and, under bf16 autocast, already
    in bf16 (precision.cast_as_autocast: one pass instead of a layout copy and autocast's cast): the same scores,
    deltas and gradients, bit for bit, as flattening a standard-layout copy."""
    from maskrcnn.model.precision import cast_as_autocast

    torch.manual_seed(0)
    head = BoxHead(**box_head_kwargs())
    x = torch.rand(5, C, 7, 7)
    seen = []
    head.fc6.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[0].is_contiguous())))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        inp = x.clone().contiguous(memory_format=layout).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores, deltas = head(inp)
        (scores.sum() + deltas.square().sum()).backward()
        results.append((scores, deltas, inp.grad, head.fc6.weight.grad.clone()))
        head.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert seen == [(torch.bfloat16 if bf16 else torch.float32, True)] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cast_as_autocast(x.double()).dtype == torch.float64  # only what autocast casts
