"""Tests for maskrcnn.torchvision_weights: torchvision <-> maskrcnn state-dict names, and the COCO transfer initialisation."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.model.backbone import FrozenBatchNorm2d, WeightsUnavailable
from maskrcnn.model.build import build_model
from maskrcnn.config import load_config
from maskrcnn.torchvision_weights import (UnmappedKeysError, from_torchvision, load_torchvision_coco, load_torchvision_state,
                              to_torchvision)

CATEGORIES = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()


def _ours(num_classes: int = 90, stage: str = "full"):
    cfg = load_config("configs/torchvision_compat.yaml",
                      ["model.backbone.weights=none", f"model.num_classes={num_classes}", f"stage={stage}"])
    return build_model(cfg), cfg


@pytest.fixture(scope="module")
def ours_model():
    torch.manual_seed(1)
    return _ours()[0]


def test_every_key_maps_and_loads_strictly(tv_state, ours_model):
    state = from_torchvision(tv_state)
    assert set(state) == set(ours_model.state_dict())  # nothing missing, nothing extra
    ours_model.load_state_dict(state, strict=True)
    for k, v in state.items():
        assert torch.equal(ours_model.state_dict()[k], v), k


def test_round_trip_both_ways(tv_state, ours_model):
    back = to_torchvision(from_torchvision(tv_state))
    assert set(back) == {k for k in tv_state if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(back[k], tv_state[k]) for k in back)
    ours = ours_model.state_dict()
    again = from_torchvision(to_torchvision(ours))
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_to_torchvision_loads_strictly_into_torchvision(ours_model):
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    tv.load_state_dict(to_torchvision(ours_model.state_dict()), strict=True)  # BN restores num_batches_tracked
    torch.testing.assert_close(tv.roi_heads.mask_predictor.mask_fcn_logits.weight,
                               ours_model.roi_heads.mask_head.predictor.weight, rtol=0, atol=0)


def test_version_1_names(tv_state):
    """The COCO_V1 checkpoint predates torchvision's Conv2dNormActivation names."""
    legacy = {}
    for k, v in tv_state.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy[k] = v
    assert "roi_heads.mask_head.mask_fcn4.weight" in legacy and "rpn.head.conv.weight" in legacy
    new, old = from_torchvision(tv_state), from_torchvision(legacy)
    assert set(new) == set(old) and all(torch.equal(new[k], old[k]) for k in new)


def test_unmapped_keys_are_listed():
    state = {"backbone.body.conv1.weight": torch.zeros(1), "roi_heads.keypoint_head.0.weight": torch.zeros(1),
             "roi_heads.box_head.0.0.weight": torch.zeros(1)}
    with pytest.raises(UnmappedKeysError) as e:
        from_torchvision(state)
    msg = str(e.value)
    assert "2 torchvision keys" in msg
    assert "roi_heads.keypoint_head.0.weight" in msg and "roi_heads.box_head.0.0.weight" in msg
    with pytest.raises(UnmappedKeysError, match="latent"):
        to_torchvision({"noise.latent.weight": torch.zeros(1)})


def test_same_classes_loads_everything_and_sets_eps(tv_state):
    model, cfg = _ours(90)
    report = load_torchvision_state(model, tv_state, num_classes=90, cfg=cfg)
    assert not report.load.new and not report.load.unused and not report.reinitialised
    assert cfg.model.backbone.frozen_bn_eps == 0.0
    assert all(m.eps == 0.0 for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    assert "FrozenBatchNorm eps set to 0.0" in report.summary()


def test_other_classes_reinitialise_predictors(tv_state):
    model, _ = _ours(4)
    report = load_torchvision_state(model, tv_state, num_classes=4)
    assert sorted({k.rsplit(".", 1)[0] for k in report.reinitialised}) == [
        "roi_heads.box_head.bbox_pred", "roi_heads.box_head.cls_score", "roi_heads.mask_head.predictor"]
    assert not report.load.skipped
    # everything else came from torchvision
    torch.testing.assert_close(model.roi_heads.box_head.fc7.weight, tv_state["roi_heads.box_head.fc7.weight"])
    assert model.roi_heads.box_head.cls_score.weight.shape == (5, 1024)
    assert model.roi_heads.box_head.cls_score.weight.std() < 0.02  # fresh init (std 0.01), not torchvision's
    assert "re-initialised" in report.summary() and "roi_heads.box_head.cls_score" in report.summary()


def test_coco_class_names_keep_their_predictor_rows(tv_state):
    model, _ = _ours(2)
    report = load_torchvision_state(model, tv_state, num_classes=2, class_names=["__background__", "dog", "person"],
                                    categories=CATEGORIES)
    dog, person = CATEGORIES.index("dog"), CATEGORIES.index("person")
    assert report.class_rows == [0, dog, person] and not report.reinitialised
    rows = torch.tensor([0, dog, person])
    head = model.roi_heads.box_head
    torch.testing.assert_close(head.cls_score.weight, tv_state["roi_heads.box_predictor.cls_score.weight"][rows])
    deltas = tv_state["roi_heads.box_predictor.bbox_pred.bias"].view(-1, 4)[rows].reshape(-1)
    torch.testing.assert_close(head.bbox_pred.bias, deltas)
    torch.testing.assert_close(model.roi_heads.mask_head.predictor.bias,
                               tv_state["roi_heads.mask_predictor.mask_fcn_logits.bias"][rows])


def test_rpn_stage_reports_unused_heads(tv_state):
    model, _ = _ours(90, stage="rpn")
    report = load_torchvision_state(model, tv_state, num_classes=90)
    assert not report.load.new
    assert any(k.startswith("roi_heads.") for k in report.load.unused)


def test_model_that_does_not_fit_is_a_clear_error(tv_state):
    cfg = load_config("configs/tiny.yaml", ["model.num_classes=90"])
    model = build_model(cfg)
    with pytest.raises(ValueError, match="torchvision_compat"):
        load_torchvision_state(model, tv_state, num_classes=90)


def test_load_torchvision_coco_offline_names_file_and_place(offline_hub):
    model, _ = _ours(4, stage="rpn")
    with pytest.raises(WeightsUnavailable) as e:
        load_torchvision_coco(model, num_classes=4)
    msg = str(e.value)
    assert "\n" not in msg
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in msg
    assert str(offline_hub.checkpoints) in msg


def test_load_torchvision_coco_with_cached_weights(offline_hub, tv_state):
    """What `--init torchvision` does once the file is in torch.hub's cache (a random-weights stand-in,
    named by its own hash)."""
    offline_hub.place(torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1, tv_state)
    model, cfg = _ours(4)
    report = load_torchvision_coco(model, num_classes=4, cfg=cfg)
    assert "COCO_V1" in report.source and report.reinitialised
    assert torch.equal(model.bottom_up.layer1[0].conv1.weight, tv_state["backbone.body.layer1.0.conv1.weight"])
    assert cfg.model.backbone.frozen_bn_eps == 0.0
