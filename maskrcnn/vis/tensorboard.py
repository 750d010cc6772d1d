"""TensorBoard images of a training run (detectron2's VIS_PERIOD), drawn from the probe record of the
training step itself: what the model saw and did in that step, at no extra cost. With LatentNoise on, the
features at its site without and with the noise of that step.

    record = {};  losses = model(images, targets, record);  log_training_images(writer, record, iteration)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .panels import draw_ground_truth, draw_proposals, draw_sampled_rois, feature_grid, pooled_grid, relative_change
from .primitives import GT_COLOUR, caption, draw_boxes, fit, side_by_side
from .views import input_image


def training_panels(record: dict, top: int = 20, class_names: Optional[Sequence[str]] = None,
                    logits: bool = True) -> dict[str, np.ndarray]:
    """The batch's first image: {"gt_proposals": ground truth | top proposals, "rois": sampled RoIs (full
    stage), "features": the tensors at the noise site without and with the step's noise (when the noise is on:
    feature maps of the first image at the bottom_up and fpn sites, the first pooled RoIs at the roi site)}.
    `logits`: proposal scores are logits (False for an RPN with sigmoid_scores)."""
    image, target, p = input_image(record, 0), record["targets"][0], record["proposals"][0]
    gt = draw_ground_truth(image, target, class_names)
    props = draw_proposals(draw_boxes(image, target["boxes"], GT_COLOUR, outline=True), p["boxes"][:top],
                           p["scores"][:top], thickness=2, logits=logits)
    panels = {"gt_proposals": side_by_side([caption(gt, "ground truth"), caption(props, f"top-{top} proposals")])}
    if record.get("roi_samples") is not None:
        s = record["roi_samples"][0]
        rois = draw_sampled_rois(image, s["boxes"], s["labels"], s["matched_idx"], target["boxes"], class_names,
                                 target["labels"])
        npos, nneg = int((s["labels"] > 0).sum()), int((s["labels"] == 0).sum())
        panels["rois"] = caption(rois, [f"sampled RoIs: {npos} positive, {nneg} negative"])
    noise = record.get("noise")
    if noise is not None and noise["active"]:
        before, after = noise["before"], noise["after"]
        change = ", ".join(f"{k} {relative_change(before[k], after[k]):.3f}" for k in before)
        if noise["site"] == "roi":
            grid = pooled_grid(before, after)
        else:
            grid = feature_grid(image, {k: v[:1] for k, v in before.items()}, {k: v[:1] for k, v in after.items()},
                                record["image_sizes"][0], record["padded_size"], noise_text=noise["site"])
        panels["features"] = caption(grid, [f"noise at {noise['site']}, relative change: {change}"])
    return panels


def log_training_images(writer, record: dict, iteration: int, top: int = 20, max_side: int = 640,
                        class_names: Optional[Sequence[str]] = None, logits: bool = True) -> None:
    """"vis/gt_proposals" (ground truth next to the top-`top` proposals, both stages), "vis/rois" (the RoIs
    sampled for the box head, full stage) and, with the noise on, "vis/features" (the noise site) of the step's
    first image."""
    for name, img in training_panels(record, top, class_names, logits).items():
        writer.add_image(f"vis/{name}", fit(img, 2 * max_side if name in ("gt_proposals", "features") else max_side),
                         iteration, dataformats="HWC")


def log_pictures(writer, paths: Sequence, iteration: int, prefix: str) -> None:
    """PNG files into TensorBoard as "<prefix>/<file stem>" (the end-of-run error analysis: "errors/pr_val_training",
    "errors/confusion-box_val_training", ...)."""
    from pathlib import Path

    from PIL import Image

    for path in paths:
        with Image.open(path) as im:
            writer.add_image(f"{prefix}/{Path(path).stem}", np.asarray(im.convert("RGB")), iteration,
                             dataformats="HWC")
