"""Tests for `visualize.py report` (maskrcnn/report/, maskrcnn/vis/anchor_fit.py, html.py): on a dataset whose anchor
fit is known by construction the fractions and IoUs are exact; the page parses and every picture it links
exists; --against with the same checkpoint shows no difference; RPN-stage and no-checkpoint reports work;
k-means with the IoU distance finds planted box shapes."""
from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import visualize as vis_cli
from maskrcnn.config import load_config
from maskrcnn.data.build import build_eval_dataset
from maskrcnn.engine.checkpoint import config_to_yaml, save_checkpoint
from maskrcnn.model.build import build_model
from maskrcnn.vis import anchor_fit as af
from maskrcnn.report.measure import recall_numbers

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128  # every image is SIZE x SIZE and the model's test resize keeps it so
# One anchor per location (ratio 1): squares of side 16, 32, 64, 128, 256 centred on multiples of 4 .. 64 px.
# Three images, one object each:
EXACT_P2 = [24, 24, 40, 40]  # 16 x 16 centred on (32, 32): one P2 anchor exactly; its neighbours 4 px away: IoU 0.6
NO_FIT = [30, 12, 34, 112]  # 4 x 100: at best 4 x 16 inside a P2 anchor: IoU 64 / (400 + 256 - 64), 66 such anchors
EXACT_P4 = [32, 32, 96, 96]  # 64 x 64 centred on (64, 64): one P4 anchor exactly
NO_FIT_IOU = 64 / (400 + 256 - 64)
NO_FIT_TIES = 3 * 22  # anchor centres x in {28, 32, 36}, y in {20, 24, ..., 104}: each holds 4 x 16 of the box


def write_dataset(root: Path) -> None:
    """Three images with one rectangle each; the same files serve as train and val split."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k, (x0, y0, x1, y1) in enumerate((EXACT_P2, NO_FIT, EXACT_P4)):
        img = (rng.random((SIZE, SIZE, 3)) * 60 + 40).astype(np.uint8)
        img[y0:y1, x0:x1] = (230, 200, 40)
        cv2.imwrite(str(root / "images" / f"{k}.png"), img)
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": SIZE, "width": SIZE})
        anns.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
                     "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    (root / "ann.json").write_text(json.dumps(data))


def overrides(root: Path) -> list[str]:
    return ["data.dataset=coco", f"data.train_ann={root / 'ann.json'}", f"data.train_images={root / 'images'}",
            f"data.val_ann={root / 'ann.json'}", f"data.val_images={root / 'images'}",
            "model.anchors.sizes=[16,32,64,128,256]", "model.anchors.ratios=[1.0]",
            f"model.transform.min_size_test={SIZE}", f"model.transform.max_size_test={SIZE}",
            f"model.transform.min_size_train=[{SIZE}]", f"model.transform.max_size_train={SIZE}"]


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a busy CPU
    yield
    torch.set_num_threads(threads)
    os.chdir(old)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted dataset, its config, and a random full-stage and RPN-stage checkpoint of it."""
    root = tmp_path_factory.mktemp("planted")
    write_dataset(root)
    sets = overrides(root)
    out = {"root": root, "set": sets}
    for stage in ("full", "rpn"):
        cfg = load_config("configs/tiny.yaml", sets + [f"stage={stage}", "model.num_classes=1"])
        torch.manual_seed(0)
        model = build_model(cfg, load_weights=False).eval()
        path = root / f"{stage}.pth"
        save_checkpoint({"model": model.state_dict(), "config": config_to_yaml(cfg), "stage": stage,
                         "class_names": ["__background__", "box"]}, path)
        out[stage] = str(path)
    return out


