"""The weekly check-up page (`index.html`), rendered from `report.json` alone: no model, no checkpoint, no data
set and no torch, so a report can be re-rendered (or its page changed) without measuring anything again.

    python -m maskrcnn.report.page runs/report        # index.html again from runs/report/report.json

One function per section, each taking the report (the dict in report.json) and returning its HTML; `render`
puts them together. The numbers and the pictures' paths come from maskrcnn/report/measure.py.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..vis import html as H

VIEW_NAMES = ("dataset", "anchors", "anchor labels", "proposals", "rois", "detections", "features")


@dataclass
class PageSide:
    """One side of the report (this checkpoint, or the one it is compared with), as report.json holds it."""
    label: str
    data: dict


def page_sides(report: dict) -> list[PageSide]:
    return [PageSide(label, data) for label, data in report["sides"].items()]


def write_page(out: Path) -> Path:
    """out/index.html rendered from out/report.json; returns its path."""
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    path = out / "index.html"
    path.write_text(render(report))
    return path


def render(report: dict) -> str:
    """The whole page, section by section."""
    sides = page_sides(report)
    body = [header_html(report, sides), summary_section(report, sides), views_section(sides),
            anchor_fit_section(sides), suggestions_section(sides), proposals_section(sides),
            run_section(report, sides), errors_section(sides), first_day_section(sides)]
    return H.page("anchor and proposal check-up", [b for b in body if b])


# ----------------------------------------------------------------------------------------------- header
def side_header(s: PageSide) -> str:
    d = s.data
    what = (f"checkpoint <code>{H.esc(d['source'])}</code> ({d['stage']} stage"
            + (f", iteration {d['iteration']}" if d.get("iteration") is not None else "") + ")"
            if d["has_weights"] else f"no checkpoint: config <code>{H.esc(d['source'])}</code>, anchors and data only")
    a = d["anchor_fit"]
    return (f"<li><b>{H.esc(s.label)}</b>: {what}; anchors sizes {H.esc(a['anchor_sizes'])} ratios "
            f"{H.esc(a['anchor_ratios'])}, test size {d['test_size'][0]}/{d['test_size'][1]}</li>")


def header_html(report: dict, sides: Sequence[PageSide]) -> str:
    made = report["created"][:16].replace("T", " ")
    return "\n".join([f"<h1>Anchor and proposal check-up</h1><ul>{''.join(side_header(s) for s in sides)}</ul>",
                      H.para(f"made in {report['seconds']:.0f} s on {made}; numbers in report.json", "note")])


# ---------------------------------------------------------------------------------------------- summary
def summary_html(rows: list[dict], sides: Sequence) -> str:
    """The summary table: one row per figure, both sides, their difference coloured by its verdict
    (sides: anything with a `label`)."""
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


def summary_section(report: dict, sides: Sequence[PageSide]) -> str:
    return "\n".join([H.h2("Summary", "summary"), summary_html(report["summary"], sides)])


# ------------------------------------------------------------------------------------------------ views
def views_html(sides: Sequence[PageSide]) -> str:
    pictures = [s.data["view_pictures"] for s in sides]
    n = max(len(p) for p in pictures)
    if n == 0:
        return H.para("no validation images", "note")
    shown = [v for v in VIEW_NAMES if any(v in pics for p in pictures for pics in p)]
    header = ["image"] + shown
    rows = []
    for i in range(n):
        for s, p in zip(sides, pictures):
            if i >= len(p):
                continue
            pics = p[i]
            label = f"val #{i}" + (f" ({s.label})" if len(sides) > 1 else "")
            rows.append([label] + [H.picture(pics[v], f"{v}, val #{i}, {s.label}") if v in pics else "–"
                                   for v in shown])
    return H.table(header, rows, css="views")


def views_section(sides: Sequence[PageSide]) -> str:
    n_views = len(sides[0].data["view_pictures"])
    return "\n".join([
        H.h2(f"The seven views on {n_views} validation images", "views"),
        H.para("dataset, anchors and anchor labels depend only on the config; proposals, RoIs, detections and "
               "features on the weights (RoIs and detections need the full stage). Click a picture for its "
               "full size.", "note"), views_html(sides)])


# ------------------------------------------------------------------------------------------- anchor fit
def fit_sides(sides: Sequence[PageSide]) -> tuple[list[PageSide], bool]:
    """The sides whose anchor fit is shown, and whether it is one fit for both: two checkpoints of the same
    data, resize, anchors and matcher share one fit, shown once."""
    shared = len(sides) == 2 and sides[1].data["pictures"]["anchor_fit"] == sides[0].data["pictures"]["anchor_fit"]
    return (list(sides[:1]) if shared else list(sides)), shared


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


def anchor_fit_section(sides: Sequence[PageSide]) -> str:
    body = [H.h2("Anchor fit over the training set", "anchor-fit"),
            H.para("Ground-truth boxes in model-input pixels (after the test-time resize) against the model's "
                   "anchors for that input size, labelled by the RPN's matcher. 'positive at IoU ≥ t': at least "
                   "one anchor is positive by the threshold; 'low-quality only': positive only as the box's "
                   "best anchor (the low-quality rule); sizes are COCO's buckets (area < 32², < 96²) in "
                   "model-input pixels; a box's level is the one whose anchor size is nearest to √(wh).", "note")]
    shown, shared = fit_sides(sides)
    if shared:
        body.append(H.para("the same for both checkpoints: same data, resize, anchors and matcher", "note"))
    cols = []
    for s in shown:
        a = s.data["anchor_fit"]
        cols.append(H.h3(f"{s.label if not shared else 'both'}: {a['current']['all'].get('objects', 0)} objects "
                         f"in {a['images']} images")
                    + H.picture(s.data["pictures"]["anchor_fit"], "best anchor IoU", "figure")
                    + fit_table(a["current"], a["levels"])
                    + H.para("positive anchors per level over the split: " + ", ".join(
                        f"{k} {v}" for k, v in a["current"]["positives_per_level"].items()), "note"))
    body.append(H.pair(cols))
    return "\n".join(body)


# ------------------------------------------------------------------------------------------ suggestions
SUGGESTION_KEYS = [("mean best IoU", "mean_best_iou"), ("positive at the threshold", "positive_at_threshold"),
                   ("low-quality only", "low_quality_only"), ("no positive", "no_positive"),
                   ("positives / object", "positives_per_object")]


def suggestion_html(a: dict) -> str:
    """The current anchors and the three k-means candidates measured alike, and the line to try."""
    sug, now = a["suggestion"], a["current"]["all"]
    keys = SUGGESTION_KEYS
    rows = [["now", " ".join(f"{x:g}" for x in a["anchor_sizes"]), " ".join(f"{x:g}" for x in a["anchor_ratios"])]
            + [now.get(k) for _, k in keys]]
    for c in sug["candidates"]:
        rows.append([c["method"] + (" (suggested)" if c["set"] == sug["set"] else ""),
                     " ".join(f"{x:g}" for x in c["sizes"]), " ".join(f"{x:g}" for x in c["ratios"])]
                    + [c["coverage"]["all"].get(k) for _, k in keys])
    verdict = ("covers more objects at the threshold than the anchors now" if sug["better_than_now"] else
               "does not cover more objects at the threshold than the anchors now: keep yours, or try it "
               "for its other numbers")
    return (H.table(["anchors", "sizes", "ratios"] + [k for k, _ in keys], rows)
            + H.para(f"the best of the three ({sug['method']}) {verdict}:") + H.code_block(sug["set"]))


def suggestions_section(sides: Sequence[PageSide]) -> str:
    shown, shared = fit_sides(sides)
    cols = []
    for s in shown:
        a = s.data["anchor_fit"]
        block = H.h3(s.label if not shared else "both") + H.picture(s.data["pictures"]["shapes"],
                                                                    "objects and anchor shapes", "figure")
        block += suggestion_html(a) if a.get("suggestion") else H.para("no ground-truth boxes: nothing to cluster",
                                                                       "note")
        cols.append(block)
    return "\n".join([H.h2("Anchor suggestions (k-means, distance 1 − IoU of centred boxes)", "suggestions"),
                      H.pair(cols)])


# -------------------------------------------------------------------------------------------- proposals
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


def proposals_section(sides: Sequence[PageSide]) -> str:
    with_props = [s for s in sides if "proposals" in s.data]
    if not with_props:
        return ""
    body = [H.h2("Proposals on the validation images", "proposals"),
            H.para("Best-proposal IoU of each object among the top-k proposals (no one-to-one matching); "
                   "recall at IoU 0.5 and AR over IoU 0.5:0.95. Worst-covered objects: white the ground "
                   "truth, orange its best proposal among those the model keeps at test time.", "note")]
    cols = []
    for s in with_props:
        p, pictures = s.data["proposals"], s.data["pictures"]
        block = (H.h3(f"{s.label}: {p['all']['objects']} objects in {p['images']} images (the model keeps "
                      f"{p['model_keeps']} proposals; counted up to {max(p['recall_at'])})")
                 + recall_table(p) + H.para("best proposal's level: " + ", ".join(
                     f"{k} {v}" for k, v in p["best_proposal_level"].items()), "note")
                 + H.picture(pictures["scores"], "proposal scores", "figure"))
        if "worst" in pictures:
            block += H.h3(f"the {len(p['worst'])} worst-covered objects") + \
                H.picture(pictures["worst"], "worst-covered objects", "figure")
        cols.append(block)
    body.append(H.pair(cols))
    return "\n".join(body)


# -------------------------------------------------------------------------------------------------- run
def run_section(report: dict, sides: Sequence[PageSide]) -> str:
    with_run = [s for s in sides if "run" in s.data]
    if not with_run:
        return ""
    body = [H.h2("Training run", "run")]
    if report.get("losses_picture"):
        body.append(H.picture(report["losses_picture"], "losses", "figure"))
    keys = sorted({k for s in with_run for src in ("val", "eval") for k in s.data["run"].get(src, {})})
    rows = []
    for s in with_run:
        r = s.data["run"]
        for src, title in (("val", "metrics.json"), ("eval", r.get("eval_file"))):
            if r.get(src):
                rows.append([f"{s.label} ({title})", r.get("iterations")] + [r[src].get(k) for k in keys])
    if rows:
        body.append(H.table(["run", "iterations"] + keys, rows))
    body.append(H.para("run directories: " + "; ".join(f"{s.label}: {s.data['run']['dir']}" for s in with_run),
                       "note"))
    return "\n".join(body)


# ----------------------------------------------------------------------------------------------- errors
def errors_table(with_errors: Sequence[PageSide]) -> str:
    """TIDE's dAP per error type (x 100), box and mask, each side and (two sides) this - against."""
    kinds = [k for k in ("box", "mask") if all(k in s.data["errors"]["types"] for s in with_errors)]
    two = len(with_errors) == 2

    def cells(kind: str, value: Callable[[dict], float]) -> list[str]:
        v = [100 * value(s.data["errors"]["types"][kind]) for s in with_errors]
        return [H.fmt(x, 2) for x in v + ([v[0] - v[1]] if two else [])]

    columns = [f"dAP {s.label}" for s in with_errors] + (["difference"] if two else [])
    header = ["error", "meaning"] + [f"{k} {what}" for k in kinds for what in columns]
    rows = [[name, meaning] + [c for k in kinds for c in cells(k, lambda e: e["dAP"][name])]
            for name, meaning in with_errors[0].data["errors"]["words"].items()]
    rows.append(["AP50", "the AP50 the oracles start from"] + [c for k in kinds for c in cells(k, lambda e: e["AP50"])])
    return H.table(header, rows, [["", ""] + ["num"] * (len(r) - 2) for r in rows])


