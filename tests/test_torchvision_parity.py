"""Parity with torchvision: its Mask R-CNN's weights, converted by maskrcnn.torchvision_weights and loaded into our model
built from configs/torchvision_compat.yaml, give the same features, proposals, detections and masks.

torchvision's random initialisation makes every score degenerate (RPN logits ~0, one background-dominated
class), so the predictors and the BatchNorm statistics are set to seeded random values of a sensible scale:
then there are distinct proposals and detections of several classes above the 0.05 threshold. Images are
small (short side 320 in both models) so that the whole file runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d as TVFrozenBN

from maskrcnn.model.build import build_model
from maskrcnn.config import load_config
from maskrcnn.torchvision_weights import load_torchvision_state

MIN_SIZE, MAX_SIZE = 256, 384
POST_NMS, DETECTIONS = 100, 8  # fewer than the defaults: the heads would dominate the run time on CPU
IMAGE_SIZES = [(240, 320), (300, 260), (200, 410)]  # (h, w): resized to three shapes, padded batch


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Seeded, sensible-scale values for the BatchNorm statistics and the RPN / mask predictors."""
    g = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * std

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(randn(m.running_mean, 0.1))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(randn(m.bias, 0.1))
        head = model.rpn.head
        head.cls_logits.weight.copy_(randn(head.cls_logits.weight, 0.05))
        head.cls_logits.bias.copy_(randn(head.cls_logits.bias, 0.5))
        head.bbox_pred.weight.copy_(randn(head.bbox_pred.weight, 0.005))
        box = model.roi_heads.box_predictor
        box.bbox_pred.weight.copy_(randn(box.bbox_pred.weight, 0.005))
        mask = model.roi_heads.mask_predictor.mask_fcn_logits
        mask.weight.copy_(randn(mask.weight, 0.05))
        mask.bias.copy_(randn(mask.bias, 0.5))


@torch.no_grad()
def _centre_classifier(model: torch.nn.Module, box_features: torch.Tensor, seed: int) -> None:
    """Class scores that vary by ~2 logits from RoI to RoI, centred on these RoIs. The box-head features of
    a random model share one large positive component (post-ReLU), which a random classifier turns into
    one winning class everywhere; centring on it makes the argmax differ from RoI to RoI."""
    g = torch.Generator().manual_seed(seed)
    layer = model.roi_heads.box_predictor.cls_score
    w = torch.randn(layer.weight.shape, generator=g)
    w = w / ((box_features - box_features.mean(0)) @ w.T).std(0)[:, None] * 2.0
    layer.weight.copy_(w)
    layer.bias.copy_(-(box_features.mean(0) @ w.T))


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm2d -> torchvision's FrozenBatchNorm2d with the same statistics and eps: the model torchvision's
    builder makes whenever it loads weights (maskrcnn_resnet50_fpn(weights=...)), and what our frozen_bn is."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = TVFrozenBN(child.num_features, eps=child.eps)
                for buf in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buf).copy_(getattr(child, buf).detach())
                setattr(module, name, frozen)


def _capture(module: torch.nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda mod, args, out: store.__setitem__(key, out))


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, h, w, generator=g) for h, w in IMAGE_SIZES]


