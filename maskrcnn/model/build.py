"""build_model(cfg): the one place that reads the model config and wires the stages together."""
from __future__ import annotations

from .anchors import AnchorGenerator
from .backbone import FrozenBatchNorm2d, ResNetBottomUp, load_pretrained
from .box_coder import BoxCoder
from ..config import Config
from .fpn import FPN
from .latent_noise import LatentNoise
from .mask_rcnn import MaskRCNN
from .matcher import Matcher
from .poolers import MultiScaleRoIAlign
from .roi_heads import BoxHead, MaskHead, RoIHeads
from .rpn import RPN
from .sampler import BalancedSampler
from .transform import ImageTransform


def build_model(cfg: Config, load_weights: bool = True) -> MaskRCNN:
    """The model for `cfg.stage` ("rpn" or "full"). `load_weights=False` skips pretrained backbone weights
    (when a checkpoint will be loaded over them anyway)."""
    m = cfg.model
    if cfg.stage not in ("rpn", "full"):
        raise ValueError(f"stage must be 'rpn' or 'full', got '{cfg.stage}'")
    t = m.transform
    transform = ImageTransform(t.min_size_train, t.max_size_train, t.min_size_test, t.max_size_test,
                               t.pixel_mean, t.pixel_std, t.size_divisibility)
    b = m.backbone
    bottom_up = ResNetBottomUp(b.depth, b.norm, b.freeze_at)
    for module in bottom_up.modules():  # eps is not a constructor argument of torchvision's ResNet
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = b.frozen_bn_eps
    if load_weights:
        load_pretrained(bottom_up, b.weights)
    n = m.noise
    noise = LatentNoise(n.enabled, n.levels, n.mode, n.distribution, n.strength, n.shape, n.train_only, n.seed)
    fpn = FPN([bottom_up.out_channels[c] for c in m.fpn.in_features], m.fpn.in_features, m.fpn.out_channels)
    a = m.anchors
    missing = [lvl for lvl in a.levels if lvl not in fpn.out_features]
    if missing:
        raise ValueError(f"anchor levels {missing} are not FPN outputs {fpn.out_features}")
    if len(a.strides) != len(a.levels):
        raise ValueError(f"model.anchors: {len(a.levels)} levels but {len(a.strides)} strides")
    anchor_gen = AnchorGenerator(a.sizes, a.ratios, a.strides, a.round_base, a.offset, a.stride_from_image)
    r = m.rpn
    rpn = RPN(a.levels, m.fpn.out_channels, anchor_gen, BoxCoder(tuple(r.box_weights)),
              Matcher(r.fg_iou, r.bg_iou, r.allow_low_quality), BalancedSampler(r.batch_size_per_image,
                                                                                r.positive_fraction),
              (r.pre_nms_topk_train, r.pre_nms_topk_test), (r.post_nms_topk_train, r.post_nms_topk_test),
              r.nms_thresh, r.min_size, r.smooth_l1_beta, r.conv_dims, r.score_thresh, r.sigmoid_scores)
    roi_heads = None
    if cfg.stage == "full":
        h = m.roi_heads
        if m.num_classes < 1:
            raise ValueError("model.num_classes must be >= 1 for the full stage")
        # RoI levels: every anchor level except the extra max-pooled one (P2..P5 by default).
        levels, strides = a.levels[:-1], a.strides[:-1]
        box_pooler = MultiScaleRoIAlign(h.box_pooler_resolution, strides, h.sampling_ratio, h.aligned,
                                        h.canonical_box_size, h.canonical_level, h.roi_align_impl, h.level_mapper)
        box_head = BoxHead(m.fpn.out_channels, h.box_pooler_resolution, h.fc_dim, m.num_classes)
        mask_pooler = mask_head = None
        if h.mask_on:
            mask_pooler = MultiScaleRoIAlign(h.mask_pooler_resolution, strides, h.sampling_ratio, h.aligned,
                                             h.canonical_box_size, h.canonical_level, h.roi_align_impl,
                                             h.level_mapper)
            mask_head = MaskHead(m.fpn.out_channels, h.mask_conv_dim, h.mask_num_convs, m.num_classes)
        roi_heads = RoIHeads(levels, box_pooler, box_head, mask_pooler, mask_head, BoxCoder(tuple(h.box_weights)),
                             Matcher(h.fg_iou, h.bg_iou, False), BalancedSampler(h.batch_size_per_image,
                                                                                 h.positive_fraction),
                             m.num_classes, h.add_gt_as_proposals, h.smooth_l1_beta, h.score_thresh,
                             h.nms_thresh, h.detections_per_image, h.aligned, h.min_box_size,
                             h.mask_soft_targets)
    return MaskRCNN(transform, bottom_up, noise, fpn, rpn, roi_heads, m.roi_heads.mask_paste)
