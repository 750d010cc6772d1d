"""Tests for maskrcnn.model.rpn: losses on empty / half-empty batches, proposal limits, anchor labelling, sampling,
and the agreement of the head's [N, A(4), Hi, Wi] layout with the anchor order."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.model.anchors import AnchorGenerator
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.build import build_model
from maskrcnn.config import load_config
from maskrcnn.model.matcher import Matcher
from maskrcnn.model.rpn import RPN
from maskrcnn.model.sampler import BalancedSampler
from maskrcnn.model.transform import ImageList

from conftest import saved_bytes

CONFIG = "configs/tiny.yaml"
# Smaller images than tiny.yaml's 128 px keep these tests fast on 2 CPU cores.
SMALL = ["model.transform.min_size_train=[64]", "model.transform.max_size_train=96",
         "model.transform.min_size_test=64", "model.transform.max_size_test=96"]


def make_model(*overrides: str):
    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["stage=rpn", *SMALL, *overrides])
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def tiny():
    return make_model()


def images_and_targets(with_objects: tuple[bool, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 80), (80, 64), (60, 72)]
    images, targets = [], []
    for i, has in enumerate(with_objects):
        h, w = sizes[i % len(sizes)]
        images.append(torch.rand(3, h, w, generator=g))
        if has:
            boxes = torch.tensor([[5.0, 6.0, 25.0, 30.0], [20.0, 15.0, 45.0, 35.0]])
            labels = torch.tensor([1, 2])
        else:
            boxes, labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def test_tiny_config_builds_rpn_stage(tiny):
    cfg, model = tiny
    assert model.stage == "rpn"
    assert model.roi_heads is None
    assert model.rpn.anchor_generator.strides == cfg.model.anchors.strides


# ------------------------------------------------------------------------------------------------ losses
def test_losses_half_empty_batch(tiny):
    _, model = tiny
    model.train()
    images, targets = images_and_targets((False, True))
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    for name, v in losses.items():
        assert v.dim() == 0 and math.isfinite(v.item()), name
    assert losses["loss_rpn_cls"].item() > 0
    assert losses["loss_rpn_box"].item() > 0  # the image with objects has positives (low-quality matches)
    model.zero_grad()
    sum(losses.values()).backward()
    grads = [p.grad for p in model.rpn.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0


def test_losses_all_empty_batch(tiny):
    _, model = tiny
    model.train()
    images, targets = images_and_targets((False, False))
    losses = model(images, targets)
    assert losses["loss_rpn_box"].item() == 0.0
    assert math.isfinite(losses["loss_rpn_cls"].item()) and losses["loss_rpn_cls"].item() > 0
    model.zero_grad()
    sum(losses.values()).backward()  # still a graph: training steps on empty batches work
    assert torch.isfinite(model.rpn.head.cls_logits.weight.grad).all()


def test_training_without_targets_raises(tiny):
    _, model = tiny
    model.train()
    images, _ = images_and_targets((True,))
    with pytest.raises(ValueError):
        model(images)


# --------------------------------------------------------------------------------------------- proposals
def _proposals(model, images, targets=None):
    image_list, targets, feats = model.features(images, targets)
    proposals, _ = model.rpn(image_list, feats, targets)
    return image_list, proposals


@pytest.mark.parametrize("training", [False, True])
def test_proposal_limits(training, tiny, monkeypatch):
    limit = 25
    _, model = tiny
    monkeypatch.setattr(model.rpn, "post_nms_topk", (limit, limit))
    model.train(training)
    images, targets = images_and_targets((True, False))
    image_list, proposals = _proposals(model, images, targets if training else None)
    assert len(proposals) == 2
    # different image sizes in one padded batch: each image is clipped to its own size
    assert image_list.image_sizes[0] != image_list.image_sizes[1]
    for p, (h, w) in zip(proposals, image_list.image_sizes, strict=True):
        boxes, scores = p["boxes"], p["scores"]
        assert boxes.shape[1] == 4 and scores.shape == (boxes.shape[0],)
        assert 0 < boxes.shape[0] <= limit
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (scores[:-1] >= scores[1:]).all(), "proposals not sorted by score"
        # detached constants for the RoI heads, even in training
        assert not boxes.requires_grad and boxes.grad_fn is None
        assert not scores.requires_grad and scores.grad_fn is None


def test_proposal_limit_is_binding(tiny, monkeypatch):
    """With a large limit there are more proposals than the small limit, so the small limit really cuts."""
    _, model = tiny
    model.eval()
    images, _ = images_and_targets((True,))
    with torch.no_grad():
        image_list, _, feats = model.features(images)
        monkeypatch.setattr(model.rpn, "post_nms_topk", (1000, 1000))
        p_big, _ = model.rpn(image_list, feats)
        monkeypatch.setattr(model.rpn, "post_nms_topk", (10, 10))
        p_small, _ = model.rpn(image_list, feats)
    assert p_big[0]["boxes"].shape[0] > 10
    assert p_small[0]["boxes"].shape[0] == 10
    # the 10 kept are the top 10 of the larger set
    torch.testing.assert_close(p_small[0]["boxes"], p_big[0]["boxes"][:10])


# --------------------------------------------------------------------------------------- anchor labels
def test_label_anchors(tiny):
    _, model = tiny
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 164.0, 132.0]])
    anchors = torch.tensor([
        [10.0, 10.0, 50.0, 50.0],  # equal to GT 0
        [300.0, 300.0, 340.0, 340.0],  # far from everything
        [12.0, 12.0, 52.0, 52.0],  # IoU 1444/1756 = 0.82 with GT 0
        [100.0, 100.0, 164.0, 132.0],  # equal to GT 1
        [30.0, 10.0, 70.0, 50.0],  # IoU 800/2400 = 0.33 with GT 0: ignored
        [0.0, 200.0, 8.0, 208.0],  # far
    ])
    labels, matched = model.rpn.label_anchors(anchors, gt)
    assert labels.tolist() == [1, 0, 1, 1, -1, 0]
    torch.testing.assert_close(matched[0], gt[0])
    torch.testing.assert_close(matched[2], gt[0])
    torch.testing.assert_close(matched[3], gt[1])


def test_label_anchors_on_grid(tiny):
    _, model = tiny
    gen = model.rpn.anchor_generator
    anchors = torch.cat(gen([(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]))
    gt = anchors[1000:1001].clone()  # a GT box equal to one anchor
    labels, matched = model.rpn.label_anchors(anchors, gt)
    assert labels[1000].item() == 1
    torch.testing.assert_close(matched[1000], gt[0])
    assert (labels == 0).sum() > 0.9 * len(anchors)  # nearly everything is far: background
    assert set(labels.unique().tolist()) <= {-1, 0, 1}


def test_label_anchors_no_gt(tiny):
    _, model = tiny
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 30.0]])
    labels, matched = model.rpn.label_anchors(anchors, torch.zeros(0, 4))
    assert labels.tolist() == [0, 0]
    assert matched.shape == (2, 4)


def test_sampled_anchors_per_image_at_most_batch_size(monkeypatch):
    cfg, model = make_model()
    model.train()
    per_image = cfg.model.rpn.batch_size_per_image
    frac = cfg.model.rpn.positive_fraction
    counts = []
    sampler = model.rpn.sampler

    def spy(labels):
        pos, neg = sampler(labels)
        counts.append((pos.numel(), neg.numel()))
        return pos, neg

    model.rpn.sampler = spy
    bce_sizes = []
    real_bce = F.binary_cross_entropy_with_logits

    def bce_spy(input, target, *args, **kwargs):
        bce_sizes.append(input.numel())
        return real_bce(input, target, *args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy_with_logits", bce_spy)
    # many GT boxes so that positives are plentiful
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    xs = torch.arange(0, 64, 4.0)
    many = torch.stack((xs, xs * 0.5, xs + 12, xs * 0.5 + 16), 1)
    targets = [{"boxes": many, "labels": torch.ones(len(many), dtype=torch.int64)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    model(images, targets)
    assert len(counts) == 2
    for n_pos, n_neg in counts:
        assert n_pos + n_neg <= per_image
        assert n_pos <= int(per_image * frac)
    assert counts[0][0] > 0  # the image with objects has positives
    assert counts[1] == (0, per_image)  # the empty image: all negatives
    # the classification loss sees exactly the sampled anchors
    assert bce_sizes == [sum(p + n for p, n in counts)]


# ------------------------------------------------------------------------------ head layout vs anchors
class FixedHead(nn.Module):
    def __init__(self, logits, deltas):
        super().__init__()
        self.logits, self.deltas = logits, deltas

    def forward(self, features):
        return self.logits, self.deltas


def test_head_layout_matches_anchor_order():
    """The best-scoring proposal must be the anchor (level, y, x, a) where the head put its largest logit,
    moved by the deltas the head put at channels 4a..4a+3 of that cell (detectron2's [N, A*4, H, W])."""
    sizes, strides, ratios = [16, 32, 64, 128, 256], [4, 8, 16, 32, 64], [0.5, 1.0, 2.0]
    rpn = RPN(in_features=["p2", "p3", "p4", "p5", "p6"], in_channels=8,
              anchor_generator=AnchorGenerator(sizes=sizes, ratios=ratios, strides=strides), box_coder=BoxCoder(weights=(1, 1, 1, 1)),
              matcher=Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True), sampler=BalancedSampler(batch_size_per_image=64, positive_fraction=0.5), pre_nms_topk=(200, 200),
              post_nms_topk=(100, 100), nms_thresh=0.7)
    rpn.eval()
    H, W = 64, 80
    hw = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # a 64x80 image at strides 4..64
    a_num = len(ratios)
    logits = [torch.zeros(1, a_num, h, w) for h, w in hw]
    deltas = [torch.zeros(1, 4 * a_num, h, w) for h, w in hw]
    level, a, y, x = 1, 2, 3, 5  # p3, ratio 2, cell (3, 5)
    logits[level][0, a, y, x] = 10.0
    dx, dy, dw, dh = 0.25, -0.1, math.log(1.5), math.log(0.8)
    deltas[level][0, 4 * a: 4 * a + 4, y, x] = torch.tensor([dx, dy, dw, dh])
    rpn.head = FixedHead(logits, deltas)
    feats = {f"p{k}": torch.zeros(1, 8, h, w) for k, (h, w) in zip(range(2, 7), hw, strict=True)}
    proposals, losses = rpn(ImageList(torch.zeros(1, 3, H, W), [(H, W)]), feats)
    assert losses == {}
    # by hand: size 32, ratio 2 -> w = 32 / sqrt(2), h = 32 * sqrt(2), centred at (5 * 8, 3 * 8)
    aw, ah = 32 / math.sqrt(2), 32 * math.sqrt(2)
    cx, cy = 40 + dx * aw, 24 + dy * ah
    pw, ph = aw * 1.5, ah * 0.8
    expected = torch.tensor([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2])
    top = proposals[0]
    assert top["scores"][0].item() == pytest.approx(10.0)
    assert top["levels"][0].item() == level
    torch.testing.assert_close(top["boxes"][0], expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------- the losses at the sampled cells only
def test_head_at_cells_equals_the_whole_map_there():
    """RPNHead.at_cells gives forward()'s objectness and deltas at the chosen cells, borders and corners
    included (the 3x3 neighbourhood is zero outside the map, as the conv's padding), and the same gradient to
    the features and every parameter (float64)."""
    from maskrcnn.model.rpn import RPNHead
    torch.manual_seed(0)
    head = RPNHead(in_channels=6, num_anchors=3).double()
    for p in head.parameters():  # not the init's zero biases and tiny weights: every term matters
        nn.init.normal_(p)
    feats = [torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)]
    cells = [torch.tensor([[0, 0, 0], [1, 4, 6], [0, 2, 3], [1, 0, 6], [0, 4, 0]]),
             torch.tensor([[1, 1, 2], [0, 2, 3]])]
    logits, deltas = head(feats)
    want_l = torch.cat([lg[c[:, 0], :, c[:, 1], c[:, 2]] for lg, c in zip(logits, cells)])
    want_d = torch.cat([d[c[:, 0], :, c[:, 1], c[:, 2]] for d, c in zip(deltas, cells)]).view(-1, 3, 4)
    got_l, got_d = head.at_cells(feats, cells)
    torch.testing.assert_close(got_l, want_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_d, want_d, rtol=1e-12, atol=1e-12)
    wl, wd = torch.randn_like(got_l), torch.randn_like(got_d)
    inputs = feats + list(head.parameters())
    want = torch.autograd.grad((want_l * wl).sum() + (want_d * wd).sum(), inputs)
    got = torch.autograd.grad((got_l * wl).sum() + (got_d * wd).sum(), inputs)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _rpn_losses_and_grads(model, images, targets, at_cells):
    model.rpn.loss_at_sampled_cells = at_cells
    torch.manual_seed(1)  # the sampler's draws
    losses = model(images, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(losses.values()), params)
    return {k: v.detach() for k, v in losses.items()}, grads


