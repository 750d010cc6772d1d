"""Robustness summary of a benchmark run, as in Michaelis et al. 2019, "Benchmarking Robustness in Object
Detection: Autonomous Driving when Winter is Coming":

    P   = the metric on clean images (COCO AP for boxes and for masks)
    mPC = mean performance under corruption = 1/Nc sum_c 1/Ns sum_s P_{c,s}   (15 corruptions x 5 severities)
    rPC = relative performance under corruption = mPC / P

`summarize` takes the metrics of the clean run and of each (corruption, severity) run and returns these numbers
with the per-corruption, per-severity table; `markdown` renders it. Nothing here runs a model.
"""
from __future__ import annotations

import math
from typing import Optional

from .corruptions import BENCHMARK_CORRUPTIONS

BENCHMARK_SEVERITIES = (1, 2, 3, 4, 5)


def headline(metrics: dict) -> dict[str, float]:
    """The metrics the benchmark averages: box and mask AP of a full model ('bbox', 'segm'), or proposal
    AR@100 / AR@1000 of an RPN-stage model."""
    if "AR@100" in metrics:
        return {k: float(v) for k, v in metrics.items() if k.startswith("AR@")}
    return {k: float(metrics[k]["stats"]["AP"]) for k in ("bbox", "segm") if k in metrics}


def summarize(clean: dict[str, float], corrupted: dict[tuple[str, int], dict[str, float]]) -> dict:
    """P, mPC and rPC per metric from headline numbers: `clean` {metric: value}, `corrupted`
    {(corruption, severity): {metric: value}}.

    mPC averages over severities within each corruption, then over corruptions (the paper's order; the same
    as the mean over all pairs when every corruption has every severity). `complete` says whether the runs
    are the whole benchmark (its 15 corruptions, each at severities 1..5), the only case comparable to
    published numbers."""
    if not corrupted:
        raise ValueError("no corrupted runs to summarize")
    names = list(dict.fromkeys(name for name, _ in corrupted))
    severities = sorted({sev for _, sev in corrupted})
    complete = (set(names) == set(BENCHMARK_CORRUPTIONS)
                and all((n, s) in corrupted for n in BENCHMARK_CORRUPTIONS for s in BENCHMARK_SEVERITIES))
    out = {"corruptions": names, "severities": severities, "complete": complete, "metrics": {}}
    for metric in clean:
        table: dict[str, dict] = {}
        for name in names:
            row = {str(s): corrupted[(name, s)][metric] for s in severities if (name, s) in corrupted}
            row["mean"] = sum(row.values()) / len(row)
            table[name] = row
        per_severity = {}
        for s in severities:
            vals = [corrupted[(n, s)][metric] for n in names if (n, s) in corrupted]
            per_severity[str(s)] = sum(vals) / len(vals)
        p = float(clean[metric])
        mpc = sum(row["mean"] for row in table.values()) / len(table)
        out["metrics"][metric] = {"P": p, "mPC": mpc, "rPC": mpc / p if p > 0 else None,
                                  "per_corruption": table, "per_severity": per_severity}
    return out


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown(summary: dict, labels: Optional[dict[str, str]] = None) -> str:
    """One Markdown table per metric: a row per corruption (AP x 100 at each severity and the mean), a row of
    means per severity, then P, mPC and rPC (%)."""
    labels = labels or {"bbox": "box AP", "segm": "mask AP"}
    sevs = [str(s) for s in summary["severities"]]
    parts = []
    for metric, m in summary["metrics"].items():
        label = labels.get(metric, metric)
        scope = "" if summary["complete"] else \
            f" (subset: {len(summary['corruptions'])} corruptions x {len(sevs)} severities, not comparable " \
            f"to the published benchmark)"
        lines = [f"**{label}**: P {_pct(m['P'])}, mPC {_pct(m['mPC'])}, rPC {_pct(m['rPC'])} %{scope}", "",
                 "| corruption | " + " | ".join(f"s{s}" for s in sevs) + " | mean |",
                 "|---|" + "---:|" * (len(sevs) + 1)]
        for name, row in m["per_corruption"].items():
            cells = [_pct(row[s]) if s in row else "" for s in sevs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(row['mean'])} |")
        lines.append("| **mean** | " + " | ".join(_pct(m["per_severity"][s]) for s in sevs)
                     + f" | **{_pct(m['mPC'])}** |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