def report(tmp_path: Path, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "rep"
    page = vis_cli.main(["report", "--out", str(out), "--no-progress", *argv])[0]
    assert page == out / "index.html"
    return json.loads((out / "report.json").read_text()), page.read_text()


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids, self.cells = [], set(), []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("img", "a"):
            self.links.append(a.get("src") or a.get("href"))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "td":
            self.cells.append(a.get("class") or "")
        if tag not in ("img", "meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
        self.open.pop()


def parse(page: str, out: Path) -> Page:
    p = Page()
    p.feed(page)
    p.close()
    assert p.open == []  # every element closed, in order
    assert p.links and all(not Path(link).is_absolute() and (out / link).is_file() for link in p.links), p.links
    return p


# ---------------------------------------------------------------------------------------------- anchor fit
def test_anchor_fit_is_exact_on_planted_boxes(planted):
    cfg = load_config("configs/tiny.yaml", planted["set"] + ["stage=rpn"])
    model = build_model(cfg, load_weights=False).eval()
    train = build_eval_dataset(cfg, "train")
    gt = af.ground_truth(train, model.transform)
    assert gt.boxes.tolist() == [[float(v) for v in b] for b in (EXACT_P2, NO_FIT, EXACT_P4)]
    grids = af.anchor_grids(model, gt)
    assert list(grids) == [(SIZE, SIZE)]
    fit = af.anchor_fit(gt, grids, model.rpn.anchor_generator, model.rpn.matcher)
    assert fit.best_iou[0] == 1.0 and fit.best_iou[2] == 1.0
    assert fit.best_iou[1] == pytest.approx(NO_FIT_IOU, abs=1e-6)
    assert fit.best_level.tolist() == [0, 0, 2]
    assert fit.positives.tolist() == [1, NO_FIT_TIES, 1] and fit.by_threshold.tolist() == [1, 0, 1]
    s = af.summarise(fit, model.rpn.anchor_generator.sizes, model.rpn.in_features)
    assert s["all"]["objects"] == 3
    assert s["all"]["mean_best_iou"] == pytest.approx((2 + NO_FIT_IOU) / 3, abs=1e-6)
    assert s["all"]["positive_at_threshold"] == pytest.approx(2 / 3)
    assert s["all"]["low_quality_only"] == pytest.approx(1 / 3) and s["all"]["no_positive"] == 0
    assert s["positives_per_level"] == {"p2": 1 + NO_FIT_TIES, "p3": 0, "p4": 1, "p5": 0, "p6": 0}
    assert s["by_size"]["small"]["objects"] == 2 and s["by_size"]["medium"]["objects"] == 1
    assert s["by_size"]["small"]["positive_at_threshold"] == 0.5 and s["by_size"]["medium"]["positive_at_threshold"] == 1
    assert s["by_level"]["p2"]["objects"] == 2 and s["by_level"]["p4"]["low_quality_only"] == 0
    assert s["by_ratio"]["h/w > 3"]["objects"] == 1 and s["by_ratio"]["h/w > 3"]["low_quality_only"] == 1
    assert s["by_ratio"]["h/w 2/3 - 3/2"]["positive_at_threshold"] == 1
    # Without the low-quality rule the box no anchor reaches has no positive at all.
    model.rpn.matcher.allow_low_quality_matches = False
    strict = af.anchor_fit(gt, grids, model.rpn.anchor_generator, model.rpn.matcher)
    assert strict.positives.tolist() == [1, 0, 1]


def test_no_checkpoint_report_is_exact_and_parses(planted, tmp_path):
    data, page = report(tmp_path, "--config", "configs/tiny.yaml", "--set", *planted["set"], "--images", "2",
                        "--timing-steps", "1", "--minutes", "10")
    this = data["sides"]["this"]
    fit = this["anchor_fit"]["current"]["all"]
    assert fit["mean_best_iou"] == pytest.approx((2 + NO_FIT_IOU) / 3, abs=1e-6)
    assert fit["positive_at_threshold"] == pytest.approx(2 / 3) and fit["low_quality_only"] == pytest.approx(1 / 3)
    assert "proposals" not in this and "run" not in this
    day = this["first_day"]
    assert day["seconds_per_iteration"] > 0 and day["most_objects_in_an_image"] == 1
    assert f"solver.max_iter={int(10 * 60 / day['seconds_per_iteration'])}" in day["set"]
    assert this["objects"]["input_size_range"] == {"h": [SIZE, SIZE], "w": [SIZE, SIZE]}
    sug = this["anchor_fit"]["suggestion"]
    assert len(sug["sizes"]) == 5 and len(sug["ratios"]) == 1
    assert sug["set"].startswith("--set model.anchors.sizes=[") and " model.anchors.ratios=[" in sug["set"]
    p = parse(page, tmp_path / "rep")
    assert {"summary", "views", "anchor-fit", "suggestions", "first-day"} <= p.ids and "proposals" not in p.ids
    views = [link for link in p.links if "/views_this/" in link and link.endswith(".png")]
    assert {Path(v).name.rsplit("_val", 1)[0] for v in views} == {"dataset", "anchors", "anchor_labels"}


# --------------------------------------------------------------------------------------------- checkpoints
def test_against_the_same_checkpoint_shows_no_difference(planted, tmp_path):
    data, page = report(tmp_path, "--checkpoint", planted["full"], "--against", planted["full"], "--images", "1")
    rows = data["summary"]
    assert rows and all(r["difference"] == 0 and r["verdict"] == "same" for r in rows)
    assert {r["section"] for r in rows} >= {"anchor fit", "proposals"}
    this, other = data["sides"]["this"], data["sides"]["against"]
    assert this["proposals"] == other["proposals"] and this["anchor_fit"] == other["anchor_fit"]
    assert this["proposals"]["all"]["objects"] == 3 and this["proposals"]["model_keeps"] == 100
    p = parse(page, tmp_path / "rep")
    assert not any("better" in c or "worse" in c for c in p.cells)
    for label in ("this", "against"):
        names = {Path(v).name.rsplit("_val", 1)[0] for v in p.links if f"/views_{label}/" in v}
        assert names == {"dataset", "anchors", "anchor_labels", "proposals", "rois", "detections", "features"}
    assert "proposals" in p.ids


def test_against_a_different_checkpoint_shows_the_difference(planted, tmp_path):
    """The counterpart of the test above: the same comparison against a checkpoint whose anchors are twice as
    large (and whose weights differ) finds the anchor fit worse by exactly what the planted boxes give, and marks
    it so on the page. With sides 32, 64, ..., 512 the 16 x 16 box is at best inside a 32 x 32 anchor (IoU 1/4),
    the 4 x 100 box holds 4 x 32 of one (IoU 128 / (400 + 1024 - 128)), and the 64 x 64 box is a P3 anchor."""
    cfg = load_config("configs/tiny.yaml", planted["set"] + ["stage=full", "model.num_classes=1",
                                                              "model.anchors.sizes=[32,64,128,256,512]"])
    torch.manual_seed(1)
    model = build_model(cfg, load_weights=False).eval()
    large = tmp_path / "large.pth"
    save_checkpoint({"model": model.state_dict(), "config": config_to_yaml(cfg), "stage": "full",
                     "class_names": ["__background__", "box"]}, large)
    data, page = report(tmp_path, "--checkpoint", str(large), "--against", planted["full"], "--images", "1")
    rows = {r["metric"]: r for r in data["summary"]}
    this_iou, against_iou = (0.25 + 128 / 1296 + 1) / 3, (2 + NO_FIT_IOU) / 3
    iou = rows["mean best anchor IoU"]
    assert iou["this"] == pytest.approx(this_iou, abs=1e-6) and iou["against"] == pytest.approx(against_iou, abs=1e-6)
    assert iou["difference"] == pytest.approx(this_iou - against_iou, abs=1e-6) and iou["verdict"] == "worse"
    # The 16 x 16 box loses its positive anchor at the threshold (kept only by the low-quality rule).
    positive = rows["objects with a positive anchor at the threshold"]
    assert (positive["this"], positive["against"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert positive["verdict"] == "worse"
    for r in data["summary"]:  # every difference is this - against, and its verdict follows its sign
        assert r["difference"] == pytest.approx(r["this"] - r["against"])
        expected = "same" if r["difference"] == 0 else (
            "better" if (r["difference"] > 0) == r["higher_is_better"] else "worse")
        assert r["verdict"] == expected, r
    assert data["sides"]["this"]["proposals"] != data["sides"]["against"]["proposals"]
    p = parse(page, tmp_path / "rep")
    assert any("worse" in c for c in p.cells)


def test_rpn_stage_checkpoint(planted, tmp_path):
    data, page = report(tmp_path, "--checkpoint", planted["rpn"], "--images", "1", "--val-images", "2")
    this = data["sides"]["this"]
    assert this["stage"] == "rpn" and this["proposals"]["images"] == 2 and "first_day" not in this
    rec = this["proposals"]["all"]
    assert 0 <= rec["recall@100"] <= rec["recall@300"] <= rec["recall@1000"] <= 1
    p = parse(page, tmp_path / "rep")
    names = {Path(v).name.rsplit("_val", 1)[0] for v in p.links if "/views_this/" in v}
    assert names == {"dataset", "anchors", "anchor_labels", "proposals", "features"}  # no box head


def test_one_line_errors(planted, tmp_path, capsys):
    missing = tmp_path / "none.pth"
    for argv, message in (
            (["--against", planted["full"]], "error: --against compares two checkpoints: give --checkpoint too"),
            (["--checkpoint", planted["full"], "--images", "-1"], "error: --images must be >= 0, got -1"),
            (["--checkpoint", str(missing)], f"error: checkpoint not found: {missing}")):
        with pytest.raises(SystemExit) as e:
            vis_cli.main(["report", "--out", str(tmp_path), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == message + "\n", (argv, err)


# -------------------------------------------------------------------------------------------------- k-means
def test_kmeans_finds_planted_shapes():
    rng = np.random.default_rng(1)
    planted = np.array([[10.0, 30.0], [40.0, 40.0], [160.0, 80.0]])
    wh = np.concatenate([c * np.exp(rng.normal(0, 0.03, (200, 2))) for c in planted])
    found = af.kmeans_iou(wh, 3, seed=0)
    assert np.allclose(found, planted, rtol=0.05), found
    # Sizes x ratios, as the anchor generator makes them: recovered factor by factor.
    sizes, ratios = np.array([12.0, 48.0, 192.0]), np.array([0.5, 1.0, 2.0])
    s = np.repeat(sizes, 3 * 100)
    r = np.tile(np.repeat(ratios, 100), 3)
    jitter = np.exp(rng.normal(0, 0.02, (len(s), 2)))
    wh = np.stack((s / np.sqrt(r), s * np.sqrt(r)), 1) * jitter
    got_sizes, got_ratios = af.suggest_anchors(wh, 3, 3)
    assert np.allclose(got_sizes, sizes, rtol=0.05) and np.allclose(got_ratios, ratios, rtol=0.05)
    assert af.set_line([12, 48.5], [0.5, 1]) == "--set model.anchors.sizes=[12,48.5] model.anchors.ratios=[0.5,1]"


def test_recall_numbers():
    best = {100: np.array([0.9, 0.5, 0.3, 0.72]), 300: np.array([0.9, 0.6, 0.55, 0.72])}
    r = recall_numbers(best, np.array([True, True, True, False]))
    assert r["objects"] == 3 and r["recall@100"] == pytest.approx(2 / 3) and r["recall@300"] == 1.0
    # AR: thresholds 0.5, 0.55, ..., 0.95; 0.9 passes 9 of 10, 0.5 one, 0.3 none
    assert r["AR@100"] == pytest.approx((9 + 1 + 0) / 30)


def test_summary_marks_better_and_worse():
    from types import SimpleNamespace

    from maskrcnn.report.measure import summary_rows
    from maskrcnn.report.page import summary_html

    def side(label, iou, missed, loss):
        return SimpleNamespace(label=label, stats={"anchor_fit": {"current": {"all": {
            "mean_best_iou": iou, "no_positive": missed}}}, "run": {"loss_end": {"total_loss": loss}}})
    sides = [side("this", 0.7, 0.2, 1.0), side("against", 0.6, 0.1, 1.0)]
    rows = {r["metric"]: r for r in summary_rows(sides)}
    assert set(rows) == {"mean best anchor IoU", "objects without a positive anchor", "total loss at the end"}
    assert rows["mean best anchor IoU"]["verdict"] == "better"
    assert rows["mean best anchor IoU"]["difference"] == pytest.approx(0.1)
    assert rows["objects without a positive anchor"]["verdict"] == "worse"  # more misses: worse
    assert rows["total loss at the end"]["verdict"] == "same"
    p = Page()
    p.feed(summary_html(list(rows.values()), sides))
    assert sorted(c for c in p.cells if "better" in c or "worse" in c) == ["num better", "num worse"]


def planted_run(root: Path, name: str, checkpoint: str, ann: Path, boxes: list) -> Path:
    """A run directory: the checkpoint and a metrics.json whose val entry is the box evaluation of planted
    detections ((image id, box, score) each) on the planted dataset, error analysis included."""
    from pycocotools.coco import COCO

    from maskrcnn.evaluation.coco_eval import coco_evaluate

    run = root / name
    run.mkdir()
    (run / "model_final.pth").write_bytes(Path(checkpoint).read_bytes())
    coco = COCO(str(ann))
    results = [{"image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
               for i, (x0, y0, x1, y1), score in boxes]
    metrics = {"bbox": coco_evaluate(coco, results, "bbox", [1, 2, 3])}
    metrics["bbox"].pop("summary")
    (run / "metrics.json").write_text(json.dumps({"stage": "full", "iterations": 1, "val": metrics}))
    return run


def test_errors_section_shows_each_runs_error_types_and_pictures(planted, tmp_path):
    """Two runs whose planted detections differ by one error: `this` finds the first object and puts a box on
    background in the third image (bkg), `against` finds the first and mislocalises the third (loc), each error
    scored above the true positive so that it costs AP. The page
    shows each run's dAP as its metrics.json has it (x 100), their difference, and both runs' pictures."""
    ann = planted["root"] / "ann.json"
    this = planted_run(tmp_path, "this", planted["full"], ann, [(1, EXACT_P2, 0.8), (3, [100, 100, 120, 120], 0.9)])
    against = planted_run(tmp_path, "against", planted["full"], ann, [(1, EXACT_P2, 0.8), (3, [32, 32, 64, 50], 0.9)])
    data, page = report(tmp_path, "--checkpoint", str(this / "model_final.pth"), "--against",
                        str(against / "model_final.pth"), "--images", "1")
    dap = {label: json.loads((run / "metrics.json").read_text())["val"]["bbox"]["errors"]["dAP"]
           for label, run in (("this", this), ("against", against))}
    assert dap["this"]["bkg"] > 0 and dap["this"]["loc"] == 0  # the planted errors are what the analysis sees
    assert dap["against"]["loc"] > 0 and dap["against"]["bkg"] == 0
    for label in ("this", "against"):
        errors = data["sides"][label]["errors"]
        assert errors["source"] == "metrics.json" and errors["types"]["box"]["dAP"] == dap[label]
        assert [Path(p).name for p in errors["pictures"]] == ["pr_val_training.png", "confusion-box_val_training.png"]
    p = parse(page, tmp_path / "rep")
    assert "errors" in p.ids
    assert {Path(v).name for v in p.links if "/errors_" in v} == {"pr_val_training.png", "confusion-box_val_training.png"}
    for name in ("bkg", "loc"):
        a, b = 100 * dap["this"][name], 100 * dap["against"][name]
        assert f"<td>{name}</td>" in page and f"{a:.2f}</td>" in page and f"{a - b:.2f}</td>" in page
    assert not (this / "pr_val_training.png").exists()  # drawn for the page, not into the run directory