def test_losses_at_sampled_cells_equal_the_whole_map():
    """model.rpn.loss_at_sampled_cells (the default) gives the same RPN losses and the same gradient to every
    parameter, the bottom-up pathway's and the FPN's included, as the head computed in autograd over every cell
    (float64, two images: one with objects, one without)."""
    cfg, model = make_model()
    assert cfg.model.rpn.loss_at_sampled_cells
    model = model.double().train()
    images, targets = images_and_targets((True, False))
    images = [i.double() for i in images]
    whole, whole_grads = _rpn_losses_and_grads(model, images, targets, False)
    cells, cells_grads = _rpn_losses_and_grads(model, images, targets, True)
    assert whole.keys() == cells.keys() == {"loss_rpn_cls", "loss_rpn_box"}
    assert whole["loss_rpn_box"] > 0
    for k in whole:
        torch.testing.assert_close(cells[k], whole[k], rtol=1e-12, atol=0)
    for w, g in zip(whole_grads, cells_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)


def test_losses_at_sampled_cells_keep_no_whole_map_activations():
    """With the losses at the sampled cells the RPN's training forward saves for the backward pass only the
    sampled cells' neighbourhoods, not the levels' maps and the head's activations over every cell."""
    def rpn_saved_bytes(at_cells):
        _, model = make_model()
        model.train().rpn.loss_at_sampled_cells = at_cells
        _, targets = images_and_targets((True, True))
        h, w = 256, 256
        feats = {f"p{k}": torch.randn(2, 16, h // 2**k, w // 2**k, requires_grad=True) for k in range(2, 7)}
        model.rpn.head = type(model.rpn.head)(in_channels=16, num_anchors=model.rpn.anchor_generator.num_anchors)
        torch.manual_seed(0)
        (_, losses), saved = saved_bytes(
            lambda: model.rpn(ImageList(torch.zeros(2, 3, h, w), [(h, w)] * 2), feats, targets))
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
        return saved
    whole, cells = rpn_saved_bytes(False), rpn_saved_bytes(True)
    map_bytes = sum(2 * 16 * (256 // 2**k) ** 2 * 4 for k in range(2, 7))
    assert whole >= 2 * map_bytes  # each level's map and the head's ReLU output over it
    assert cells < 0.3 * whole, (cells, whole)


def test_head_without_at_cells_trains_over_the_whole_map(tiny):
    """A head of the user's own without at_cells still trains: the RPN then computes the losses from the whole
    map, with the same losses as the default head's at_cells."""
    _, model = make_model()
    model.train()
    images, targets = images_and_targets((True, True))
    torch.manual_seed(1)
    want = model(images, targets)

    class OwnHead(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.inner = head

        def forward(self, features):
            return self.inner(features)
    model.rpn.head = OwnHead(model.rpn.head)
    torch.manual_seed(1)
    got = model(images, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got["loss_rpn_cls"].requires_grad
