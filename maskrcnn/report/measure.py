"""What the weekly check-up (`visualize.py report`) measures, side by side for this checkpoint and the one it is
compared with: the views drawn from the model's probe records, the anchor fit over the training set and the anchor
suggestions, proposal recall on the validation images, the run's losses and AP/AR, and without a checkpoint the
first-day numbers (object sizes, suggested settings, seconds per training iteration, timed by the engine's own
step). Every number goes into `Side.stats` and from there into report.json (`report_json`); the pictures are
saved under `img/` as they are measured (maskrcnn/vis/report_figures.py) and only their paths are kept.
maskrcnn/report/page.py renders the page from report.json alone.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..evaluation.coco_eval import proposals_kept
from ..model.precision import Precision
from ..vis import anchor_fit as af
from ..vis import report_figures as figures
from ..vis import views
from ..vis.panels import objectness
from ..vis.primitives import save_png, to_uint8_image

RECALL_AT = (100, 300, 1000)
AR_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # COCO's IoU thresholds of AR
WORST = 12  # worst-covered objects drawn


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
    side.pictures["anchor_fit"] = figures.figure_anchor_fit(fit_now, gen.sizes, names, out, side.label)
    side.pictures["shapes"] = figures.figure_shapes(gt.wh, gen, fit_now, suggestion, fit_best, out, side.label)
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


@dataclass
class ProposalTally:
    """What the proposal section gathers image by image over the validation images."""
    ks: list  # the top-k of the recall figures, the model's own among them
    own_k: int  # the proposals the model keeps at test time
    logits: bool  # the RPN's scores are logits (not probabilities)
    best: dict = field(default_factory=dict)  # k -> per image [M]: each object's best IoU among the top k
    wh: list = field(default_factory=list)  # per image [M, 2]: the objects' sizes in model-input pixels
    best_level: list = field(default_factory=list)  # per image [M]: the level of each object's best proposal
    covering: list = field(default_factory=list)  # objectness of proposals with IoU >= 0.5 with an object
    other: list = field(default_factory=list)  # and of the others
    worst: list = field(default_factory=list)  # (IoU, image, object, tile), lowest IoU first, at most WORST


def proposal_section(side: Side, val_set, out: Path, max_images: int, seed: int, tick: Callable) -> None:
    """Proposals over the validation images: recall by size and level, scores, the worst-covered objects."""
    model, rpn = side.model, side.model.rpn
    device = next(model.parameters()).device
    n = len(val_set) if max_images <= 0 else min(max_images, len(val_set))
    batch = max(1, side.cfg.test.ims_per_batch)  # as evaluate.py batches the validation images
    with proposals_kept(model, max(RECALL_AT)) as own_k:
        tally = ProposalTally(sorted(set(RECALL_AT) | {own_k}), own_k, not rpn.sigmoid_scores)
        for first in range(0, n, batch):  # a loop over batches, then over their images
            items = [val_set[i] for i in range(first, min(n, first + batch))]
            torch.manual_seed(seed)
            # No targets: no anchor labelling; no heads: proposals only, no detections pasted.
            record = model.probe([image.to(device) for image, _ in items], heads=False)
            for j, (image, target) in enumerate(items):
                tick()
                tally_image(tally, record, j, image, target, first + j)
    side.stats["proposals"] = proposal_numbers(tally, n, rpn.in_features, rpn.anchor_generator.sizes)
    side.pictures["scores"] = figures.figure_scores(concat(tally.covering), concat(tally.other), out, side.label)
    if tally.worst:
        side.pictures["worst"] = figures.save_tiles([w[3] for w in tally.worst], out, f"worst_{side.label}.png")


def tally_image(tally: ProposalTally, record: dict, j: int, image, target: dict, i: int) -> None:
    """Add image j of a probe record (validation image i): its objects' best IoUs, its proposals' scores and
    the crops of its objects that enter the worst-covered list."""
    from ..model.box_ops import box_iou
    from ..model.transform import resize_boxes

    # the ground truth in the model-input frame, resized as the model's transform resizes it
    gt = resize_boxes(target["boxes"].float(), tuple(image.shape[-2:]), record["image_sizes"][j])
    p = record["proposals"][j]
    boxes, scores, levels = p["boxes"].float().cpu(), p["scores"].float().cpu(), p["levels"].cpu()
    prob = objectness(scores, tally.logits)
    iou = box_iou(gt, boxes) if len(gt) and len(boxes) else torch.zeros((len(gt), len(boxes)))
    if len(boxes):
        hit = (iou.max(0).values >= 0.5).numpy() if len(gt) else np.zeros(len(boxes), bool)
        tally.covering.append(prob[hit])
        tally.other.append(prob[~hit])
    if len(gt) == 0:
        return
    for k in tally.ks:
        tally.best.setdefault(k, []).append(iou[:, :k].max(1).values.numpy() if len(boxes) else np.zeros(len(gt)))
    arg = iou[:, :tally.own_k].argmax(1) if len(boxes) else torch.zeros(len(gt), dtype=torch.int64)
    tally.best_level.append(levels[arg].numpy() if len(boxes) else np.full(len(gt), -1))
    tally.wh.append((gt[:, 2:] - gt[:, :2]).double().numpy())
    own_best, worst = tally.best[tally.own_k][-1], tally.worst
    for m in np.argsort(own_best, kind="stable")[:WORST]:  # draw only what may enter the worst list
        if len(worst) >= WORST and own_best[m] >= worst[-1][0]:
            break
        tile = figures.worst_tile(views.input_image(record, j), gt[m], boxes[arg[m]] if len(boxes) else None,
                                  float(own_best[m]), f"val #{i}")
        worst.append((float(own_best[m]), i, int(m), tile))
        worst.sort(key=lambda x: x[:3])
        del worst[WORST:]


def concat(arrays: list) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0)


def proposal_numbers(tally: ProposalTally, n: int, names: Sequence[str], anchor_sizes) -> dict:
    """The proposal figures of report.json from a tally of n images (levels `names`)."""
    wh_all = np.concatenate(tally.wh) if tally.wh else np.zeros((0, 2))
    best_all = ({k: np.concatenate(v) for k, v in tally.best.items()} if tally.wh
                else {k: np.zeros(0) for k in tally.ks})
    sizes, levels_of = af.size_bucket(wh_all), af.level_bucket(wh_all, anchor_sizes)
    everything = np.ones(len(wh_all), bool)
    stats = {"images": n, "model_keeps": tally.own_k, "recall_at": tally.ks,
             "all": recall_numbers(best_all, everything),
             "by_size": {name: recall_numbers(best_all, sizes == k) for k, (name, _, _) in enumerate(af.SIZE_BUCKETS)},
             "by_level": {name: recall_numbers(best_all, levels_of == k) for k, name in enumerate(names)},
             "best_proposal_level": {name: int((np.concatenate(tally.best_level) == k).sum()) if tally.best_level
                                     else 0 for k, name in enumerate(names)},
             "worst": [round(w[0], 4) for w in tally.worst]}
    cov, oth = concat(tally.covering), concat(tally.other)
    stats["scores"] = {"covering": int(len(cov)), "other": int(len(oth)),
                       "covering_median": float(np.median(cov)) if len(cov) else None,
                       "other_median": float(np.median(oth)) if len(oth) else None}
    return stats


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


def error_analysis(side: Side, out: Path) -> None:
    """The error analysis of the checkpoint's run (evaluate.py's clean evaluation, else its metrics.json): TIDE's
    dAP per error type (box and mask) and the pictures, those beside the evaluation copied into img/ (else drawn
    there), so that the page stands alone."""
    if side.checkpoint is None:
        return
    from ..evaluation.error_plots import run_analysis
    from ..evaluation.errors import ERROR_WORDS
    img = out / "img" / f"errors_{side.label}"
    found = run_analysis(side.checkpoint.parent, "val", draw=True, out_dir=img)
    if found is None:
        return
    img.mkdir(parents=True, exist_ok=True)
    pictures = []
    for path in found["pictures"]:
        if path.parent.resolve() != img.resolve():
            shutil.copyfile(path, img / path.name)
        pictures.append(f"img/errors_{side.label}/{path.name}")
    side.stats["errors"] = {"source": Path(found["source"]).name, "image_set": found["image_set"],
                            "types": found["errors"], "words": ERROR_WORDS, "pictures": pictures}


def flat_metrics(metrics: dict) -> dict:
    """{"box AP": .., "box AP50": .., "mask AP": .., "AR@100": ..} from a metrics dict of either stage."""
    out = {k: float(v) for k, v in metrics.items() if k.startswith("AR@")}
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        stats = metrics.get(iou_type, {}).get("stats", {})
        out.update({f"{name} {k}": float(stats[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
                    if k in stats})
    return out


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
    """Median time of `steps` real training steps of a freshly built model on real batches (the trainer's own
    step, timed by maskrcnn.engine.step.time_training_steps in the precision the run would choose on this
    machine, which is returned with the seconds)."""
    from ..data.loader import build_loader
    from ..data.transforms import Compose, RandomHorizontalFlip
    from ..engine.device import select_device
    from ..engine.step import time_training_steps
    from ..model.build import build_model

    cfg = side.cfg
    device = select_device(cfg.train.device)
    model = build_model(cfg, load_weights=False).to(device)  # weights do not change the time
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    was = train_set.transforms
    train_set.transforms = Compose([RandomHorizontalFlip(cfg.data.flip_prob)])
    loader = build_loader(train_set, cfg.solver.ims_per_batch, shuffle=True, num_workers=0, seed=cfg.train.seed,
                          drop_last=True, infinite=True)
    try:
        return time_training_steps(cfg, model, loader, steps, tick)
    finally:
        train_set.transforms = was


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


def report_json(sides: Sequence[Side], rows: list[dict], seconds: float, losses: Optional[str]) -> dict:
    """The content of report.json: every number on the page, and what the page shows beside them (the
    pictures' paths, what each side is), so that maskrcnn/report/page.py renders the page from it alone."""
    def side_json(s: Side) -> dict:
        run = {"run": {k: v for k, v in s.stats["run"].items() if k != "scalars"}} if "run" in s.stats else {}
        t = s.cfg.model.transform
        return {"source": s.source, "stage": s.cfg.stage, "iteration": s.iteration,
                **{k: v for k, v in s.stats.items() if k != "run"}, **run,
                "has_weights": s.has_weights, "test_size": [t.min_size_test, t.max_size_test],
                "pictures": s.pictures, "view_pictures": s.view_pictures}
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds,
            "sides": {s.label: side_json(s) for s in sides}, "summary": rows, "losses_picture": losses}