def errors_section(sides: Sequence[PageSide]) -> str:
    """Where the AP is lost (TIDE's error types) and the pictures of the analysis, for each side with an
    evaluated run."""
    with_errors = [s for s in sides if "errors" in s.data]
    if not with_errors:
        return ""
    body = [H.h2("Errors: where the AP is lost", "errors"),
            H.para("TIDE's error types at foreground IoU 0.5, background 0.1: dAP is the AP50 (x 100) an oracle "
                   "fixing only that type would gain (a smaller dAP is better). From "
                   + "; ".join(f"{s.label}: {s.data['errors']['source']}" for s in with_errors)
                   + ".", "note"),
            errors_table(with_errors)]
    cols = []
    for s in with_errors:
        cols.append(H.h3(s.label) + "".join(H.picture(p, Path(p).stem, "figure") for p in s.data["errors"]["pictures"]))
    body.append(H.pair(cols))
    return "\n".join(body)


# -------------------------------------------------------------------------------------------- first day
def first_day_table(d: dict, o: dict) -> str:
    """The first-day numbers: the training data's objects and images, and the settings they suggest."""
    seconds = ("not measured" if d["seconds_per_iteration"] is None else
               f"{d['seconds_per_iteration']:.3f} (median of {d['timing_steps']} steps after a warm-up step, in "
               f"{d['timing_precision']['name']}: {d['timing_precision']['reason']})")
    return H.table(["", "value"], [
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
        ["seconds per training iteration (this machine)", seconds],
    ])


def first_day_section(sides: Sequence[PageSide]) -> str:
    body = []
    for s in sides:
        if "first_day" not in s.data:
            continue
        d = s.data["first_day"]
        body += [H.h2("First day with this data", "first-day"), first_day_table(d, s.data["objects"]),
                 H.para(f"the settings to start with ({d['minutes']:g} minutes of training):") + H.code_block(d["set"])]
    return "\n".join(body)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m maskrcnn.report.page DIR`: DIR/index.html again from DIR/report.json; 2 on bad input."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m maskrcnn.report.page",
                                description="Write DIR/index.html again from DIR/report.json (visualize.py report).")
    p.add_argument("dir", metavar="DIR", help="the folder of a report (DIR/report.json)")
    path = Path(p.parse_args(argv).dir) / "report.json"
    if not path.is_file():
        return error(f"{path}: no such file (visualize.py report writes it beside index.html)")
    try:
        print(write_page(path.parent))
    except json.JSONDecodeError as e:
        return error(f"{path}: not JSON ({e})")
    except (KeyError, TypeError, IndexError) as e:
        return error(f"{path}: not a report of visualize.py report ({type(e).__name__}: {e})")
    return 0


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
