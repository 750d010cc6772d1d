"""Compare runs: every named loss and the total, then every training statistic (sampled anchor and RoI counts,
classification and mask accuracy), against iteration (smoothed, mean and one standard deviation across seeds)
in one figure, and a Markdown table of final box/mask AP, clean and under
corruption, per run or group of runs.

    python compare.py runs/demo/full-s0 runs/demo/full-noise-s0 --out comparison.png
    python compare.py runs/demo/full-s* runs/demo/full-noise-s* --out comparison.png --table table.md

Runs whose names differ only in a trailing seed suffix (-s0, -s1, ...) form one group. With two or more seeds
in common, each group's difference from the first group is also given paired by seed, with a 95% confidence
interval (t-distribution) and in words whether it excludes zero; for clean box and mask AP also a 95% interval
over the evaluation images (a paired bootstrap, --bootstrap N resamples) and the smallest difference the seeds
could detect. A second table gives every error type's dAP (TIDE, maskrcnn/evaluation/errors.py) per group and
its difference from the first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np

from maskrcnn.cli import one_line_errors

SEED_SUFFIX = re.compile(r"-s\d+$")


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not list(run_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{run_dir}: no TensorBoard events (is it a run directory?)")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, acc = np.empty_like(values, dtype=np.float64), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for run in run_dirs:
        groups.setdefault(SEED_SUFFIX.sub("", run.name), []).append(run)
    return groups


def read_ap(run_dir: Path, sources: Optional[dict[str, str]] = None) -> dict[str, float]:
    """Final AP of a run: clean from evaluate.py (or the training run's own end-of-run evaluation), mean under
    corruption from `evaluate.py --corruption all`, and mPC / rPC from `evaluate.py --corruption benchmark`; of
    each, the evaluation of every val image if there is one, else the one on the most images. `sources` gets the
    image set each value comes from (`val`, `val-first20`; `metrics.json` for the training's own)."""
    from maskrcnn.evaluation.outputs import find_metrics

    ap: dict[str, float] = {}
    sources = {} if sources is None else sources
    clean = find_metrics(run_dir, "val", "clean")
    if clean:
        res = json.loads(clean[1].read_text())["results"]["clean"]
        for t in ("bbox", "segm"):
            if t in res:
                ap[f"{t}"], sources[t] = res[t]["stats"]["AP"], clean[0]
    elif (run_dir / "metrics.json").is_file():
        val = json.loads((run_dir / "metrics.json").read_text()).get("val", {})
        for t in ("bbox", "segm"):
            if t in val:
                ap[f"{t}"], sources[t] = val[t]["stats"]["AP"], "metrics.json"
    corrupted = find_metrics(run_dir, "val", "all-*")
    if corrupted:
        data = json.loads(corrupted[1].read_text())
        for t in ("bbox", "segm"):
            if f"mean_corrupted_{t}_AP" in data:
                ap[f"{t}_corrupted"], sources[f"{t}_corrupted"] = data[f"mean_corrupted_{t}_AP"], corrupted[0]
    bench = find_metrics(run_dir, "val", "benchmark")
    if bench:
        metrics = json.loads(bench[1].read_text()).get("benchmark", {}).get("metrics", {})
        for t in ("bbox", "segm"):
            if t in metrics:
                ap[f"{t}_mPC"], sources[f"{t}_mPC"] = metrics[t]["mPC"], bench[0]
                if metrics[t]["rPC"] is not None:
                    ap[f"{t}_rPC"], sources[f"{t}_rPC"] = metrics[t]["rPC"], bench[0]
    return ap


# Two-sided 95% quantiles of Student's t with df = 1..30 degrees of freedom (beyond: the normal's 1.960 plus
# the first terms of the Cornish-Fisher expansion).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t quantile needs at least one degree of freedom, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(base: dict[str, float], other: dict[str, float]) -> Optional[dict]:
    """Mean of other - base over the seeds both have, with its 95% confidence interval (t-distribution,
    n - 1 degrees of freedom); None with fewer than two common seeds."""
    seeds = sorted(set(base) & set(other))
    if len(seeds) < 2:
        return None
    d = np.array([other[s] - base[s] for s in seeds], dtype=np.float64)
    half = t975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"n": len(d), "mean": float(d.mean()), "sd": float(d.std(ddof=1)),
            "low": float(d.mean() - half), "high": float(d.mean() + half),
            "excludes_zero": bool(d.mean() - half > 0 or d.mean() + half < 0)}


def seed_of(run: Path) -> str:
    m = SEED_SUFFIX.search(run.name)
    return m.group(0)[2:] if m else run.name


def _mean_std(xs: list[float]) -> tuple[float, float]:
    arr = np.array(xs, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def ap_table(groups: dict[str, list[Path]], bootstrap: int = 0) -> str:
    """The AP table; with `bootstrap` resamples, each paired AP difference also gets an interval over the
    evaluation images and the smallest difference the seeds could detect (robustness_words)."""
    columns = [("bbox", "box AP"), ("segm", "mask AP"), ("bbox_corrupted", "box AP corrupted"),
               ("segm_corrupted", "mask AP corrupted"), ("bbox_mPC", "box mPC"), ("segm_mPC", "mask mPC"),
               ("bbox_rPC", "box rPC"), ("segm_rPC", "mask rPC")]
    sources: dict[str, set[str]] = {}  # column -> the image sets its values come from

    def read(run: Path) -> dict[str, float]:
        found: dict[str, str] = {}
        ap = read_ap(run, found)
        for k, image_set in found.items():
            sources.setdefault(k, set()).add(image_set)
        return ap

    per_group = {name: [read(r) for r in runs] for name, runs in groups.items()}
    present = [(k, title) for k, title in columns if any(k in ap for aps in per_group.values() for ap in aps)]
    if not present:
        return "(no AP found: run evaluate.py on the runs first)"
    header = "| run | seeds | " + " | ".join(t for _, t in present) + " |"
    lines = [header, "|" + "---|" * (2 + len(present))]
    base_name = next(iter(per_group))
    base = {k: _mean_std([ap[k] for ap in per_group[base_name] if k in ap]) for k, _ in present
            if any(k in ap for ap in per_group[base_name])}
    for name, aps in per_group.items():
        cells = []
        for k, _ in present:
            xs = [ap[k] for ap in aps if k in ap]
            if not xs:
                cells.append("-")
                continue
            mean, std = _mean_std(xs)
            cell = f"{mean:.3f} ± {std:.3f}" if len(xs) > 1 else f"{mean:.3f}"
            if name != base_name and k in base:
                bm, bs = base[k]
                nb = len([ap for ap in per_group[base_name] if k in ap])
                spread = math.sqrt(std**2 / len(xs) + bs**2 / max(1, nb))
                cell += f" ({mean - bm:+.3f} ± {spread:.3f})"
            cells.append(cell)
        lines.append(f"| {name} | {len(aps)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± sample standard deviation across seeds; in brackets the difference from `{base_name}` "
                 "± its standard error.")
    lines.append(image_sets_line(present, sources))
    paired = []
    for name, runs in groups.items():
        if name == base_name:
            continue
        for k, title in present:
            by_seed = {seed_of(r): ap[k] for r, ap in zip(runs, per_group[name]) if k in ap}
            base_by_seed = {seed_of(r): ap[k] for r, ap in zip(groups[base_name], per_group[base_name]) if k in ap}
            diff = paired_difference(base_by_seed, by_seed)
            if diff is None:
                continue
            verdict = ("excludes zero: a difference at this confidence" if diff["excludes_zero"]
                       else "includes zero: no difference shown")
            paired.append(f"- {name} - {base_name}, {title}: {diff['mean']:+.3f}, 95% CI [{diff['low']:+.3f}, "
                          f"{diff['high']:+.3f}] over {diff['n']} seeds (paired, t with {diff['n'] - 1} df); the "
                          f"interval {verdict}." + robustness_words(diff, groups[base_name], runs, k, bootstrap))
    if paired:
        lines += ["", "Paired by seed:", *paired]
    return "\n".join(lines)


# ----------------------------------------------------------------- error types and robust verdicts
# One-sided 80% quantiles of Student's t with df = 1..30 (the power term of the detectable difference)
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
       0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854]


def detectable_difference(n: int, sd: float) -> float:
    """The smallest true mean difference that n paired seeds detect with 80% power in a two-sided test at the 5%
    level, if the paired differences spread by `sd` (their sample standard deviation) as here:
    (t_0.975,n-1 + t_0.80,n-1) * sd / sqrt(n), the usual approximation of the paired t-test's power."""
    t80 = T80[n - 2] if n - 1 <= len(T80) else 0.8416
    return (t975(n - 1) + t80) * sd / math.sqrt(n)


def _clean_evaluation(run: Path) -> Optional[dict]:
    """The run's clean evaluation by evaluate.py (every val image if there is one, else the most), its
    detections and the images it evaluated, or None."""
    from maskrcnn.evaluation.outputs import detections_file, find_metrics

    found = find_metrics(run, "val", "clean")
    if not found:
        return None
    report = json.loads(found[1].read_text())
    dets = run / detections_file(found[0], "clean", "clean", True)
    if not report.get("image_ids") or not report.get("annotations") or not dets.is_file():
        return None
    return {"image_set": found[0], "detections": dets, **report}


def bootstrap_over_images(base_runs: list[Path], other_runs: list[Path], key: str, resamples: int,
                          seed: int = 0) -> Optional[dict]:
    """A paired bootstrap over the evaluation images: each resample draws the images with replacement, the same
    draw for every run of both arms, and takes the mean over seeds of (other - base) AP on it (AP from each
    run's detections, as COCOeval computes it on those images); the 2.5 and 97.5 percentiles. `key`: bbox or
    segm. None (with the reason in "why") where a run lacks evaluate.py's image ids or detections."""
    from pycocotools.coco import COCO

    from maskrcnn.evaluation.errors import image_matches, resampled_ap

    base = {seed_of(r): r for r in base_runs}
    other = {seed_of(r): r for r in other_runs}
    seeds = sorted(set(base) & set(other))
    evals = {r: _clean_evaluation(r) for s in seeds for r in (base[s], other[s])}
    if not seeds or any(e is None for e in evals.values()):
        return {"why": "needs evaluate.py's clean evaluation with its detections (image ids) for every run"}
    first = next(iter(evals.values()))
    if any(e["image_ids"] != first["image_ids"] or e["annotations"] != first["annotations"] for e in evals.values()):
        return {"why": "the runs were evaluated on different images"}
    if not Path(first["annotations"]).is_file():
        return {"why": f"annotations not found: {first['annotations']}"}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(first["annotations"])
    ids = first["image_ids"]
    matches = {r: image_matches(gt, json.loads(e["detections"].read_text()), key, ids, e["cat_ids"])
               for r, e in evals.items()}
    rng = np.random.default_rng(seed)
    n = len(ids)
    diffs = np.empty(resamples)
    for b in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        diffs[b] = np.mean([resampled_ap(matches[other[s]], counts) - resampled_ap(matches[base[s]], counts)
                            for s in seeds])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "resamples": resamples, "images": n, "seeds": len(seeds),
            "excludes_zero": bool(low > 0 or high < 0)}


