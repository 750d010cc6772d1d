"""build_model(cfg): the one place that reads the model config and wires the stages together."""
from __future__ import annotations

from ..config import Config, ModelConfig
from .anchors import AnchorGenerator
from .backbone import FrozenBatchNorm2d, ResNetBottomUp, load_pretrained
from .box_coder import BoxCoder
from .box_head import BoxHead
from .fpn import FPN
from .latent_noise import LatentNoise
from .mask_head import MaskHead
from .mask_rcnn import MaskRCNN
from .matcher import Matcher
from .poolers import MultiScaleRoIAlign
from .roi_heads import RoIHeads
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
    transform = ImageTransform(min_size_train=t.min_size_train, max_size_train=t.max_size_train,
                               min_size_test=t.min_size_test, max_size_test=t.max_size_test, pixel_mean=t.pixel_mean,
                               pixel_std=t.pixel_std, size_divisibility=t.size_divisibility,
                               resize_rounding=t.resize_rounding, mask_resize=t.mask_resize)
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
    rpn = RPN(in_features=a.levels, in_channels=m.fpn.out_channels, anchor_generator=anchor_gen,
              box_coder=BoxCoder(tuple(r.box_weights)), matcher=Matcher(r.fg_iou, r.bg_iou, r.allow_low_quality),
              sampler=BalancedSampler(r.batch_size_per_image, r.positive_fraction),
              pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
              post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test), nms_thresh=r.nms_thresh,
              min_size=r.min_size, smooth_l1_beta=r.smooth_l1_beta, conv_dims=r.conv_dims,
              score_thresh=r.score_thresh, sigmoid_scores=r.sigmoid_scores)
    roi_heads = None
    if cfg.stage == "full":
        if m.num_classes < 1:
            raise ValueError("model.num_classes must be >= 1 for the full stage")
        roi_heads = build_roi_heads(m, a.levels[:-1], a.strides[:-1])
    return MaskRCNN(transform=transform, bottom_up=bottom_up, noise=noise, fpn=fpn, rpn=rpn, roi_heads=roi_heads,
                    mask_paste=m.roi_heads.mask_paste)


def build_roi_heads(m: ModelConfig, levels: list[str], strides: list[int]) -> RoIHeads:
    """Box and mask heads over the RoI levels (every anchor level but the extra max-pooled one: P2..P5)."""
    h = m.roi_heads

    def pooler(resolution: int) -> MultiScaleRoIAlign:
        return MultiScaleRoIAlign(resolution, strides, h.sampling_ratio, h.aligned, h.canonical_box_size,
                                  h.canonical_level, h.roi_align_impl, h.level_mapper)

    box_head = BoxHead(in_channels=m.fpn.out_channels, resolution=h.box_pooler_resolution, fc_dim=h.fc_dim,
                       num_classes=m.num_classes, box_coder=BoxCoder(tuple(h.box_weights)),
                       smooth_l1_beta=h.smooth_l1_beta, score_thresh=h.score_thresh, nms_thresh=h.nms_thresh,
                       detections_per_image=h.detections_per_image, min_box_size=h.min_box_size)
    mask_pooler = mask_head = None
    if h.mask_on:
        mask_pooler = pooler(h.mask_pooler_resolution)
        mask_head = MaskHead(in_channels=m.fpn.out_channels, conv_dim=h.mask_conv_dim, num_convs=h.mask_num_convs,
                             num_classes=m.num_classes, aligned=h.aligned, soft_targets=h.mask_soft_targets)
    return RoIHeads(in_features=levels, box_pooler=pooler(h.box_pooler_resolution), box_head=box_head,
                    matcher=Matcher(h.fg_iou, h.bg_iou, False),
                    sampler=BalancedSampler(h.batch_size_per_image, h.positive_fraction),
                    mask_pooler=mask_pooler, mask_head=mask_head, add_gt_as_proposals=h.add_gt_as_proposals)