@pytest.fixture(scope="module")
def tv(images) -> dict:
    """A seeded torchvision Mask R-CNN, perturbed, in eval mode, BatchNorm eps 0 (as torchvision runs its COCO_V1
    weights), and its outputs: FPN features with BatchNorm2d (as built without weights), then, with the
    BatchNorm frozen, features, proposals and detections of one forward pass."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                  rpn_post_nms_top_n_test=POST_NMS, box_detections_per_img=DETECTIONS)
    _perturb(model, seed=1)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 0.0
    out: dict = {}
    with torch.no_grad():
        image_list, _ = model.transform(images)
        feats = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, feats)
        rh = model.roi_heads
        _centre_classifier(model, rh.box_head(rh.box_roi_pool(feats, proposals, image_list.image_sizes)), seed=2)
        out["bn_features"] = list(feats.values())
        _freeze_batchnorm(model)
        hooks = [_capture(model.backbone, out, "features"), _capture(model.rpn, out, "rpn")]
        out["detections"] = model(images)
        for h in hooks:
            h.remove()
    out["features"] = list(out["features"].values())
    out["proposals"] = out.pop("rpn")[0]
    out["state"] = model.state_dict()
    out["model"], out["image_list"] = model, image_list
    return out


@pytest.fixture(scope="module")
def ours(tv, images):
    """Our model from configs/torchvision_compat.yaml, initialised through load_torchvision_state (the path of
    --init torchvision, which also sets the FrozenBatchNorm eps to 0), for each RoIAlign implementation:
    {impl: outputs of one forward pass}. Computed lazily, once per implementation."""
    cache: dict[str, dict] = {}

    def run(impl: str) -> dict:
        if impl not in cache:
            cfg = load_config("configs/torchvision_compat.yaml", [
                "model.backbone.weights=none", f"model.transform.min_size_test={MIN_SIZE}",
                f"model.transform.max_size_test={MAX_SIZE}", f"model.rpn.post_nms_topk_test={POST_NMS}",
                f"model.roi_heads.detections_per_image={DETECTIONS}", f"model.roi_heads.roi_align_impl={impl}"])
            model = build_model(cfg).eval()
            report = load_torchvision_state(model, tv["state"], num_classes=90, frozen_bn_eps=0.0)
            assert not report.load.new and not report.load.unused and not report.reinitialised
            out: dict = {}
            hooks = [_capture(model.fpn, out, "features"), _capture(model.rpn, out, "rpn")]
            with torch.no_grad():
                out["detections"] = model(images)
            for h in hooks:
                h.remove()
            out["features"] = list(out["features"].values())
            out["proposals"] = [p["boxes"] for p in out.pop("rpn")[0]]
            out["model"] = model
            cache[impl] = out
        return cache[impl]

    return run


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def test_fpn_features_match(tv, ours):
    """P2..P6 against torchvision's with its BatchNorm frozen (as it runs loaded weights) and with BatchNorm2d
    (as built without weights): in eval mode at eps 0 both are the same function as our FrozenBatchNorm2d."""
    got = ours("torchvision")["features"]
    assert len(got) == len(tv["features"]) == len(tv["bn_features"]) == 5  # P2..P6
    for level, (a, b, c) in enumerate(zip(got, tv["features"], tv["bn_features"], strict=True)):
        assert b.abs().max() > 0.1, level  # features, not zeros
        assert _max_diff(a, b) <= 1e-4, level
        assert _max_diff(a, c) <= 1e-4, level


def test_proposals_match(tv, ours):
    got = ours("torchvision")["proposals"]
    assert len(got) == len(tv["proposals"]) == len(IMAGE_SIZES)  # one set per image
    for i, (a, b) in enumerate(zip(got, tv["proposals"], strict=True)):
        assert len(torch.unique(b, dim=0)) == len(b) == POST_NMS, "distinct proposals up to the post-NMS top-k"
        assert _max_diff(a, b) <= 1e-3, i


@pytest.mark.parametrize("impl", ["torchvision", "ours"])
def test_detections_and_masks_match(tv, ours, impl):
    if impl == "ours":
        pytest.importorskip("maskrcnn.model.roi_align")
    labels_seen = set()
    got = ours(impl)["detections"]
    assert len(got) == len(tv["detections"]) == len(IMAGE_SIZES)  # one result per image
    for i, (d, t) in enumerate(zip(got, tv["detections"], strict=True)):
        assert len(t["boxes"]) > 0, "the perturbed torchvision model should detect something"
        assert torch.equal(d["labels"], t["labels"]), i
        assert _max_diff(d["boxes"], t["boxes"]) <= 1e-3, i
        assert _max_diff(d["scores"], t["scores"]) <= 1e-4, i
        assert t["masks"].shape == (len(t["boxes"]), 1, *IMAGE_SIZES[i])
        assert _max_diff(d["masks"], t["masks"]) <= 1e-4, i
        labels_seen |= set(t["labels"].tolist())
    assert len(labels_seen) >= 3, "detections of several classes make the label comparison meaningful"


def test_training_losses_match(tv, ours):
    """Training mode, on the same features: the two RPNs and RoI heads draw their anchor and RoI samples
    in the same order from the same RNG, so with one seed they sample alike and the losses must agree
    (torchvision's names on the left: smooth-L1 beta 1/9 in both heads, soft mask targets)."""
    from collections import OrderedDict

    from maskrcnn.model.transform import ImageList

    tv_model, our_model = tv["model"], ours("torchvision")["model"]
    image_list = tv["image_list"]
    g = torch.Generator().manual_seed(7)
    targets = []
    for h, w in image_list.image_sizes:  # three objects per image, in the resized frame
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat((xy, xy + wh), 1).round()
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0 + 2: y1 - 2, x0 + 2: x1 - 2] = 1  # a little inside the box: soft targets differ
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (3,), generator=g), "masks": masks})
    tv_feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], tv["features"], strict=True))
    our_feats = dict(zip(["p2", "p3", "p4", "p5", "p6"], tv["features"], strict=True))
    try:
        tv_model.train()
        our_model.train()
        with torch.no_grad():
            torch.manual_seed(11)
            tv_props, tv_losses = tv_model.rpn(image_list, tv_feats, targets)
            torch.manual_seed(11)
            our_props, our_losses = our_model.rpn(ImageList(image_list.tensors, image_list.image_sizes), our_feats,
                                                  targets)
            assert len(our_props) == len(tv_props) == len(image_list.image_sizes)
            for a, b in zip(our_props, tv_props, strict=True):  # 2000 per image in training, as torchvision
                assert _max_diff(a["boxes"], b) <= 1e-3
            torch.manual_seed(12)
            _, tv_head = tv_model.roi_heads(tv_feats, tv_props, image_list.image_sizes, targets)
            torch.manual_seed(12)
            _, our_head = our_model.roi_heads(our_feats, tv_props, image_list.image_sizes, targets)
    finally:
        tv_model.eval()
        our_model.eval()
    pairs = [("loss_objectness", our_losses["loss_rpn_cls"], tv_losses["loss_objectness"]),
             ("loss_rpn_box_reg", our_losses["loss_rpn_box"], tv_losses["loss_rpn_box_reg"]),
             ("loss_classifier", our_head["loss_cls"], tv_head["loss_classifier"]),
             ("loss_box_reg", our_head["loss_box"], tv_head["loss_box_reg"]),
             ("loss_mask", our_head["loss_mask"], tv_head["loss_mask"])]
    for name, a, b in pairs:
        assert b.item() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- stage by stage, cheap
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_torchvision_rule_matches_torchvision(seed):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from maskrcnn.model.postprocess import paste_masks_torchvision

    g = torch.Generator().manual_seed(seed)
    h, w = 70, 90
    masks = torch.rand(40, 1, 28, 28, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    wh = torch.rand(40, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh[:5] = torch.rand(5, 2, generator=g) * 2  # tiny boxes, some under one pixel
    boxes = torch.cat((xy, xy + wh), 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)  # detections are clipped to the image (torchvision's paste
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)  # fails on boxes wholly outside it)
    expected = paste_masks_in_image(masks, boxes, (h, w))
    got = paste_masks_torchvision(masks, boxes, (h, w), chunk=16)
    assert got.shape == expected.shape == (40, 1, h, w)
    assert _max_diff(got, expected) <= 1e-5


def test_paste_torchvision_rule_no_detections():
    from maskrcnn.model.postprocess import paste_masks_torchvision

    assert paste_masks_torchvision(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (30, 40)).shape == (0, 1, 30, 40)


@pytest.mark.parametrize("padded", [(800, 1344), (352, 416), (320, 384)])
def test_anchors_with_strides_from_image_match_torchvision(padded):
    """torchvision's P6 stride is padded size // P6 size: 800 // 13 = 61 rows, not 64."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchors
    from torchvision.models.detection.image_list import ImageList

    from maskrcnn.model.anchors import AnchorGenerator

    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    hp, wp = padded
    feature_sizes = [(-(-hp // s), -(-wp // s)) for s in (4, 8, 16, 32, 64)]
    tv_anchors = TVAnchors(tuple((s,) for s in sizes), (ratios,) * 5)
    feats = [torch.empty(1, 1, fh, fw) for fh, fw in feature_sizes]
    expected = tv_anchors(ImageList(torch.empty(1, 3, hp, wp), [(hp, wp)]), feats)[0]
    ours = AnchorGenerator(sizes=sizes, ratios=ratios, strides=(4, 8, 16, 32, 64), round_base=True, stride_from_image=True)
    got = torch.cat(ours(feature_sizes, (hp, wp)))
    assert torch.equal(got, expected)


def test_level_mapper_matches_torchvision():
    from torchvision.ops.poolers import LevelMapper

    from maskrcnn.model.poolers import assign_levels

    sides = torch.tensor([1.0, 55.9, 56.0, 111.99, 112.0, 223.999, 224.0, 447.0, 448.0, 449.0, 2000.0])
    boxes = torch.stack((torch.zeros_like(sides), torch.zeros_like(sides), sides, sides), 1)
    expected = LevelMapper(2, 5)([boxes])
    assert torch.equal(assign_levels(boxes, 2, 5, 224.0, 4, "torchvision"), expected)
