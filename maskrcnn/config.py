"""Typed configuration: nested dataclasses with defaults, YAML overrides and `--set a.b=value`.

Every field has a default and a one-line meaning (the comment beside it). Only `build_model(cfg)` and the
entry points read a config; modules take explicit arguments.

    cfg = load_config("configs/coco_r50_fpn_1x.yaml", ["solver.lr=0.01", "model.noise.enabled=true"])

An unknown key or a value of the wrong type raises `ConfigError` naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# A precision switch: true, false, or auto (mixed precision where the device runs it natively; see
# maskrcnn.model.precision.choose_precision).
Switch = Union[bool, Literal["auto"]]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    depth: int = 50  # ResNet depth: 18, 34, 50 or 101 (torchvision's ResNet)
    norm: str = "frozen_bn"  # frozen_bn | bn | gn (gn/bn for training from scratch)
    freeze_at: int = 2  # 0: train all; 1: freeze stem; 2: stem+res2; ... 5: stem..res5
    weights: str = "imagenet"  # imagenet (through torchvision) | none | path to a .pth state dict
    frozen_bn_eps: float = 1e-5  # eps of FrozenBatchNorm2d (torchvision's COCO Mask R-CNN weights use 0.0)
    fold_frozen_bn: bool = False  # each FrozenBatchNorm2d computed inside its convolution (weight x scale, bias)
    # in training too (model/fuse.py: fold_frozen_batchnorm_live); the same state dict
    recompute: list[str] = field(default_factory=lambda: ["layer2", "layer3"])  # ResNet stages (layer1..layer4)
    # whose activations are not kept for the backward pass but computed again there: the same gradients, less
    # memory for more time (ResNet-50, 512x512, batch 2: peak 1583 -> 1438 MB, 0.96x -> 0.87x torchvision's, for
    # ~7% longer steps; the README's lever table). [] keeps everything. A stage whose BatchNorm updates its running
    # statistics (norm: bn, in training) is not recomputed: they would be updated twice.
    recompute_under_cpu_amp: bool = False  # recompute those stages under a CPU's bf16 autocast too (train.cpu_amp).
    # Off: there the step is faster without (AVX-512 BF16 CPU, the benchmark's bf16 step: 2537 -> 2390 ms, -6%) and
    # its peak 1432 -> 1510 MB, below torchvision's under the same autocast (1750 MB) and its fp32 step (1665 MB).


@dataclass
class NoiseConfig:
    enabled: bool = False  # LatentNoise is the identity unless enabled (--feature-noise turns it on)
    site: str = "bottom_up"  # where it sits: bottom_up (c2..c5, before the FPN) | fpn (p2..p6, after the FPN) |
    # roi (the pooled RoI features, "box" and "mask", before the heads)
    levels: list[str] = field(default_factory=list)  # outputs of the site the noise touches (empty: the site's
    # default: c5 at bottom_up, as LatentNoise.uniform_c5_per_position; every output at fpn and roi)
    mode: str = "multiplicative"  # multiplicative: x * n | additive: x + n * std(x)
    distribution: str = "uniform"  # uniform: n ~ U(-s, s) | gaussian: n ~ N(0, s)   (1 + n when multiplicative)
    strength: float = 0.2  # s above; 0.2 uniform multiplicative is U(0.8, 1.2)
    shape: str = "position"  # element: [N,C,H,W] | position: [1,1,H,W] | channel: [1,C,1,1]
    train_only: bool = True  # identity in eval mode unless false
    seed: Optional[int] = None  # seed of the module's own generator (None: the global RNG)


@dataclass
class FPNConfig:
    in_features: list[str] = field(default_factory=lambda: ["c2", "c3", "c4", "c5"])  # bottom-up inputs
    out_channels: int = 256  # channels of every P level


@dataclass
class AnchorConfig:
    levels: list[str] = field(default_factory=lambda: ["p2", "p3", "p4", "p5", "p6"])  # feature maps used
    strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # pixel stride of each level
    sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])  # one per level
    ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    round_base: bool = False  # round the base anchors to integers (torchvision does)
    offset: float = 0.0  # anchor centre offset in units of stride (detectron2 default 0.0)
    stride_from_image: bool = False  # torchvision: stride = padded image size // feature size (P6 can be < 64)


@dataclass
class RPNConfig:
    conv_dims: int = -1  # channels of the 3x3 head conv (-1: same as input)
    fg_iou: float = 0.7  # IoU >= this: positive anchor
    bg_iou: float = 0.3  # IoU < this: negative anchor
    allow_low_quality: bool = True  # each GT's best anchors are positive too
    batch_size_per_image: int = 256  # anchors sampled per image for the loss
    positive_fraction: float = 0.5  # at most this fraction of the sample is positive
    pre_nms_topk_train: int = 2000  # per level, per image, before NMS (training)
    pre_nms_topk_test: int = 1000  # per level, per image, before NMS (inference)
    post_nms_topk_train: int = 1000  # per image after NMS (training; torchvision: 2000)
    post_nms_topk_test: int = 1000  # per image after NMS (inference)
    nms_thresh: float = 0.7  # NMS IoU threshold, applied per level
    min_size: float = 0.0  # proposals with a side below this (px) are removed
    score_thresh: float = 0.0  # proposals with sigmoid(objectness) below this are removed (0: keep all)
    sigmoid_scores: bool = False  # proposal scores are sigmoid probabilities, as torchvision ranks them in NMS
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # box coder weights
    smooth_l1_beta: float = 0.0  # 0: L1 loss (detectron2); 1/9: torchvision's smooth L1
    loss_at_sampled_cells: bool = True  # training: the head's whole-map pass (proposals) without autograd, and
    # the losses from the head computed again at the sampled anchors' cells: the same losses and gradients for less
    # time and memory; false: the whole map in autograd (for a loss over every anchor)


@dataclass
class RoIHeadsConfig:
    fg_iou: float = 0.5  # IoU >= this: foreground RoI
    bg_iou: float = 0.5  # IoU < this: background RoI
    batch_size_per_image: int = 512  # RoIs sampled per image
    positive_fraction: float = 0.25  # at most this fraction foreground
    add_gt_as_proposals: bool = True  # ground-truth boxes join the proposals in training
    box_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # box coder weights (x, y, w, h)
    box_pooler_resolution: int = 7  # RoIAlign output for the box head
    mask_pooler_resolution: int = 14  # RoIAlign output for the mask head
    sampling_ratio: int = 0  # RoIAlign samples per bin side (<=0: adaptive)
    aligned: bool = True  # RoIAlign half-pixel shift (detectron2 True, torchvision False)
    canonical_box_size: float = 224.0  # FPN level assignment: k = floor(k0 + log2(sqrt(wh) / this))
    canonical_level: int = 4  # k0 above
    level_mapper: str = "detectron2"  # detectron2: floor(k0 + log2(s/s0 + 1e-8)) | torchvision: + 1e-6 outside log2
    fc_dim: int = 1024  # width of the two box-head FC layers
    mask_conv_dim: int = 256  # channels of the mask-head convs
    mask_num_convs: int = 4  # number of 3x3 convs in the mask head
    smooth_l1_beta: float = 0.0  # 0: L1 (detectron2); 1/9 torchvision
    box_head: str = "standard"  # which box head, by name: standard (2 FC, box_head.py); names in model/build.py
    mask_head: str = "standard"  # which mask head: standard (4 conv + deconv, mask_head.py) | maskiou (Mask Scoring
    # R-CNN: the standard head plus a MaskIoU branch that rescores each mask, maskiou_head.py)
    mask_on: bool = True  # build the mask head
    mask_soft_targets: bool = False  # keep RoIAligned GT masks soft (torchvision) instead of >= 0.5 (detectron2)
    score_thresh: float = 0.05  # detections below this score are dropped
    nms_thresh: float = 0.5  # per-class NMS
    min_box_size: float = 0.01  # detections with a side below this (px) are removed (torchvision: 1e-2)
    detections_per_image: int = 100  # top-k after NMS
    mask_threshold: float = 0.5  # used when binarising masks (evaluation, drawing)
    mask_paste: str = "bilinear"  # bilinear: sample the mask at pixel centres | torchvision: pad, resize, paste
    roi_align_impl: str = "ours"  # ours (hand-written, maskrcnn.model.roi_align) | torchvision (its compiled kernel)


@dataclass
class TransformConfig:
    min_size_train: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])  # short side, one
    # drawn per image (detectron2's multi-scale training; torchvision: [800])
    max_size_train: int = 1333  # long side at most
    min_size_test: int = 800  # short side at evaluation and inference
    max_size_test: int = 1333  # long side at most, at evaluation and inference
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB, 0..1 scale
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # RGB, 0..1 scale
    size_divisibility: int = 32  # batch padded to a multiple of this
    resize_rounding: str = "detectron2"  # detectron2: int(x + 0.5) of its ResizeShortestEdge | torchvision: floor
    mask_resize: str = "centre"  # centre: bilinear at pixel centres, >= 0.5 | nearest: torchvision's (+0.5 px shift)


@dataclass
class ModelConfig:
    num_classes: int = 80  # K object classes, background excluded (training sets it to the dataset's count)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)


# ------------------------------------------------------------------------------------------ training
@dataclass
class ShapesConfig:
    num_train: int = 400  # images in the generated train split
    num_val: int = 100  # images in the generated val split
    image_size: list[int] = field(default_factory=lambda: [256, 320])  # side range in px
    seed: int = 0  # generator seed: same seed, same dataset


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes (generated on first use) | coco (any COCO-format JSON + images)
    root: str = "datasets/shapes"  # where the shapes set is generated
    train_images: str = ""  # coco: image folder of the train split
    train_ann: str = ""  # coco: annotation JSON of the train split
    val_images: str = ""  # coco: image folder of the validation split
    val_ann: str = ""  # coco: annotation JSON of the validation split
    categories: list[str] = field(default_factory=list)  # keep only these category names (empty: all)
    remove_images_without_annotations: bool = True  # drop images with no (non-crowd) object from training
    min_box_size: float = 1.0  # instances whose clipped box is narrower or shorter (px) are dropped (detectron2: 1e-5)
    flip_prob: float = 0.5  # horizontal flip in training
    aspect_ratio_grouping: bool = False  # training batches of only landscape or only portrait images (COCO: true)
    num_workers: int = 2  # DataLoader workers
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class SolverConfig:
    ims_per_batch: int = 16  # images per iteration on each process (the global batch sums it over torchrun's processes)
    reference_batch: int = 0  # global batch that base_lr, max_iter, steps, warmup_iters are written for (0: off)
    scale_rule: str = "linear"  # global batch != reference_batch -> linear: lr x batch/ref, iterations x ref/batch
    # (detectron2's auto_scale_workers) | accumulate: ref/batch micro-batches per optimiser step | none: as written
    optimizer: str = "sgd"  # sgd (momentum) | adamw (converges in fewer iterations when training from scratch)
    base_lr: float = 0.02  # learning rate at ims_per_batch
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # weight decay of the trained parameters but the normalisation layers'
    weight_decay_norm: float = 0.0  # weight decay of BatchNorm / GroupNorm weights and biases (detectron2's 0)
    max_iter: int = 90000  # training iterations (optimiser steps)
    warmup_iters: int = 1000  # linear warmup length
    warmup_factor: float = 0.001  # lr multiplier at iteration 0
    steps: list[int] = field(default_factory=lambda: [60000, 80000])  # lr x gamma at each
    gamma: float = 0.1  # lr factor at each of steps
    clip_grad_norm: float = 0.0  # max global grad norm (0: off)


@dataclass
class TrainConfig:
    output_dir: str = "runs"  # runs/<name>/
    name: str = ""  # run name (empty: <stage>[-noise]-<time>)
    seed: int = 0  # seeds data order, augmentation and initialisation
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    amp: Switch = True  # mixed precision when training on CUDA: fp16 autocast and a grad scaler (auto: the same)
    cpu_amp: Switch = False  # bf16 autocast when training on a CPU: auto (where the CPU computes bf16 natively,
    # AVX-512 BF16 or AMX: 1.6x faster; elsewhere emulated and 7-16x slower, so fp32), true or false
    num_threads: int = 0  # CPU threads for torch (0: torch's default, one per core)
    channels_last: bool = False  # model weights (so activations) in channels-last memory format (faster on CUDA;
    # on a CPU with AVX-512 7-10% faster training, fp32 or bf16; on an AVX2 CPU in fp32 ~6% slower)
    winograd: Switch = "auto"  # the 3x3 convolutions of 128 channels or more computed by Winograd's F(2x2, 3x3),
    # forward and backward (maskrcnn/model/winograd.py), in calls of 1024 tiles or more: auto (on an AVX2 or
    # AVX-512 CPU, in fp32: 15% faster ResNet-50-FPN training steps at 512x512 measured on AVX2; never under bf16
    # autocast, on CUDA, or for model.backbone.fold_frozen_bn's convolutions), true or false
    frozen_as_inference: Switch = "auto"  # the frozen stem and stages (model.backbone.freeze_at) computed as
    # inference computes them: each FrozenBatchNorm2d inside its convolution, channels-last, what they give back in
    # the standard layout (maskrcnn/model/fuse.py: frozen_as_inference). No gradient flows through them, so only
    # their forward changes, to float rounding. auto (on an AVX2 or AVX-512 CPU in fp32, unless train.channels_last:
    # ResNet-50, 512x512, batch 2, AVX2: the bottom-up pathway's forward 0.77-0.85x), true or false
    log_period: int = 20  # TensorBoard scalars every N iterations
    checkpoint_period: int = 5000  # checkpoint every N iterations (and at the end)
    keep_checkpoints: int = 3  # keep the newest K model_<iter>.pth (0: only last_checkpoint.pth)
    vis_period: int = 0  # TensorBoard images of proposals / RoIs every N iterations (0: off)
    precise_bn_iters: int = 0  # after training, recompute BatchNorm statistics over N batches (0: off; norm bn)
    eval_at_end: bool = True  # AR (rpn stage) or AP (full stage) on the val split at the end
    error_pictures: bool = True  # with eval_at_end, full stage: the error analysis's pictures (PR breakdown,
    # confusion matrices) beside metrics.json and in TensorBoard ("errors/..."); ~2 s
    sync_bn: bool = False  # under torchrun: trained BatchNorm layers use the statistics of the global batch
    # (SyncBatchNorm, CUDA only); frozen BatchNorm is unaffected
    dist_timeout_min: float = 30.0  # under torchrun: a process waiting longer than this for the others fails
    deterministic: bool = False  # deterministic CUDA kernels, so that --resume is exact on a GPU too (slower; a
    # CPU run is deterministic already)


@dataclass
class TestConfig:
    ims_per_batch: int = 2  # inference batch
    max_images: int = 0  # evaluate on at most this many val images (0: all)
    amp: Switch = False  # mixed precision in the end-of-run evaluation: fp16 on CUDA, bf16 on a CPU; auto: where
    # the device computes it natively (false: fp32)
    channels_last: Switch = "auto"  # evaluate.py and infer.py run the model in channels-last memory format: auto
    # (on an AVX2 or AVX-512 CPU: 10-11% faster inference measured on AVX2, fp32, BatchNorm folded; 15% slower
    # with scalar ATen kernels), true or false
    winograd: Switch = "auto"  # evaluate.py and infer.py compute the 3x3 convolutions of 128 channels or more by
    # Winograd's F(2x2, 3x3) (maskrcnn/model/winograd.py): auto (on an AVX2 or AVX-512 CPU, in fp32: 17% faster
    # inference measured on AVX2), true or false


# The named losses the model returns in training, over both stages (the RPN stage returns the first two): the
# keys loss_weights may name. A weight for a loss the stage being trained does not compute is unused, not an error.
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "loss_maskiou")


@dataclass
class Config:
    stage: str = "full"  # rpn: backbone + FPN + RPN | full: the whole Mask R-CNN
    model: ModelConfig = field(default_factory=ModelConfig)
    loss_weights: dict[str, float] = field(default_factory=dict)  # loss name -> weight; unnamed losses weigh 1.0
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


# ------------------------------------------------------------------------------------ merge / parse
def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f" (closest valid key: '{match[0]}')" if match else ""


def _describe(tp: Any) -> str:
    """A type in the words of an error message: Switch is 'true, false or auto'."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Union:
        words = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    return {bool: "true, false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # Optional[X]
            return _coerce(value, args[0], path)
        for arg in args:  # the first type that takes the value
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, path): _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    """Write the nested dict `data` into the dataclass `obj`, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'" + _closest(path, [f"{prefix}{n}" for n in names]))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{path}.")
        elif isinstance(current, dict):  # a mapping is merged key by key (--set loss_weights.loss_mask=2)
            value = _coerce(value, hints[key], path)
            if path == "loss_weights":
                _check_loss_names(value)
            setattr(obj, key, {**current, **value})
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _check_loss_names(weights: dict) -> None:
    for name in weights:
        if name not in LOSS_NAMES:
            match = difflib.get_close_matches(name, LOSS_NAMES, n=1, cutoff=0.0)
            raise ConfigError(f"loss_weights.{name}: not a loss of this model (its losses, over both stages: "
                              f"{', '.join(LOSS_NAMES)})" + (f"; did you mean {match[0]}?" if match else ""))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        keys, value = _parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file (`_base_: other.yaml` chains allowed) <- overrides."""
    cfg = Config()
    if path is not None:
        _merge_file(cfg, Path(path))
    return apply_overrides(cfg, list(overrides or []))


def _merge_file(cfg: Config, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    base = data.pop("_base_", None)
    if base is not None:
        _merge_file(cfg, path.parent / base)
    try:
        _merge(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data)
    return cfg


def save_config(cfg: Config, path: str | Path, comment: Optional[str] = None) -> None:
    """The config as YAML; `comment` (lines of what the run made of it, e.g. the precision an auto setting
    chose) goes above it as YAML comments, which loading ignores."""
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    Path(path).write_text(head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
