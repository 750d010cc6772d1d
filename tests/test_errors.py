"""Tests for maskrcnn.evaluation.errors: one hand-computed case per TIDE error type, the matching against
pycocotools (AP50 and AP75 equal COCOeval's to the last digit, crowd regions included), the PR breakdown and the
confusion matrix.

The hand cases: class A has two GT, g1 [0,0,10,10] and g2 [50,50,10,10], in a 200x200 image. With one true
positive on g1 alone, recall 0.5 at precision 1: COCO's 101-point AP50 is 51/101 (the recall points 0.00..0.50).
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.evaluation.errors import ERROR_TYPES, analyze

A, B = 1, 2
G1, G2, G3 = [0, 0, 10, 10], [50, 50, 10, 10], [100, 100, 10, 10]
HALF = 51 / 101  # AP50 with recall 0.5 at precision 1
# [TP, FP, TP] over two GT: precision 1 up to recall 0.5, then 2/3: (51 + 50 * 2/3) / 101
TP_FP_TP = (51 + 100 / 3) / 101


def coco(gts: list[tuple[int, list[float]]], crowd: tuple = ()) -> COCO:
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 200, "height": 200}],
                  "categories": [{"id": A, "name": "a", "supercategory": "s"},
                                 {"id": B, "name": "b", "supercategory": "s"}],
                  "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": box, "area": box[2] * box[3],
                                   "iscrowd": int(i in crowd)} for i, (c, box) in enumerate(gts)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def dets(*items) -> list[dict]:
    return [{"image_id": 1, "category_id": c, "bbox": box, "score": s} for c, box, s in items]


def run(gts, results) -> dict:
    return analyze(coco(gts), results, "bbox", [1])


def only(errors: dict, name: str, dap: float, count: int = 1) -> None:
    """`name` has dAP `dap` and `count` errors; every other error type none."""
    assert errors["dAP"][name] == pytest.approx(dap, abs=1e-12)
    assert errors["counts"][name] == count
    for other in ERROR_TYPES:
        if other not in (name, "miss"):
            assert errors["counts"][other] == 0 and errors["dAP"][other] == pytest.approx(0.0, abs=1e-12), other


def test_localisation_error():
    """d2 overlaps g2 at IoU 0.4: fixed, it becomes g2's true positive (AP 1); g2 is not missed."""
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9), (A, [50, 50, 10, 4], 0.8)))
    assert e["AP50"] == pytest.approx(HALF)
    only(e, "loc", 1 - HALF)
    assert e["counts"]["miss"] == 0
    assert e["dAP"]["FP"] == pytest.approx(0.0, abs=1e-12)  # removing d2 leaves recall 0.5 at precision 1
    assert e["dAP"]["FN"] == pytest.approx(1 - HALF)  # g2 out of the count: recall 1


def test_classification_error():
    """d2 sits on g2 with class B (which has no GT, so no AP of its own): fixed, it is A's second true positive."""
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9), (B, G2, 0.8)))
    assert e["AP50"] == pytest.approx(HALF)
    only(e, "cls", 1 - HALF)
    assert set(e["per_category_dAP"]) == {"a"}  # b has no GT: no AP, no dAP
    assert e["per_category_dAP"]["a"]["cls"] == pytest.approx(1 - HALF)
    # the confusion matrix: g2 (A) detected as B, and no A detection on it: one in A's background column
    assert e["confusion"]["classes"] == ["a", "b", "background"]
    assert e["confusion"]["matrix"] == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]


def test_duplicate_error():
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9), (A, [0, 0, 10, 9], 0.8), (A, G2, 0.7)))
    assert e["AP50"] == pytest.approx(TP_FP_TP)
    only(e, "dupe", 1 - TP_FP_TP)
    assert e["confusion"]["matrix"][0] == [3, 0, 0]  # every confident detection overlapping an A GT


