"""Tests for maskrcnn.config: the standard defaults, YAML files, `_base_` chains, overrides and errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from maskrcnn import config as C
from maskrcnn.config import Config, ConfigError, apply_overrides, load_config, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------- docs/design.md's standard settings
def test_defaults_anchors():
    a = Config().model.anchors
    assert a.sizes == [32, 64, 128, 256, 512]
    assert a.levels == ["p2", "p3", "p4", "p5", "p6"]
    assert a.strides == [4, 8, 16, 32, 64]
    assert a.ratios == [0.5, 1.0, 2.0]


def test_defaults_rpn():
    r = Config().model.rpn
    assert (r.fg_iou, r.bg_iou, r.allow_low_quality) == (0.7, 0.3, True)
    assert (r.batch_size_per_image, r.positive_fraction) == (256, 0.5)
    assert (r.pre_nms_topk_train, r.pre_nms_topk_test) == (2000, 1000)
    assert r.nms_thresh == 0.7
    assert (r.post_nms_topk_train, r.post_nms_topk_test) == (1000, 1000)
    assert r.box_weights == [1.0, 1.0, 1.0, 1.0]


def test_defaults_roi_heads():
    h = Config().model.roi_heads
    assert (h.batch_size_per_image, h.positive_fraction) == (512, 0.25)
    assert (h.fg_iou, h.bg_iou) == (0.5, 0.5)
    assert h.add_gt_as_proposals is True
    assert h.box_weights == [10.0, 10.0, 5.0, 5.0]
    assert (h.box_pooler_resolution, h.mask_pooler_resolution) == (7, 14)
    assert (h.canonical_box_size, h.canonical_level) == (224, 4)
    assert h.fc_dim == 1024
    assert (h.mask_num_convs, h.mask_conv_dim) == (4, 256)
    # test-time thresholds
    assert h.score_thresh == 0.05
    assert h.nms_thresh == 0.5
    assert h.detections_per_image == 100
    assert h.mask_threshold == 0.5


def test_defaults_model_and_images():
    m = Config().model
    assert m.backbone.depth == 50 and m.backbone.norm == "frozen_bn" and m.backbone.freeze_at == 2
    assert m.fpn.out_channels == 256 and m.fpn.in_features == ["c2", "c3", "c4", "c5"]
    assert m.noise.enabled is False
    assert (m.transform.min_size_train, m.transform.max_size_train) == ([640, 672, 704, 736, 768, 800], 1333)
    assert (m.transform.min_size_test, m.transform.max_size_test) == (800, 1333)
    assert Config().data.flip_prob == 0.5


def test_defaults_solver():
    s = Config().solver
    assert (s.momentum, s.weight_decay) == (0.9, 1e-4)
    assert (s.base_lr, s.ims_per_batch) == (0.02, 16)
    assert s.warmup_iters == 1000
    assert s.steps == [round(s.max_iter * 2 / 3), round(s.max_iter * 8 / 9)]
    assert s.gamma == 0.1


def test_coco_yaml_spells_out_the_defaults():
    """configs/coco_r50_fpn_1x.yaml only restates defaults: the model it gives is the default model, and its
    solver is the default one written for a reference batch of 16 (the default 0 leaves other presets as they
    are written)."""
    cfg = load_config(CONFIGS / "coco_r50_fpn_1x.yaml")
    assert cfg.model == Config().model
    assert cfg.solver.reference_batch == 16 == cfg.solver.ims_per_batch
    assert dataclasses.replace(cfg.solver, reference_batch=0) == Config().solver


# ---------------------------------------------------------------------------------------- YAML files
def test_yaml_override(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("model:\n  rpn: {nms_thresh: 0.6}\n  backbone: {depth: 18}\nsolver:\n  steps: [10, 20]\n")
    cfg = load_config(p)
    assert cfg.model.rpn.nms_thresh == 0.6
    assert cfg.model.backbone.depth == 18
    assert cfg.solver.steps == [10, 20]
    # everything else keeps its default
    assert cfg.model.rpn.fg_iou == 0.7
    assert cfg.model.roi_heads == Config().model.roi_heads


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_base_chain_tiny():
    """tiny.yaml = shapes.yaml (its _base_) + its own keys, read independently with yaml.safe_load."""
    tiny_raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    assert tiny_raw.pop("_base_") == "shapes.yaml"
    shapes_raw = yaml.safe_load((CONFIGS / "shapes.yaml").read_text())
    shapes_raw.pop("_base_", None)
    tiny_flat, shapes_flat = _flatten(tiny_raw), _flatten(shapes_raw)
    cfg = load_config(CONFIGS / "tiny.yaml")
    for key, value in tiny_flat.items():  # tiny's own values win
        assert _get(cfg, key) == value, key
    inherited = [k for k in shapes_flat if k not in tiny_flat]
    assert inherited, "tiny.yaml inherits nothing from shapes.yaml"
    for key in inherited:  # the rest comes from the base
        assert _get(cfg, key) == shapes_flat[key], key
    # and keys set in neither file keep the defaults
    assert cfg.model.rpn.fg_iou == Config().model.rpn.fg_iou


def test_base_chain_three_levels(tmp_path):
    (tmp_path / "a.yaml").write_text("solver: {max_iter: 10, base_lr: 0.1}\nmodel: {num_classes: 3}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nsolver: {max_iter: 20}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.yaml").write_text("_base_: ../b.yaml\nsolver: {base_lr: 0.5}\n")
    cfg = load_config(sub / "c.yaml", ["model.num_classes=7"])
    assert cfg.solver.max_iter == 20  # b over a
    assert cfg.solver.base_lr == 0.5  # c over a
    assert cfg.model.num_classes == 7  # override over the files


def test_missing_file_raises(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  rpn: {nms_thres: 0.6}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert "bad.yaml" in msg and "model.rpn.nms_thres" in msg and "model.rpn.nms_thresh" in msg


# ----------------------------------------------------------------------------------------- overrides
def test_apply_overrides_types():
    cfg = apply_overrides(Config(), [
        "model.anchors.sizes=[8, 16, 32, 64, 128]",
        "model.noise.enabled=true",
        "model.noise.levels=[c4, c5]",
        "solver.base_lr=0.01",
        "model.rpn.fg_iou=1",  # an int where a float is expected
        "train.amp=false",
        "model.noise.seed=3",
        "stage=rpn",
        "train.name=my-run",
    ])
    assert cfg.model.anchors.sizes == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert all(isinstance(v, float) for v in cfg.model.anchors.sizes)
    assert cfg.model.noise.enabled is True
    assert cfg.model.noise.levels == ["c4", "c5"]
    assert cfg.solver.base_lr == 0.01
    assert cfg.model.rpn.fg_iou == 1.0 and isinstance(cfg.model.rpn.fg_iou, float)
    assert cfg.train.amp is False
    assert cfg.model.noise.seed == 3
    assert cfg.stage == "rpn"
    assert cfg.train.name == "my-run"


def test_override_optional_back_to_none():
    cfg = apply_overrides(Config(), ["model.noise.seed=5", "model.noise.seed=null"])
    assert cfg.model.noise.seed is None


def test_override_float_in_exponent_notation():
    cfg = apply_overrides(Config(), ["solver.weight_decay=1e-4", "solver.base_lr=2.5e-3"])
    assert cfg.solver.weight_decay == pytest.approx(1e-4)
    assert cfg.solver.base_lr == pytest.approx(2.5e-3)


def test_yaml_file_float_in_exponent_notation(tmp_path):
    p = tmp_path / "lr.yaml"
    p.write_text("solver: {weight_decay: 5e-5}\n")
    assert load_config(p).solver.weight_decay == pytest.approx(5e-5)


def test_override_later_wins():
    cfg = load_config(None, ["solver.max_iter=5", "solver.max_iter=6"])
    assert cfg.solver.max_iter == 6


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["model.rpn.nms_thres=0.5"])
    msg = str(info.value)
    assert "'model.rpn.nms_thres'" in msg
    assert "model.rpn.nms_thresh" in msg


def test_unknown_section_names_closest():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["modle.rpn.nms_thresh=0.5"])
    msg = str(info.value)
    assert "modle" in msg and "'model'" in msg
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["model.rpnn.nms_thresh=0.5"])
    assert "model.rpn" in str(info.value)


@pytest.mark.parametrize("item,key", [
    ("model.rpn.fg_iou=abc", "model.rpn.fg_iou"),
    ("model.backbone.depth=5.5", "model.backbone.depth"),
    ("model.noise.enabled=3", "model.noise.enabled"),
    ("model.anchors.sizes=32", "model.anchors.sizes"),
    ("model.anchors.sizes=[32, x]", "model.anchors.sizes[1]"),
    ("solver.max_iter=true", "solver.max_iter"),
    ("model.backbone.norm=[1]", "model.backbone.norm"),
])
def test_wrong_type_names_key(item, key):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [item])
    assert key in str(info.value)


def test_section_given_a_scalar_raises():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["model.rpn=3"])
    assert "model.rpn" in str(info.value)


def test_malformed_override_raises():
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["model.rpn.nms_thresh"])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------ round trip
def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.noise.enabled=true", "model.noise.seed=11",
                                                "solver.base_lr=0.00125", "model.anchors.offset=0.5"])
    p = tmp_path / "resolved.yaml"
    save_config(cfg, p)
    back = load_config(p)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_save_load_round_trip_defaults(tmp_path):
    p = tmp_path / "default.yaml"
    save_config(Config(), p)
    assert load_config(p) == Config()


def test_config_dict_round_trip():
    cfg = load_config(CONFIGS / "shapes.yaml")
    assert C.config_from_dict(C.config_to_dict(cfg)) == cfg


def test_defaults_are_independent_instances():
    a, b = Config(), Config()
    a.model.anchors.sizes.append(1024.0)
    assert b.model.anchors.sizes == [32, 64, 128, 256, 512]


def test_loss_weights_merge_key_by_key(tmp_path):
    cfg = C.load_config(None, ["loss_weights.loss_mask=2", "loss_weights.loss_cls=0.5"])
    assert cfg.loss_weights == {"loss_mask": 2.0, "loss_cls": 0.5}
    path = tmp_path / "c.yaml"
    C.save_config(cfg, path)
    assert C.load_config(path).loss_weights == {"loss_mask": 2.0, "loss_cls": 0.5}
    with pytest.raises(C.ConfigError, match="loss_weights.loss_mask"):
        C.load_config(None, ["loss_weights.loss_mask=heavy"])


def test_total_loss_weighs_unnamed_losses_one_and_rejects_unknown_names():
    import torch

    from maskrcnn.engine.step import total_loss

    losses = {"loss_a": torch.tensor(2.0), "loss_b": torch.tensor(3.0)}
    assert float(total_loss(losses, {})) == 5.0
    assert float(total_loss(losses, {"loss_b": 0.5})) == 3.5
    with pytest.raises(ValueError, match="loss_weights names 'loss_c'"):
        total_loss(losses, {"loss_c": 1.0})


def test_image_rules_and_grouping_per_config():
    """Standard settings: detectron2's resize rounding, pixel-centre mask resizing, short side drawn per image
    from 640..800 and aspect-ratio grouping on COCO; torchvision_compat keeps torchvision's rules; shapes groups
    nothing (a field of DataConfig, off by default)."""
    t = Config().model.transform
    assert (t.resize_rounding, t.mask_resize) == ("detectron2", "centre")
    assert Config().data.aspect_ratio_grouping is False
    coco = load_config(CONFIGS / "coco_r50_fpn_1x.yaml")
    assert coco.model.transform.min_size_train == [640, 672, 704, 736, 768, 800]
    assert (coco.model.transform.max_size_train, coco.model.transform.min_size_test) == (1333, 800)
    assert (coco.model.transform.resize_rounding, coco.model.transform.mask_resize) == ("detectron2", "centre")
    assert coco.data.aspect_ratio_grouping is True
    tv = load_config(CONFIGS / "torchvision_compat.yaml")
    assert tv.model.transform.min_size_train == [800]
    assert (tv.model.transform.resize_rounding, tv.model.transform.mask_resize) == ("torchvision", "nearest")
    assert load_config(CONFIGS / "shapes.yaml").data.aspect_ratio_grouping is False
    with pytest.raises(ConfigError, match="model.transform.mask_resize: expected a string"):
        load_config(None, ["model.transform.mask_resize=1"])


@pytest.mark.parametrize("preset", ["coco_r50_fpn_1x.yaml", "torchvision_compat.yaml"])
def test_published_presets_evaluate_one_image_per_batch(preset):
    """The presets compared with published AP infer one image at a time (detectron2 and torchvision's reference
    evaluate so): in a batch of two, an image is padded to its partner's size and its detections can change.
    The default (2) is left as it is; --set still overrides."""
    assert load_config(CONFIGS / preset).test.ims_per_batch == 1
    assert Config().test.ims_per_batch == 2
    assert load_config(CONFIGS / preset, ["test.ims_per_batch=4"]).test.ims_per_batch == 4


def test_min_box_size_per_config():
    """The COCO presets keep boxes down to detectron2's 1e-5 px; the default and the shapes presets drop boxes
    under 1 px."""
    assert Config().data.min_box_size == 1.0
    for name in ("coco_r50_fpn_1x.yaml", "torchvision_compat.yaml"):
        assert load_config(CONFIGS / name).data.min_box_size == 1e-5
    for name in ("shapes.yaml", "tiny.yaml"):
        assert load_config(CONFIGS / name).data.min_box_size == 1.0
