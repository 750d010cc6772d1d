"""`visualize.py report`: the weekly anchor and proposal check-up, one page, this checkpoint against another.

    python visualize.py report --checkpoint runs/full/model_final.pth --against runs/last-week/model_final.pth --out rep
    python visualize.py report --config configs/shapes.yaml --set ... --out rep      # first day: no checkpoint

writes `rep/report.json` (every number on the page, measured by maskrcnn/report/measure.py) and then
`rep/index.html` rendered from it alone (maskrcnn/report/page.py; pictures in `rep/img/`, linked relatively).
Sections: a summary (with --against: differences, better green, worse red), the seven views on N validation
images, anchor fit over the training set, anchor suggestions (k-means, IoU distance), proposal recall and the
worst-covered objects, the run's losses and AP/AR, and without a checkpoint the first-day numbers (object sizes,
suggested settings, seconds per iteration).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from ..vis import html as H
from ..vis.report_figures import figure_losses
from . import measure as M
from .page import write_page


def make_report(args, default_config: str) -> tuple[Path, list[str]]:
    """Run `visualize.py report`: (path of index.html, lines to print)."""
    from tqdm import tqdm

    from ..data.build import build_eval_dataset

    start = time.perf_counter()
    out = Path(args.out)
    check_args(args)
    sides = [M.load_side("this", args.checkpoint, args.config, args.set, args.device, args.seed, default_config)]
    if args.against:
        sides.append(M.load_side("against", args.against, args.config, args.set, args.device, args.seed,
                                 default_config))
    data = [(build_eval_dataset(s.cfg, "train"), build_eval_dataset(s.cfg, "val")) for s in sides]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=progress_total(args, sides, data), desc="report", disable=not args.progress, dynamic_ncols=True)
    try:
        for s, (train_set, val_set) in zip(sides, data):
            measure_side(s, sides[0], train_set, val_set, out, args, bar.set_description, bar.update)
    finally:
        bar.close()
    losses = figure_losses([(s.label, s.stats.get("run", {}).get("scalars", {})) for s in sides], out)
    rows = M.summary_rows(sides)
    seconds = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(M.report_json(sides, rows, seconds, losses), indent=1))
    page = write_page(out)
    return page, summary_lines(sides, rows, seconds, out)


def check_args(args) -> None:
    if args.images < 0:
        raise ValueError(f"--images must be >= 0, got {args.images}")
    if args.against and not args.checkpoint:
        raise ValueError("--against compares two checkpoints: give --checkpoint too")


def train_images(args, train_set) -> int:
    return len(train_set) if args.train_images <= 0 else min(args.train_images, len(train_set))


def progress_total(args, sides: Sequence[M.Side], data: list) -> int:
    """The progress bar's steps: images drawn, training images fitted (4 passes), validation images probed and
    timed training steps."""
    total = 0
    for s, (train_set, val_set) in zip(sides, data):
        n_val = len(val_set) if args.val_images <= 0 else min(args.val_images, len(val_set))
        total += min(args.images, len(val_set)) + 4 * train_images(args, train_set) + (n_val if s.has_weights else 0)
        total += 0 if s.has_weights else args.timing_steps + 1
    return total


def measure_side(s: M.Side, first: M.Side, train_set, val_set, out: Path, args, say: Callable[[str], None],
                 tick: Callable[..., None]) -> None:
    """Every section of one side, in the order the progress bar counts them."""
    say(f"report {s.label}: views")
    M.view_section(s, val_set, out, args.images, args.seed, args.score_thresh, args.top, args.palette, tick)
    if s.has_weights:
        say(f"report {s.label}: proposals")
        M.proposal_section(s, val_set, out, args.val_images, args.seed, tick)
    say(f"report {s.label}: anchor fit")
    if s is not first and M.anchor_key(s, args.train_images) == M.anchor_key(first, args.train_images):
        # the same data, resize, anchors and matcher: the same fit
        s.stats.update(anchor_fit=first.stats["anchor_fit"], objects=first.stats["objects"])
        s.pictures.update(anchor_fit=first.pictures["anchor_fit"], shapes=first.pictures["shapes"])
        tick(4 * train_images(args, train_set))
    else:
        M.anchor_section(s, train_set, out, args.train_images, args.seed, tick)
    M.read_run(s)
    M.error_analysis(s, out)
    if not s.has_weights:
        say(f"report {s.label}: timing")
        M.first_day(s, train_set, args.minutes, args.timing_steps, tick)


def summary_lines(sides: Sequence[M.Side], rows: list[dict], seconds: float, out: Path) -> list[str]:
    """What the command prints: the first summary rows, the lines to try, where the report is."""
    lines = [f"{r['metric']}: " + ", ".join(f"{s.label} {H.fmt(r.get(s.label))}" for s in sides)
             + (f" ({r['verdict']})" if "verdict" in r else "") for r in rows[:8]]
    if "suggestion" in sides[0].stats.get("anchor_fit", {}):
        lines.append("anchors to try: " + sides[0].stats["anchor_fit"]["suggestion"]["set"])
    if "first_day" in sides[0].stats:
        lines.append("first-day settings: " + sides[0].stats["first_day"]["set"])
    return lines + [f"report written in {seconds:.1f} s", str(out / "report.json")]