def robustness_words(diff: dict, base_runs: list[Path], other_runs: list[Path], key: str, resamples: int) -> str:
    """After a paired AP difference: its interval over the evaluation images and the detectable difference."""
    if key not in ("bbox", "segm"):
        return ""
    words = ""
    boot = bootstrap_over_images(base_runs, other_runs, key, resamples) if resamples > 0 else None
    if boot and "why" not in boot:
        words += (f" Over the evaluation images (paired bootstrap, the same {boot['images']} images resampled for "
                  f"both arms, {boot['resamples']} times): 95% CI [{boot['low']:+.3f}, {boot['high']:+.3f}], "
                  + ("excludes zero." if boot["excludes_zero"] else "includes zero."))
    elif boot:
        words += f" (No interval over images: {boot['why']}.)"
    words += (f" Smallest difference {diff['n']} seeds detect (80% power, 5% level) at this seed spread of the "
              f"differences ({diff['sd']:.3f}): {detectable_difference(diff['n'], diff['sd']):.3f}.")
    return words


def read_errors(run_dir: Path) -> dict[str, dict[str, float]]:
    """TIDE's dAP per error type of a run's clean evaluation (evaluate.py's, else the training's own
    metrics.json): {bbox|segm: {cls: dAP, ...}}."""
    from maskrcnn.evaluation.outputs import clean_metrics

    found = clean_metrics(run_dir, "val")
    if found is None:
        return {}
    res = found[3]
    return {t: res[t]["errors"]["dAP"] for t in ("bbox", "segm") if "errors" in res.get(t, {})}


