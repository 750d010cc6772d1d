"""The pictures of the weekly check-up page (`visualize.py report`): matplotlib charts of the anchor fit, the
object and anchor shapes, proposal scores and the runs' losses, and the crops of the worst-covered objects.
Each function draws from arrays it is given, saves one PNG under `out/img/` and returns its path relative to the
page; the numbers themselves are measured in maskrcnn/report/measure.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import anchor_fit as af
from .primitives import GT_COLOUR, caption, draw_boxes, save_png, side_by_side, stack

BEST_PROPOSAL_COLOUR = (255, 140, 0)
SIDE_COLOURS = ("#1f77b4", "#ff7f0e")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, name: str) -> str:
    path = out / "img" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return f"img/{name}"


def figure_anchor_fit(fit_now: af.AnchorFit, sizes, names, out: Path, label: str) -> str:
    """Best-anchor IoU histograms by object size, by level and by aspect ratio, with the RPN's thresholds."""
    plt = _plt()
    groups = [("by size (model-input px)", af.size_bucket(fit_now.wh), [b[0] for b in af.SIZE_BUCKETS]),
              ("by level (nearest anchor size)", af.level_bucket(fit_now.wh, sizes), list(names)),
              ("by aspect ratio", af.ratio_bucket(fit_now.wh), [b[0] for b in af.RATIO_BUCKETS])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
    bins = np.linspace(0, 1, 21)
    for ax, (title, bucket, bucket_names) in zip(axes, groups):
        for k, name in enumerate(bucket_names):
            values = fit_now.best_iou[bucket == k]
            if len(values):
                ax.hist(values, bins=bins, histtype="step", linewidth=1.6, label=f"{name} ({len(values)})")
        ax.axvline(fit_now.threshold, color="green", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("best anchor IoU")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("objects")
    fig.suptitle(f"best anchor IoU per object (dashed: positive at IoU >= {fit_now.threshold:g})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out, f"anchor_fit_{label}.png")


def figure_shapes(wh: np.ndarray, gen, fit_now: af.AnchorFit, suggestion: Optional[dict],
                  fit_new: Optional[af.AnchorFit], out: Path, label: str) -> str:
    """Object width x height against the anchor shapes (log-log), and the coverage curves."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    if len(wh):
        ax.scatter(wh[:, 0], wh[:, 1], s=4, alpha=0.35, color="grey", label="objects")

    def shapes(sizes, ratios):
        s, r = np.asarray(sizes, float)[:, None], np.sqrt(np.asarray(ratios, float))[None]
        return (s / r).ravel(), (s * r).ravel()
    w, h = shapes(gen.sizes, gen.ratios)
    ax.scatter(w, h, marker="x", s=60, color="tab:blue", label="anchors now")
    if suggestion:
        w2, h2 = shapes(suggestion["sizes"], suggestion["ratios"])
        ax.scatter(w2, h2, marker="o", s=50, facecolors="none", edgecolors="tab:red", label="suggested")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (model-input px)")
    ax.set_ylabel("height")
    ax.set_title("objects and anchor shapes", fontsize=10)
    ax.legend(fontsize=8)
    t, c = af.coverage_curve(fit_now.best_iou)
    bx.plot(t, c, color="tab:blue", label="anchors now")
    if fit_new is not None:
        t, c2 = af.coverage_curve(fit_new.best_iou)
        bx.plot(t, c2, color="tab:red", label="suggested")
    bx.axvline(fit_now.threshold, color="green", linestyle="--", linewidth=1)
    bx.set_xlabel("IoU")
    bx.set_ylabel("fraction of objects with best anchor IoU >= x")
    bx.set_title("coverage", fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, f"shapes_{label}.png")



def worst_tile(image: np.ndarray, gt, proposal, iou: float, where: str, size: int = 150) -> np.ndarray:
    """A crop around one ground-truth box (white) and its best proposal (orange), captioned."""
    img = draw_boxes(image, gt[None], GT_COLOUR, thickness=1, outline=True)
    region = gt.clone()
    if proposal is not None:
        img = draw_boxes(img, proposal[None], BEST_PROPOSAL_COLOUR, thickness=1)
        region = torch.cat([torch.minimum(gt[:2], proposal[:2]), torch.maximum(gt[2:], proposal[2:])])
    w, h = float(gt[2] - gt[0]), float(gt[3] - gt[1])
    margin = max(8.0, 0.3 * max(w, h))
    x0, y0 = max(0, int(region[0] - margin)), max(0, int(region[1] - margin))
    x1, y1 = min(image.shape[1], int(region[2] + margin) + 1), min(image.shape[0], int(region[3] + margin) + 1)
    crop = np.ascontiguousarray(img[y0:y1, x0:x1])
    import cv2
    s = size / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
                      interpolation=cv2.INTER_NEAREST if s > 1 else cv2.INTER_AREA)
    tile = np.full((size, size, 3), 255, np.uint8)
    tile[: crop.shape[0], : crop.shape[1]] = crop
    return caption(tile, [f"IoU {iou:.2f}", f"{w:.0f}x{h:.0f} px {where}"], corner="bottom-left")


def save_tiles(tiles: list[np.ndarray], out: Path, name: str, per_row: int = 6) -> str:
    rows = [side_by_side(tiles[i : i + per_row]) for i in range(0, len(tiles), per_row)]
    save_png(stack(rows), out / "img" / name)
    return f"img/{name}"


def figure_scores(covering: np.ndarray, other: np.ndarray, out: Path, label: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, 1, 26)
    if len(other):
        ax.hist(other, bins=bins, histtype="step", linewidth=1.6, color="grey", label=f"other ({len(other)})")
    if len(covering):
        ax.hist(covering, bins=bins, histtype="step", linewidth=1.6, color="tab:green",
                label=f"IoU >= 0.5 with an object ({len(covering)})")
    ax.set_yscale("log")
    ax.set_xlabel("objectness (probability)")
    ax.set_ylabel("proposals")
    ax.set_title(f"{label}: proposal scores", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, f"scores_{label}.png")



def figure_losses(runs: Sequence[tuple[str, dict]], out: Path, smoothing: float = 0.6) -> Optional[str]:
    """Every loss of the runs against iteration, the runs overlaid (EMA-smoothed, raw values faint).
    runs: (label, {TensorBoard tag: [[step, value], ...]}) per run."""
    tags = sorted({t for _, sc in runs for t in sc if t.startswith("loss/")})
    if not tags:
        return None
    tags = [t for t in tags if t != "loss/total_loss"] + (["loss/total_loss"] if "loss/total_loss" in tags else [])
    plt = _plt()
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for k, (label, scalars) in enumerate(runs):
            if tag not in scalars:
                continue
            steps, values = np.array(scalars[tag]).T
            acc, smooth = 0.0, []
            for j, v in enumerate(values):
                acc = smoothing * acc + (1 - smoothing) * v
                smooth.append(acc / (1 - smoothing ** (j + 1)))
            colour = SIDE_COLOURS[k % len(SIDE_COLOURS)]
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth, color=colour, label=label)
        ax.set_title(tag[len("loss/"):], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "losses.png")
