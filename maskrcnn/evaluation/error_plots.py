"""Pictures and tables of the error analysis (maskrcnn/evaluation/errors.py), drawn from the metrics alone (an
`eval_<set>_<tag>.json` pass or a run's `metrics.json` "val" entry), so that any evaluation can be drawn again.

    analysis_pictures(metrics, out_dir, image_set, tag)  -> the PNGs (named by outputs.py) and the confusion tables
    run_analysis(run_dir)                                -> the pictures and tables of a run's clean evaluation
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import outputs
from .errors import CURVES, IOU_TYPES, RECALLS, category_table, error_table

# COCO analyze()'s colours, from C75 (dark) to FN (light)
CURVE_COLOURS = ["#1f3b73", "#2e6fb0", "#4c9bd6", "#7fc3e8", "#f5a65b", "#e8604c", "#f3e3c3"]


def pr_figure(metrics: dict, title: str = ""):
    """COCO analyze()'s stacked PR curves (C75 .. FN): a row per iou type, a column per area (all, small, medium,
    large); the legend gives each AP."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = [(t, name) for t, name in IOU_TYPES if "errors" in metrics.get(t, {})]
    areas = ["all", "small", "medium", "large"]
    fig, axes = plt.subplots(len(types), len(areas), figsize=(4 * len(areas), 3.6 * len(types)), squeeze=False)
    for row, (t, name) in zip(axes, types):
        for ax, area in zip(row, areas):
            pr = metrics[t]["errors"]["pr_breakdown"]
            pr = pr if area == "all" else pr.get("by_area", {}).get(area)
            if pr is None or pr.get("classes_with_gt", 1) == 0:
                ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}, {area}")
                ax.text(0.5, 0.5, "no objects of this size", ha="center", va="center")
                continue
            below = np.zeros(len(RECALLS))
            for curve, colour in zip(CURVES, CURVE_COLOURS):
                y = np.asarray(pr["curves"][curve])
                ax.fill_between(RECALLS, below, y, color=colour, label=f"[{pr['AP'][curve]:.3f}] {curve}")
                below = np.maximum(below, y)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision", title=f"{name}, {area}")
            ax.legend(loc="lower left", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: dict, title: str = ""):
    """The confusion matrix, each GT row as fractions of its row (counts written in the cells when few classes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = confusion["classes"]
    m = np.asarray(confusion["matrix"], dtype=np.float64)
    frac = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(names)
    side = min(16, 2 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), names, fontsize=8 if n > 20 else 10)
    ax.set(xlabel="detected as", ylabel="ground truth",
           title=f"{title} confusion at IoU {confusion['iou']}, score >= {confusion['score_threshold']}".strip())
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the row")
    fig.tight_layout()
    return fig


def confusion_markdown(confusion: dict) -> str:
    """The confusion matrix as a Markdown table: rows the GT class, columns the detected class (counts)."""
    names = confusion["classes"]
    lines = ["| GT \\ detected | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, confusion["matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def analysis_pictures(metrics: dict, out_dir: Path, image_set: str, tag: str) -> dict:
    """Writes the PR breakdown (one PNG, box and mask panels), each iou type's confusion matrix (PNG and
    Markdown) into `out_dir`, named by outputs.analysis_file; returns {"pictures": [paths], "tables": [paths]}.
    Nothing for metrics without an error analysis (an RPN stage's AR)."""
    import matplotlib.pyplot as plt

    written: dict[str, list[Path]] = {"pictures": [], "tables": []}
    if not any("errors" in metrics.get(t, {}) for t, _ in IOU_TYPES):
        return written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = pr_figure(metrics, f"({image_set}, {tag})")
    path = out_dir / outputs.analysis_file(image_set, tag, "pr", "png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written["pictures"].append(path)
    for t, name in IOU_TYPES:
        if "errors" not in metrics.get(t, {}):
            continue
        confusion = metrics[t]["errors"]["confusion"]
        fig = confusion_figure(confusion, name)
        path = out_dir / outputs.analysis_file(image_set, tag, f"confusion-{name}", "png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written["pictures"].append(path)
        table = out_dir / outputs.analysis_file(image_set, tag, f"confusion-{name}", "md")
        table.write_text(confusion_markdown(confusion) + "\n")
        written["tables"].append(table)
    return written


def run_analysis(run_dir: Path, split: str = "val", draw: bool = True, out_dir: Optional[Path] = None
                 ) -> Optional[dict]:
    """For a report page: the error analysis of a run's clean evaluation (evaluate.py's `eval_<set>_clean.json`,
    every image if there is one, else the most; else the training's own `metrics.json`): {"source", "image_set",
    "pictures" (PNG paths: those beside the evaluation, else drawn into `out_dir` (default: the run directory) if
    `draw`), "tables" (Markdown paths), "category_table", "error_table" (text), "errors" ({"box"/"mask": {"AP50",
    "dAP", "counts"}})}; None where the run has no such evaluation."""
    run_dir = Path(run_dir)
    found = outputs.clean_metrics(run_dir, split)
    if found is None:
        return None
    path, image_set, tag, metrics = found
    types = [(t, n) for t, n in IOU_TYPES if "errors" in metrics.get(t, {})]
    if not types:
        return None
    kinds = ["pr"] + [f"confusion-{n}" for t, n in types]
    names = {"pictures": [run_dir / outputs.analysis_file(image_set, tag, kind, "png") for kind in kinds],
             "tables": [run_dir / outputs.analysis_file(image_set, tag, kind, "md") for kind in kinds[1:]]}
    if draw and not all(p.is_file() for p in names["pictures"] + names["tables"]):
        names = analysis_pictures(metrics, run_dir if out_dir is None else out_dir, image_set, tag)
    errors = {n: {k: metrics[t]["errors"][k] for k in ("AP50", "dAP", "counts")} for t, n in types}
    return {"source": str(path), "image_set": image_set, **names, "errors": errors,
            "category_table": category_table(metrics), "error_table": error_table(metrics)}