def error_type_rows(groups: dict[str, list[Path]]) -> list[dict]:
    """Per iou type and error type: each group's mean dAP and each other group's difference from the first,
    paired by seed (mean and 95% CI) where two or more seeds are in common, else of the means."""
    from maskrcnn.evaluation.errors import ERROR_TYPES, SUMMARY_TYPES

    per_run = {r: read_errors(r) for runs in groups.values() for r in runs}
    base_name = next(iter(groups))
    rows = []
    for t in ("bbox", "segm"):
        for e in ERROR_TYPES + SUMMARY_TYPES:
            values = {name: {seed_of(r): per_run[r][t][e] for r in runs if t in per_run[r]}
                      for name, runs in groups.items()}
            if not all(values.values()):
                continue
            row = {"iou_type": t, "error": e, "mean": {n: float(np.mean(list(v.values()))) for n, v in values.items()},
                   "difference": {}}
            for name, v in values.items():
                if name != base_name:
                    row["difference"][name] = paired_difference(values[base_name], v) or {
                        "n": 1, "mean": row["mean"][name] - row["mean"][base_name]}
            rows.append(row)
    return rows


def error_type_table(groups: dict[str, list[Path]]) -> str:
    """Markdown: every error type's dAP (x 100) for each group and the difference from the first group."""
    rows = error_type_rows(groups)
    if not rows:
        return ""
    names = list(groups)
    base = names[0]
    head = ["iou", "error", *[f"{n} dAP" for n in names], *[f"{n} - {base}" for n in names[1:]]]
    lines = ["Error types (TIDE: the AP50 an oracle gains by fixing only that type, x 100; mean over seeds; "
             "the difference paired by seed with its 95% CI where two or more seeds are in common):", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [{"bbox": "box", "segm": "mask"}[row["iou_type"]], row["error"]]
        cells += [f"{100 * row['mean'][n]:.2f}" for n in names]
        for n in names[1:]:
            d = row["difference"][n]
            cell = f"{100 * d['mean']:+.2f}"
            if "low" in d:
                cell += f" [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]" + (" *" if d["excludes_zero"] else "")
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "A positive dAP difference: that error costs the other group more AP than the first; `*`: the "
              "interval excludes zero."]
    return "\n".join(lines)


