"""build_model(cfg): the one place that reads the model config and wires the stages together."""
from __future__ import annotations

from ..config import AnchorConfig, Config, ModelConfig
from .anchors import AnchorGenerator
from .backbone import ResNetBottomUp, load_pretrained
from .box_coder import BoxCoder
from .box_head import BoxHead
from .fpn import FPN
from .fuse import fold_frozen_batchnorm_live
from .latent_noise import LatentNoise
from .mask_head import MaskHead
from .maskiou_head import MaskIoUHead
from .mask_rcnn import DEFAULT_NOISE_LEVELS, NOISE_SITES, MaskRCNN
from .matcher import Matcher
from .poolers import MultiScaleRoIAlign
from .roi_heads import RoIHeads
from .rpn import RPN
from .sampler import BalancedSampler
from .transform import ImageTransform

# The heads a config can name (model.roi_heads.box_head / mask_head), the one place names become classes. A box
# head is built with BoxHead's keywords, a mask head with MaskHead's (a new head takes the same, or subclasses);
# a head with wants_features = True also gets strides= {level: stride} of the RoI levels.
BOX_HEADS = {"standard": BoxHead}
MASK_HEADS = {"standard": MaskHead, "maskiou": MaskIoUHead}  # maskiou: Mask Scoring R-CNN (maskiou_head.py)


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
    bottom_up = ResNetBottomUp(depth=b.depth, norm=b.norm, freeze_at=b.freeze_at, frozen_bn_eps=b.frozen_bn_eps,
                               recompute=b.recompute, recompute_under_cpu_amp=b.recompute_under_cpu_amp)
    if load_weights:
        load_pretrained(bottom_up, b.weights)
    if b.fold_frozen_bn:
        fold_frozen_batchnorm_live(bottom_up)
    fpn = FPN(in_channels=[bottom_up.out_channels[c] for c in m.fpn.in_features], in_features=m.fpn.in_features,
              out_channels=m.fpn.out_channels)
    a = m.anchors
    missing = [lvl for lvl in a.levels if lvl not in fpn.out_features]
    if missing:
        raise ValueError(f"anchor levels {missing} are not FPN outputs {fpn.out_features}")
    r = m.rpn
    rpn = RPN(in_features=a.levels, in_channels=m.fpn.out_channels, anchor_generator=build_anchor_generator(a),
              box_coder=BoxCoder(weights=tuple(r.box_weights)),
              matcher=Matcher(high_threshold=r.fg_iou, low_threshold=r.bg_iou,
                              allow_low_quality_matches=r.allow_low_quality),
              sampler=BalancedSampler(batch_size_per_image=r.batch_size_per_image,
                                      positive_fraction=r.positive_fraction),
              pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
              post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test), nms_thresh=r.nms_thresh,
              min_size=r.min_size, smooth_l1_beta=r.smooth_l1_beta, conv_dims=r.conv_dims,
              score_thresh=r.score_thresh, sigmoid_scores=r.sigmoid_scores,
              loss_at_sampled_cells=r.loss_at_sampled_cells)
    roi_heads = None
    if cfg.stage == "full":
        if m.num_classes < 1:
            raise ValueError("model.num_classes must be >= 1 for the full stage")
        roi_heads = build_roi_heads(m, a.levels[:-1], a.strides[:-1])
    n = m.noise
    if n.site not in NOISE_SITES:
        raise ValueError(f"model.noise.site: expected one of {', '.join(NOISE_SITES)}, got '{n.site}'")
    outputs = MaskRCNN.site_outputs(n.site, bottom_up, fpn, roi_heads)
    levels = list(n.levels) or DEFAULT_NOISE_LEVELS.get(n.site, outputs)
    unknown = [lvl for lvl in levels if lvl not in outputs]
    if unknown:
        raise ValueError(f"model.noise.levels {unknown} are not outputs of the {n.site} site in this "
                         f"{cfg.stage}-stage model ({', '.join(outputs) or 'none'}); set model.noise.levels to some "
                         f"of them, or [] for the site's default")
    if n.enabled and not levels:
        raise ValueError(f"model.noise.enabled with no outputs at the {n.site} site in an {cfg.stage}-stage model "
                         f"(choose another model.noise.site)")
    noise = LatentNoise(enabled=n.enabled, levels=levels, mode=n.mode, distribution=n.distribution,
                        strength=n.strength, shape=n.shape, train_only=n.train_only, seed=n.seed)
    return MaskRCNN(transform=transform, bottom_up=bottom_up, noise=noise, fpn=fpn, rpn=rpn, roi_heads=roi_heads,
                    mask_paste=m.roi_heads.mask_paste, noise_site=n.site)