def test_background_error():
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9), (A, G3, 0.8), (A, G2, 0.7)))
    assert e["AP50"] == pytest.approx(TP_FP_TP)
    only(e, "bkg", 1 - TP_FP_TP)
    assert e["confusion"]["matrix"][2] == [1, 0, 0]  # the background row


def test_both_error():
    """d2 (class A) overlaps g3 (class B) at IoU 0.4 only: wrong class and wrong place. The mean is over A and B
    (B: AP 0); g3 is missed, and an oracle that drops it leaves B without GT: AP 0, as TIDE's."""
    e = run([(A, G1), (A, G2), (B, G3)], dets((A, G1, 0.9), (A, [100, 100, 10, 4], 0.8), (A, G2, 0.7)))
    assert e["AP50"] == pytest.approx(TP_FP_TP / 2)
    only(e, "both", (1 - TP_FP_TP) / 2)
    assert e["counts"]["miss"] == 1 and e["dAP"]["miss"] == pytest.approx(0.0, abs=1e-12)
    # per class: the both error costs class A, class B only misses
    assert e["per_category_dAP"]["a"]["both"] == pytest.approx(1 - TP_FP_TP)
    assert e["per_category_dAP"]["b"]["both"] == pytest.approx(0.0, abs=1e-12)
    assert e["per_category_dAP"]["b"]["FN"] == pytest.approx(0.0, abs=1e-12)  # no TP: AP 0 with or without


def test_missed_error():
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9)))
    assert e["AP50"] == pytest.approx(HALF)
    only(e, "miss", 1 - HALF)
    assert e["dAP"]["FN"] == pytest.approx(1 - HALF)


def test_one_gt_fixed_once():
    """Two loc errors on the same free GT: the higher-scoring one becomes its true positive, the other goes
    (TIDE's BestGTMatch): recall 1 at precision 1."""
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9), (A, [50, 50, 10, 4], 0.8), (A, [50, 50, 4, 10], 0.7)))
    assert e["counts"]["loc"] == 2
    assert e["dAP"]["loc"] == pytest.approx(1 - e["AP50"])


def test_no_detections_is_a_stated_zero():
    e = run([(A, G1), (A, G2)], [])
    assert e["AP50"] == 0.0 and e["counts"]["miss"] == 2 and e["counts"]["tp"] == 0
    assert all(v == 0.0 for v in e["dAP"].values())


def test_pr_breakdown_by_hand():
    """The loc case: at IoU 0.75 and 0.5 only d1 is right (AP 51/101); at IoU 0.1 d2 finds g2 (AP 1)."""
    e = run([(A, G1), (A, G2)], dets((A, G1, 0.9), (A, [50, 50, 10, 4], 0.8)))
    ap = e["pr_breakdown"]["AP"]
    assert ap["C75"] == pytest.approx(HALF) and ap["C50"] == pytest.approx(HALF)
    assert ap["Loc"] == ap["Sim"] == ap["Oth"] == ap["BG"] == ap["FN"] == pytest.approx(1.0)


