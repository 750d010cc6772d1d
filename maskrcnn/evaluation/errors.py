"""Why detections miss: TIDE's error decomposition, COCO analyze()'s PR breakdown and a confusion matrix.

One pass over the images matches every detection as pycocotools does (per class, in score order, each ground
truth (GT) once, crowd regions ignore what falls in them; the top 100 detections per image and class), so the AP
at IoU 0.5 computed here is COCOeval's AP50 to the last digit (tests/test_errors.py). On that matching:

TIDE (Bolya et al., ECCV 2020), at foreground IoU 0.5 and background IoU 0.1. Each false positive (FP) gets one
error type, tested in TIDE's order, with IoUs against non-crowd GT:
  loc   its best IoU with a GT of its class is in [0.1, 0.5): found the object, drew it badly
  cls   IoU >= 0.5 with a GT of another class: the right place, the wrong class
  dupe  IoU >= 0.5 with a GT of its class that a higher-scoring detection already took
  bkg   IoU <= 0.1 with every GT: fired on background
  both  the rest (IoU in (0.1, 0.5) with a GT of another class only): wrong place and wrong class
  miss  a GT that no detection found, nor any loc or cls error points at
dAP of a type = the AP50 an oracle gets by fixing only that type, minus the AP50 found: a loc or cls error whose GT
no detection took becomes that GT's true positive (the highest-scoring loc or cls error per GT; TIDE's
BestGTMatch), the others of the type are removed; dupe, bkg and both errors are removed; a missed GT is removed
from the GT count. FP dAP removes every false positive, FN dAP every GT not found. AP is the mean over the
classes that have GT; a class whose GT an oracle removes entirely scores 0 (as TIDE's).
Differences from the `tidecv` package (its AP: the top 100 per image over all classes; here per image and class,
as COCO's): detections inside crowd regions are ignored here, not analysed; a false positive at IoU exactly 0.5
with a taken GT of its class is a dupe here, a loc error in TIDE.

COCO analyze() (the PR curves of Hoiem-style analysis in the COCO API's MATLAB analyze.m and mmdetection's port):
  C75, C50   PR at IoU 0.75, 0.5
  Loc        PR at IoU 0.1 (localisation errors forgiven)
  Sim        and FPs that overlap (IoU >= 0.1) a GT of another class of the same supercategory dropped
  Oth        and FPs that overlap a GT of any other class dropped
  BG         and every remaining FP dropped (precision 1 wherever Oth found anything)
  FN         precision 1 at every recall (every missed GT found)
(for all areas, and for COCO's small, medium and large as COCOeval restricts them; analyze.m relabels the
similar GT as ignored ones and rematches at IoU 0.1, here the detections unmatched at 0.1 are dropped: the same
except where one detection would take a similar GT that another needed.)

Confusion matrix (mmdetection's tools/analysis_tools/confusion_matrix.py): rows the GT class (and background),
columns the detected class (and background); each detection scoring >= 0.3 counts once against every GT it
overlaps at IoU >= 0.5, in the background row if it overlaps none; a GT that no detection of its own class
overlaps counts once in the background column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pycocotools.mask as mask_util

FG_IOU, BG_IOU = 0.5, 0.1  # TIDE's foreground and background thresholds
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
SUMMARY_TYPES = ("FP", "FN")
CURVES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
RECALLS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points
MAX_DETS = 100  # per image and class, as COCOeval's AP
AREAS = {"small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2), "large": (96.0 ** 2, 1e5 ** 2)}  # COCOeval's
CONFUSION_SCORE, CONFUSION_IOU = 0.3, 0.5
_ERR = {name: i for i, name in enumerate(ERROR_TYPES)}  # det error codes; -1: not an error


@dataclass
class Matched:
    """Every kept detection (in COCOeval's order: image by image, each by falling score) and every GT."""
    cls: np.ndarray       # [N] class index (into cat_ids) of each detection
    score: np.ndarray     # [N]
    tp: dict              # {IoU threshold: [N] bool} true positive at that threshold
    ignored: dict         # {IoU threshold: [N] bool} matched a crowd region only
    error: np.ndarray     # [N] index into ERROR_TYPES, -1 for true positives and ignored detections
    target: np.ndarray    # [N] global GT index a loc / cls error points at, else -1
    near_sim: np.ndarray  # [N] bool: IoU >= 0.1 with a GT of another class of the same supercategory
    near_oth: np.ndarray  # [N] bool: IoU >= 0.1 with a GT of another class
    gt_cls: np.ndarray    # [G] class index of each non-crowd GT
    gt_used: np.ndarray   # [G] bool: matched at IoU 0.5
    confusion: np.ndarray  # [K + 1, K + 1]
    gt_area: np.ndarray   # [G] the annotation's area of each non-crowd GT
    by_area: dict         # {(area name, IoU threshold): ([N] true positive, [N] ignored)}


def _last_best(cand: np.ndarray, row: np.ndarray) -> int:
    """The index of the best IoU among the candidates, the last of equal ones (as COCOeval's loop)."""
    row = np.where(cand, row, -1.0)
    return len(row) - 1 - int(np.argmax(row[::-1]))


def _match(iou: np.ndarray, same: np.ndarray, crowd: np.ndarray, thr: float,
           ignore: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' greedy matching of one image's detections (rows, by falling score) to its GT (columns) at IoU
    `thr`: (matched GT index or -1 [D], ignored [D]). Among the free GT of its class that are not ignored (crowd
    regions, and GT outside an area range) a detection takes the best IoU (the last of equal ones, as COCOeval);
    with none, the best free ignored one (a crowd region is never used up), and the detection is ignored."""
    ignore = crowd if ignore is None else ignore
    D = iou.shape[0]
    gt = np.full(D, -1)
    ignored = np.zeros(D, bool)
    ok = same & (iou >= thr)  # [D, G]
    taken = np.zeros(len(crowd), bool)
    for d in np.flatnonzero(ok.any(1)):  # only detections that overlap something of their class
        cand = ok[d] & ~taken & ~ignore
        if cand.any():
            g = _last_best(cand, iou[d])
            taken[g] = True
            gt[d] = g
            continue
        cand = ok[d] & ignore & (~taken | crowd)
        if cand.any():
            taken[_last_best(cand, iou[d])] = True
            ignored[d] = True
    return gt, ignored


def _images(coco_gt, results: list[dict], iou_type: str, image_ids: list[int], cat_ids: list[int]):
    """Per image (sorted ids): detections sorted by falling score (stable), top MAX_DETS per class, and GT."""
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["category_id"] in cat_index:
            by_image.setdefault(r["image_id"], []).append(r)
    for image_id in sorted(image_ids):
        dets = by_image.get(image_id, [])
        scores = np.array([d["score"] for d in dets], dtype=np.float64)
        order = np.argsort(-scores, kind="mergesort")
        cls = np.array([cat_index[dets[i]["category_id"]] for i in order], dtype=np.int64)
        # rank of each detection within its class: keep the top MAX_DETS per class
        by_cls = np.argsort(cls, kind="mergesort")
        rank = np.empty(len(cls), np.int64)
        if len(cls):
            starts = np.r_[0, np.flatnonzero(np.diff(cls[by_cls])) + 1]
            run = np.diff(np.r_[starts, len(cls)])
            rank[by_cls] = np.arange(len(cls)) - np.repeat(starts, run)
        keep = order[rank < MAX_DETS]
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if a["category_id"] in cat_index]
        anns.sort(key=lambda a: bool(a.get("iscrowd", 0)))  # non-crowd first, as COCOeval
        g_geo = [a["bbox"] if iou_type == "bbox" else coco_gt.annToRLE(a) for a in anns]
        d_geo = [dets[i][geometry] for i in keep]
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
        g_area = np.array([float(a.get("area", 0.0)) for a in anns], dtype=np.float64)
        if iou_type == "bbox":  # loadRes's areas: the box's w * h, the mask's pixel count
            d_area = np.array([g[2] * g[3] for g in d_geo], dtype=np.float64)
        else:
            d_area = np.asarray(mask_util.area(d_geo), dtype=np.float64).reshape(-1) if d_geo else np.zeros(0)
        if d_geo and g_geo:
            iou = np.asarray(mask_util.iou(d_geo, g_geo, crowd.astype(np.uint8).tolist()), dtype=np.float64)
        else:
            iou = np.zeros((len(d_geo), len(g_geo)))
        g_cls = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
        yield cls[rank < MAX_DETS], scores[keep], iou.reshape(len(d_geo), len(g_geo)), g_cls, crowd, d_area, g_area


def match(coco_gt, results: list[dict], iou_type: str, image_ids: list[int], cat_ids: list[int]) -> Matched:
    """The matching of every detection at IoU 0.75, 0.5 and 0.1, its TIDE error and the confusion matrix."""
    K = len(cat_ids)
    superc = [coco_gt.cats[c].get("supercategory", str(c)) for c in cat_ids]
    same_super = np.array([[a == b for b in superc] for a in superc], bool).reshape(K, K)
    parts: dict[str, list] = {k: [] for k in ("cls", "score", "tp75", "ig75", "tp50", "ig50", "tp10", "ig10",
                                             "error", "target", "near_sim", "near_oth", "gt_cls", "gt_used", "gt_area")}
    confusion = np.zeros((K + 1, K + 1), np.int64)
    by_area: dict[tuple[str, float], tuple[list, list]] = {}
    gt_offset = 0
    for cls, score, iou, g_cls, crowd, d_area, g_area in _images(coco_gt, results, iou_type, image_ids, cat_ids):
        same = cls[:, None] == g_cls[None, :]  # [D, G]
        gt50, ig50 = _match(iou, same, crowd, FG_IOU)
        for thr, key in ((0.75, "75"), (0.1, "10")):
            gt_t, ig_t = _match(iou, same, crowd, thr)
            parts["tp" + key].append(gt_t >= 0)
            parts["ig" + key].append(ig_t)
        for area, (lo, hi) in AREAS.items():  # COCOeval's area ranges: GT outside ignored, unmatched dets too
            outside = (g_area < lo) | (g_area > hi)
            d_out = (d_area < lo) | (d_area > hi)
            for thr in (0.75, 0.5, 0.1):
                gt_t, ig_t = _match(iou, same, crowd, thr, crowd | outside)
                by_area.setdefault((area, thr), ([], []))
                by_area[(area, thr)][0].append(gt_t >= 0)
                by_area[(area, thr)][1].append(ig_t | ((gt_t < 0) & d_out))
        real = ~crowd
        n_real = int(real.sum())
        used = np.zeros(len(g_cls), bool)
        used[gt50[gt50 >= 0]] = True
        fp = (gt50 < 0) & ~ig50
        # IoUs with non-crowd GT: of the detection's class, of another class, of its class already taken
        iou_real = np.where(real[None, :], iou, 0.0)
        cls_iou = np.where(same, iou_real, 0.0)
        other_iou = np.where(~same, iou_real, 0.0)
        used_iou = np.where(used[None, :], cls_iou, 0.0)
        if iou.shape[1]:
            best_cls, arg_cls = cls_iou.max(1), cls_iou.argmax(1)
            best_other, arg_other = other_iou.max(1), other_iou.argmax(1)
            best_used = used_iou.max(1)
            sim = ~same & same_super[cls][:, g_cls] & real[None, :]
            parts["near_sim"].append((np.where(sim, iou, 0.0) >= BG_IOU).any(1))
        else:
            best_cls = best_other = best_used = np.zeros(len(cls))
            arg_cls = arg_other = np.zeros(len(cls), np.int64)
            parts["near_sim"].append(np.zeros(len(cls), bool))
        parts["near_oth"].append(best_other >= BG_IOU)
        error = np.full(len(cls), -1)
        target = np.full(len(cls), -1)
        loc = fp & (best_cls >= BG_IOU) & (best_cls < FG_IOU)
        wrong_cls = fp & ~loc & (best_other >= FG_IOU)
        dupe = fp & ~loc & ~wrong_cls & (best_used >= FG_IOU)
        bkg = fp & ~loc & ~wrong_cls & ~dupe & (np.maximum(best_cls, best_other) <= BG_IOU)
        both = fp & ~loc & ~wrong_cls & ~dupe & ~bkg
        for mask, name in ((loc, "loc"), (wrong_cls, "cls"), (dupe, "dupe"), (bkg, "bkg"), (both, "both")):
            error[mask] = _ERR[name]
        # crowd regions sort last, so the index of a non-crowd GT is its index among the image's real GT
        target[loc] = gt_offset + arg_cls[loc]
        target[wrong_cls] = gt_offset + arg_other[wrong_cls]
        # confusion matrix (mmdetection's): every confident detection against every GT it overlaps at 0.5
        conf = score >= CONFUSION_SCORE
        hits = (iou_real >= CONFUSION_IOU) & conf[:, None] & real[None, :]  # [D, G]
        d_idx, g_idx = np.nonzero(hits)
        np.add.at(confusion, (g_cls[g_idx], cls[d_idx]), 1)
        np.add.at(confusion, (K, cls[conf & ~hits.any(1)]), 1)
        found = (hits & same).any(0)
        np.add.at(confusion, (g_cls[real & ~found], K), 1)
        parts["cls"].append(cls)
        parts["score"].append(score)
        parts["tp50"].append(gt50 >= 0)
        parts["ig50"].append(ig50)
        parts["error"].append(error)
        parts["target"].append(target)
        parts["gt_cls"].append(g_cls[real])
        parts["gt_used"].append(used[real])
        parts["gt_area"].append(g_area[real])
        gt_offset += n_real
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    return Matched(cls=cat["cls"].astype(np.int64), score=cat["score"].astype(np.float64),
                   tp={0.75: cat["tp75"].astype(bool), 0.5: cat["tp50"].astype(bool), 0.1: cat["tp10"].astype(bool)},
                   ignored={0.75: cat["ig75"].astype(bool), 0.5: cat["ig50"].astype(bool),
                            0.1: cat["ig10"].astype(bool)},
                   error=cat["error"].astype(np.int64), target=cat["target"].astype(np.int64),
                   near_sim=cat["near_sim"].astype(bool), near_oth=cat["near_oth"].astype(bool),
                   gt_cls=cat["gt_cls"].astype(np.int64), gt_used=cat["gt_used"].astype(bool), confusion=confusion,
                   gt_area=cat["gt_area"].astype(np.float64),
                   by_area={k: (np.concatenate(tp).astype(bool) if tp else np.zeros(0, bool),
                                np.concatenate(ig).astype(bool) if ig else np.zeros(0, bool))
                            for k, (tp, ig) in by_area.items()})


def precision_curves(cls: np.ndarray, score: np.ndarray, tp: np.ndarray, npos: np.ndarray,
                     weight: Optional[np.ndarray] = None) -> np.ndarray:
    """[K, 101] interpolated precision at COCO's recall points per class (COCOeval.accumulate's arithmetic), from
    detections in COCOeval's order (image by image, by falling score); 0 for a class without GT. `weight`: each
    detection counted that many times (its image's count in a bootstrap resample)."""
    K = len(npos)
    q = np.zeros((K, len(RECALLS)))
    order = np.lexsort((-score, cls))  # by class, then falling score; stable: ties keep image order
    cls, tp = cls[order], tp[order]
    w = np.ones(len(cls)) if weight is None else weight[order]
    bounds = np.searchsorted(cls, np.arange(K + 1))
    for k in range(K):
        if npos[k] <= 0:
            continue
        t, wk = tp[bounds[k]:bounds[k + 1]], w[bounds[k]:bounds[k + 1]]
        tps, fps = np.cumsum(t * wk, dtype=np.float64), np.cumsum(~t * wk, dtype=np.float64)
        rc = tps / npos[k]
        pr = tps / (fps + tps + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision made non-increasing
        inds = np.searchsorted(rc, RECALLS, side="left")
        q[k] = np.where(inds < len(pr), pr[np.minimum(inds, len(pr) - 1)] if len(pr) else 0.0, 0.0)
    return q


COCO_IOUS = np.linspace(0.5, 0.95, 10)  # COCOeval's IoU thresholds


@dataclass
class ImageMatches:
    """Each detection's match at COCO's ten IoU thresholds, and its image: enough to recompute AP for any
    resample of the images (a bootstrap)."""
    image: np.ndarray     # [N] index (into the sorted image ids) of each detection's image
    cls: np.ndarray       # [N]
    score: np.ndarray     # [N]
    tp: np.ndarray        # [T, N] bool
    ignored: np.ndarray   # [T, N] bool
    gt_image: np.ndarray  # [G] image index of each non-crowd GT
    gt_cls: np.ndarray    # [G]
    n_images: int
    K: int
    sorted: Optional[dict] = None  # the detections by class, then falling score (resampled_ap sets it once)


def image_matches(coco_gt, results: list[dict], iou_type: str, image_ids: list[int],
                  cat_ids: Optional[list[int]] = None) -> ImageMatches:
    cat_ids = sorted(coco_gt.getCatIds() if cat_ids is None else cat_ids)
    p: dict[str, list] = {k: [] for k in ("image", "cls", "score", "tp", "ignored", "gt_image", "gt_cls")}
    for i, (cls, score, iou, g_cls, crowd, _, _) in enumerate(_images(coco_gt, results, iou_type, image_ids,
                                                                      cat_ids)):
        same = cls[:, None] == g_cls[None, :]
        matched = [_match(iou, same, crowd, t) for t in COCO_IOUS]
        p["image"].append(np.full(len(cls), i))
        p["cls"].append(cls)
        p["score"].append(score)
        p["tp"].append(np.stack([g >= 0 for g, _ in matched]).reshape(len(COCO_IOUS), len(cls)))
        p["ignored"].append(np.stack([ig for _, ig in matched]).reshape(len(COCO_IOUS), len(cls)))
        p["gt_image"].append(np.full(int((~crowd).sum()), i))
        p["gt_cls"].append(g_cls[~crowd])
    cat = {k: np.concatenate(v, axis=-1) for k, v in p.items()}
    return ImageMatches(image=cat["image"].astype(np.int64), cls=cat["cls"].astype(np.int64),
                        score=cat["score"].astype(np.float64), tp=cat["tp"].astype(bool),
                        ignored=cat["ignored"].astype(bool), gt_image=cat["gt_image"].astype(np.int64),
                        gt_cls=cat["gt_cls"].astype(np.int64), n_images=len(image_ids), K=len(cat_ids))


def resampled_ap(m: ImageMatches, counts: Optional[np.ndarray] = None) -> float:
    """COCO AP (IoU 0.5:0.95, all areas) with image i counted counts[i] times (default once each: COCOeval's AP;
    a class without GT in the resample is left out of the mean, as COCOeval leaves it out). All ten thresholds at
    once: a detection that is ignored, or whose image is not drawn, weighs 0 (it repeats the point before it on
    the PR curve, which changes no interpolated precision)."""
    counts = np.ones(m.n_images) if counts is None else np.asarray(counts, dtype=np.float64)
    npos = np.bincount(m.gt_cls, weights=counts[m.gt_image], minlength=m.K)
    has_gt = npos > 0
    if not has_gt.any():
        return 0.0
    if m.sorted is None:  # by class, then falling score; stable: ties keep COCOeval's image order
        o = np.lexsort((-m.score, m.cls))
        m.sorted = {"image": m.image[o], "tp": m.tp[:, o].astype(np.float64), "fp": (~m.tp[:, o]).astype(np.float64),
                    "counted": (~m.ignored[:, o]).astype(np.float64),
                    "bounds": np.searchsorted(m.cls[o], np.arange(m.K + 1))}
    srt = m.sorted
    w = counts[srt["image"]][None, :] * srt["counted"]  # [T, N]
    tp_w, fp_w = srt["tp"] * w, srt["fp"] * w
    q = np.zeros((len(COCO_IOUS), m.K, len(RECALLS)))
    for k in np.flatnonzero(has_gt):
        s, e = srt["bounds"][k], srt["bounds"][k + 1]
        if s == e:
            continue
        tps, fps = np.cumsum(tp_w[:, s:e], axis=1), np.cumsum(fp_w[:, s:e], axis=1)
        rc = tps / npos[k]
        pr = tps / (fps + tps + np.spacing(1))
        pr = np.flip(np.maximum.accumulate(np.flip(pr, 1), axis=1), 1)
        for t in range(len(COCO_IOUS)):
            inds = np.searchsorted(rc[t], RECALLS, side="left")
            q[t, k] = np.where(inds < e - s, pr[t, np.minimum(inds, e - s - 1)], 0.0)
    return float(q[:, has_gt].mean())


def _class_ap(m: Matched, keep: np.ndarray, cls: np.ndarray, tp: np.ndarray, npos: np.ndarray) -> np.ndarray:
    """[K] AP50 of each class (0 for a class without GT)."""
    return precision_curves(cls[keep], m.score[keep], tp[keep], npos).mean(1)


def decompose(m: Matched, K: int) -> dict:
    """TIDE's dAP of each error type and of all FPs / FNs (fractions, as the AP), and the count of each."""
    npos = np.bincount(m.gt_cls, minlength=K)
    has_gt = npos > 0
    tp, ign = m.tp[0.5], m.ignored[0.5]
    base_keep = ~ign
    base_k = _class_ap(m, base_keep, m.cls, tp, npos)
    per_class: dict[str, np.ndarray] = {}

    def mean(ap_k: np.ndarray) -> float:
        return float(ap_k[has_gt].mean()) if has_gt.any() else 0.0

    base = mean(base_k)
    # loc / cls errors whose GT is free: the highest-scoring one per GT is fixed (TIDE's BestGTMatch, over both)
    fixable = np.isin(m.error, (_ERR["loc"], _ERR["cls"])) & (m.target >= 0)
    fixable &= ~m.gt_used[np.maximum(m.target, 0)]
    winner = np.zeros(len(m.cls), bool)
    cand = np.flatnonzero(fixable)
    if cand.size:
        by_score = cand[np.argsort(-m.score[cand], kind="mergesort")]
        _, first = np.unique(m.target[by_score], return_index=True)
        winner[by_score[first]] = True
    usable = np.zeros(len(m.gt_cls), bool)
    usable[m.target[fixable]] = True
    missed = ~m.gt_used & ~usable
    out = {"AP50": base, "dAP": {}, "counts": {}}
    for name in ERROR_TYPES:
        keep, cls, fixed_tp, n = base_keep.copy(), m.cls, tp, npos
        this = m.error == _ERR[name]
        if name in ("loc", "cls"):
            fixed_tp = tp | (this & winner)
            keep &= ~(this & ~winner)
            if name == "cls":  # the fixed detection takes its GT's class
                cls = np.where(this & winner, m.gt_cls[np.maximum(m.target, 0)], m.cls)
        elif name == "miss":
            n = npos - np.bincount(m.gt_cls[missed], minlength=K)
        else:
            keep &= ~this
        per_class[name] = _class_ap(m, keep, cls, fixed_tp, n) - base_k
        out["counts"][name] = int(missed.sum() if name == "miss" else this.sum())
    per_class["FP"] = _class_ap(m, base_keep & tp, m.cls, tp, npos) - base_k
    per_class["FN"] = _class_ap(m, base_keep, m.cls, tp, np.bincount(m.gt_cls[m.gt_used], minlength=K)) - base_k
    out["dAP"] = {name: mean(d) for name, d in per_class.items()}
    # per class (only those with GT: the mean above is over them)
    out["per_class_dAP"] = {name: [float(v) if g else None for v, g in zip(d, has_gt)] for name, d in per_class.items()}
    out["counts"]["tp"] = int(tp.sum())
    out["counts"]["gt"] = int(len(m.gt_cls))
    return out


def pr_breakdown(m: Matched, K: int) -> dict:
    """COCO analyze()'s seven PR curves (mean over the classes with GT) and the AP under each: for all areas, and
    under "by_area" for COCO's small, medium and large."""
    out = _pr_curves(m, K, m.tp, m.ignored, np.ones(len(m.gt_cls), bool))
    out["by_area"] = {}
    for area, (lo, hi) in AREAS.items():
        tp = {thr: m.by_area[(area, thr)][0] for thr in (0.75, 0.5, 0.1)} if m.by_area else m.tp
        ign = {thr: m.by_area[(area, thr)][1] for thr in (0.75, 0.5, 0.1)} if m.by_area else m.ignored
        out["by_area"][area] = _pr_curves(m, K, tp, ign, (m.gt_area >= lo) & (m.gt_area <= hi))
    return out


def _pr_curves(m: Matched, K: int, tp: dict, ignored: dict, counted: np.ndarray) -> dict:
    npos = np.bincount(m.gt_cls[counted], minlength=K)
    has_gt = npos > 0
    curves = {}
    for name, thr in (("C75", 0.75), ("C50", 0.5), ("Loc", 0.1)):
        curves[name] = precision_curves(m.cls[~ignored[thr]], m.score[~ignored[thr]], tp[thr][~ignored[thr]], npos)
    tp10, keep10 = tp[0.1], ~ignored[0.1]
    for name, near in (("Sim", m.near_sim), ("Oth", m.near_oth)):
        keep = keep10 & ~(~tp10 & near)
        curves[name] = precision_curves(m.cls[keep], m.score[keep], tp10[keep], npos)
    curves["BG"] = (curves["Oth"] > 0).astype(np.float64)
    curves["FN"] = np.ones_like(curves["Oth"])
    mean = {k: (v[has_gt].mean(0) if has_gt.any() else np.zeros(len(RECALLS))) for k, v in curves.items()}
    return {"AP": {k: float(v.mean()) for k, v in mean.items()}, "classes_with_gt": int(has_gt.sum()),
            "curves": {k: [round(float(x), 4) for x in v] for k, v in mean.items()}}


def analyze(coco_gt, results: list[dict], iou_type: str, image_ids: list[int],
            cat_ids: Optional[list[int]] = None) -> dict:
    """TIDE's error decomposition, analyze()'s PR breakdown and the confusion matrix of `results` (COCO results
    records) for iou_type 'bbox' or 'segm', over `image_ids` and `cat_ids` (default: every category of
    `coco_gt`). JSON-ready."""
    cat_ids = sorted(coco_gt.getCatIds() if cat_ids is None else cat_ids)
    K = len(cat_ids)
    m = match(coco_gt, results, iou_type, image_ids, cat_ids)
    names = [coco_gt.cats[c]["name"] for c in cat_ids]
    errors = decompose(m, K)
    per_class = errors.pop("per_class_dAP")
    errors["per_category_dAP"] = {n: {t: per_class[t][k] for t in per_class} for k, n in enumerate(names)
                                  if per_class["cls"][k] is not None}
    return {"thresholds": {"foreground": FG_IOU, "background": BG_IOU}, **errors,
            "pr_breakdown": pr_breakdown(m, K),
            "confusion": {"classes": names + ["background"], "matrix": m.confusion.tolist(),
                          "iou": CONFUSION_IOU, "score_threshold": CONFUSION_SCORE}}


# ----------------------------------------------------------------------------------------------- tables
IOU_TYPES = (("bbox", "box"), ("segm", "mask"))


def category_table(metrics: dict) -> str:
    """Per category AP, AP50 and AP75, box and mask side by side (x 100, one row per category)."""
    types = [(t, title) for t, title in IOU_TYPES if t in metrics and metrics[t].get("per_category_ap")]
    if not types:
        return ""
    names = list(metrics[types[0][0]]["per_category_ap"])
    width = max(8, *(len(n) for n in names))
    box_errors = metrics.get("bbox", {}).get("errors", {}).get("per_category_dAP")
    head = f"{'category':<{width}}" + "".join(f" | {title + ' AP':>7} {'AP50':>5} {'AP75':>5}" for _, title in types)
    head += " | box: costliest error" if box_errors else ""
    lines = [head, "-" * len(head)]
    for name in names:
        cells = []
        for t, _ in types:
            row = metrics[t]["per_category_ap"].get(name, {})
            cells.append(" | " + " ".join(f"{100 * row.get(k, float('nan')):>{w}.1f}"
                                          for k, w in (("AP", 7), ("AP50", 5), ("AP75", 5))))
        if box_errors and name in box_errors:
            worst = max(ERROR_TYPES, key=lambda e: box_errors[name][e])
            cells.append(f" | {worst} (dAP {100 * box_errors[name][worst]:.1f})")
        lines.append(f"{name:<{width}}" + "".join(cells))
    lines.append("(x 100; AP over IoU 0.5:0.95, AP50 and AP75 at IoU 0.5 and 0.75; all areas, 100 detections"
                 + ("; the costliest error: TIDE's type with the largest dAP of that category's box AP50)"
                    if box_errors else ")"))
    return "\n".join(lines)


ERROR_WORDS = {"cls": "right place, wrong class", "loc": "right class, IoU 0.1-0.5", "both": "wrong class and place",
               "dupe": "duplicate of a true positive", "bkg": "on background (IoU <= 0.1)",
               "miss": "object never detected", "FP": "all false positives", "FN": "all missed objects"}


def error_table(metrics: dict) -> str:
    """TIDE's dAP per error type (x 100, AP50 points an oracle fixing that type gains) and the count of each,
    box and mask side by side."""
    types = [(t, title) for t, title in IOU_TYPES if t in metrics and "errors" in metrics[t]]
    if not types:
        return ""
    head = f"{'error':<5}" + "".join(f" | {title + ' dAP':>8} {'count':>6}" for _, title in types) + " | meaning"
    lines = [head, "-" * len(head)]
    for name in ERROR_TYPES + SUMMARY_TYPES:
        cells = []
        for t, _ in types:
            e = metrics[t]["errors"]
            count = e["counts"].get(name)
            cells.append(f" | {100 * e['dAP'][name]:>8.2f} {'' if count is None else count:>6}")
        lines.append(f"{name:<5}" + "".join(cells) + f" | {ERROR_WORDS[name]}")
    base = ", ".join(f"{title} AP50 {100 * metrics[t]['errors']['AP50']:.1f}" for t, title in types)
    lines.append(f"(x 100; TIDE at foreground IoU 0.5, background 0.1; {base}; dAP: the AP50 an oracle gains by "
                 "fixing only that type)")
    return "\n".join(lines)
