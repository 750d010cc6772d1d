"""Tests for maskrcnn.evaluation.coco_eval and evaluate.py on the tiny shapes val set (4 images, datasets/shapes-tiny):
perfect detections give AP 1.0, coco_evaluate agrees with pycocotools run by hand, proposal_recall agrees
with COCOeval(useCats=0) and with recall counted by hand, and evaluate.py writes its files."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.config import load_config
from maskrcnn.data.build import build_datasets
from maskrcnn.evaluation.coco_eval import (STAT_NAMES, coco_evaluate, detections_to_coco, proposal_recall,
                                 proposals_to_coco)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
DATA_ROOT = str(ROOT / "datasets" / "shapes-tiny")
SMALL = ["model.transform.min_size_train=[64]", "model.transform.max_size_train=96",
         "model.transform.min_size_test=64", "model.transform.max_size_test=96"]


@pytest.fixture(scope="module")
def val():
    cfg = load_config(CONFIG, [f"data.root={DATA_ROOT}"])
    _, val_set = build_datasets(cfg, train=False)
    items = [val_set[i] for i in range(len(val_set))]
    assert 4 <= len(items) <= 6
    assert sum(len(t["boxes"]) for _, t in items) >= 10
    return val_set, items


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def by_hand(ann_file: str, results_file: Path, iou_type: str, image_ids, cat_ids=None, use_cats=True,
            max_dets=None) -> COCOeval:
    """pycocotools as its README uses it: COCO(gt json), loadRes(results json), evaluate/accumulate/summarize.
    For segm the records lose their 'bbox' first, as in pycocotools' own segm results files (and detectron2):
    with one, loadRes would give each detection its box's area instead of its mask's."""
    gt = quiet(COCO, ann_file)
    records = json.loads(Path(results_file).read_text())
    if iou_type == "segm":
        records = [{k: v for k, v in r.items() if k != "bbox"} for r in records]
    dt = quiet(gt.loadRes, records)
    ev = COCOeval(gt, dt, iou_type)
    ev.params.imgIds = sorted(image_ids)
    if cat_ids is not None:
        ev.params.catIds = sorted(cat_ids)
    if not use_cats:
        ev.params.useCats = 0
    if max_dets is not None:
        ev.params.maxDets = list(max_dets)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    if max_dets is None:
        quiet(ev.summarize)
    return ev


# ------------------------------------------------------------------------------------ detections_to_coco
def test_detections_to_coco_records():
    det = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.5, 7.25]]),
           "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.3]),
           "masks": torch.zeros(2, 1, 30, 40)}
    det["masks"][0, 0, 2:5, 3:9] = 0.8  # above the threshold
    det["masks"][0, 0, 10:12, 10:12] = 0.4  # below it
    det["masks"][1, 0, 0:7, 0:5] = 0.5  # exactly the threshold: included (>=)
    recs = detections_to_coco(det, 7, {1: 11, 2: 22}, mask_threshold=0.5)
    assert len(recs) == 2
    assert [r["image_id"] for r in recs] == [7, 7]
    assert [r["category_id"] for r in recs] == [22, 11]
    assert recs[0]["bbox"] == pytest.approx([10.0, 20.0, 40.0, 40.0])
    assert recs[1]["bbox"] == pytest.approx([0.0, 0.0, 5.5, 7.25])
    assert [r["score"] for r in recs] == pytest.approx([0.9, 0.3])
    json.dumps(recs)  # JSON-serialisable (RLE counts as str)
    for r, (ys, xs) in zip(recs, [(slice(2, 5), slice(3, 9)), (slice(0, 7), slice(0, 5))]):
        seg = r["segmentation"]
        assert seg["size"] == [30, 40] and isinstance(seg["counts"], str)
        m = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})
        expected = np.zeros((30, 40), np.uint8)
        expected[ys, xs] = 1
        assert np.array_equal(m, expected)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 30, 40)}
    assert detections_to_coco(empty, 7, {1: 11}) == []


# ------------------------------------------------------------------------------------------- coco AP
def gt_detections(val_set, items) -> list[dict]:
    results = []
    for _, t in items:
        n = len(t["boxes"])
        det = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
               "masks": t["masks"][:, None].float()}  # [D, 1, H, W] probabilities 1.0
        results.extend(detections_to_coco(det, t["image_id"], val_set.contiguous_to_cat_id))
    return results


def test_perfect_detections_give_ap_one(val):
    val_set, items = val
    results = gt_detections(val_set, items)
    n_gt = sum(1 for a in val_set.coco.dataset["annotations"] if not a.get("iscrowd", 0))
    assert len(results) == n_gt  # every annotation came back as a detection
    image_ids = [t["image_id"] for _, t in items]
    cat_ids = list(val_set.contiguous_to_cat_id.values())
    for iou_type in ("bbox", "segm"):
        m = coco_evaluate(val_set.coco, results, iou_type, image_ids, cat_ids)
        assert m["stats"]["AP"] == pytest.approx(1.0), iou_type
        assert m["stats"]["AP50"] == pytest.approx(1.0) and m["stats"]["AP75"] == pytest.approx(1.0)
        assert m["stats"]["AR100"] == pytest.approx(1.0)
        assert set(m["per_category"]) == {"circle", "rectangle", "triangle", "star"}
        assert all(v == pytest.approx(1.0) for v in m["per_category"].values())


def perturbed_detections(val_set, items, seed: int = 0) -> list[dict]:
    """Shifted boxes and masks, random scores, every 4th object missed, and false positives."""
    g = torch.Generator().manual_seed(seed)
    results = []
    for _, t in items:
        img_h, img_w = t["masks"].shape[-2:]
        keep = [i for i in range(len(t["boxes"])) if i % 4 != 3]
        boxes = t["boxes"][keep] + torch.randint(-3, 4, (len(keep), 4), generator=g).float()
        masks = torch.stack([torch.roll(t["masks"][i], shifts=(int(s[0]), int(s[1])), dims=(0, 1))
                             for i, s in zip(keep, torch.randint(-3, 4, (len(keep), 2), generator=g))])
        labels = t["labels"][keep].clone()
        if len(labels) > 2:
            labels[1] = labels[1] % 4 + 1  # one wrong class
        n_fp = 3
        xy = torch.rand(n_fp, 2, generator=g) * 80
        fp_boxes = torch.cat((xy, xy + 10 + torch.rand(n_fp, 2, generator=g) * 40), 1)
        fp_masks = torch.zeros(n_fp, img_h, img_w)
        for j, (x0, y0, x1, y1) in enumerate(fp_boxes.long().tolist()):
            fp_masks[j, y0:y1, x0:x1] = 0.9
        det = {"boxes": torch.cat((boxes, fp_boxes)),
               "labels": torch.cat((labels, torch.randint(1, 5, (n_fp,), generator=g))),
               "scores": torch.rand(len(keep) + n_fp, generator=g),
               "masks": torch.cat((masks.float(), fp_masks))[:, None]}
        results.extend(detections_to_coco(det, t["image_id"], val_set.contiguous_to_cat_id))
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_evaluate_matches_pycocotools_by_hand(val, tmp_path, iou_type):
    val_set, items = val
    results = perturbed_detections(val_set, items)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    image_ids = [t["image_id"] for _, t in items]
    cat_ids = list(val_set.contiguous_to_cat_id.values())
    ours = coco_evaluate(val_set.coco, json.loads(path.read_text()), iou_type, image_ids, cat_ids)
    ev = by_hand(str(val_set.ann_file), path, iou_type, image_ids, cat_ids)
    assert list(ours["stats"]) == STAT_NAMES
    np.testing.assert_allclose([ours["stats"][k] for k in STAT_NAMES], ev.stats, rtol=0, atol=1e-12)
    assert 0.05 < ours["stats"]["AP"] < 0.95  # a real, non-degenerate case
    # per-category AP: mean precision over IoU thresholds and recall points, all areas, 100 detections
    for k, cat_id in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        name = val_set.coco.cats[cat_id]["name"]
        assert ours["per_category"][name] == pytest.approx(float(p[p > -1].mean()), abs=1e-12)
    # the results passed in are not modified (loadRes adds keys to what it is given)
    assert json.loads(path.read_text()) == results
    assert "summary" in ours and "Average Precision" in ours["summary"]


def test_mask_ap_by_size_uses_mask_area(tmp_path):
    """A false positive whose thin L-shaped mask (591 px: small) fills a large 100x100 box counts by its mask's
    area in the segm evaluation and by its box's in the bbox one. It is scored above two perfect detections, a
    large square A and a small square S, and overlaps neither, so it halves AP in the one size bucket it counts
    in (precision 1/2 at every recall) and is ignored in the other."""
    h = w = 256
    masks = torch.zeros(3, h, w)
    masks[0, 10:110, 10:110] = 1  # A: 100x100 = 10000 px, large (>= 96^2)
    masks[1, 20:40, 150:170] = 1  # S: 20x20 = 400 px, small (< 32^2)
    masks[2, 217:220, 120:220] = 1  # D: an L of 3 px thick bars in the box (120, 120)-(220, 220)
    masks[2, 120:220, 120:123] = 1
    boxes = torch.tensor([[10.0, 10.0, 110.0, 110.0], [150.0, 20.0, 170.0, 40.0], [120.0, 120.0, 220.0, 220.0]])
    rles = [mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in masks[:2]]
    gt = {"images": [{"id": 1, "height": h, "width": w, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                           "area": float(mask_util.area(r)), "bbox": mask_util.toBbox(r).tolist(),
                           "segmentation": {"size": r["size"], "counts": r["counts"].decode("ascii")}}
                          for i, r in enumerate(rles)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco_gt = quiet(COCO, str(tmp_path / "gt.json"))
    det = {"boxes": boxes, "labels": torch.tensor([1, 1, 1]), "scores": torch.tensor([0.8, 0.7, 0.9]),
           "masks": masks[:, None]}
    results = detections_to_coco(det, 1, {1: 1})
    d_mask_area = float(mask_util.area({**results[2]["segmentation"],
                                        "counts": results[2]["segmentation"]["counts"].encode("ascii")}))
    assert d_mask_area == 591 < 32 ** 2 and results[2]["bbox"][2] * results[2]["bbox"][3] == 10000 >= 96 ** 2
    segm = coco_evaluate(coco_gt, results, "segm", [1])["stats"]
    bbox = coco_evaluate(coco_gt, results, "bbox", [1])["stats"]
    assert (segm["APs"], segm["APl"]) == (pytest.approx(0.5), pytest.approx(1.0))  # D is small by mask area
    assert (bbox["APs"], bbox["APl"]) == (pytest.approx(1.0), pytest.approx(0.5))  # D is large by box area
    assert segm["APm"] == bbox["APm"] == -1.0  # no medium ground truth
    # over all sizes D counts in both: precision 1/2 at recall 1/2, 2/3 at recall 1
    assert segm["AP"] == pytest.approx(2 / 3) and bbox["AP"] == pytest.approx(2 / 3)
    assert all("bbox" in r for r in results)  # the caller's records keep their boxes
    with pytest.raises(ValueError, match="record 0 .*'segmentation'"):
        coco_evaluate(coco_gt, [{k: v for k, v in results[0].items() if k != "segmentation"}], "segm", [1])


def test_coco_evaluate_without_results_is_zero(val):
    val_set, items = val
    m = coco_evaluate(val_set.coco, [], "bbox", [t["image_id"] for _, t in items])
    assert all(v == 0.0 for v in m["stats"].values())


# --------------------------------------------------------------------------------------- proposal recall
def proposal_results(val_set, items, distractors_first: bool) -> tuple[list[dict], float]:
    """Per GT i: i % 3 == 0 an exact proposal (IoU 1), i % 3 == 1 one of IoU 0.72 (matched at thresholds 0.50
    .. 0.70, i.e. 5 of the 10), i % 3 == 2 none. Plus 150 tiny 2x2 distractors (IoU < 0.05 with every GT),
    scored above or below the real ones. Returns the results and the AR@1000 computed by hand."""
    results, credit, n_gt = [], 0.0, 0
    for _, t in items:
        boxes, scores = [], []
        for i, (x0, y0, x1, y1) in enumerate(t["boxes"].tolist()):
            n_gt += 1
            if i % 3 == 0:
                boxes.append([x0, y0, x1, y1])
                credit += 1.0
            elif i % 3 == 1:
                boxes.append([x0, y0, x0 + 0.72 * (x1 - x0), y1])
                credit += 0.5
            else:
                continue
            scores.append(0.5)
        g = torch.Generator().manual_seed(t["image_id"])
        xy = torch.rand(150, 2, generator=g) * 100
        d_boxes = torch.cat((xy, xy + 2), 1)
        d_scores = torch.full((150,), 0.9 if distractors_first else 0.1)
        all_boxes = torch.cat((torch.tensor(boxes).reshape(-1, 4), d_boxes))
        all_scores = torch.cat((torch.tensor(scores), d_scores))
        order = all_scores.argsort(descending=True, stable=True)  # proposals come sorted, best first
        props = {"boxes": all_boxes[order], "scores": all_scores[order]}
        results.extend(proposals_to_coco(props, t["image_id"], max_dets=1000))
    return results, credit / n_gt


@pytest.mark.parametrize("distractors_first", [False, True])
def test_proposal_recall_matches_cocoeval_and_hand_count(val, tmp_path, distractors_first):
    val_set, items = val
    results, ar_by_hand = proposal_results(val_set, items, distractors_first)
    image_ids = [t["image_id"] for _, t in items]
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(results))
    ours = proposal_recall(val_set.coco, json.loads(path.read_text()), image_ids)
    assert set(ours) == {"AR@100", "AR@1000"}
    ev = by_hand(str(val_set.ann_file), path, "bbox", image_ids, use_cats=False, max_dets=[100, 1000])
    for m_idx, key in enumerate(["AR@100", "AR@1000"]):
        r = ev.eval["recall"][:, 0, 0, m_idx]  # [T] at area 'all'
        assert ours[key] == pytest.approx(float(r[r > -1].mean()), abs=1e-12)
    assert ours["AR@1000"] == pytest.approx(ar_by_hand, abs=1e-9)
    # 150 distractors scored first push every real proposal out of the top 100.
    assert ours["AR@100"] == pytest.approx(0.0 if distractors_first else ar_by_hand, abs=1e-9)


def test_proposals_to_coco():
    props = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 6.0, 9.0], [0.0, 0.0, 3.0, 3.0]]),
             "scores": torch.tensor([0.9, 0.8, 0.1])}
    recs = proposals_to_coco(props, 3, max_dets=2)
    assert len(recs) == 2
    assert recs[0] == {"image_id": 3, "category_id": 1, "bbox": pytest.approx([1.0, 2.0, 10.0, 20.0]),
                       "score": pytest.approx(0.9)}
    assert recs[1]["bbox"] == pytest.approx([5.0, 5.0, 1.0, 4.0])


# --------------------------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for stage in ("full", "rpn"):
        with contextlib.redirect_stdout(io.StringIO()):
            summary = train.main(["--config", CONFIG, "--stage", stage, "--name", stage, "--no-progress",
                                  "--set", f"train.output_dir={out}", f"data.root={DATA_ROOT}",
                                  "solver.max_iter=2", "train.eval_at_end=false", *SMALL])
        paths[stage] = Path(summary["checkpoint"])
        assert paths[stage].is_file()
    return paths


def run_evaluate(argv) -> tuple[dict, str]:
    import evaluate

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report = evaluate.main(argv)
    return report, buf.getvalue()


def check_detections_file(path: Path, val_set) -> list[dict]:
    dets = json.loads(path.read_text())
    assert isinstance(dets, list) and len(dets) > 0  # untrained scores (~0.2) pass the 0.05 threshold
    sizes = {i["id"]: (i["height"], i["width"]) for i in val_set.coco.dataset["images"]}
    cat_ids = set(val_set.contiguous_to_cat_id.values())
    for d in dets:
        assert set(d) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert d["image_id"] in sizes and d["category_id"] in cat_ids
        x, y, w, h = d["bbox"]
        ih, iw = sizes[d["image_id"]]
        assert w >= 0 and h >= 0 and x >= -1e-3 and y >= -1e-3 and x + w <= iw + 1e-3 and y + h <= ih + 1e-3
        assert 0.0 <= d["score"] <= 1.0
        assert d["segmentation"]["size"] == [ih, iw] and isinstance(d["segmentation"]["counts"], str)
    quiet(val_set.coco.loadRes, [dict(d) for d in dets])  # valid COCO results
    return dets


def test_evaluate_full_checkpoint_clean_and_corrupted(checkpoints, val, tmp_path):
    val_set, items = val
    report, stdout = run_evaluate(["--checkpoint", str(checkpoints["full"]), "--out", str(tmp_path),
                                   "--no-progress"])
    dets_file = tmp_path / "detections_val_clean.json"
    eval_file = tmp_path / "eval_val_clean.json"
    assert dets_file.is_file() and eval_file.is_file()
    check_detections_file(dets_file, val_set)
    saved = json.loads(eval_file.read_text())
    assert saved["stage"] == "full" and saved["split"] == "val"
    assert set(saved["results"]) == {"clean"}
    image_ids = [t["image_id"] for _, t in items]
    cat_ids = list(val_set.contiguous_to_cat_id.values())
    for iou_type in ("bbox", "segm"):
        stats = saved["results"]["clean"][iou_type]["stats"]
        assert list(stats) == STAT_NAMES
        ev = by_hand(str(val_set.ann_file), dets_file, iou_type, image_ids, cat_ids)  # from the written file
        np.testing.assert_allclose([stats[k] for k in STAT_NAMES], ev.stats, rtol=0, atol=1e-9)
        # per category: AP over IoU 0.5:0.95, AP50 and AP75, as COCOeval's precision array gives them
        table = saved["results"]["clean"][iou_type]["per_category_ap"]
        for k, cat_id in enumerate(ev.params.catIds):
            row = table[val_set.coco.cats[cat_id]["name"]]
            for key, t in (("AP", slice(None)), ("AP50", [0]), ("AP75", [5])):
                p = ev.eval["precision"][t, :, k, 0, -1]
                assert row[key] == pytest.approx(float(p[p > -1].mean()) if (p > -1).any() else float("nan"),
                                                 abs=1e-12, nan_ok=True)
        errors = saved["results"]["clean"][iou_type]["errors"]
        assert errors["AP50"] == pytest.approx(stats["AP50"], abs=1e-12)
        assert set(errors["dAP"]) == {"cls", "loc", "both", "dupe", "bkg", "miss", "FP", "FN"}
    assert report["results"]["clean"]["bbox"]["stats"]["AP"] == saved["results"]["clean"]["bbox"]["stats"]["AP"]
    assert "metrics:" in stdout
    assert re.search(r"^category +\|  box AP  AP50  AP75 \| mask AP  AP50  AP75 \| box: costliest error$",
                     stdout, re.M)
    assert re.search(r"^triangle +\| .* \| (cls|loc|both|dupe|bkg|miss) \(dAP \d+\.\d\)$", stdout, re.M)
    # the pictures and tables of the error analysis, beside the metrics, and found again for a report
    from maskrcnn.evaluation.error_plots import run_analysis

    drawn = ["pr_val_clean.png", "confusion-box_val_clean.png", "confusion-mask_val_clean.png",
             "confusion-box_val_clean.md", "confusion-mask_val_clean.md"]
    assert all((tmp_path / name).stat().st_size > 0 for name in drawn)
    assert "| GT \\ detected | circle | rectangle | triangle | star | background |" in \
        (tmp_path / "confusion-box_val_clean.md").read_text()
    found = run_analysis(tmp_path)
    assert sorted(p.name for p in found["pictures"] + found["tables"]) == sorted(drawn)
    assert found["image_set"] == "val" and "box dAP" in found["error_table"] and "triangle" in found["category_table"]
    assert "error |  box dAP  count | mask dAP  count | meaning" in stdout

    run_evaluate(["--checkpoint", str(checkpoints["full"]), "--out", str(tmp_path), "--no-progress",
                  "--corruption", "contrast", "--severity", "2"])
    assert (tmp_path / "detections_val_contrast-2.json").is_file()
    check_detections_file(tmp_path / "detections_val_contrast-2.json", val_set)
    corrupted = json.loads((tmp_path / "eval_val_contrast-2.json").read_text())
    assert set(corrupted["results"]) == {"contrast-2"}
    assert set(corrupted["results"]["contrast-2"]) >= {"bbox", "segm"}


def test_evaluate_default_out_is_checkpoint_dir(checkpoints, tmp_path):
    import shutil

    ckpt = tmp_path / "model_final.pth"
    shutil.copy(checkpoints["full"], ckpt)
    run_evaluate(["--checkpoint", str(ckpt), "--no-progress", "--max-images", "2"])
    # the files name their image set: the first 2 val images
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["detections_val-first2_clean.json",
                                                              "eval_val-first2_clean.json"]
    saved = json.loads((tmp_path / "eval_val-first2_clean.json").read_text())
    assert saved["image_set"] == "val-first2" and saved["images"] == 2
    dets = json.loads((tmp_path / "detections_val-first2_clean.json").read_text())
    assert len({d["image_id"] for d in dets}) == 2


def test_evaluate_rpn_checkpoint_reports_ar(checkpoints, val, tmp_path):
    val_set, items = val
    report, stdout = run_evaluate(["--checkpoint", str(checkpoints["rpn"]), "--out", str(tmp_path),
                                   "--no-progress"])
    saved = json.loads((tmp_path / "eval_val_clean.json").read_text())
    assert saved["stage"] == "rpn"
    clean = saved["results"]["clean"]
    assert set(clean) == {"AR@100", "AR@1000"}
    assert all(0.0 <= v <= 1.0 for v in clean.values())
    assert clean["AR@1000"] >= clean["AR@100"]
    assert "AR@100" in stdout and "AR@1000" in stdout
    props = json.loads((tmp_path / "detections_val_clean.json").read_text())
    assert len(props) > 0 and all(p["category_id"] == 1 for p in props)
    ev = by_hand(str(val_set.ann_file), tmp_path / "detections_val_clean.json", "bbox",
                 [t["image_id"] for _, t in items], use_cats=False, max_dets=[100, 1000])
    for m_idx, key in enumerate(["AR@100", "AR@1000"]):
        r = ev.eval["recall"][:, 0, 0, m_idx]
        assert clean[key] == pytest.approx(float(r[r > -1].mean()), abs=1e-9)


def test_evaluate_missing_checkpoint_exits_2(tmp_path, capsys):
    import evaluate

    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(tmp_path / "nope.pth"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "nope.pth" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_rpn_inference_keeps_1000_proposals_for_ar(val):
    """AR@1000 of an RPN-stage model counts up to 1000 proposals even when its config keeps fewer."""
    from maskrcnn.model.build import build_model
    from maskrcnn.evaluation.coco_eval import run_inference

    val_set, _ = val
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, [f"data.root={DATA_ROOT}", "stage=rpn"] + SMALL), load_weights=False)
    model.rpn.post_nms_topk = (100, 5)
    results, image_ids = run_inference(model, val_set, torch.device("cpu"), max_images=2, progress=False)
    per_image = [sum(r["image_id"] == i for r in results) for i in image_ids]
    assert max(per_image) > 5
    assert model.rpn.post_nms_topk == (100, 5)


def test_evaluate_benchmark_subset_with_cache(checkpoints, tmp_path):
    """--corruption benchmark on 2 images, 2 corruptions x 2 severities: P / mPC / rPC from the runs' APs,
    the Markdown table, and a second evaluation that reads every corrupted image from the cache."""
    cache = tmp_path / "cache"
    argv = ["--checkpoint", str(checkpoints["full"]), "--no-progress", "--max-images", "2",
            "--corruption", "benchmark", "--corruptions", "snow,glass_blur", "--severities", "1,3",
            "--cache-dir", str(cache), "--frost", "procedural"]
    # a pass of an earlier benchmark of the same name that this one does not repeat: removed, not left as its own
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "detections_val-first2_benchmark_fog-3.json").write_text("[]")
    report, stdout = run_evaluate([*argv, "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "eval_val-first2_benchmark.json").read_text())
    tags = ["clean", "snow-1", "snow-3", "glass_blur-1", "glass_blur-3"]
    assert list(saved["results"]) == tags
    bench = saved["benchmark"]
    assert bench["corruptions"] == ["snow", "glass_blur"] and bench["severities"] == [1, 3]
    assert not bench["complete"]
    for key in ("bbox", "segm"):
        ap = {t: saved["results"][t][key]["stats"]["AP"] for t in tags}
        m = bench["metrics"][key]
        assert m["P"] == ap["clean"]
        assert m["mPC"] == pytest.approx(sum(ap[t] for t in tags[1:]) / 4, abs=1e-12)
        assert m["rPC"] == (pytest.approx(m["mPC"] / m["P"]) if m["P"] > 0 else None)
        assert m["per_corruption"]["snow"]["3"] == ap["snow-3"]
        assert saved[f"mean_corrupted_{key}_AP"] == m["mPC"]
    table = (tmp_path / "a" / "benchmark_val-first2.md").read_text()
    assert "| snow |" in table and "| glass_blur |" in table and "not comparable" in table
    assert "| corruption | s1 | s3 | mean |" in stdout
    assert saved["corruption_settings"]["cache"] == {"read": 0, "written": 8}
    assert len(list(cache.rglob("*.png"))) == 8
    # the next checkpoint (here: the same one) reads the same pixels from the cache
    again, _ = run_evaluate([*argv, "--out", str(tmp_path / "b")])
    assert again["corruption_settings"]["cache"] == {"read": 8, "written": 0}
    for tag in tags:
        a = json.loads((tmp_path / "a" / f"detections_val-first2_benchmark_{tag}.json").read_text())
        b = json.loads((tmp_path / "b" / f"detections_val-first2_benchmark_{tag}.json").read_text())
        assert a == b
    # every file is the benchmark's own: its clean pass is not a clean evaluation's detections file
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file()) == sorted(
        ["eval_val-first2_benchmark.json", "benchmark_val-first2.md"]
        + [f"detections_val-first2_benchmark_{t}.json" for t in tags])


@pytest.mark.parametrize("extra, needle", [
    (["--corruption", "benchmark", "--severities", "0,3"], "1..5"),
    (["--corruption", "all", "--corruptions", "snow,hail"], "hail"),
    (["--corruptions", "snow"], "--corruption all or benchmark"),
])
def test_evaluate_corruption_options_are_one_line_errors(checkpoints, tmp_path, capsys, extra, needle):
    import evaluate

    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(checkpoints["full"]), "--no-progress", "--out", str(tmp_path), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_evaluation_is_fp32_unless_asked(checkpoints, tmp_path, monkeypatch, capsys):
    """evaluate.py infers in fp32 unless --amp; --amp true forces mixed precision, --amp (auto) takes it where the
    device computes it natively; the end-of-run evaluation follows test.amp (default false), not train.amp."""
    from maskrcnn.config import TestConfig, TrainConfig
    from maskrcnn.evaluation import coco_eval
    from maskrcnn.model.precision import cpu_bf16_native

    seen = []

    def spy(model, dataset, device, batch_size=2, max_images=0, amp=False, *args, **kwargs):
        seen.append(amp)
        return [], []

    monkeypatch.setattr(coco_eval, "run_inference", spy)
    base = ["--checkpoint", str(checkpoints["full"]), "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    report, text = run_evaluate(base)
    run_evaluate(base + ["--amp", "true"])
    auto, _ = run_evaluate(base + ["--amp"])
    native, _ = cpu_bf16_native()
    assert seen == [False, True, native] and report["precision"] == "fp32"
    assert auto["precision"] == ("bf16 autocast" if native else "fp32") and "--amp=auto" in auto["precision_reason"]
    assert "precision: fp32 (--amp=false)" in text  # the choice and its reason, one line at the start
    assert TestConfig().amp is False and TrainConfig().amp is True
    with pytest.raises(SystemExit) as exc:
        __import__("evaluate").main(base + ["--amp", "maybe"])
    assert exc.value.code == 2 and "--amp: expected true, false or auto" in capsys.readouterr().err
    # On a CPU, --amp true is bf16 autocast (fp16 is for CUDA); without it there is no autocast at all.
    from maskrcnn.model.mask_rcnn import MaskRCNN

    monkeypatch.undo()
    autocast = []
    forward = MaskRCNN.forward

    def record_autocast(self, *args, **kwargs):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", record_autocast)
    for extra in ([], ["--amp", "true"]):
        report, _ = run_evaluate(base + ["--max-images", "1", *extra])
    assert autocast[0][0] is False and autocast[1] == (True, torch.bfloat16)
    assert report["precision"] == "bf16 autocast"


