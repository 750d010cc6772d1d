"""Benchmark: this project's Mask R-CNN against torchvision's, on the same settings and the same weights.

    python -m maskrcnn.bench                     # CPU (or GPU when present): 512x512, batch 2, 5 repeats
    python -m maskrcnn.bench --full-size         # 800x1333 images
    python -m maskrcnn.bench --quick             # smoke run, not a measurement: ResNet-18, 128 px (tests/test_bench.py)
    python -m maskrcnn.bench --out bench.json
    python -m maskrcnn.bench --coco-size-ann     # also: load + validate a generated COCO-sized annotation file

Both models come from one seeded state dict: ours is built from configs/torchvision_compat.yaml and
torchvision's is maskrcnn_resnet50_fpn as it is built for training from ImageNet weights (FrozenBatchNorm2d,
stem and res2 frozen), loaded with maskrcnn.torchvision_weights.to_torchvision. Same image sizes, batch, sample counts
(256 anchors, 512 RoIs per image) and proposals (2000 per level before NMS, 2000 after in training, 1000 in
inference). The class scores are biased towards a few classes so that inference keeps 100 detections per
image (the mask head and the paste run at full load) instead of none.

On a CPU four more rows time ours under `torch.autocast("cpu", dtype=torch.bfloat16)` (channels-last, and for
inference BatchNorm folded into the convolutions, maskrcnn.model.fuse) against torchvision in fp32 and against
torchvision under the same autocast, what its user on a bf16 CPU would run (a note says why if it cannot run so).
`--bf16 auto` (the default) times them only where the CPU computes bfloat16 natively
(maskrcnn.model.precision.cpu_bf16_native: AVX-512 BF16 or AMX); elsewhere bf16 is emulated, 7-16x slower than
fp32, and the rows are skipped with a note. `--bf16 always` times them anyway, emulated ones with one repeat (one
warm-up; none for the two against torchvision's bf16). The printout and the JSON start with the CPU capability
and whether bfloat16 is native. Our fp32 inference row also folds BatchNorm and, on an AVX2 or AVX-512 CPU, runs
channels-last, as our inference entry points do (evaluate.py, infer.py: test.channels_last auto). That bf16 gives
the fp32 detections on trained weights is tests/test_bf16.py's job: on these seeded random weights every score is
a near tie, and no detector's detections are stable.

Each benchmark warms up, then interleaves ours and torchvision's repeats (alternating which goes first) and
reports medians: on a CPU shared with other jobs, interleaving puts both under the same load. The ratio is ours'
median over torchvision's, what the targets are read against; beside it, the range of the repeats' own ratios (ours
/ torchvision of each repeat's back-to-back pair): how far a single pair moves with the machine, not an interval for
the ratio of the medians. Peak training memory is measured in a fresh subprocess per model (peak RSS on CPU, with
glibc's mmap threshold fixed so that it follows the live memory: MEMORY_CHILD_ENV; max allocated on CUDA). On CUDA
the training and inference benchmarks run in mixed precision (autocast fp16 + GradScaler) and report images/s.

Mask targets: 512 sampled RoIs per image (128 foreground) on a batch of two 800x1333 images with 15 objects
each, our maskrcnn.model.mask_targets against torchvision's project_masks_on_boxes (RoIAlign of the
full-resolution masks with its compiled kernel); time and extra peak memory (max allocated on CUDA, peak RSS
growth on CPU). `--coco-size-ann` writes a synthetic annotation file of COCO train2017's size (118k images,
860k polygon instances, ~450 MB) and times loading + validating it with maskrcnn.data.coco (CocoInstances)
against pycocotools' own COCO(), each in a fresh process (peak RSS of that process).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torchvision
from torch import Tensor, nn

from .model.build import build_model
from . import cli
from .cli import keep_freed_memory, ready_to_write, use_huge_pages
from .config import BackboneConfig, load_config
from .model.fuse import fold_batchnorm, inference_channels_last, prepare_inference, prepare_training
from .engine.step import grad_scaler, train_step
from .model.precision import autocast, cpu_bf16_native
from .torchvision_weights import to_torchvision
from .model.poolers import MultiScaleRoIAlign
from .model.postprocess import paste_masks, paste_masks_torchvision

COMPAT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "torchvision_compat.yaml"

# The targets printed beside the fp32 rows, ours / torchvision: on a CPU the project's goals (a training step <= 0.75x,
# inference <= 0.6x, peak training memory <= 0.9x); on CUDA, where nothing has been measured yet, the mission's "at
# least as fast" and the earlier memory bound.
FP32_TARGETS = {"cpu": {"training": 0.75, "inference": 0.6, "memory": 0.9},
                "cuda": {"training": 1.0, "inference": 1.0, "memory": 1.1}}


@dataclass
class Settings:
    height: int = 512
    width: int = 512
    batch: int = 2
    depth: int = 50  # ResNet depth of both models (--quick: 18)
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    amp: bool = False  # CUDA only
    channels_last: bool = False
    bf16: str = "auto"  # CPU only: time ours under bf16 autocast too (channels-last, BN folded for inference):
    # auto (where the CPU computes bf16 natively), always, never
    winograd: Union[str, bool] = "auto"  # ours' 3x3 convolutions by Winograd's F(2x2, 3x3), training and
    # inference, as train.winograd / test.winograd: auto (where it was measured to gain: AVX2, AVX-512) or False
    frozen_as_inference: Union[str, bool] = "auto"  # ours' frozen stem and layer1 computed as inference computes
    # them in training (train.frozen_as_inference): auto or False
    recompute: list = field(default_factory=lambda: list(BackboneConfig().recompute))  # ours' ResNet stages
    # computed again in the backward pass (model.backbone.recompute; by default the config's, as train.py)
    objects: int = 4  # ground-truth objects per training image
    post_nms_train: int = 2000  # RPN proposals per image after NMS, training (torchvision's default)
    post_nms_test: int = 1000  # ... inference
    rois_per_image: int = 512  # RoIs sampled per image for the box head
    detections: int = 100  # detections per image (inference)
    align_rois: int = 512  # RoIs per image of the RoIAlign benchmark (the box head's training load)
    mask_target_size: tuple[int, int] = (800, 1333)  # image size of the mask-target benchmark (--quick: small)
    mask_objects: int = 15  # ground-truth masks per image of the mask-target benchmark
    mask_fg_rois: int = 128  # foreground RoIs per image (25% of 512 sampled) whose targets are built
    seed: int = 0


# ------------------------------------------------------------------------------------------- models
def build_ours(s: Settings) -> nn.Module:
    size = min(s.height, s.width)
    cfg = load_config(COMPAT_CONFIG, [
        "model.backbone.weights=none", f"model.backbone.depth={s.depth}",
        f"model.transform.min_size_train=[{size}]", f"model.transform.max_size_train={max(s.height, s.width)}",
        f"model.transform.min_size_test={size}", f"model.transform.max_size_test={max(s.height, s.width)}",
        f"model.rpn.post_nms_topk_train={s.post_nms_train}", f"model.rpn.post_nms_topk_test={s.post_nms_test}",
        f"model.roi_heads.batch_size_per_image={s.rois_per_image}",
        f"model.roi_heads.detections_per_image={s.detections}",
        f"model.backbone.recompute=[{','.join(s.recompute)}]"])
    return build_model(cfg)


def build_torchvision(s: Settings) -> nn.Module:
    """maskrcnn_resnet50_fpn as torchvision builds it for training from ImageNet weights (FrozenBatchNorm2d,
    3 trainable stages), without downloading anything."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    size = min(s.height, s.width)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{s.depth}", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    return MaskRCNN(backbone, num_classes=91, min_size=size, max_size=max(s.height, s.width),
                    rpn_post_nms_top_n_train=s.post_nms_train, rpn_post_nms_top_n_test=s.post_nms_test,
                    box_batch_size_per_image=s.rois_per_image, box_detections_per_img=s.detections)


