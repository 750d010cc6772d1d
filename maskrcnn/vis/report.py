"""The weekly anchor and proposal check-up: one page, this checkpoint against another.

    python visualize.py report --checkpoint runs/full/model_final.pth --against runs/last-week/model_final.pth --out rep
    python visualize.py report --config configs/shapes.yaml --set ... --out rep      # first day: no checkpoint

writes `rep/index.html` (one self-contained page; pictures in `rep/img/`, linked relatively) and
`rep/report.json` (every number on the page). Sections: a summary (with --against: differences, better
green, worse red), the seven views on N validation images, anchor fit over the training set, anchor
suggestions (k-means, IoU distance), proposal recall and the worst-covered objects, the run's losses and
AP/AR, and without a checkpoint the first-day numbers (object sizes, suggested settings, seconds per
iteration). Everything is drawn from the model's probe records and the vis package.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..evaluation.coco_eval import proposals_kept
from ..model.precision import Precision
from . import anchor_fit as af
from . import html as H
from . import views
from .panels import objectness
from .primitives import GT_COLOUR, caption, draw_boxes, save_png, side_by_side, stack, to_uint8_image

RECALL_AT = (100, 300, 1000)
AR_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # COCO's IoU thresholds of AR
VIEW_NAMES = ("dataset", "anchors", "anchor labels", "proposals", "rois", "detections", "features")
WORST = 12  # worst-covered objects drawn
BEST_PROPOSAL_COLOUR = (255, 140, 0)
SIDE_COLOURS = ("#1f77b4", "#ff7f0e")


@dataclass
class Side:
    """One checkpoint (or, without one, a config) and what the report measured for it."""
    label: str  # "this" | "against"
    source: str  # the checkpoint or config file
    cfg: object
    model: object
    class_names: Optional[list]
    checkpoint: Optional[Path] = None
    iteration: Optional[int] = None
    stats: dict = field(default_factory=dict)  # JSON-able numbers, written to report.json
    pictures: dict = field(default_factory=dict)  # name -> path relative to the page
    view_pictures: list = field(default_factory=list)  # per view image: {view name: relative path}
    grids: dict = field(default_factory=dict)  # padded size -> anchor_fit.Grid (harvested from every probe)

    @property
    def has_weights(self) -> bool:
        return self.checkpoint is not None

    @property
    def full(self) -> bool:
        return self.model.roi_heads is not None


# --------------------------------------------------------------------------------------------- loading
def load_side(label: str, checkpoint: Optional[str], config: Optional[str], overrides: Sequence[str],
              device: str, seed: int, default_config: str) -> Side:
    from ..config import load_config
    from ..data.build import build_eval_dataset
    from ..engine.checkpoint import load_checkpoint, model_from_checkpoint
    from ..model.build import build_model

    if checkpoint:
        model, cfg = model_from_checkpoint(checkpoint, config, list(overrides), device)
        iteration = load_checkpoint(checkpoint).get("iteration")
        return Side(label, checkpoint, cfg, model, model.class_names, Path(checkpoint), iteration)
    cfg = load_config(config or default_config, list(overrides))
    val = build_eval_dataset(cfg, "val")
    cfg.model.num_classes = val.num_classes
    torch.manual_seed(seed)
    # Without weights only the views of the data and the anchors are drawn: the RPN stage has all they need.
    rpn_cfg = copy.deepcopy(cfg)
    rpn_cfg.stage = "rpn"
    model = build_model(rpn_cfg, load_weights=False).to(device).eval()
    return Side(label, config or default_config, cfg, model, val.class_names)


def harvest(side: Side, record: dict) -> None:
    """Keep the anchor grid of a single-image probe (its padded size and feature sizes)."""
    padded = tuple(record["padded_size"])
    if padded not in side.grids:
        side.grids[padded] = af.Grid(padded, [tuple(record["fpn"][n].shape[-2:]) for n in side.model.rpn.in_features])


def model_target(target: dict, device) -> dict:
    return {k: target[k].to(device) for k in ("boxes", "labels", "masks")}


# ------------------------------------------------------------------------------------------ anchor fit
def anchor_key(side: Side, max_images: int) -> str:
    """What the anchor fit depends on: two sides with the same key share it."""
    from ..config import config_to_dict

    c = config_to_dict(side.cfg)
    m = c["model"]
    return json.dumps([c["data"], m["transform"], m["anchors"], {k: m["rpn"][k] for k in
                       ("fg_iou", "bg_iou", "allow_low_quality")}, max_images], sort_keys=True)


def anchor_section(side: Side, train_set, out: Path, max_images: int, seed: int, tick: Callable) -> None:
    """Anchor fit over the training set, k-means suggestions and their coverage, and the figures."""
    from ..config import apply_overrides
    from ..model.build import build_anchor_generator

    model, rpn = side.model, side.model.rpn
    gen, names = rpn.anchor_generator, rpn.in_features
    gt = af.ground_truth(train_set, model.transform, max_images)
    missing = {p for p in gt.padded_sizes if p not in side.grids}
    if missing:
        side.grids.update({k: v for k, v in af.anchor_grids(model, gt).items() if k in missing})
    fit_now = af.anchor_fit(gt, side.grids, gen, rpn.matcher, tick)
    now = af.summarise(fit_now, gen.sizes, names)
    stats = {"images": len(gt.input_sizes), "anchor_sizes": gen.sizes, "anchor_ratios": gen.ratios,
             "strides": gen.strides, "levels": names, "current": now}
    suggestion, fit_best = None, None
    if len(gt.boxes):
        sizes, ratios = af.suggest_anchors(gt.wh, len(gen.sizes), len(gen.ratios), seed)
        candidates = []
        for method, (sz, rt) in (("k-means sizes and ratios", (sizes, ratios)),
                                 ("k-means sizes, ratios kept", (sizes, gen.ratios)),
                                 ("k-means ratios, sizes kept", (gen.sizes, ratios))):
            line = af.set_line(sz, rt)
            trial_cfg = apply_overrides(copy.deepcopy(side.cfg), line.split(" ", 1)[1].split())
            trial = build_anchor_generator(trial_cfg.model.anchors)  # the anchors that line gives
            fit_new = af.anchor_fit(gt, side.grids, trial, rpn.matcher, tick)
            candidates.append(({"method": method, "sizes": list(trial.sizes), "ratios": list(trial.ratios), "set": line,
                                "coverage": af.summarise(fit_new, gen.sizes, names)}, fit_new))

        def score(summary: dict) -> tuple:  # objects with a positive at the threshold first
            return summary["all"]["positive_at_threshold"], summary["all"]["mean_best_iou"]
        suggestion, fit_best = max(candidates, key=lambda c: score(c[0]["coverage"]))
        suggestion = {**suggestion, "better_than_now": score(suggestion["coverage"]) > score(now),
                      "candidates": [c for c, _ in candidates]}
        stats["suggestion"] = suggestion
    else:
        tick(3 * len(gt.input_sizes))
    side.stats["anchor_fit"] = stats
    side.pictures["anchor_fit"] = figure_anchor_fit(fit_now, gen.sizes, names, out, side.label)
    side.pictures["shapes"] = figure_shapes(gt.wh, gen, fit_now, suggestion, fit_best, out, side.label)
    side.stats["objects"] = object_numbers(gt)


def object_numbers(gt: af.GroundTruth) -> dict:
    """Sizes and shapes of the objects in model-input pixels, and the images they are in."""
    wh = gt.wh
    per_image = gt.per_image
    q = [5, 10, 25, 50, 75, 95]
    side = np.sqrt(wh[:, 0] * wh[:, 1]) if len(wh) else np.zeros(0)
    ratio = wh[:, 1] / np.maximum(wh[:, 0], 1e-9) if len(wh) else np.zeros(0)
    hs = [s[0] for s in gt.input_sizes] or [0]
    ws = [s[1] for s in gt.input_sizes] or [0]
    oh = [s[0] for s in gt.original_sizes] or [0]
    ow = [s[1] for s in gt.original_sizes] or [0]
    return {
        "images": len(gt.input_sizes), "objects": int(len(wh)),
        "objects_per_image_mean": float(per_image.mean()) if len(per_image) else 0.0,
        "objects_per_image_max": int(per_image.max()) if len(per_image) else 0,
        "distinct_original_sizes": len(set(gt.original_sizes)),
        "original_size_range": {"h": [min(oh), max(oh)], "w": [min(ow), max(ow)]},
        "input_size_range": {"h": [min(hs), max(hs)], "w": [min(ws), max(ws)]},
        "side_percentiles": {str(p): float(np.percentile(side, p)) for p in q} if len(side) else {},
        "ratio_percentiles": {str(p): float(np.percentile(ratio, p)) for p in q} if len(ratio) else {},
    }


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


# ------------------------------------------------------------------------------------------- proposals
def recall_numbers(best: dict[int, np.ndarray], keep: np.ndarray) -> dict:
    """Recall at IoU 0.5 and AR (IoU 0.5:0.95) at each top-k, of the objects selected by `keep`."""
    n = int(keep.sum())
    out = {"objects": n}
    if n == 0:
        return out
    for k, b in best.items():
        v = b[keep]
        out[f"recall@{k}"] = float((v >= 0.5).mean())
        out[f"AR@{k}"] = float((v[None] >= AR_THRESHOLDS[:, None]).mean())
    return out


def proposal_section(side: Side, val_set, out: Path, max_images: int, seed: int, tick: Callable) -> None:
    """Proposals over the validation images: recall by size and level, scores, the worst-covered objects."""
    from ..model.box_ops import box_iou
    from ..model.transform import resize_boxes

    model, rpn = side.model, side.model.rpn
    device = next(model.parameters()).device
    n = len(val_set) if max_images <= 0 else min(max_images, len(val_set))
    logits = not rpn.sigmoid_scores
    best = {}  # k -> list of [M] arrays
    wh, best_level, covering, other = [], [], [], []
    worst: list[tuple[float, int, int, np.ndarray]] = []  # (IoU, image, object, tile), lowest IoU first
    batch = max(1, side.cfg.test.ims_per_batch)  # as evaluate.py batches the validation images
    with proposals_kept(model, max(RECALL_AT)) as own_k:
        ks = sorted(set(RECALL_AT) | {own_k})
        for first in range(0, n, batch):  # a loop over batches, then over their images
            items = [val_set[i] for i in range(first, min(n, first + batch))]
            torch.manual_seed(seed)
            # No targets: no anchor labelling; no heads: proposals only, no detections pasted.
            record = model.probe([image.to(device) for image, _ in items], heads=False)
            for j, (image, target) in enumerate(items):
                tick()
                i = first + j
                # the ground truth in the model-input frame, resized as the model's transform resizes it
                gt = resize_boxes(target["boxes"].float(), tuple(image.shape[-2:]), record["image_sizes"][j])
                p = record["proposals"][j]
                boxes, scores, levels = p["boxes"].float().cpu(), p["scores"].float().cpu(), p["levels"].cpu()
                prob = objectness(scores, logits)
                iou = box_iou(gt, boxes) if len(gt) and len(boxes) else torch.zeros((len(gt), len(boxes)))
                if len(boxes):
                    hit = (iou.max(0).values >= 0.5).numpy() if len(gt) else np.zeros(len(boxes), bool)
                    covering.append(prob[hit])
                    other.append(prob[~hit])
                if len(gt) == 0:
                    continue
                for k in ks:
                    best.setdefault(k, []).append(iou[:, :k].max(1).values.numpy() if len(boxes)
                                                  else np.zeros(len(gt)))
                arg = iou[:, :own_k].argmax(1) if len(boxes) else torch.zeros(len(gt), dtype=torch.int64)
                best_level.append(levels[arg].numpy() if len(boxes) else np.full(len(gt), -1))
                wh.append((gt[:, 2:] - gt[:, :2]).double().numpy())
                own_best = best[own_k][-1]
                for m in np.argsort(own_best, kind="stable")[:WORST]:  # draw only what may enter the worst list
                    if len(worst) >= WORST and own_best[m] >= worst[-1][0]:
                        break
                    tile = worst_tile(views.input_image(record, j), gt[m], boxes[arg[m]] if len(boxes) else None,
                                      float(own_best[m]), f"val #{i}")
                    worst.append((float(own_best[m]), i, int(m), tile))
                    worst.sort(key=lambda x: x[:3])
                    del worst[WORST:]
    wh_all = np.concatenate(wh) if wh else np.zeros((0, 2))
    best_all = {k: np.concatenate(v) for k, v in best.items()} if wh else {k: np.zeros(0) for k in ks}
    names = rpn.in_features
    sizes, levels_of = af.size_bucket(wh_all), af.level_bucket(wh_all, rpn.anchor_generator.sizes)
    everything = np.ones(len(wh_all), bool)
    stats = {"images": n, "model_keeps": own_k, "recall_at": ks,
             "all": recall_numbers(best_all, everything),
             "by_size": {name: recall_numbers(best_all, sizes == k) for k, (name, _, _) in enumerate(af.SIZE_BUCKETS)},
             "by_level": {name: recall_numbers(best_all, levels_of == k) for k, name in enumerate(names)},
             "best_proposal_level": {name: int((np.concatenate(best_level) == k).sum()) if best_level else 0
                                     for k, name in enumerate(names)},
             "worst": [round(w[0], 4) for w in worst]}
    cov = np.concatenate(covering) if covering else np.zeros(0)
    oth = np.concatenate(other) if other else np.zeros(0)
    stats["scores"] = {"covering": int(len(cov)), "other": int(len(oth)),
                       "covering_median": float(np.median(cov)) if len(cov) else None,
                       "other_median": float(np.median(oth)) if len(oth) else None}
    side.stats["proposals"] = stats
    side.pictures["scores"] = figure_scores(cov, oth, out, side.label)
    if worst:
        side.pictures["worst"] = save_tiles([w[3] for w in worst], out, f"worst_{side.label}.png")


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


# ----------------------------------------------------------------------------------------------- views
def view_section(side: Side, val_set, out: Path, n: int, seed: int, score_thresh: float, top: int,
                 palette: int, tick: Callable) -> None:
    """The seven views (those this model can draw) of the first n validation images."""
    model = side.model
    device = next(model.parameters()).device
    for i in range(min(n, len(val_set))):  # a loop over images
        tick()
        image, target = val_set[i]
        image = image.to(device)
        random.seed(seed)
        torch.manual_seed(seed)
        record = model.probe([image], [model_target(target, device)])
        harvest(side, record)
        drawn = {"dataset": views.dataset_view(record, 0, side.class_names),
                 "anchors": views.anchors_view(record, 0, model),
                 "anchor labels": views.anchor_labels_view(record, 0, model)}
        if side.has_weights:
            drawn["proposals"] = views.proposals_view(record, 0, model, top)
            if side.full:
                drawn["rois"] = views.rois_view(record, 0, model, side.class_names)
                drawn["detections"] = views.detections_view(
                    to_uint8_image(image), record["output"][0], side.class_names, score_thresh,
                    side.cfg.model.roi_heads.mask_threshold)
            torch.manual_seed(seed)
            clean = model.probe([image], noise=False)
            torch.manual_seed(seed)
            noisy = model.probe([image], noise=True)  # the configured noise, switched on
            drawn["features"] = views.features_view(clean, noisy, 0, views.noise_text(model))
        paths = {}
        for name, view in drawn.items():
            rel = f"img/views_{side.label}/{name.replace(' ', '_')}_val{i}.png"
            save_png(view.picture, out / rel, palette)
            paths[name] = rel
        side.view_pictures.append(paths)


# ------------------------------------------------------------------------------------------------- run
def read_run(side: Side) -> None:
    """Losses from the TensorBoard events and AP/AR from metrics.json (and evaluate.py's file) of the
    checkpoint's run directory, when there is one."""
    if side.checkpoint is None:
        return
    run_dir = side.checkpoint.parent
    run: dict = {"dir": str(run_dir)}
    if list(run_dir.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        run["scalars"] = {tag: [[int(e.step), float(e.value)] for e in acc.Scalars(tag)]
                          for tag in acc.Tags()["scalars"] if tag.startswith(("loss/", "val/", "time/"))}
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        data = json.loads(metrics.read_text())
        run["iterations"] = data.get("iterations")
        run["loss_end"] = data.get("loss_end", {})
        run["val"] = flat_metrics(data.get("val", {}))
    from ..evaluation.outputs import find_metrics
    clean = find_metrics(run_dir, "val", "clean")  # evaluate.py's, on every val image if it was run so
    if clean:
        res = json.loads(clean[1].read_text()).get("results", {}).get("clean", {})
        run["eval"], run["eval_file"] = flat_metrics(res), clean[1].name
    if len(run) > 1:
        side.stats["run"] = run


def flat_metrics(metrics: dict) -> dict:
    """{"box AP": .., "box AP50": .., "mask AP": .., "AR@100": ..} from a metrics dict of either stage."""
    out = {k: float(v) for k, v in metrics.items() if k.startswith("AR@")}
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        stats = metrics.get(iou_type, {}).get("stats", {})
        out.update({f"{name} {k}": float(stats[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
                    if k in stats})
    return out


def figure_losses(sides: Sequence[Side], out: Path, smoothing: float = 0.6) -> Optional[str]:
    """Every loss of the runs against iteration, the runs overlaid (EMA-smoothed, raw values faint)."""
    runs = [(s, s.stats.get("run", {}).get("scalars", {})) for s in sides]
    tags = sorted({t for _, sc in runs for t in sc if t.startswith("loss/")})
    if not tags:
        return None
    tags = [t for t in tags if t != "loss/total_loss"] + (["loss/total_loss"] if "loss/total_loss" in tags else [])
    plt = _plt()
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for k, (side, scalars) in enumerate(runs):
            if tag not in scalars:
                continue
            steps, values = np.array(scalars[tag]).T
            acc, smooth = 0.0, []
            for j, v in enumerate(values):
                acc = smoothing * acc + (1 - smoothing) * v
                smooth.append(acc / (1 - smoothing ** (j + 1)))
            colour = SIDE_COLOURS[k % len(SIDE_COLOURS)]
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth, color=colour, label=side.label)
        ax.set_title(tag[len("loss/"):], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "losses.png")


# ------------------------------------------------------------------------------------------- first day
def first_day(side: Side, train_set, minutes: float, timing_steps: int, tick: Callable) -> None:
    """Object sizes against the anchors, suggested settings and a measured time per training iteration."""
    cfg, gen = side.cfg, side.model.rpn.anchor_generator
    objects = side.stats["objects"]
    t = cfg.model.transform
    p10 = objects["side_percentiles"].get("10")
    target = 4.0 * min(gen.strides)  # a 10th-percentile object spans 4 cells of the finest level
    factor = 1.0 if not p10 else min(2.0, max(0.5, target / p10))
    d = t.size_divisibility

    def scaled(x: float) -> int:
        return max(d, int(round(x * factor / d)) * d)
    if abs(factor - 1) < 0.1:
        factor, size = 1.0, []
    else:
        size = [f"model.transform.min_size_test={scaled(t.min_size_test)}",
                f"model.transform.max_size_test={scaled(t.max_size_test)}",
                f"model.transform.min_size_train=[{','.join(str(scaled(s)) for s in t.min_size_train)}]",
                f"model.transform.max_size_train={scaled(t.max_size_train)}"]
    most = objects["objects_per_image_max"]
    detections = max(20, int(math.ceil(1.25 * most / 10)) * 10)  # room above the most crowded image
    proposals = max(300, 10 * detections)  # COCO: 100 detections from 1000 proposals
    suggestion = side.stats["anchor_fit"].get("suggestion")
    anchors = []
    if suggestion:
        sizes = [max(1.0, round(s * factor)) for s in suggestion["sizes"]]
        anchors = af.set_line(sizes, suggestion["ratios"]).split(" ", 1)[1].split()
    heads = [f"model.roi_heads.detections_per_image={detections}",
             f"model.rpn.post_nms_topk_test={proposals}", f"model.rpn.post_nms_topk_train={proposals}"]
    seconds, precision = (seconds_per_iteration(side, train_set, timing_steps, tick) if timing_steps > 0
                          else (None, None))
    schedule = []
    if seconds:
        s = cfg.solver
        max_iter = max(1, int(minutes * 60 / seconds))
        steps = [max(1, int(round(x / s.max_iter * max_iter))) for x in s.steps if x < s.max_iter]
        schedule = [f"solver.max_iter={max_iter}", f"solver.steps=[{','.join(map(str, steps))}]",
                    f"solver.warmup_iters={min(s.warmup_iters, max(1, max_iter // 10))}"]
    side.stats["first_day"] = {
        "image_scale": factor, "image_size_rule": f"the 10th-percentile object side ({p10 or 0:.1f} px) should span "
        f"{target:g} px (4 cells of stride {min(gen.strides)}); scale between 0.5 and 2, kept within 10%",
        "detections_per_image": detections, "proposals": proposals, "most_objects_in_an_image": most,
        "detections_rule": "max(20, 1.25 x the most objects in an image, rounded up to 10); proposals: "
                           "max(300, 10 x detections)",
        "seconds_per_iteration": seconds, "minutes": minutes, "timing_steps": timing_steps,
        "timing_precision": precision.as_dict() if precision else None,
        "set": "--set " + " ".join(size + anchors + heads + schedule)}


def seconds_per_iteration(side: Side, train_set, steps: int, tick: Callable) -> tuple[float, "Precision"]:
    """Median time of `steps` real training steps (data, forward, backward, update) of a freshly built model
    on real batches, after one warm-up step that is not counted: the trainer's own step
    (maskrcnn.engine.step.train_step) in the precision the run would choose on this machine, which is returned
    with the seconds."""
    from ..data.loader import build_loader
    from ..data.transforms import Compose, RandomHorizontalFlip
    from ..engine.device import select_device
    from ..engine.step import grad_scaler, train_step
    from ..engine.trainer import build_optimizer
    from ..model.build import build_model
    from ..model.precision import training_precision

    cfg = side.cfg
    device = select_device(cfg.train.device)
    precision = training_precision(cfg.train, device)
    model = build_model(cfg, load_weights=False).to(device)  # weights do not change the time
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, cfg.solver)
    scaler = grad_scaler(device, precision.autocast)
    was = train_set.transforms
    train_set.transforms = Compose([RandomHorizontalFlip(cfg.data.flip_prob)])
    loader = iter(build_loader(train_set, cfg.solver.ims_per_batch, shuffle=True, num_workers=0,
                               seed=cfg.train.seed, drop_last=True, infinite=True))
    times = []
    try:
        for _ in range(steps + 1):
            start = time.perf_counter()
            train_step(model, [next(loader)], optimizer, amp=precision.autocast, scaler=scaler,
                       loss_weights=cfg.loss_weights, clip_grad_norm=cfg.solver.clip_grad_norm)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            tick()
    finally:
        train_set.transforms = was
    return float(np.median(times[1:])), precision


# --------------------------------------------------------------------------------------------- summary
# (section, name, where in stats, higher is better)
SUMMARY = [
    ("anchor fit", "mean best anchor IoU", ("anchor_fit", "current", "all", "mean_best_iou"), True),
    ("anchor fit", "objects with a positive anchor at the threshold",
     ("anchor_fit", "current", "all", "positive_at_threshold"), True),
    ("anchor fit", "objects positive only through the low-quality rule",
     ("anchor_fit", "current", "all", "low_quality_only"), False),
    ("anchor fit", "objects without a positive anchor", ("anchor_fit", "current", "all", "no_positive"), False),
] + [("anchor fit", f"{b} objects with a positive anchor at the threshold",
      ("anchor_fit", "current", "by_size", b, "positive_at_threshold"), True) for b, _, _ in af.SIZE_BUCKETS] + [
    ("proposals", f"recall@{k} (IoU 0.5)", ("proposals", "all", f"recall@{k}"), True) for k in RECALL_AT] + [
    ("proposals", f"AR@{k} (IoU 0.5:0.95)", ("proposals", "all", f"AR@{k}"), True) for k in RECALL_AT] + [
    ("proposals", f"{b} objects recall@300", ("proposals", "by_size", b, "recall@300"), True)
    for b, _, _ in af.SIZE_BUCKETS] + [
    ("run", "box AP", ("run", "val", "box AP"), True), ("run", "mask AP", ("run", "val", "mask AP"), True),
    ("run", "AR@100 (metrics.json)", ("run", "val", "AR@100"), True),
    ("run", "AR@1000 (metrics.json)", ("run", "val", "AR@1000"), True),
    ("run", "total loss at the end", ("run", "loss_end", "total_loss"), False),
]


def lookup(stats: dict, path: Sequence[str]):
    for key in path:
        if not isinstance(stats, dict) or key not in stats:
            return None
        stats = stats[key]
    return stats if isinstance(stats, (int, float)) and not isinstance(stats, bool) else None


def summary_rows(sides: Sequence[Side]) -> list[dict]:
    """One row per figure present on any side: values, difference (this - against) and the verdict."""
    rows = []
    for section, name, path, higher in SUMMARY:
        values = [lookup(s.stats, path) for s in sides]
        if all(v is None for v in values):
            continue
        row = {"section": section, "metric": name, "higher_is_better": higher,
               **{s.label: v for s, v in zip(sides, values)}}
        if len(sides) == 2 and None not in values:
            diff = values[0] - values[1]
            row["difference"] = diff
            row["verdict"] = "same" if diff == 0 else ("better" if (diff > 0) == higher else "worse")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ page
def fit_table(summary: dict, names: Sequence[str]) -> str:
    header = ["objects", "n", "mean best IoU", f"positive at IoU ≥ {summary['threshold']:g}",
              "low-quality only", "no positive", "positives / object", "of which per level"]
    rows = []
    for group, title in (("all", None), ("by_size", "size"), ("by_level", "level"), ("by_ratio", "h/w")):
        items = [("all", summary["all"])] if title is None else list(summary[group].items())
        for key, v in items:
            label = key if title is None or title == "h/w" else f"{key} ({title})"
            if not v.get("objects"):
                rows.append([label, 0] + [None] * (len(header) - 2))
                continue
            rows.append([label, v["objects"], v["mean_best_iou"], v["positive_at_threshold"], v["low_quality_only"],
                         v["no_positive"], v["positives_per_object"],
                         " ".join(f"{n} {v['positives_per_level'][n]:.2f}" for n in names)])
    return H.table(header, rows)


def recall_table(stats: dict) -> str:
    ks = stats["recall_at"]
    header = ["objects", "n"] + [f"recall@{k}" for k in ks] + [f"AR@{k}" for k in ks]
    rows = []
    for group, title in (("all", None), ("by_size", "size"), ("by_level", "level")):
        items = [("all", stats["all"])] if title is None else list(stats[group].items())
        for key, v in items:
            label = key if title is None else f"{key} ({title})"
            rows.append([label, v["objects"]] + [v.get(f"recall@{k}") for k in ks] + [v.get(f"AR@{k}") for k in ks])
    return H.table(header, rows)


def summary_html(rows: list[dict], sides: Sequence[Side]) -> str:
    labels = [s.label for s in sides]
    header = ["section", "metric"] + labels + (["difference"] if len(sides) == 2 else [])
    body, classes = [], []
    for r in rows:
        cells = [r["section"], r["metric"]] + [r.get(lab) for lab in labels]
        cls = ["", ""] + [""] * len(labels)
        if len(sides) == 2:
            diff = r.get("difference")
            cells.append(None if diff is None else ("0" if diff == 0 else f"{diff:+.3f}"))
            cls.append(("num " + {"better": "better", "worse": "worse"}.get(r.get("verdict"), "")).strip())
        body.append(cells)
        classes.append(cls)
    verdicts = [r.get("verdict") for r in rows]
    note = (f"{verdicts.count('better')} better, {verdicts.count('worse')} worse, {verdicts.count('same')} the same. "
            "difference = this − against; green: better, red: worse (for losses and misses, lower is better)"
            if len(sides) == 2 else "run with --against CHECKPOINT to compare with another checkpoint")
    return H.table(header, body, classes, css="summary") + H.para(note, "note")


def views_html(sides: Sequence[Side]) -> str:
    n = max(len(s.view_pictures) for s in sides)
    if n == 0:
        return H.para("no validation images", "note")
    shown = [v for v in VIEW_NAMES if any(v in pics for s in sides for pics in s.view_pictures)]
    header = ["image"] + shown
    rows = []
    for i in range(n):
        for s in sides:
            if i >= len(s.view_pictures):
                continue
            pics = s.view_pictures[i]
            label = f"val #{i}" + (f" ({s.label})" if len(sides) > 1 else "")
            rows.append([label] + [H.picture(pics[v], f"{v}, val #{i}, {s.label}") if v in pics else "–"
                                   for v in shown])
    return H.table(header, rows, css="views")


def side_header(s: Side) -> str:
    what = (f"checkpoint <code>{H.esc(s.source)}</code> ({s.model.stage} stage"
            + (f", iteration {s.iteration}" if s.iteration is not None else "") + ")"
            if s.has_weights else f"no checkpoint: config <code>{H.esc(s.source)}</code>, anchors and data only")
    g = s.model.rpn.anchor_generator
    return (f"<li><b>{H.esc(s.label)}</b>: {what}; anchors sizes {H.esc(g.sizes)} ratios {H.esc(g.ratios)}, "
            f"test size {s.cfg.model.transform.min_size_test}/{s.cfg.model.transform.max_size_test}</li>")


def write_page(sides: Sequence[Side], rows: list[dict], out: Path, losses: Optional[str], seconds: float,
               n_views: int) -> Path:
    body = [f"<h1>Anchor and proposal check-up</h1><ul>{''.join(side_header(s) for s in sides)}</ul>",
            H.para(f"made in {seconds:.0f} s on {time.strftime('%Y-%m-%d %H:%M')}; numbers in report.json", "note"),
            H.h2("Summary", "summary"), summary_html(rows, sides)]
    body += [H.h2(f"The seven views on {n_views} validation images", "views"),
             H.para("dataset, anchors and anchor labels depend only on the config; proposals, RoIs, detections and "
                    "features on the weights (RoIs and detections need the full stage). Click a picture for its "
                    "full size.", "note"), views_html(sides)]
    # anchor fit
    body.append(H.h2("Anchor fit over the training set", "anchor-fit"))
    body.append(H.para("Ground-truth boxes in model-input pixels (after the test-time resize) against the model's "
                       "anchors for that input size, labelled by the RPN's matcher. 'positive at IoU ≥ t': at least "
                       "one anchor is positive by the threshold; 'low-quality only': positive only as the box's "
                       "best anchor (the low-quality rule); sizes are COCO's buckets (area < 32², < 96²) in "
                       "model-input pixels; a box's level is the one whose anchor size is nearest to √(wh).", "note"))
    # Two checkpoints of the same data, resize, anchors and matcher share one fit: shown once.
    shared = len(sides) == 2 and sides[1].pictures["anchor_fit"] == sides[0].pictures["anchor_fit"]
    fit_sides = sides[:1] if shared else sides
    if shared:
        body.append(H.para("the same for both checkpoints: same data, resize, anchors and matcher", "note"))
    cols = []
    for s in fit_sides:
        a = s.stats["anchor_fit"]
        cols.append(H.h3(f"{s.label if not shared else 'both'}: {a['current']['all'].get('objects', 0)} objects "
                         f"in {a['images']} images")
                    + H.picture(s.pictures["anchor_fit"], "best anchor IoU", "figure")
                    + fit_table(a["current"], a["levels"])
                    + H.para("positive anchors per level over the split: " + ", ".join(
                        f"{k} {v}" for k, v in a["current"]["positives_per_level"].items()), "note"))
    body.append(H.pair(cols))
    # suggestions
    body.append(H.h2("Anchor suggestions (k-means, distance 1 − IoU of centred boxes)", "suggestions"))
    cols = []
    for s in fit_sides:
        a = s.stats["anchor_fit"]
        sug = a.get("suggestion")
        block = H.h3(s.label if not shared else "both") + H.picture(s.pictures["shapes"], "objects and anchor shapes", "figure")
        if sug:
            now = a["current"]["all"]
            keys = [("mean best IoU", "mean_best_iou"), ("positive at the threshold", "positive_at_threshold"),
                    ("low-quality only", "low_quality_only"), ("no positive", "no_positive"),
                    ("positives / object", "positives_per_object")]
            rows_ = [["now", " ".join(f"{x:g}" for x in a["anchor_sizes"]),
                      " ".join(f"{x:g}" for x in a["anchor_ratios"])] + [now.get(k) for _, k in keys]]
            for c in sug["candidates"]:
                rows_.append([c["method"] + (" (suggested)" if c["set"] == sug["set"] else ""),
                              " ".join(f"{x:g}" for x in c["sizes"]), " ".join(f"{x:g}" for x in c["ratios"])]
                             + [c["coverage"]["all"].get(k) for _, k in keys])
            block += H.table(["anchors", "sizes", "ratios"] + [k for k, _ in keys], rows_)
            verdict = ("covers more objects at the threshold than the anchors now" if sug["better_than_now"] else
                       "does not cover more objects at the threshold than the anchors now: keep yours, or try it "
                       "for its other numbers")
            block += H.para(f"the best of the three ({sug['method']}) {verdict}:") + H.code_block(sug["set"])
        else:
            block += H.para("no ground-truth boxes: nothing to cluster", "note")
        cols.append(block)
    body.append(H.pair(cols))
    # proposals
    with_props = [s for s in sides if "proposals" in s.stats]
    if with_props:
        body.append(H.h2("Proposals on the validation images", "proposals"))
        body.append(H.para("Best-proposal IoU of each object among the top-k proposals (no one-to-one matching); "
                           "recall at IoU 0.5 and AR over IoU 0.5:0.95. Worst-covered objects: white the ground "
                           "truth, orange its best proposal among those the model keeps at test time.", "note"))
        cols = []
        for s in with_props:
            p = s.stats["proposals"]
            block = (H.h3(f"{s.label}: {p['all']['objects']} objects in {p['images']} images (the model keeps "
                          f"{p['model_keeps']} proposals; counted up to {max(p['recall_at'])})")
                     + recall_table(p) + H.para("best proposal's level: " + ", ".join(
                         f"{k} {v}" for k, v in p["best_proposal_level"].items()), "note")
                     + H.picture(s.pictures["scores"], "proposal scores", "figure"))
            if "worst" in s.pictures:
                block += H.h3(f"the {len(p['worst'])} worst-covered objects") + \
                    H.picture(s.pictures["worst"], "worst-covered objects", "figure")
            cols.append(block)
        body.append(H.pair(cols))
    # run
    with_run = [s for s in sides if "run" in s.stats]
    if with_run:
        body.append(H.h2("Training run", "run"))
        if losses:
            body.append(H.picture(losses, "losses", "figure"))
        keys = sorted({k for s in with_run for src in ("val", "eval") for k in s.stats["run"].get(src, {})})
        rows_ = []
        for s in with_run:
            r = s.stats["run"]
            for src, title in (("val", "metrics.json"), ("eval", r.get("eval_file"))):
                if r.get(src):
                    rows_.append([f"{s.label} ({title})", r.get("iterations")] + [r[src].get(k) for k in keys])
        if rows_:
            body.append(H.table(["run", "iterations"] + keys, rows_))
        body.append(H.para("run directories: " + "; ".join(f"{s.label}: {s.stats['run']['dir']}" for s in with_run),
                           "note"))
    # first day
    with_day = [s for s in sides if "first_day" in s.stats]
    for s in with_day:
        d, o = s.stats["first_day"], s.stats["objects"]
        body.append(H.h2("First day with this data", "first-day"))
        body.append(H.table(["", "value"], [
            ["training images", o["images"]], ["objects", o["objects"]],
            ["objects per image (mean / max)", f"{o['objects_per_image_mean']:.1f} / {o['objects_per_image_max']}"],
            ["distinct image sizes (stored)", o["distinct_original_sizes"]],
            ["stored size h x w", f"{o['original_size_range']['h']} x {o['original_size_range']['w']}"],
            ["model-input size h x w", f"{o['input_size_range']['h']} x {o['input_size_range']['w']}"],
            ["object side √(wh), percentiles 5/10/25/50/75/95 (model-input px)",
             " / ".join(f"{v:.0f}" for v in o["side_percentiles"].values())],
            ["aspect ratio h/w, same percentiles", " / ".join(f"{v:.2f}" for v in o["ratio_percentiles"].values())],
            ["image scale suggested", f"{d['image_scale']:.2f} ({d['image_size_rule']})"],
            ["detections per image / proposals", f"{d['detections_per_image']} / {d['proposals']} (at most "
                                                 f"{d['most_objects_in_an_image']} objects in an image; "
                                                 f"{d['detections_rule']})"],
            ["seconds per training iteration (this machine)",
             "not measured" if d["seconds_per_iteration"] is None else
             f"{d['seconds_per_iteration']:.3f} (median of {d['timing_steps']} steps after a warm-up step, in "
             f"{d['timing_precision']['name']}: {d['timing_precision']['reason']})"],
        ]))
        body.append(H.para(f"the settings to start with ({d['minutes']:g} minutes of training):")
                    + H.code_block(d["set"]))
    path = out / "index.html"
    path.write_text(H.page("anchor and proposal check-up", body))
    return path


# ------------------------------------------------------------------------------------------------ main
def make_report(args, default_config: str) -> tuple[Path, list[str]]:
    """Run `visualize.py report`: (path of index.html, lines to print)."""
    from tqdm import tqdm

    from ..data.build import build_eval_dataset

    start = time.perf_counter()
    out = Path(args.out)
    if args.images < 0:
        raise ValueError(f"--images must be >= 0, got {args.images}")
    if args.against and not args.checkpoint:
        raise ValueError("--against compares two checkpoints: give --checkpoint too")
    sides = [load_side("this", args.checkpoint, args.config, args.set, args.device, args.seed, default_config)]
    if args.against:
        sides.append(load_side("against", args.against, args.config, args.set, args.device, args.seed,
                               default_config))
    data = []
    for s in sides:
        train_set, val_set = build_eval_dataset(s.cfg, "train"), build_eval_dataset(s.cfg, "val")
        data.append((train_set, val_set))
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for s, (train_set, val_set) in zip(sides, data):
        n_train = len(train_set) if args.train_images <= 0 else min(args.train_images, len(train_set))
        n_val = len(val_set) if args.val_images <= 0 else min(args.val_images, len(val_set))
        total += min(args.images, len(val_set)) + 4 * n_train + (n_val if s.has_weights else 0)
        total += 0 if s.has_weights else args.timing_steps + 1
    bar = tqdm(total=total, desc="report", disable=not args.progress, dynamic_ncols=True)

    def tick(k: int = 1) -> None:
        bar.update(k)
    try:
        for s, (train_set, val_set) in zip(sides, data):
            bar.set_description(f"report {s.label}: views")
            view_section(s, val_set, out, args.images, args.seed, args.score_thresh, args.top, args.palette, tick)
            if s.has_weights:
                bar.set_description(f"report {s.label}: proposals")
                proposal_section(s, val_set, out, args.val_images, args.seed, tick)
            bar.set_description(f"report {s.label}: anchor fit")
            first = sides[0]
            if s is not first and anchor_key(s, args.train_images) == anchor_key(first, args.train_images):
                # the same data, resize, anchors and matcher: the same fit
                s.stats.update(anchor_fit=first.stats["anchor_fit"], objects=first.stats["objects"])
                s.pictures.update(anchor_fit=first.pictures["anchor_fit"], shapes=first.pictures["shapes"])
                n_train = len(train_set) if args.train_images <= 0 else min(args.train_images, len(train_set))
                tick(4 * n_train)
            else:
                anchor_section(s, train_set, out, args.train_images, args.seed, tick)
            read_run(s)
            if not s.has_weights:
                bar.set_description(f"report {s.label}: timing")
                first_day(s, train_set, args.minutes, args.timing_steps, tick)
    finally:
        bar.close()
    losses = figure_losses(sides, out)
    rows = summary_rows(sides)
    seconds = time.perf_counter() - start
    page = write_page(sides, rows, out, losses, seconds, min(args.images, len(data[0][1])))
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds,
              "sides": {s.label: {"source": s.source, "stage": s.cfg.stage, "iteration": s.iteration,
                                  **{k: v for k, v in s.stats.items() if k != "run"},
                                  **({"run": {k: v for k, v in s.stats["run"].items() if k != "scalars"}}
                                     if "run" in s.stats else {})} for s in sides},
              "summary": rows}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"{r['metric']}: " + ", ".join(f"{s.label} {H.fmt(r.get(s.label))}" for s in sides)
             + (f" ({r['verdict']})" if "verdict" in r else "") for r in rows[:8]]
    if "suggestion" in sides[0].stats.get("anchor_fit", {}):
        lines.append("anchors to try: " + sides[0].stats["anchor_fit"]["suggestion"]["set"])
    if "first_day" in sides[0].stats:
        lines.append("first-day settings: " + sides[0].stats["first_day"]["set"])
    lines += [f"report written in {seconds:.1f} s", str(out / "report.json")]
    return page, lines
