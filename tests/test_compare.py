"""Tests for compare.py: the loss-curve PNG and the Markdown AP table over four tiny runs (groups 'base' and
'noise', two seeds each, trained once per module), smooth(), grouping by seed suffix, and one-line errors. The
table is checked on planted APs (copies of the runs with chosen numbers in metrics.json) against statistics
computed in the test."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import compare

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
DATA_ROOT = str(ROOT / "datasets" / "shapes-tiny")
# Very small images and a short schedule: four runs must train in a few seconds on 2 CPU cores.
SMALL = ["model.transform.min_size_train=[48]", "model.transform.max_size_train=64",
         "model.transform.min_size_test=48", "model.transform.max_size_test=64",
         "model.rpn.pre_nms_topk_train=50", "model.rpn.post_nms_topk_train=50",
         "model.rpn.pre_nms_topk_test=50", "model.rpn.post_nms_topk_test=50"]
ITERS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    import train

    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for group in ("base", "noise"):
        for seed in (0, 1):
            name = f"{group}-s{seed}"
            argv = ["--config", CONFIG, "--stage", "full", "--name", name, "--no-progress", "--seed", str(seed),
                    "--set", f"train.output_dir={out}", f"data.root={DATA_ROOT}", f"solver.max_iter={ITERS}",
                    "train.log_period=1", "train.checkpoint_period=1000", "test.max_images=2", *SMALL]
            if group == "noise":
                argv.insert(0, "--feature-noise")
            with contextlib.redirect_stdout(io.StringIO()):
                train.main(argv)
            dirs[name] = out / name
    return dirs


def run_compare(argv) -> tuple[str, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        table = compare.main(argv)
    return table, buf.getvalue()


def parse_cell(cell: str) -> tuple[float, ...]:
    return tuple(float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell))


def test_runs_are_what_the_test_assumes(runs):
    for name, d in runs.items():
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["model"]["noise"]["enabled"] == name.startswith("noise")
        assert cfg["train"]["seed"] == int(name[-1])
        val = json.loads((d / "metrics.json").read_text())["val"]
        assert {"bbox", "segm"} <= set(val)
        scalars = compare.read_scalars(d)
        steps, values = scalars["loss/loss_cls"]
        assert steps.tolist() == list(range(1, ITERS + 1))
        assert np.isfinite(values).all()
    # The noise switch changes training: same seed, different losses from the first iteration on.
    base = compare.read_scalars(runs["base-s0"])["loss/total_loss"][1]
    noise = compare.read_scalars(runs["noise-s0"])["loss/total_loss"][1]
    assert not np.allclose(base, noise)


# Planted final APs (group -> seed -> (box AP, mask AP)), written into copies of the trained runs' metrics.json:
# after ITERS iterations every real AP is 0.0, and a table of zeros would pass whatever compare.py computed. The
# box APs differ between groups by about 0.1 on both seeds (a paired interval that excludes zero), the mask
# APs go up on one seed and down on the other (an interval that includes zero); no mean sits on a rounding edge.
PLANTED = {"base": {0: (0.300, 0.200), 1: (0.340, 0.260)},
           "noise": {0: (0.400, 0.250), 1: (0.446, 0.190)}}
T975_DF1 = 12.706  # Student's t, 97.5% quantile, 1 degree of freedom (two seeds), from a printed table


@pytest.fixture(scope="module")
def planted(runs, tmp_path_factory) -> dict[str, Path]:
    """Copies of the four runs (their events, for the chart) with the PLANTED APs in metrics.json."""
    import shutil

    out = tmp_path_factory.mktemp("planted")
    dirs = {}
    for name, src in runs.items():
        assert not (src / "eval_val_clean.json").exists()  # metrics.json is what compare.py reads here
        dst = out / name
        shutil.copytree(src, dst)
        box, mask = PLANTED[name.rsplit("-s", 1)[0]][int(name[-1])]
        metrics = json.loads((dst / "metrics.json").read_text())
        metrics["val"]["bbox"]["stats"]["AP"], metrics["val"]["segm"]["stats"]["AP"] = box, mask
        (dst / "metrics.json").write_text(json.dumps(metrics))
        dirs[name] = dst
    return dirs


def expected_cells(column: int) -> dict[str, str]:
    """The table's cells for column 0 (box AP) or 1 (mask AP) of PLANTED, computed here with the statistics
    module: mean ± sample standard deviation, and for noise the difference of means ± its standard error."""
    import statistics

    cells, base = {}, None
    for group in ("base", "noise"):
        xs = [PLANTED[group][s][column] for s in (0, 1)]
        mean, sd = statistics.mean(xs), statistics.stdev(xs)
        cells[group] = f"{mean:.3f} ± {sd:.3f}"
        if base is None:
            base = (mean, sd)
        else:
            se = ((sd**2) / 2 + base[1] ** 2 / 2) ** 0.5
            cells[group] += f" ({mean - base[0]:+.3f} ± {se:.3f})"
    return cells


def test_planted_aps_are_not_a_trivial_comparison():
    box, mask = expected_cells(0), expected_cells(1)
    assert box == {"base": "0.320 ± 0.028", "noise": "0.423 ± 0.033 (+0.103 ± 0.030)"}  # worked by hand too
    assert mask == {"base": "0.230 ± 0.042", "noise": "0.220 ± 0.042 (-0.010 ± 0.042)"}
    assert box["base"] != mask["base"] and box["noise"] != mask["noise"]  # a swapped column shows


def test_compare_writes_png_and_table(planted, tmp_path):
    import matplotlib.image as mpimg

    png, md = tmp_path / "charts" / "cmp.png", tmp_path / "table.md"
    dirs = [str(planted[n]) for n in ("base-s0", "base-s1", "noise-s0", "noise-s1")]
    table, stdout = run_compare([*dirs, "--out", str(png), "--table", str(md)])
    assert png.is_file() and png.stat().st_size > 1000
    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0  # not a blank canvas
    assert md.read_text().strip() == table.strip()
    assert table in stdout

    lines = [ln for ln in table.split("\n\n")[0].splitlines() if ln.startswith("|")]  # the AP table, first
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "seeds", "box AP", "mask AP"]  # no corrupted or benchmark AP in these runs
    assert set(lines[1].replace("|", "").strip()) <= {"-"}
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells
    assert set(rows) == {"base", "noise"}
    box, mask = expected_cells(0), expected_cells(1)
    for group, cells in rows.items():
        assert cells[1:] == ["2", box[group], mask[group]], (group, cells)


def test_compare_prefers_evaluate_results(runs, tmp_path):
    """eval_val_clean.json (written by evaluate.py) takes precedence over the run's own metrics.json."""
    import shutil

    copies = []
    for i, name in enumerate(("base-s0", "base-s1")):
        dst = tmp_path / name
        shutil.copytree(runs[name], dst)
        report = {"results": {"clean": {"bbox": {"stats": {"AP": 0.25 + 0.5 * i}},
                                        "segm": {"stats": {"AP": 0.125}}}}}
        (dst / "eval_val_clean.json").write_text(json.dumps(report))
        copies.append(str(dst))
    table, _ = run_compare([*copies, "--out", str(tmp_path / "c.png")])
    row = next(ln for ln in table.splitlines() if ln.startswith("| base |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert parse_cell(cells[2]) == pytest.approx((0.5, np.std([0.25, 0.75], ddof=1)), abs=6e-4)
    assert parse_cell(cells[3]) == pytest.approx((0.125, 0.0), abs=6e-4)


def test_smooth():
    const = np.full(17, 3.25)
    for w in (0.0, 0.5, 0.8, 0.99):
        np.testing.assert_allclose(compare.smooth(const, w), const, rtol=1e-12)
    x = np.array([1.0, 5.0, -2.0, 4.0])
    np.testing.assert_allclose(compare.smooth(x, 0.0), x)  # no smoothing
    s = compare.smooth(x, 0.5)
    assert s[0] == pytest.approx(1.0)  # bias-corrected: the first value is kept
    # EMA with bias correction, by hand: (0.5*1*0.5 + 0.5*5) / (1 - 0.25) = 3.666...
    assert s[1] == pytest.approx((0.25 * 1.0 + 0.5 * 5.0) / 0.75)


def test_group_runs_by_seed_suffix():
    paths = [Path("r/base-s0"), Path("r/base-s12"), Path("r/noise-s0"), Path("r/solo"), Path("r/a-s1-x")]
    groups = compare.group_runs(paths)
    assert {k: [p.name for p in v] for k, v in groups.items()} == {
        "base": ["base-s0", "base-s12"], "noise": ["noise-s0"], "solo": ["solo"], "a-s1-x": ["a-s1-x"]}
    assert list(groups)[0] == "base"  # the first group (the baseline of the table) is the first run's


def test_non_run_directory_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        compare.main([str(empty), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not-a-run" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing" in err


def test_loss_tags_are_every_logged_loss_total_last():
    runs = [{"loss/loss_cls": 0, "loss/total_loss": 0, "lr": 0}, {"loss/loss_new_term": 0, "time/x": 0}]
    assert compare.loss_tags(runs) == ["loss_cls", "loss_new_term", "total_loss"]
    assert compare.loss_tags([{"lr": 0}]) == []


def test_training_statistics_are_charted_after_the_losses(runs, tmp_path):
    """The trainer logs stats/* (sample counts, accuracies) beside loss/*; compare.py charts every one it finds."""
    scalars = compare.read_scalars(runs["base-s0"])
    stats = compare.stat_tags([scalars])
    assert {"rpn_pos_anchors", "rpn_neg_anchors", "roi_fg_samples", "roi_bg_samples", "cls_accuracy",
            "mask_accuracy"} <= set(stats)
    assert compare.stat_tags([{"loss/loss_cls": 0, "stats/b": 0, "stats/a": 0}]) == ["a", "b"]
    tags = compare.plot(compare.group_runs([runs["base-s0"], runs["noise-s0"]]), tmp_path / "c.png", 0.5)
    assert tags[-len(stats):] == [f"stats/{t}" for t in stats] and "loss/total_loss" in tags


def test_t_quantiles_by_hand_and_against_scipy():
    # df = 2 has a closed form: t = (2p - 1) / sqrt(2 p (1 - p)) at p = 0.975 gives 4.3027
    assert compare.t975(2) == pytest.approx(4.3027, abs=1e-3)
    assert compare.t975(1) == pytest.approx(12.706, abs=1e-3)
    stats = pytest.importorskip("scipy.stats", reason="scipy not installed: the table alone is checked")
    for df in (1, 2, 3, 5, 10, 29, 30, 31, 50, 200):
        assert compare.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3), df


def test_paired_difference_interval_and_verdict():
    base = {"0": 0.20, "1": 0.22, "2": 0.21}
    better = {"0": 0.25, "1": 0.26, "2": 0.27, "9": 0.9}  # seed 9 has no partner: ignored
    d = compare.paired_difference(base, better)
    diffs = np.array([0.05, 0.04, 0.06])
    half = 4.303 * diffs.std(ddof=1) / np.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.05)
    assert d["low"] == pytest.approx(0.05 - half) and d["high"] == pytest.approx(0.05 + half)
    assert d["excludes_zero"]
    noisy = {"0": 0.25, "1": 0.18, "2": 0.22}
    assert not compare.paired_difference(base, noisy)["excludes_zero"]
    assert compare.paired_difference(base, {"0": 0.3}) is None  # one common seed: no interval


def test_table_reports_paired_interval(planted, tmp_path):
    """The paired lines: mean of the per-seed differences, mean -+ t(0.975, 1 df) * sd / sqrt(2), and the verdict,
    computed here from PLANTED; box AP's interval excludes zero, mask AP's includes it."""
    import statistics

    dirs = [str(planted[n]) for n in ("base-s0", "base-s1", "noise-s0", "noise-s1")]
    table, _ = run_compare([*dirs, "--out", str(tmp_path / "c.png")])
    paired = table.split("Paired by seed:\n", 1)[1].split("\n\n")[0].splitlines()  # the AP lines; error types after
    assert len(paired) == 2, paired
    verdicts = []
    for line, (column, title) in zip(paired, ((0, "box AP"), (1, "mask AP")), strict=True):
        d = [PLANTED["noise"][s][column] - PLANTED["base"][s][column] for s in (0, 1)]
        mean, half = statistics.mean(d), T975_DF1 * statistics.stdev(d) / 2**0.5
        excludes = mean - half > 0 or mean + half < 0
        verdict = ("excludes zero: a difference at this confidence" if excludes
                   else "includes zero: no difference shown")
        verdicts.append(excludes)
        assert line.startswith(f"- noise - base, {title}: {mean:+.3f}, 95% CI [{mean - half:+.3f}, {mean + half:+.3f}] "
                               f"over 2 seeds (paired, t with 1 df); the interval {verdict}."), line
    assert verdicts == [True, False]  # both verdicts are exercised
    assert paired[0].startswith("- noise - base, box AP: +0.103, 95% CI [+0.065, +0.141]")  # worked by hand
    assert paired[1].startswith("- noise - base, mask AP: -0.010, 95% CI [-0.772, +0.752]")


def test_error_types_of_both_groups_and_their_paired_difference(runs, tmp_path):
    """Every error type's dAP (x 100) for base and noise, and noise - base paired by seed with its 95% CI, from the
    runs' own end-of-run evaluations (metrics.json)."""
    dirs = [str(runs[n]) for n in ("base-s0", "base-s1", "noise-s0", "noise-s1")]
    table, _ = run_compare([*dirs, "--out", str(tmp_path / "c.png")])
    assert "| iou | error | base dAP | noise dAP | noise - base |" in table
    dap = {name: json.loads((runs[name] / "metrics.json").read_text())["val"]["bbox"]["errors"]["dAP"]
           for name in runs}
    for error in ("cls", "loc", "both", "dupe", "bkg", "miss", "FP", "FN"):
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| box | {error} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        base = [dap[f"base-s{s}"][error] for s in (0, 1)]
        noise = [dap[f"noise-s{s}"][error] for s in (0, 1)]
        assert float(cells[2]) == pytest.approx(100 * np.mean(base), abs=6e-3)
        assert float(cells[3]) == pytest.approx(100 * np.mean(noise), abs=6e-3)
        d = compare.paired_difference({"0": base[0], "1": base[1]}, {"0": noise[0], "1": noise[1]})
        assert parse_cell(cells[4]) == pytest.approx((100 * d["mean"], 100 * d["low"], 100 * d["high"]), abs=6e-3)
    # the end-of-run evaluation logged each dAP to TensorBoard
    steps, values = compare.read_scalars(runs["base-s0"])["val/bbox_dAP_loc"]
    assert values[-1] == pytest.approx(dap["base-s0"]["loc"], abs=1e-6)
    # the AP lines say why there is no interval over images (no evaluate.py detections) and the detectable size
    line = next(ln for ln in table.splitlines() if ln.startswith("- noise - base, box AP"))
    assert "No interval over images" in line and "Smallest difference 2 seeds detect" in line


def test_detectable_difference_by_hand():
    # 3 seeds, sd 0.01: (4.303 + 1.061) * 0.01 / sqrt(3)
    assert compare.detectable_difference(3, 0.01) == pytest.approx((4.303 + 1.061) * 0.01 / np.sqrt(3), abs=1e-6)
    stats = pytest.importorskip("scipy.stats", reason="scipy not installed: the table alone is checked")
    for df in (1, 2, 5, 29):
        assert compare.T80[df - 1] == pytest.approx(stats.t.ppf(0.80, df), abs=2e-3), df


def test_bootstrap_over_images_is_paired(tmp_path):
    """Two arms evaluated on the same synthetic images: identical detections give the interval [0, 0]; the
    other arm's detections with half its true positives shifted give an interval around the difference of APs."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_errors import synthetic

    from maskrcnn.evaluation.errors import image_matches, resampled_ap

    gt, res = synthetic(40, 3, crowd=0.0)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(gt.dataset))
    ids = sorted(gt.getImgIds())
    worse = [dict(r, bbox=[r["bbox"][0] + 4, *r["bbox"][1:]]) if i % 2 else r for i, r in enumerate(res)]

    def run(name, records):
        d = tmp_path / name
        d.mkdir()
        (d / "eval_val_clean.json").write_text(json.dumps({"image_ids": ids, "annotations": str(ann),
                                                           "cat_ids": sorted(gt.getCatIds()), "results": {}}))
        (d / "detections_val_clean.json").write_text(json.dumps(records))
        return d

    base, same, other = [run("base-s0", res)], [run("same-s0", res)], [run("other-s0", worse)]
    assert compare.bootstrap_over_images(base, same, "bbox", 30) | {"excludes_zero": None} == {
        "low": 0.0, "high": 0.0, "resamples": 30, "images": 40, "seeds": 1, "excludes_zero": None}
    boot = compare.bootstrap_over_images(base, other, "bbox", 200)
    full = (resampled_ap(image_matches(gt, worse, "bbox", ids)) - resampled_ap(image_matches(gt, res, "bbox", ids)))
    assert full < 0 and boot["low"] < full < boot["high"] and boot["high"] - boot["low"] > 1e-3
    # no image ids (an evaluation older than them): no interval, and why
    (base[0] / "eval_val_clean.json").write_text(json.dumps({"results": {}}))
    assert "why" in compare.bootstrap_over_images(base, other, "bbox", 10)