def seeded_state(s: Settings) -> dict[str, Tensor]:
    """Our seeded initialisation, with class scores biased to 5 classes so inference keeps 100 detections."""
    torch.manual_seed(s.seed)
    model = build_ours(s)
    state = model.state_dict()
    bias = state["roi_heads.box_head.cls_score.bias"]
    bias[1:6] = 4.0  # ~0.2 probability each for classes 1..5 on every RoI: 5 candidates per RoI
    return state


def load_pair(s: Settings, state: dict[str, Tensor]) -> tuple[nn.Module, nn.Module]:
    ours, tv = build_ours(s), build_torchvision(s)
    ours.load_state_dict(state)
    tv.load_state_dict(to_torchvision(state))
    device = torch.device(s.device)
    ours, tv = ours.to(device), tv.to(device)
    if s.channels_last:
        ours, tv = ours.to(memory_format=torch.channels_last), tv.to(memory_format=torch.channels_last)
    return ours, tv


def make_batch(s: Settings, seed: int = 1) -> tuple[list[Tensor], list[dict]]:
    """Images [3, H, W] in 0..1 and targets with `objects` random boxes (and their box-shaped masks) each."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(s.batch):
        images.append(torch.rand(3, s.height, s.width, generator=g))
        wh = torch.rand(s.objects, 2, generator=g) * 0.4 + 0.1  # 10..50% of the image side
        xy = torch.rand(s.objects, 2, generator=g) * (1 - wh)
        scale = torch.tensor([s.width, s.height], dtype=torch.float32)
        boxes = torch.cat((xy * scale, (xy + wh) * scale), 1).round()
        masks = torch.zeros(s.objects, s.height, s.width, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):  # setup only, not timed
            masks[j, y0:y1, x0:x1] = 1
        labels = torch.randint(1, 91, (s.objects,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    device = torch.device(s.device)
    return ([i.to(device) for i in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])


def training_step_fn(model: nn.Module, s: Settings, images, targets, bf16: bool = False) -> Callable[[], None]:
    """One SGD step, the trainer's own (maskrcnn.engine.step.train_step): under fp16 autocast + GradScaler with
    s.amp (CUDA), under bf16 autocast with `bf16` (CPU: bf16 has fp32's range, so no scaler). torchvision's
    model takes the same step (its forward returns a dict of named losses too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = grad_scaler(torch.device(s.device), s.amp)
    model.train()
    batch = [(images, targets)]

    def step() -> None:
        train_step(model, batch, opt, amp=s.amp or bf16, scaler=scaler)  # fp16 on CUDA, bf16 on a CPU

    return step


def inference_fn(model: nn.Module, s: Settings, images, bf16: bool = False) -> Callable[[], None]:
    device = torch.device(s.device)

    def run() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, s.amp or bf16):  # fp16 on CUDA, bf16 on a CPU
            model(images)

    return run


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: str) -> None:
    """Wait for the device's queued kernels (CUDA's run asynchronously; a CPU's have finished)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """One comparison: the median seconds of ours and torchvision's, and each repeat's ratio (ours / torchvision of
    the pair measured back to back), in the order measured."""
    ours_s: float
    tv_s: float
    ratios: list[float]


def compare(fn_ours: Callable[[], None], fn_tv: Callable[[], None], s: Settings, repeats: Optional[int] = None,
            warmup: Optional[int] = None) -> Timing:
    """Ours and torchvision's, warmed up, repeats interleaved (alternating who goes first): medians and each
    repeat's ratio."""
    for _ in range(s.warmup if warmup is None else warmup):
        fn_ours()
        fn_tv()
    times: dict[str, list[float]] = {"ours": [], "tv": []}
    for r in range(repeats or s.repeats):
        order = [("ours", fn_ours), ("tv", fn_tv)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            synchronize(s.device)
            t0 = time.perf_counter()
            fn()
            synchronize(s.device)
            times[name].append(time.perf_counter() - t0)
    return Timing(statistics.median(times["ours"]), statistics.median(times["tv"]),
                  [o / t for o, t in zip(times["ours"], times["tv"])])


# ------------------------------------------------------------------------------------ micro benches
def roi_align_fns(s: Settings, sampling_ratio: int, aligned: bool) -> tuple[Callable, Callable, str]:
    """Box-head load: `align_rois` (512) RoIs per image over P2..P5 (4 levels, 256 channels), 7x7, forward and
    backward, through MultiScaleRoIAlign with either implementation."""
    g = torch.Generator().manual_seed(2)
    device = torch.device(s.device)
    feats = [torch.randn(s.batch, 256, s.height // st, s.width // st, generator=g).to(device).requires_grad_()
             for st in (4, 8, 16, 32)]
    rois_per_image = s.align_rois
    # sides log-uniform in 16..512 px so every level gets RoIs, as proposals do
    side = torch.exp(torch.empty(s.batch * rois_per_image, 2).uniform_(2.77, 6.24, generator=g))
    xy = torch.rand(s.batch * rois_per_image, 2, generator=g) * torch.tensor([s.width, s.height])
    boxes = torch.cat((xy, xy + side), 1).clamp(max=float(max(s.height, s.width)))
    boxes = [b.to(device) for b in boxes.split(rois_per_image)]
    grad = torch.randn(s.batch * rois_per_image, 256, 7, 7, generator=g).to(device)

    def make(impl: str) -> Callable[[], None]:
        pooler = MultiScaleRoIAlign(output_size=7, strides=(4, 8, 16, 32), sampling_ratio=sampling_ratio,
                                    aligned=aligned, impl=impl, level_mapper="torchvision")

        def run() -> None:
            out = pooler(feats, boxes)
            torch.autograd.backward(out, grad)
            for f in feats:
                f.grad = None

        return run

    label = (f"RoIAlign fwd+bwd ({s.batch}x{rois_per_image} RoIs, 4 lvls, 256 ch, sr={sampling_ratio}, "
             f"aligned={aligned})")
    return make("ours"), make("torchvision"), label


def proposal_fns(ours: nn.Module, tv: nn.Module, s: Settings) -> tuple[Callable, Callable]:
    """Anchor generation + proposal selection (top-k per level, decode, clip, NMS per level, top-k) on the
    same objectness and deltas, with the training settings (2000 per level before NMS)."""
    from torchvision.models.detection.image_list import ImageList as TVImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    g = torch.Generator().manual_seed(3)
    device = torch.device(s.device)
    hp, wp = -(-s.height // 32) * 32, -(-s.width // 32) * 32
    sizes = [(-(-hp // st), -(-wp // st)) for st in (4, 8, 16, 32, 64)]
    logits = [torch.randn(s.batch, 3, h, w, generator=g).to(device) for h, w in sizes]
    deltas = [(torch.randn(s.batch, 12, h, w, generator=g) * 0.1).to(device) for h, w in sizes]
    feats = [torch.empty(s.batch, 1, h, w, device=device) for h, w in sizes]  # only their shapes are used
    image_sizes = [(s.height, s.width)] * s.batch
    batch = torch.empty(s.batch, 3, hp, wp, device=device)
    ours_rpn, tv_rpn = ours.rpn, tv.rpn

    def run_ours() -> None:
        ours_rpn.train()
        anchors = ours_rpn.anchor_generator(sizes, (hp, wp))
        n = s.batch
        lg = [x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits]
        dl = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for x in deltas]
        ours_rpn.select_proposals(anchors, lg, dl, image_sizes)

    def run_tv() -> None:
        tv_rpn.train()
        with torch.no_grad():
            anchors = tv_rpn.anchor_generator(TVImageList(batch, image_sizes), feats)
            objectness, box_deltas = concat_box_prediction_layers(logits, deltas)
            proposals = tv_rpn.box_coder.decode(box_deltas, anchors).view(s.batch, -1, 4)
            num_per_level = [3 * h * w for h, w in sizes]
            tv_rpn.filter_proposals(proposals, objectness, image_sizes, num_per_level)

    return run_ours, run_tv


def paste_fns(s: Settings) -> dict[str, Callable]:
    """Pasting 100 detections' 28x28 mask probabilities into an image of the benchmark size."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(4)
    device = torch.device(s.device)
    masks = torch.rand(100, 1, 28, 28, generator=g).to(device)
    wh = torch.rand(100, 2, generator=g) * 0.5 * torch.tensor([s.width, s.height]) + 8
    xy = torch.rand(100, 2, generator=g) * torch.tensor([s.width, s.height])
    boxes = torch.cat((xy, xy + wh), 1).to(device)
    size = (s.height, s.width)
    return {"bilinear": lambda: paste_masks(masks, boxes, size),
            "torchvision": lambda: paste_masks_torchvision(masks, boxes, size),
            "reference": lambda: paste_masks_in_image(masks, boxes, size)}


def mask_target_inputs(s: Settings) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image: `mask_objects` GT masks [M, H, W] uint8, and `mask_fg_rois` foreground RoIs (jittered GT boxes,
    IoU >~ 0.5 as sampled foreground) as matched index [F] and boxes [F, 4]."""
    g = torch.Generator().manual_seed(5)
    device = torch.device(s.device)
    h, w = s.mask_target_size
    per_image = []
    yy, xx = torch.meshgrid(torch.arange(h).float() + 0.5, torch.arange(w).float() + 0.5, indexing="ij")
    for _ in range(s.batch):
        # ellipses of side 2..60% of the image (COCO objects: many small, a few large)
        r = torch.exp(torch.empty(s.mask_objects, 2).uniform_(0.0, 5.9, generator=g)).clamp(max=0.3 * h)
        c = torch.rand(s.mask_objects, 2, generator=g) * torch.tensor([w, h])
        masks = torch.zeros(s.mask_objects, h, w, dtype=torch.uint8)
        for k in range(s.mask_objects):  # setup only, not timed
            inside = ((xx - c[k, 0]) / r[k, 0]) ** 2 + ((yy - c[k, 1]) / r[k, 1]) ** 2 <= 1
            masks[k] = inside
        gt_boxes = torch.cat((c - r, c + r), 1).clamp(min=0).clamp(max=float(max(h, w)))
        idx = torch.randint(0, s.mask_objects, (s.mask_fg_rois,), generator=g)
        wh = (gt_boxes[idx, 2:] - gt_boxes[idx, :2]).repeat(1, 2)
        boxes = gt_boxes[idx] + torch.randn(s.mask_fg_rois, 4, generator=g) * 0.08 * wh
        per_image.append((masks.to(device), idx.to(device), boxes.to(device)))
    return per_image


def mask_target_fns(s: Settings) -> tuple[Callable, Callable, str]:
    """28x28 mask targets of the foreground RoIs of mask_target_inputs, ours (cropped separable RoIAlign) and
    torchvision's project_masks_on_boxes (RoIAlign of the full masks, its compiled kernel)."""
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    from .model.mask_targets import mask_targets

    per_image = mask_target_inputs(s)
    h, w = s.mask_target_size
    size = 28

    def ours() -> None:
        for masks, idx, boxes in per_image:
            mask_targets(masks, idx, boxes, size, aligned=False, soft=True)

    def tv() -> None:
        for masks, idx, boxes in per_image:
            project_masks_on_boxes(masks, boxes, idx, size)

    label = (f"mask targets ({s.batch}x{s.mask_fg_rois} fg RoIs of 512, {s.mask_objects} masks "
             f"{h}x{w}, 28x28)")
    return ours, tv, label


def peak_extra_mb(fn: Callable[[], None], device: str) -> float:
    """Extra memory at the peak of one call: max allocated on CUDA, peak RSS growth on CPU (the high-water
    mark is reset first; large tensors are mmapped by malloc and returned on free, so RSS follows them)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")  # no way to reset the high-water mark here
    base = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - base) / 1024


# -------------------------------------------------------------------------------- COCO-sized annotations
COCO_TRAIN_IMAGES = 118_287
COCO_TRAIN_INSTANCES = 860_001


def write_coco_size_ann(path: str, images: int = COCO_TRAIN_IMAGES, instances: int = COCO_TRAIN_INSTANCES,
                        points: int = 24, seed: int = 0) -> int:
    """A synthetic COCO instances file of train2017's size: `images` images (640x480 or 480x640), `instances`
    polygon annotations of `points` points (~450 MB, like instances_train2017.json). Returns its size in bytes.
    Written as text directly (json.dumps of 860k dicts would need several GB)."""
    import math as _math
    import random as _random

    rng = _random.Random(seed)
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic COCO-sized file"}, "licenses": [], "images": [')
        sizes = []
        for i in range(images):
            h, w = (480, 640) if rng.random() < 0.72 else (640, 480)
            sizes.append((h, w))
            f.write(("," if i else "") + f'{{"id": {i + 1}, "file_name": "{i + 1:012d}.jpg", "height": {h}, '
                    f'"width": {w}, "license": 1}}')
        f.write('], "annotations": [')
        angles = [2 * _math.pi * k / points for k in range(points)]
        for a in range(instances):
            img = a % images
            h, w = sizes[img]
            rx, ry = rng.uniform(4, w / 4), rng.uniform(4, h / 4)
            cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
            poly = ", ".join(f"{cx + rx * _math.cos(t):.2f}, {cy + ry * _math.sin(t):.2f}" for t in angles)
            f.write(("," if a else "") + f'{{"id": {a + 1}, "image_id": {img + 1}, "category_id": {1 + a % 80}, '
                    f'"iscrowd": 0, "area": {_math.pi * rx * ry:.2f}, "bbox": [{cx - rx:.2f}, {cy - ry:.2f}, '
                    f'{2 * rx:.2f}, {2 * ry:.2f}], "segmentation": [[{poly}]]}}')
        f.write('], "categories": [')
        f.write(", ".join(f'{{"id": {k}, "name": "class{k}", "supercategory": "thing"}}' for k in range(1, 81)))
        f.write("]}")
    return os.path.getsize(path)


def ann_child(which: str, path: str) -> dict:
    """Run in a fresh process: load (and for ours, validate and index) the annotation file; time and peak RSS."""
    import contextlib
    import io
    import resource

    t0 = time.perf_counter()
    if which == "ours":
        from .data.coco import CocoInstances

        with tempfile.TemporaryDirectory() as image_dir:  # no images are read at construction
            dataset = CocoInstances(image_dir, path)
            n = len(dataset)
    else:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            n = len(COCO(path).imgs)
    seconds = time.perf_counter() - t0
    return {"which": which, "seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "images": n}


def measure_coco_ann(log: Callable[[str], None] = print) -> list[dict]:
    """Rows: load + validate a COCO-sized annotation file, ours vs pycocotools, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "instances_synthetic.json")
        t0 = time.perf_counter()
        size = write_coco_size_ann(path)
        log(f"  generated {path}: {size / 2**20:.0f} MB in {time.perf_counter() - t0:.0f} s")
        results = {}
        for which in ("ours", "pycocotools"):
            cmd = [sys.executable, "-m", "maskrcnn.bench", "--child-ann", which, "--child-ann-path", path]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode != 0:
                raise RuntimeError(f"annotation child ({which}) failed:\n{proc.stderr[-2000:]}")
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, ref = results["ours"], results["pycocotools"]
    log(f"  ours {ours['seconds']:.1f} s / {ours['peak_mb']:.0f} MB, pycocotools {ref['seconds']:.1f} s / "
        f"{ref['peak_mb']:.0f} MB")
    name = f"COCO-sized annotations ({COCO_TRAIN_IMAGES // 1000}k images, {COCO_TRAIN_INSTANCES // 1000}k polygons)"
    return [{"name": f"load + validate {name}", "ours_ms": ours["seconds"] * 1e3,
             "torchvision_ms": ref["seconds"] * 1e3, "ratio": ours["seconds"] / ref["seconds"], "target": None,
             "reference": "pycocotools COCO()", "limit_s": 60.0, "detail": results},
            {"name": f"load + validate {name}, peak RSS (MB)", "ours_mb": ours["peak_mb"],
             "torchvision_mb": ref["peak_mb"], "ratio": ours["peak_mb"] / ref["peak_mb"], "target": None,
             "reference": "pycocotools COCO()", "limit_mb": 6144.0}]


# ------------------------------------------------------------------------------------------ memory
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(which: str, s: Settings, state_path: str, steps: int) -> dict:
    """Run in a fresh process: build one model, load the weights, train `steps` steps; report the peak."""
    import resource

    torch.manual_seed(s.seed)
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if which == "ours":
        model = build_ours(s)
        model.load_state_dict(state)
    else:
        model = build_torchvision(s)
        model.load_state_dict(to_torchvision(state))
    del state
    model = model.to(torch.device(s.device))
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if which == "ours":  # as train.py trains it (train.winograd, train.frozen_as_inference)
        prepare_training(model, s.device, s.winograd, s.frozen_as_inference, s.channels_last)
    images, targets = make_batch(s)
    step = training_step_fn(model, s, images, targets)
    result = {"which": which}
    cuda = s.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kb("VmRSS")
        try:  # reset the high-water mark so that the peak below is the training's, not the setup's
            Path("/proc/self/clear_refs").write_text("5")
            result["hwm_reset"] = True
        except OSError:
            result["hwm_reset"] = False
    for _ in range(steps):
        step()
    if cuda:
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["setup_mb"] = base / 2**20
    else:
        peak_kb = _rss_kb("VmHWM") if result["hwm_reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_mb"] = peak_kb / 1024
        result["setup_mb"] = base / 1024
    return result


# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed activations stay in the
# heap: the peak RSS of the same training step then moved by up to 150 MB between fresh processes (ResNet-50-FPN,
# 512x512: ours 1892-2019, torchvision's 1791-1938 MB). A fixed threshold returns every freed block of 128 KiB or
# more, so the peak RSS follows the live memory (ours 1661 MB with Winograd's convolutions, torchvision's 1651,
# the same in every process), for both models alike. Other C libraries ignore the variable.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_memory(s: Settings, state: dict[str, Tensor], steps: int, runs: int) -> dict[str, dict]:
    """Peak training memory of each model: the median over `runs` fresh processes, interleaved, each with
    MEMORY_CHILD_ENV (on CPU the peak RSS follows the live memory rather than the allocator's retention)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pth")
        torch.save(state, path)
        children: dict[str, list[dict]] = {"ours": [], "torchvision": []}
        for _ in range(runs):
            for which in children:
                cmd = [sys.executable, "-m", "maskrcnn.bench", "--child-memory", which, "--child-state", path,
                       "--child-steps", str(steps), "--child-settings", json.dumps(asdict(s)),
                       "--threads", str(torch.get_num_threads())]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MEMORY_CHILD_ENV},
                                      cwd=Path(__file__).resolve().parent.parent)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory child ({which}) failed:\n{proc.stderr[-2000:]}")
                children[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {which: {"peak_mb": statistics.median([c["peak_mb"] for c in runs_]),
                    "setup_mb": statistics.median([c["setup_mb"] for c in runs_]), "runs": runs_}
            for which, runs_ in children.items()}


# ---------------------------------------------------------------------------------------------- main
def bf16_training_model(ours: nn.Module) -> nn.Module:
    """Ours as the bf16 rows (and bench_profile --bf16) train it: a channels-last copy of the model prepared for
    training (under bf16 autocast Winograd's convolutions and the frozen stages' layout are fp32's only)."""
    return copy.deepcopy(ours).to(memory_format=torch.channels_last)


def bf16_inference_model(ours: nn.Module) -> nn.Module:
    """Ours as the bf16 rows (and bench_profile --bf16) run inference: BatchNorm folded, channels-last."""
    return fold_batchnorm(ours).to(memory_format=torch.channels_last).eval()


def bf16_rows(s: Settings, ours: nn.Module, tv: nn.Module, state: dict[str, Tensor], images, targets, tag: str,
              add: Callable, notes: list[str], log: Callable[[str], None]) -> None:
    """Ours under bf16 autocast (channels-last; BatchNorm folded for inference) against torchvision in fp32, and
    against torchvision under bf16 autocast too (what its user on a bf16 CPU would run; a note says why where it
    cannot run so). s.bf16: auto times them where the CPU computes bf16
    natively and skips them with a note elsewhere; always times them anyway (emulated: 1 warm-up, 1 repeat)."""
    native, evidence = cpu_bf16_native()
    if s.bf16 == "never":
        notes.append("bf16 rows not measured (--bf16 never)")
        return
    if not native and s.bf16 != "always":
        notes.append(f"bf16 rows skipped: this CPU has no native bfloat16 ({evidence}), so bf16 is emulated, "
                     "7-16x slower than fp32, and training would use fp32 (train.cpu_amp=auto); --bf16 always "
                     "measures them (one warm-up, one repeat)")
        log(notes[-1])
        return
    repeats, warmup, which = (None, None, "") if native else (1, 1, ", emulated: 1 repeat")
    fast = bf16_training_model(ours)
    log(f"training step, ours bf16{which} ...")
    add(f"training step ({tag}), ours bf16 channels-last{which}, tv fp32",
        compare(training_step_fn(fast, s, images, targets, bf16=True),
                training_step_fn(tv, s, images, targets), s, repeats, warmup), 0.6, per_image=True)
    tv.load_state_dict(to_torchvision(state))
    # the peer a torchvision user with a bf16 CPU would run: its model under torch.autocast("cpu", bfloat16)
    # (emulated, where torchvision's bf16 step is slower still: one repeat without a warm-up, a smoke run only)
    peer_warmup = warmup if native else 0
    fresh = bf16_training_model(ours)
    peer_row(f"training step ({tag}), ours bf16 channels-last{which}, tv bf16 autocast",
             lambda: compare(training_step_fn(fresh, s, images, targets, bf16=True),
                             training_step_fn(tv, s, images, targets, bf16=True), s, repeats, peer_warmup),
             add, notes, log)
    tv.load_state_dict(to_torchvision(state))
    log(f"inference, ours bf16{which} ...")
    fast = bf16_inference_model(ours)
    add(f"inference ({tag}), ours bf16 channels-last folded{which}, tv fp32",
        compare(inference_fn(fast, s, images, bf16=True), inference_fn(tv, s, images), s, repeats, warmup), 0.6,
        per_image=True)
    peer_row(f"inference ({tag}), ours bf16 channels-last folded{which}, tv bf16 autocast",
             lambda: compare(inference_fn(fast, s, images, bf16=True), inference_fn(tv, s, images, bf16=True), s,
                             repeats, peer_warmup), add, notes, log)


def peer_row(name: str, measure: Callable[[], Timing], add: Callable, notes: list[str],
             log: Callable[[str], None]) -> None:
    """A row against torchvision under bf16 autocast; if torchvision cannot run so, a note that says why."""
    log(f"{name} ...")
    try:
        timing = measure()
    except Exception as e:  # an op without a bf16 CPU kernel, a dtype mismatch: said, not hidden
        detail = " ".join(str(e).split())[:200]
        notes.append(f"{name}: not measured, torchvision could not run under bf16 autocast ({type(e).__name__}: "
                     f"{detail})")
        log(notes[-1])
        return
    add(name, timing, 0.6, per_image=True)


def cpu_header() -> dict:
    """What the bf16 rows depend on: the CPU capability and whether bfloat16 is native (the first thing the
    benchmark prints and the first key of its JSON)."""
    native, evidence = cpu_bf16_native()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": native, "evidence": evidence,
            "processor": platform.processor() or platform.machine(),
            "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"), "freed_memory_kept": cli.freed_memory_kept}


def cpu_line(cpu: dict) -> str:
    return (f"CPU capability {cpu['capability']}, bfloat16 {'native' if cpu['bf16_native'] else 'not native'} "
            f"({cpu['evidence']}); THP_MEM_ALLOC_ENABLE={cpu.get('huge_pages', 'unset')}, freed memory "
            f"{'kept' if cpu.get('freed_memory_kept') else 'returned to the system'} (both models)")


def run(s: Settings, memory_steps: int = 2, memory_runs: int = 3, log: Callable[[str], None] = print,
        coco_size_ann: bool = False) -> dict:
    torch.set_grad_enabled(True)
    rows: list[dict] = []
    notes: list[str] = []
    cuda = s.device.startswith("cuda")
    cpu = cpu_header()
    targets_fp32 = FP32_TARGETS["cuda" if cuda else "cpu"]

    def add(name: str, timing: Timing, target: Optional[float] = None, per_image: bool = False):
        row = timing_row(name, timing, target, s.batch if per_image else None)
        rows.append(row)
        log(f"  {name}: ours {row['ours_ms']:.1f} ms, torchvision {row['torchvision_ms']:.1f} ms, ratio "
            f"{row['ratio']:.2f} (repeats {ratio_range(row)})")

    state = seeded_state(s)
    ours, tv = load_pair(s, state)
    images, targets = make_batch(s)
    tag = f"batch {s.batch}, {s.height}x{s.width}" + (", AMP" if s.amp else "")
    # ours as train.py trains it: Winograd's 3x3 convolutions where they gain (train.winograd: auto) and its frozen
    # stem and layer1 as inference computes them (train.frozen_as_inference: auto)
    winograd, folded = prepare_training(ours, s.device, s.winograd, s.frozen_as_inference, s.channels_last)

    log("training step ...")
    add(f"training step ({tag}{', ours Winograd' if winograd else ''}"
        f"{', ours frozen stages folded, channels-last' if folded else ''}"
        f"{', ours recomputing ' + '+'.join(s.recompute) if s.recompute else ''})",
        compare(training_step_fn(ours, s, images, targets), training_step_fn(tv, s, images, targets), s),
        targets_fp32["training"], per_image=True)
    ours.load_state_dict(state)  # undo the training steps: inference sees the seeded weights again
    tv.load_state_dict(to_torchvision(state))
    log("inference ...")
    # Ours as its inference entry points run it (engine/checkpoint.py: model_from_checkpoint): BatchNorm folded
    # into the convolutions, channels-last and Winograd's 3x3 convolutions where each gains (model/fuse.py:
    # prepare_inference, test.channels_last and test.winograd: auto).
    layout = inference_channels_last("auto", s.device) or s.channels_last
    ours_infer = prepare_inference(ours, s.device, layout, s.winograd).eval()
    add(f"inference ({tag}, ours BN folded{', channels-last' if layout else ''}{', Winograd' if winograd else ''})",
        compare(inference_fn(ours_infer, s, images), inference_fn(tv, s, images), s),
        targets_fp32["inference"], per_image=True)
    del ours_infer
    if not cuda:
        bf16_rows(s, ours, tv, state, images, targets, tag, add, notes, log)

    log("RoIAlign ...")
    for sr, aligned in ((2, False), (0, True)):
        f_ours, f_tv, label = roi_align_fns(s, sr, aligned)
        add(label, compare(f_ours, f_tv, s), 2.0)
    log("anchors + proposals ...")
    add(f"anchors + proposal selection (2000/level, NMS, {s.post_nms_train}/image)",
        compare(*proposal_fns(ours, tv, s), s))
    log("mask paste ...")
    fns = paste_fns(s)
    for mode in ("torchvision", "bilinear"):
        add(f"paste 100 masks, {mode} rule ({s.height}x{s.width})", compare(fns[mode], fns["reference"], s))
    log("mask targets ...")
    f_ours, f_tv, label = mask_target_fns(s)
    add(label, compare(f_ours, f_tv, s), 1.0)
    rows.append({"name": f"{label}, extra peak memory (MB)", "ours_mb": peak_extra_mb(f_ours, s.device),
                 "torchvision_mb": peak_extra_mb(f_tv, s.device), "ratio": float("nan"), "target": 1.0})
    rows[-1]["ratio"] = rows[-1]["ours_mb"] / max(rows[-1]["torchvision_mb"], 1e-6)
    log(f"  extra peak memory: ours {rows[-1]['ours_mb']:.0f} MB, torchvision {rows[-1]['torchvision_mb']:.0f} MB")
    del ours, tv, f_ours, f_tv
    if coco_size_ann:
        log("COCO-sized annotation file (generating ~450 MB of JSON) ...")
        rows.extend(measure_coco_ann(log))

    log(f"peak training memory (median of {memory_runs} fresh processes per model) ...")
    mem = measure_memory(s, state, memory_steps, memory_runs)
    kind = "max allocated" if cuda else "peak RSS, mmap threshold fixed"
    rows.append({"name": f"training memory, {kind} (MB)", "ours_mb": mem["ours"]["peak_mb"],
                 "torchvision_mb": mem["torchvision"]["peak_mb"],
                 "ratio": mem["ours"]["peak_mb"] / mem["torchvision"]["peak_mb"], "target": targets_fp32["memory"],
                 "detail": mem})
    log(f"  memory: ours {mem['ours']['peak_mb']:.0f} MB, torchvision {mem['torchvision']['peak_mb']:.0f} MB")
    return {"cpu": cpu, "settings": asdict(s), "rows": rows, "notes": notes, "environment": environment(s)}


def environment(s: Settings) -> dict:
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": s.device,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if hasattr(os, "getloadavg"):
        env["load_average"] = os.getloadavg()  # > cpu_count: the CPU was shared with other jobs
    if s.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def timing_row(name: str, timing: Timing, target: Optional[float] = None, batch: Optional[int] = None) -> dict:
    """One row of the result: the medians in ms, their ratio (what a target is read against), the repeats' own
    ratios and their range, and, given the batch, images per second."""
    row = {"name": name, "ours_ms": timing.ours_s * 1e3, "torchvision_ms": timing.tv_s * 1e3,
           "ratio": timing.ours_s / timing.tv_s, "ratio_range": [min(timing.ratios), max(timing.ratios)],
           "repeat_ratios": list(timing.ratios), "target": target}
    if batch:
        row["ours_img_s"], row["torchvision_img_s"] = batch / timing.ours_s, batch / timing.tv_s
    return row


def ratio_range(row: dict) -> str:
    """The range of a row's repeat ratios, "0.61-0.70" ("-" for a row without repeats: memory, file loading)."""
    if not row.get("ratio_range"):
        return "-"
    lo, hi = row["ratio_range"]
    return f"{lo:.2f}-{hi:.2f}"


def format_table(result: dict) -> str:
    lines = [cpu_line(result["cpu"]),
             f"{'benchmark':<78} {'ours':>10} {'torchvision':>12} {'ratio':>6} {'repeats':>9} {'target':>7}"]
    for r in result["rows"]:
        if "ours_mb" in r:
            ours, theirs = f"{r['ours_mb']:.0f} MB", f"{r['torchvision_mb']:.0f} MB"
        else:
            ours, theirs = f"{r['ours_ms']:.1f} ms", f"{r['torchvision_ms']:.1f} ms"
        target = f"<= {r['target']}" if r.get("target") else ""
        if r.get("limit_s"):
            target = f"<= {r['limit_s']:.0f} s"
        elif r.get("limit_mb"):
            target = f"<= {r['limit_mb'] / 1024:.0f} GB"
        lines.append(f"{r['name']:<78} {ours:>10} {theirs:>12} {r['ratio']:>6.2f} {ratio_range(r):>9} {target:>7}")
        if "ours_img_s" in r:
            lines.append(f"{'   images / s':<78} {r['ours_img_s']:>10.2f} {r['torchvision_img_s']:>12.2f}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    env = result["environment"]
    lines.append(f"torch {env['torch']}, torchvision {env['torchvision']}, device {env['device']}, "
                 f"{env['threads']} threads" + (f", load average {env['load_average'][0]:.1f} on "
                                                 f"{env['cpu_count']} CPUs" if "load_average" in env else ""))
    return "\n".join(lines)


def winograd_setting(choice: str) -> Union[str, bool]:
    """--winograd (or --frozen-as-inference) auto|never as the setting model/fuse.py reads (train.winograd,
    test.winograd, train.frozen_as_inference): "auto" or False."""
    return {"auto": "auto", "never": False}[choice]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m maskrcnn.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run on CPU, not a measurement: ResNet-18, "
                   "128x128, light heads (50 proposals, 16 RoIs, 5 detections per image), no warm-up, 1 repeat")
    p.add_argument("--full-size", action="store_true", help="800x1333 images instead of 512x512")
    p.add_argument("--repeats", type=int, help="timed repeats per benchmark (default 5; --quick 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    p.add_argument("--channels-last", action="store_true", help="both models in channels-last memory format")
    p.add_argument("--bf16", choices=["auto", "always", "never"], default="auto",
                   help="CPU: the rows of ours under bf16 autocast. auto (default): where the CPU computes bfloat16 "
                   "natively (skipped with a note elsewhere: emulated, 7-16x slower); always: measured anyway "
                   "(emulated: one warm-up, one repeat); never")
    p.add_argument("--no-bf16", action="store_const", dest="bf16", const="never", help="the same as --bf16 never")
    p.add_argument("--winograd", choices=["auto", "never"], default="auto",
                   help="ours' 3x3 convolutions of 128 channels or more by Winograd's F(2x2, 3x3), in training and "
                   "inference, as train.py and evaluate.py run them: auto (default; on an AVX2 or AVX-512 CPU, "
                   "fp32) or never")
    p.add_argument("--frozen-as-inference", choices=["auto", "never"], default="auto",
                   help="ours' frozen stem and layer1 computed in training as inference computes them (BatchNorm "
                   "inside the convolution, channels-last), as train.py runs them (train.frozen_as_inference): auto "
                   "(default; on an AVX2 or AVX-512 CPU, fp32) or never")
    p.add_argument("--recompute", metavar="STAGES",
                   help="ours' ResNet stages to compute again in the backward pass instead of keeping their "
                   "activations (model.backbone.recompute), comma-separated, e.g. layer2,layer3,layer4, or none: "
                   "the training rows and the memory row measure that trade (default: "
                   f"{','.join(BackboneConfig().recompute) or 'none'}, as train.py)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a CPU shared with "
                   "other jobs, 1 avoids OpenMP barriers waiting for descheduled threads")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--coco-size-ann", action="store_true", help="also generate a COCO train2017-sized annotation "
                   "file (118k images, 860k polygons, ~450 MB in a temporary folder) and time loading + validating "
                   "it, ours against pycocotools' COCO() (a few minutes)")
    # internal: the fresh process of the memory benchmark
    p.add_argument("--child-memory", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    p.add_argument("--child-state", help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--child-settings", help=argparse.SUPPRESS)
    p.add_argument("--child-ann", choices=["ours", "pycocotools"], help=argparse.SUPPRESS)
    p.add_argument("--child-ann-path", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    use_huge_pages()  # as train.py and evaluate.py run, for both models alike (the memory children inherit it)
    keep_freed_memory()  # likewise (not in the memory children: MEMORY_CHILD_ENV sets glibc's threshold)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_ann:
        print(json.dumps(ann_child(args.child_ann, args.child_ann_path)))
        return {}
    if args.child_memory:
        s = Settings(**json.loads(args.child_settings))
        print(json.dumps(memory_child(args.child_memory, s, args.child_state, args.child_steps)))
        return {}
    if args.out:
        ready_to_write(args.out)
    from .engine.device import DeviceError, check_cuda, check_device_name
    try:  # an unknown name or an absent GPU: one line, exit status 2
        device = check_device_name(args.device)
        if device.startswith("cuda"):
            check_cuda(device)
    except DeviceError as e:
        print(f"error: --device: {e}", file=sys.stderr)
        sys.exit(2)
    from .model.backbone import check_stages
    try:  # an unknown stage: one line, exit status 2
        stages = (BackboneConfig().recompute if args.recompute is None else
                  [x.strip() for x in args.recompute.split(",") if x.strip() and x.strip() != "none"])
        recompute = list(check_stages(stages))
    except ValueError as e:
        print(f"error: --recompute: {e}", file=sys.stderr)
        sys.exit(2)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    s = Settings(device=device, amp=device.startswith("cuda") and not args.no_amp, channels_last=args.channels_last,
                 bf16=args.bf16, winograd=winograd_setting(args.winograd),
                 frozen_as_inference=winograd_setting(args.frozen_as_inference), recompute=recompute)
    if args.full_size:
        s.height, s.width = 800, 1333
    if args.quick:
        s.height = s.width = 128
        s.depth, s.repeats, s.warmup, s.objects = 18, 1, 0, 2
        s.post_nms_train, s.post_nms_test, s.rois_per_image, s.detections, s.align_rois = 50, 50, 16, 5, 64
        s.mask_target_size, s.mask_objects, s.mask_fg_rois = (128, 160), 3, 8
    if args.repeats:
        s.repeats = args.repeats
    print(cpu_line(cpu_header()), flush=True)
    print(f"benchmark: {asdict(s)}")
    result = run(s, memory_steps=1 if args.quick else 2, memory_runs=1 if args.quick else 3,
                 coco_size_ann=args.coco_size_ann)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