def image_sets_line(present: list[tuple[str, str]], sources: dict[str, set[str]]) -> str:
    """"Images: box AP, mask AP: every val image; box mPC, ...: the first 20 val images.", and where a column's
    values come from different image sets, that they are not comparable."""
    from maskrcnn.evaluation.outputs import METRICS

    def words(image_set: str) -> str:
        m = METRICS.fullmatch(f"eval_{image_set}_x.json")
        if m is None:
            return f"the training's own evaluation ({image_set})"
        if m["n"] is None:
            return f"every {m['split']} image"
        return f"the first {m['split']} image" if m["n"] == "1" else f"the first {m['n']} {m['split']} images"

    by_sets: dict[tuple[str, ...], list[str]] = {}
    for k, title in present:
        by_sets.setdefault(tuple(sorted(sources.get(k, ()))), []).append(title)
    parts = [f"{', '.join(titles)}: " + " / ".join(words(x) for x in sets)
             + (" (they differ between runs: not comparable)" if len(sets) > 1 else "")
             for sets, titles in by_sets.items()]
    return "Images: " + "; ".join(parts) + "."


def loss_tags(scalars: list[dict]) -> list[str]:
    """Every loss logged as `loss/<name>` in any run, sorted, with the total last: a new loss is charted
    without being listed anywhere."""
    found = {tag[len("loss/"):] for s in scalars for tag in s if tag.startswith("loss/")}
    return sorted(found - {"total_loss"}) + (["total_loss"] if "total_loss" in found else [])