def synthetic(n_images: int, seed: int, crowd: float = 0.05, K: int = 4):
    """Random GT (some crowd) and detections: near the GT (some of the wrong class) and anywhere."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 10 + k, "name": f"c{k}", "supercategory": f"s{k % 2}"} for k in range(K)]
    images, anns, res = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 200, "height": 200})
        for _ in range(rng.integers(0, 7)):
            x, y, w, h = *rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)
            c = int(rng.integers(K))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 10 + c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < crowd)})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 5, 4)
                res.append({"image_id": i, "category_id": 10 + (c if rng.random() < 0.8 else int(rng.integers(K))),
                            "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                            "score": float(np.round(rng.random(), 2))})  # rounded: ties, as COCOeval sorts them
        for _ in range(10):
            x, y, w, h = *rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)
            res.append({"image_id": i, "category_id": 10 + int(rng.integers(K)), "bbox": [x, y, w, h],
                        "score": float(np.round(rng.random(), 2))})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, res


@pytest.mark.parametrize("seed", [0, 1])
def test_ap50_and_ap75_equal_cocoeval(seed):
    gt, res = synthetic(60, seed)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in res]), "bbox")
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
    e = analyze(gt, res, "bbox", sorted(gt.getImgIds()))
    for t, ours in ((0, e["AP50"]), (5, e["pr_breakdown"]["AP"]["C75"])):
        p = ev.eval["precision"][t, :, :, 0, -1]
        assert ours == pytest.approx(float(np.mean([p[:, k].mean() for k in range(p.shape[1]) if p[0, k] > -1])),
                                     abs=1e-12)
    # per area (COCOeval's small, medium, large: GT outside ignored, unmatched detections outside ignored)
    for a, area in enumerate(("small", "medium", "large"), start=1):
        for t, curve in ((0, "C50"), (5, "C75")):
            p = ev.eval["precision"][t, :, :, a, -1]
            present = [k for k in range(p.shape[1]) if p[0, k] > -1]
            expected = float(np.mean([p[:, k].mean() for k in present])) if present else 0.0
            assert e["pr_breakdown"]["by_area"][area]["AP"][curve] == pytest.approx(expected, abs=1e-12), (area, t)
    assert all(e["pr_breakdown"]["by_area"][area]["AP"]["C50"] > 0 for area in ("small", "medium"))
    # every type occurs here, each oracle gains, and the curves only rise from C75 to FN
    assert all(e["counts"][t] > 0 for t in ERROR_TYPES)
    assert all(v >= -1e-12 for v in e["dAP"].values())
    ap = e["pr_breakdown"]["AP"]
    assert [ap[k] for k in ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")] == sorted(ap.values())


def test_masks_match_like_boxes():
    """segm: the same matching on RLEs; a box-shaped mask gives the box's numbers."""
    import pycocotools.mask as mask_util

    def rle(box):
        m = np.zeros((200, 200), np.uint8, order="F")
        x, y, w, h = box
        m[y:y + h, x:x + w] = 1
        r = mask_util.encode(m)
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}

    gt = coco([(A, G1), (A, G2)])
    for a in gt.dataset["annotations"]:
        a["segmentation"] = rle(a["bbox"])
    results = [{"image_id": 1, "category_id": A, "segmentation": rle(b), "score": s}
               for b, s in ((G1, 0.9), ([50, 50, 10, 4], 0.8))]
    e = analyze(gt, results, "segm", [1])
    assert e["AP50"] == pytest.approx(HALF)
    only(e, "loc", 1 - HALF)


# ------------------------------------------------------------------------- evaluate.py --detections: bad input
@pytest.fixture
def files(tmp_path):
    """The loc case's annotations and detections as files."""
    import json

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco([(A, G1), (A, G2)]).dataset))

    def write(records, name="dets.json"):
        path = tmp_path / name
        path.write_text(records if isinstance(records, str) else json.dumps(records))
        return str(path)

    return str(ann), write


def evaluate_quietly(argv):
    import evaluate

    with contextlib.redirect_stdout(io.StringIO()) as buf:
        report = evaluate.main(argv)
    return report, buf.getvalue()


def test_evaluate_a_detections_file(files, tmp_path):
    ann, write = files
    report, out = evaluate_quietly(["--detections", write(dets((A, G1, 0.9), (A, [50, 50, 10, 4], 0.8))),
                                    "--annotations", ann])
    e = report["results"]["file-dets"]["bbox"]["errors"]
    assert e["AP50"] == pytest.approx(HALF) and e["dAP"]["loc"] == pytest.approx(1 - HALF)
    assert (tmp_path / "eval_val_file-dets.json").is_file() and (tmp_path / "pr_val_file-dets.png").is_file()
    assert "loc   |" in out