def build_anchor_generator(a: AnchorConfig) -> AnchorGenerator:
    """The RPN's anchor generator alone (the report measures candidate anchors with it)."""
    if len(a.strides) != len(a.levels):
        raise ValueError(f"model.anchors: {len(a.levels)} levels but {len(a.strides)} strides")
    return AnchorGenerator(sizes=a.sizes, ratios=a.ratios, strides=a.strides, round_base=a.round_base,
                           offset=a.offset, stride_from_image=a.stride_from_image)


def build_roi_heads(m: ModelConfig, levels: list[str], strides: list[int]) -> RoIHeads:
    """Box and mask heads over the RoI levels (every anchor level but the extra max-pooled one: P2..P5)."""
    h = m.roi_heads

    def pooler(resolution: int) -> MultiScaleRoIAlign:
        return MultiScaleRoIAlign(output_size=resolution, strides=strides, sampling_ratio=h.sampling_ratio,
                                  aligned=h.aligned, canonical_box_size=h.canonical_box_size,
                                  canonical_level=h.canonical_level, impl=h.roi_align_impl,
                                  level_mapper=h.level_mapper)

    box_head = head_class("box_head", h.box_head, BOX_HEADS)(
        in_channels=m.fpn.out_channels, resolution=h.box_pooler_resolution, fc_dim=h.fc_dim,
        num_classes=m.num_classes, box_coder=BoxCoder(weights=tuple(h.box_weights)),
        smooth_l1_beta=h.smooth_l1_beta, score_thresh=h.score_thresh, nms_thresh=h.nms_thresh,
        detections_per_image=h.detections_per_image, min_box_size=h.min_box_size)
    mask_pooler = mask_head = None
    if h.mask_on:
        cls = head_class("mask_head", h.mask_head, MASK_HEADS)
        # a head that samples the FPN maps itself (wants_features) also gets each level's stride
        maps = {"strides": dict(zip(levels, strides))} if cls.wants_features else {}
        mask_head = cls(in_channels=m.fpn.out_channels, conv_dim=h.mask_conv_dim, num_convs=h.mask_num_convs,
                        num_classes=m.num_classes, aligned=h.aligned, soft_targets=h.mask_soft_targets, **maps)
        mask_pooler = pooler(h.mask_pooler_resolution) if mask_head.pooled else None
    return RoIHeads(in_features=levels, box_pooler=pooler(h.box_pooler_resolution), box_head=box_head,
                    matcher=Matcher(high_threshold=h.fg_iou, low_threshold=h.bg_iou, allow_low_quality_matches=False),
                    sampler=BalancedSampler(batch_size_per_image=h.batch_size_per_image,
                                            positive_fraction=h.positive_fraction),
                    mask_pooler=mask_pooler, mask_head=mask_head, add_gt_as_proposals=h.add_gt_as_proposals)


def head_class(key: str, name: str, known: dict[str, type]) -> type:
    """The class a config's head name stands for; an unknown name is an error listing the known ones."""
    if name not in known:
        raise ValueError(f"model.roi_heads.{key}: unknown head '{name}' (known: {', '.join(known)})")
    return known[name]
