"""The names of evaluate.py's files: one name, one evaluation.

An evaluation is named by its image set and by what it evaluates, and every file it writes carries that name:

  image set   `<split>` (every image of the split) or `<split>-first<N>` (the first N, --max-images N)
  tag         clean | <corruption>-<severities> | all-<severities> | benchmark
  files       eval_<set>_<tag>.json              metrics (with the image set and its number of images)
              detections_<set>_<tag>.json        detections of a one-pass evaluation (clean, or one corruption at
                                                 one severity)
              detections_<set>_<tag>_<pass>.json one per pass of the others (benchmark: clean, gaussian_noise-3, ...)
              benchmark_<set>.md                 the benchmark's table
              pr_<set>_<tag>.png                 COCO analyze()'s PR breakdown, box and mask (one-pass evaluations)
              confusion-<box|mask>_<set>_<tag>.png / .md   the confusion matrix, picture and table

So the clean pass of a benchmark on the first 20 images (detections_val-first20_benchmark_clean.json) never
replaces the clean evaluation of every image (detections_val_clean.json), and compare.py, the report and
experiment.py read the evaluation they mean.
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Optional

METRICS = re.compile(r"eval_(?P<set>(?P<split>train|val)(?:-first(?P<n>\d+))?)_(?P<tag>.+)\.json")


def image_set(split: str, max_images: int, total: int) -> str:
    """`split` when every one of its `total` images is evaluated, else `<split>-first<N>`."""
    n = total if max_images <= 0 else min(max_images, total)
    return split if n >= total else f"{split}-first{n}"


def metrics_file(image_set: str, tag: str) -> str:
    return f"eval_{image_set}_{tag}.json"


def detections_file(image_set: str, tag: str, pass_tag: str, one_pass: bool) -> str:
    """The detections of one pass (`clean`, `gaussian_noise-3`, ...) of the evaluation `tag`."""
    return f"detections_{image_set}_{tag}.json" if one_pass else f"detections_{image_set}_{tag}_{pass_tag}.json"


def analysis_file(image_set: str, tag: str, kind: str, ext: str) -> str:
    """A picture or table of the error analysis: `kind` is `pr` or `confusion-box` / `confusion-mask`."""
    return f"{kind}_{image_set}_{tag}.{ext}"


def benchmark_table_file(image_set: str) -> str:
    return f"benchmark_{image_set}.md"


def find_metrics(run_dir: Path, split: str, tag: str) -> Optional[tuple[str, Path]]:
    """(image set, path) of the evaluation `tag` (a glob: `all-*` matches every severity) of `split` in
    `run_dir`: the one on every image of the split if there is one, else the one on the most images; None if
    there is none."""
    found = []
    for path in run_dir.glob(f"eval_{split}*_{tag}.json"):
        m = METRICS.fullmatch(path.name)
        if m and m["split"] == split and fnmatch.fnmatchcase(m["tag"], tag):
            whole = m["n"] is None
            found.append((whole, int(m["n"] or 0), path.name, m["set"], path))
    if not found:
        return None
    *_, found_set, path = max(found)
    return found_set, path


def clean_metrics(run_dir: Path, split: str = "val") -> Optional[tuple[Path, str, str, dict]]:
    """(source file, image set, tag, metrics) of a run's clean evaluation: evaluate.py's (every image if there is
    one, else the most), else the training's own metrics.json entry for `split` (tag "training"); None if neither."""
    import json

    found = find_metrics(run_dir, split, "clean")
    if found:
        image_set, path = found
        return path, image_set, "clean", json.loads(path.read_text())["results"]["clean"]
    path = Path(run_dir) / "metrics.json"
    if path.is_file():
        return path, split, "training", json.loads(path.read_text()).get(split, {})
    return None