def stat_tags(scalars: list[dict]) -> list[str]:
    """Every training statistic logged as `stats/<name>` in any run (anchor and RoI sample counts, accuracies),
    sorted: charted as the losses are, without being listed anywhere."""
    return sorted({tag[len("stats/"):] for s in scalars for tag in s if tag.startswith("stats/")})


def plot(groups: dict[str, list[Path]], out: Path, smoothing: float = 0.8) -> list[str]:
    """The chart of every loss, then every training statistic, to `out`; returns the tags charted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {name: [read_scalars(r) for r in runs] for name, runs in groups.items()}
    every = [s for runs in scalars.values() for s in runs]
    tags = [f"loss/{t}" for t in loss_tags(every)]
    if not tags:
        raise ValueError("no loss scalars found in the runs' events")
    tags += [f"stats/{t}" for t in stat_tags(every)]
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes.flat, tags):
        for g, (name, runs) in enumerate(scalars.items()):
            curves = [s[tag] for s in runs if tag in s]
            if not curves:
                continue
            steps = curves[0][0]
            n = min(len(c[0]) for c in curves)  # runs of a group share a schedule; cut to the shortest
            ys = np.stack([smooth(c[1][:n], smoothing) for c in curves])
            mean, std = ys.mean(0), ys.std(0)
            colour = colours[g % len(colours)]
            ax.plot(steps[:n], mean, color=colour, label=f"{name} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps[:n], mean - std, mean + std, color=colour, alpha=0.2)
        ax.set_title(tag.split("/", 1)[1] if tag.startswith("loss/") else tag)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"training losses and statistics (EMA {smoothing}; band: ±1 std across seeds)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return tags


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    p.add_argument("--out", required=True, help="PNG of the loss curves")
    p.add_argument("--table", help="also write the Markdown AP table to this file")
    p.add_argument("--smoothing", type=float, default=0.8, help="EMA weight (0: none)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the evaluation images for the second interval of each paired AP difference "
                        "(0: none; needs evaluate.py's detections of the clean evaluation)")
    args = p.parse_args(argv)
    with one_line_errors():
        run_dirs = [Path(r) for r in args.runs]
        for r in run_dirs:
            if not r.is_dir():
                raise FileNotFoundError(f"run directory not found: {r}")
        groups = group_runs(run_dirs)
        plot(groups, Path(args.out), args.smoothing)
        table = ap_table(groups, args.bootstrap)
        errors = error_type_table(groups)
        if errors:
            table += "\n\n" + errors
        print(table)
        print(f"chart: {args.out}")
        if args.table:
            Path(args.table).write_text(table + "\n")
            print(f"table: {args.table}")
        return table


if __name__ == "__main__":
    main()