def test_an_empty_detections_file_is_a_stated_zero(files):
    ann, write = files
    report, out = evaluate_quietly(["--detections", write([]), "--annotations", ann])
    assert "no detections: every AP is 0" in out
    bbox = report["results"]["file-dets"]["bbox"]
    assert bbox["stats"]["AP"] == 0.0 and bbox["per_category_ap"]["a"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert bbox["errors"]["counts"]["miss"] == 2


@pytest.mark.parametrize("records, needle", [
    ([{"image_id": 99, "category_id": A, "bbox": G1, "score": 0.5}], "1 detections for 1 image ids not in the "
                                                                      "annotations (first: [99])"),
    ([{"image_id": 1, "category_id": 7, "bbox": G1, "score": 0.5}], "category ids [7] are not among"),
    ([{"image_id": 1, "category_id": A, "score": 0.5}], "record 0 has no 'bbox'"),
    ('{"image_id": 1}', "expected a JSON list"),
    ("[{", "not JSON"),
])
def test_bad_detections_are_one_line_errors(files, capsys, records, needle):
    import evaluate

    ann, write = files
    path = write(records)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--detections", path, "--annotations", ann])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and needle in err and "dets.json" in err


def test_coco_evaluate_names_unknown_image_ids():
    """pycocotools' loadRes would stop on an assert ('Results do not correspond to current coco set')."""
    from maskrcnn.evaluation.coco_eval import coco_evaluate

    with pytest.raises(ValueError, match="image ids not in the annotations"):
        coco_evaluate(coco([(A, G1)]), dets((A, G1, 0.9)) + [{"image_id": 5, "category_id": A, "bbox": G1,
                                                             "score": 0.5}], "bbox", [1])


def test_resampled_ap_is_cocoeval_ap_and_counts_images():
    """Every image once: COCOeval's AP (IoU 0.5:0.95) to the last digit; an image counted twice: the AP of the
    image set with that image's annotations and detections duplicated under a new id."""
    from maskrcnn.evaluation.errors import image_matches, resampled_ap

    def coco_ap(gt, res):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes([dict(r) for r in res]), "bbox")
            ev.params.imgIds = sorted(gt.getImgIds())
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev.stats[0]

    gt, res = synthetic(30, 2, crowd=0.0)
    ids = sorted(gt.getImgIds())
    m = image_matches(gt, res, "bbox", ids)
    assert resampled_ap(m) == pytest.approx(coco_ap(gt, res), abs=1e-12)
    counts = np.ones(len(ids))
    counts[0], counts[1] = 2, 0  # image 1 twice, image 2 left out
    data = {k: list(v) for k, v in gt.dataset.items()}
    data["images"] = [im for im in data["images"] if im["id"] != 2] + [{"id": 1000, "width": 200, "height": 200}]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2] + [
        {**a, "id": 10_000 + a["id"], "image_id": 1000} for a in data["annotations"] if a["image_id"] == 1]
    twice = COCO()
    twice.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        twice.createIndex()
    res2 = [r for r in res if r["image_id"] != 2] + [{**r, "image_id": 1000} for r in res if r["image_id"] == 1]
    # equal up to the order of tied scores, which image 1's copies (adjacent here, last in COCOeval) can change
    assert resampled_ap(m, counts) == pytest.approx(coco_ap(twice, res2), abs=1e-4)
    assert abs(resampled_ap(m, counts) - resampled_ap(m)) > 5e-4  # and the resample changes it


def test_speed_script_runs_and_agrees():
    """maskrcnn/evaluation/bench_errors.py on 20 images: both timings, and the same AP50 as pycocotools."""
    from maskrcnn.evaluation import bench_errors

    with contextlib.redirect_stdout(io.StringIO()) as buf:
        times = bench_errors.main(["--images", "20", "--dets", "30"])
    assert set(times) == {"pycocotools loadRes+evaluate+accumulate", "error analysis"}
    ap = [float(x) for x in buf.getvalue().split("AP50 pycocotools ")[1].split(", error analysis ")]
    assert ap[0] == pytest.approx(ap[1], abs=1e-6) and ap[0] > 0
