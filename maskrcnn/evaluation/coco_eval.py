"""Evaluation: inference over a dataset, COCO box/mask AP and proposal AR through pycocotools.

Results are converted to COCO's results format image by image, so full-resolution masks never pile up.
Under torchrun the inference is shared by the processes and pycocotools runs once, on rank 0, over the
gathered results: the same numbers as one process (see run_inference).
"""
from __future__ import annotations

import contextlib
import io
from typing import Optional

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from tqdm import tqdm

from ..model.precision import autocast

from ..engine import distributed

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def detections_to_coco(det: dict[str, Tensor], image_id: int, contiguous_to_cat_id: dict[int, int],
                       mask_threshold: float = 0.5) -> list[dict]:
    """One image's detections -> COCO result records (bbox xywh; segmentation as compressed RLE)."""
    boxes = det["boxes"].float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()
    scores = det["scores"].float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    rles = None
    mask_scores = det["mask_scores"].float().cpu().tolist() if "mask_scores" in det else None  # Mask Scoring R-CNN
    if "masks" in det:
        binary = (det["masks"][:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # [H, W, D] Fortran order
    out = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        rec = {"image_id": int(image_id), "category_id": contiguous_to_cat_id[int(label)], "bbox": box,
               "score": float(score)}
        if rles is not None:
            rle = rles[i]
            rec["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        if mask_scores is not None:
            rec["mask_score"] = float(mask_scores[i])
        out.append(rec)
    return out


def proposals_to_coco(props: dict[str, Tensor], image_id: int, max_dets: int) -> list[dict]:
    boxes = props["boxes"][:max_dets].float().cpu()
    scores = props["scores"][:max_dets].float().cpu().tolist()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()
    return [{"image_id": int(image_id), "category_id": 1, "bbox": b, "score": float(s)}
            for b, s in zip(xywh, scores)]


@torch.no_grad()
def run_inference(model, dataset, device: torch.device, batch_size: int = 2, max_images: int = 0,
                  amp: bool = False, mask_threshold: float = 0.5, progress: bool = True,
                  desc: str = "inference") -> tuple[list[dict], list[int]]:
    """COCO results of `model` over `dataset` (detections, or proposals for an RPN-stage model), in dataset order,
    and the image ids. `amp`: fp16 autocast on CUDA, bf16 on a CPU (default fp32).

    Under torchrun the batches one process would run are dealt out, batch b to rank b mod world size: every
    image is padded and inferred with the same neighbours as in one process, so its detections are the same;
    rank 0 gathers and returns every result, the other ranks return empty lists."""
    model.eval()
    rank, world = distributed.rank(), distributed.world_size()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mapping = getattr(dataset, "contiguous_to_cat_id", None)
    done: list[tuple[int, list[dict], list[int]]] = []  # (first index, results, image ids) per batch
    with _proposals_for_ar(model):
        starts = list(range(0, n, batch_size))[rank::world]
        for start in tqdm(starts, desc=desc, disable=not (progress and rank == 0), leave=False):
            batch = [dataset[i] for i in range(start, min(n, start + batch_size))]
            images = [img.to(device, non_blocking=True) for img, _ in batch]
            with autocast(device, amp):
                outputs = model(images)
            results: list[dict] = []
            image_ids: list[int] = []
            for (_, target), out in zip(batch, outputs):
                image_id = int(target["image_id"])
                image_ids.append(image_id)
                if model.stage == "rpn":
                    results.extend(proposals_to_coco(out, image_id, max_dets=1000))
                else:
                    results.extend(detections_to_coco(out, image_id, mapping, mask_threshold))
            done.append((start, results, image_ids))
    if world > 1:
        parts = distributed.gather_object(done)
        if parts is None:
            return [], []
        done = sorted((b for part in parts for b in part), key=lambda b: b[0])
    return [r for _, results, _ in done for r in results], [i for _, _, ids in done for i in ids]


@contextlib.contextmanager
def proposals_kept(model, at_least: int):
    """The RPN keeps at least `at_least` proposals per image at test time inside the block (yielding the number
    it keeps outside it), restored afterwards."""
    kept = model.rpn.post_nms_topk
    model.rpn.post_nms_topk = (kept[0], max(kept[1], at_least))
    try:
        yield kept[1]
    finally:
        model.rpn.post_nms_topk = kept


def _proposals_for_ar(model):
    """An RPN-stage model keeps at least 1000 proposals per image inside the block: AR@1000 counts 1000
    even where the config keeps fewer for the full model."""
    return proposals_kept(model, 1000) if model.stage == "rpn" else contextlib.nullcontext()


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        out = fn(*args)
    return out, buf.getvalue()


def _records_for(results: list[dict], iou_type: str) -> list[dict]:
    """Copies of the result records for loadRes (which adds keys to what it is given). For 'segm' the copies have
    no 'bbox': loadRes takes its box branch whenever the first record has one and then sets every record's area
    to the box's w*h, so APs/APm/APl of masks would bucket detections by box size. Without it loadRes gives each
    the mask's area (maskUtils.area of the RLE), as detectron2 does by dropping 'bbox' too. A record's
    'mask_score' (detections with mask_scores) is its score for 'segm'."""
    if iou_type != "segm":
        return [{k: v for k, v in r.items() if k != "mask_score"} for r in results]
    for i, r in enumerate(results):
        if "segmentation" not in r:
            raise ValueError(f"segm evaluation: result record {i} (image_id {r.get('image_id')}) has no "
                             "'segmentation'")
    # a mask's own score where the model gives one (Mask Scoring R-CNN's mask_scores), else the detection's
    return [{**{k: v for k, v in r.items() if k not in ("bbox", "mask_score")},
             "score": r.get("mask_score", r["score"])} for r in results]


def check_results(coco_gt, results, source: str = "detections", iou_types=("bbox",)) -> None:
    """COCO results records that pycocotools can evaluate against `coco_gt`, else a one-line ValueError naming
    `source`, the record and the problem: a list of dicts with image_id, category_id, score and (per iou type)
    bbox [x, y, w, h] or segmentation; every image id and category id present in the annotations."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of COCO result records, got {type(results).__name__}")
    need = ["image_id", "category_id", "score"] + [("bbox" if t == "bbox" else "segmentation") for t in iou_types]
    for i, r in enumerate(results):
        missing = [k for k in need if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{source}: record {i} has no {', '.join(repr(k) for k in missing)}")
        if "bbox" in iou_types and (not isinstance(r["bbox"], (list, tuple)) or len(r["bbox"]) != 4):
            raise ValueError(f"{source}: record {i} (image_id {r['image_id']}): bbox must be [x, y, w, h], "
                             f"got {r['bbox']!r}")
    unknown = sorted({r["image_id"] for r in results} - set(coco_gt.imgs))
    if unknown:
        n = sum(r["image_id"] in set(unknown) for r in results)
        raise ValueError(f"{source}: {n} detections for {len(unknown)} image ids not in the annotations "
                         f"(first: {unknown[:3]})")
    cats = sorted({r["category_id"] for r in results} - set(coco_gt.cats))
    if cats:
        raise ValueError(f"{source}: category ids {cats[:5]} are not among the annotations' categories "
                         f"({sorted(coco_gt.cats)[:10]}{' ...' if len(coco_gt.cats) > 10 else ''})")


def coco_evaluate(coco_gt, results: list[dict], iou_type: str, image_ids: list[int],
                  cat_ids: Optional[list[int]] = None, verbose: bool = False, analysis: bool = True) -> dict:
    """The 12-number COCO summary (as fractions), per-category AP (AP, AP50, AP75) and, with `analysis`, the
    error analysis of maskrcnn/evaluation/errors.py (TIDE's dAP per error type, analyze()'s PR breakdown, the
    confusion matrix) for iou_type 'bbox' or 'segm'."""
    stats = {name: 0.0 for name in STAT_NAMES}
    if not results:
        cats = sorted(coco_gt.getCatIds() if cat_ids is None else cat_ids)
        names = [coco_gt.cats[c]["name"] for c in cats]
        out = {"stats": stats, "per_category": {n: 0.0 for n in names},
               "per_category_ap": {n: {"AP": 0.0, "AP50": 0.0, "AP75": 0.0} for n in names},
               "summary": "no detections: every AP and AR is 0"}
        if analysis:
            from .errors import analyze

            out["errors"] = analyze(coco_gt, [], iou_type, image_ids, cats)
        return out
    check_results(coco_gt, results, "detections", (iou_type,))  # loadRes would assert, COCOeval ignore them
    coco_dt, _ = _quiet(coco_gt.loadRes, _records_for(results, iou_type))
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = sorted(image_ids)
    if cat_ids is not None:  # only the categories the model was trained on
        ev.params.catIds = sorted(cat_ids)
    _, text1 = _quiet(ev.evaluate)
    _, text2 = _quiet(ev.accumulate)
    _, summary = _quiet(ev.summarize)
    if verbose:
        print(summary)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    per_cat, table = per_category_ap(coco_gt, ev)
    out = {"stats": stats, "per_category": per_cat, "per_category_ap": table, "summary": summary}
    if analysis:
        from .errors import analyze

        out["errors"] = analyze(coco_gt, results, iou_type, image_ids, list(ev.params.catIds))
    return out


def per_category_ap(coco_gt, ev) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """From an accumulated COCOeval: {category name: AP} and {category name: {AP, AP50, AP75}} (area all, 100
    detections; NaN for a category without GT)."""
    # precision [T, R, K, A, M]: IoU thresholds (0.5:0.05:0.95), recall points, categories, areas, max dets
    precision = ev.eval["precision"]
    iou_index = {"AP": slice(None), "AP50": [0], "AP75": [5]}
    per_cat, table = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        row = {}
        for key, t in iou_index.items():
            p = precision[t, :, k, 0, -1]
            p = p[p > -1]
            row[key] = float(p.mean()) if p.size else float("nan")
        name = coco_gt.cats[cat_id]["name"]
        per_cat[name], table[name] = row["AP"], row
    return per_cat, table


def proposal_recall(coco_gt, results: list[dict], image_ids: list[int], max_dets=(100, 1000)) -> dict:
    """COCO-style average recall of class-agnostic proposals (IoU 0.5:0.95, all areas) at each max_dets."""
    if not results:
        return {f"AR@{m}": 0.0 for m in max_dets}
    coco_dt, _ = _quiet(coco_gt.loadRes, [dict(r) for r in results])
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = sorted(image_ids)
    ev.params.useCats = 0
    ev.params.maxDets = list(max_dets)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    recall = ev.eval["recall"]  # [T, K, A, M]
    out = {}
    for m_idx, m in enumerate(max_dets):
        r = recall[:, 0, 0, m_idx]
        r = r[r > -1]
        out[f"AR@{m}"] = float(r.mean()) if r.size else 0.0
    return out


def evaluate_model(model, dataset, device: torch.device, batch_size: int = 2, max_images: int = 0,
                   amp: bool = False, mask_threshold: float = 0.5, progress: bool = True,
                   desc: str = "evaluate") -> tuple[dict, list[dict]]:
    """Metrics dict (AR for the RPN stage; box and mask AP for the full model) and the COCO results. Under
    torchrun: the metrics on every rank, the results on rank 0 (empty elsewhere)."""
    results, image_ids = run_inference(model, dataset, device, batch_size, max_images, amp, mask_threshold,
                                       progress, desc)
    metrics = None
    if distributed.is_main():
        if model.stage == "rpn":
            metrics = proposal_recall(dataset.coco, results, image_ids)
        else:
            cat_ids = list(dataset.contiguous_to_cat_id.values())
            metrics = {"bbox": coco_evaluate(dataset.coco, results, "bbox", image_ids, cat_ids)}
            if model.roi_heads.mask_on:
                metrics["segm"] = coco_evaluate(dataset.coco, results, "segm", image_ids, cat_ids)
    return distributed.broadcast_object(metrics), results


def end_of_run_evaluation(model, dataset, device: torch.device, *, batch_size: int, max_images: int, amp: bool,
                          mask_threshold: float, progress: bool) -> tuple[dict, str, dict[str, float]]:
    """A training's evaluation of its val split (the trainer's Hooks.evaluate): (the metrics without
    pycocotools' printed summaries, for metrics.json; one line; TensorBoard scalars)."""
    metrics, _ = evaluate_model(model, dataset, device, batch_size, max_images, amp, mask_threshold, progress,
                                "evaluate val")
    stripped = {k: ({kk: vv for kk, vv in v.items() if kk != "summary"} if isinstance(v, dict) else v)
                for k, v in metrics.items()}
    if "AR@100" in metrics:
        scalars = dict(metrics)
    else:
        scalars = {f"{t}_{k}": v for t in ("bbox", "segm") if t in metrics for k, v in metrics[t]["stats"].items()}
        # TIDE's dAP per error type: val/bbox_dAP_loc, ...
        scalars.update({f"{t}_dAP_{k}": v for t in ("bbox", "segm") if "errors" in metrics.get(t, {})
                        for k, v in metrics[t]["errors"]["dAP"].items()})
    return stripped, format_metrics(metrics), scalars


def format_metrics(metrics: dict) -> str:
    if "AR@100" in metrics:
        return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    parts = []
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            s = metrics[iou_type]["stats"]
            parts.append(f"{iou_type}: AP {s['AP']:.3f} AP50 {s['AP50']:.3f} AP75 {s['AP75']:.3f}")
    return " | ".join(parts)
