"""Check a COCO-format dataset up front: every problem, counted by kind, before any training.

Training (:class:`maskrcnn.data.coco.CocoInstances`) stops on the first error
it meets, possibly hours in when a bad image is finally loaded.  This reports
all of them at once, by the rule functions training applies (all in
:mod:`maskrcnn.data.rules`: ``scan_coco`` for the JSON; ``check_image_file``,
``decode_instance`` and ``mask_problem`` for pixels); this module is the
command line and the report:

* **errors**: training would stop (malformed records, unknown ids, duplicate
  ids, images missing/unreadable/of the wrong size, masks empty or outside their box);
* **warnings**: training repairs silently (degenerate boxes dropped, boxes
  clipped to the image, sub-pixel slivers skipped, images without a usable
  instance left out of training), counted so that nothing is lost unseen.

CLI (exit status 0: no errors, 1: errors, 2: a path is missing)::

    python -m maskrcnn.data.check ANNOTATIONS IMAGES [--workers N] [--no-images]

Python::

    report = check_dataset_files("ann.json", "images/", workers=8)
    if not report.ok:
        print(report.summary())
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from .rules import (ERROR, CocoScan, DatasetError, Problem, Problems, all_degenerate_problem, check_image_file,
                    decode_instance, mask_problem, read_coco_json, scan_coco, training_box, trains_as_instance)

__all__ = ["CheckReport", "CheckOptions", "check_dataset_files", "check_coco_data"]


@dataclass
class CheckReport(Problems):
    """Everything found in one dataset.  ``ok`` means training will not stop on the data."""

    ann_file: str
    image_dir: str | None
    problems: list[Problem] = field(default_factory=list)
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    images_checked: int = 0  # image files opened (0 with images=False)

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(severity, kind): count}``, errors first, then by decreasing count."""
        c = Counter((p.severity, p.kind) for p in self.problems)
        return dict(sorted(c.items(), key=lambda kv: (kv[0][0] != ERROR, -kv[1], kv[0][1])))

    def summary(self, examples: int = 3) -> str:
        """Counts per kind of problem with the first ``examples`` messages of each."""
        checked = (f"{self.images_checked} image files opened" if self.image_dir is not None
                   else "image files not checked")
        lines = [f"{self.ann_file}: {self.num_images} images, {self.num_annotations} annotations, "
                 f"{self.num_categories} categories; {checked}"]
        shown: Counter[tuple[str, str]] = Counter()
        by_kind: dict[tuple[str, str], list[str]] = {}
        for p in self.problems:
            key = (p.severity, p.kind)
            if shown[key] < examples:
                by_kind.setdefault(key, []).append(p.message)
                shown[key] += 1
        for (severity, kind), n in self.counts().items():
            lines.append(f"{severity} {kind}: {n}")
            lines.extend(f"    {m}" for m in by_kind[(severity, kind)])
            if n > examples:
                lines.append(f"    ... and {n - examples} more")
        n_err, n_warn = len(self.errors), len(self.warnings)
        if n_err:
            lines.append(f"FAILED: {n_err} error(s), {n_warn} warning(s): training would stop on this data")
        else:
            lines.append(f"OK: no errors, {n_warn} warning(s)" + (" (repaired silently by training)"
                                                                 if n_warn else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckOptions:
    """How a check runs: the keyword arguments of :func:`check_dataset_files` and :func:`check_coco_data`."""

    workers: int | None = None  # threads (or processes) opening images; default min(8, CPUs)
    progress: bool = True  # a tqdm bar on stderr
    min_box_size: float = 1.0  # as in CocoInstances: smaller boxes are dropped by training (a warning)
    processes: bool = False  # a process pool instead of threads


Instance = tuple[dict[str, Any], tuple[float, float, float, float]]  # an annotation and the box it trains with
# One image and the instances training would decode from it; a top-level
# function checks it so that a process pool can pickle it.
_Task = tuple[str, str, dict[str, Any], list[Instance]]


def _check_image(task: _Task) -> list[Problem]:
    source, path, info, instances = task
    _, problem = check_image_file(path, info, source)
    found = [problem] if problem is not None else []
    h, w = info["height"], info["width"]  # the JSON's size: masks are checkable even if the file is not
    for ann, box in instances:
        mask, problem = decode_instance(ann, h, w, source)
        if problem is None:
            problem = mask_problem(ann, mask, box, source)
        if problem is not None:
            found.append(problem)
    return found


def _training_instances(data: dict[str, Any], scan: CocoScan, source: str,
                        min_box_size: float) -> tuple[dict[int, list[Instance]], Problem | None]:
    """The instances training decodes, by image id (error-free, non-crowd, non-degenerate box, on a well-formed
    image), and the problem of a dataset whose every box is degenerate."""
    instances: dict[int, list[Instance]] = {}
    candidates = []
    for k, ann in enumerate(data["annotations"]):
        if k in scan.bad_annotations or not trains_as_instance(ann) or ann["image_id"] not in scan.sizes:
            continue
        candidates.append(ann)
        h, w = scan.sizes[ann["image_id"]]
        box = training_box(ann, w, h, min_box_size)
        if box is not None:
            instances.setdefault(ann["image_id"], []).append((ann, box))
    return instances, all_degenerate_problem(source, candidates, scan.sizes, min_box_size)


def _check_images(report: CheckReport, tasks: list[_Task], options: CheckOptions) -> None:
    """Every image file and its instances' masks, in parallel, into ``report``."""
    workers = options.workers or min(8, os.cpu_count() or 1)
    pool: Executor = ProcessPoolExecutor(workers) if options.processes else ThreadPoolExecutor(workers)
    with pool:
        # Threads suffice: image decoding (OpenCV) releases the GIL.
        results: Iterator[list[Problem]] = pool.map(_check_image, tasks, chunksize=16 if options.processes else 1)
        for found in tqdm(results, total=len(tasks), desc="checking images", unit="img",
                          disable=not options.progress, file=sys.stderr):
            report.problems.extend(found)
            report.images_checked += 1


def check_coco_data(data: Any, source: str, image_dir: str | os.PathLike[str] | None,
                    **options: Any) -> CheckReport:
    """Check an already-parsed COCO dict (see :func:`check_dataset_files`; ``options``: :class:`CheckOptions`)."""
    opts = CheckOptions(**options)
    scan = scan_coco(data, source, opts.min_box_size)
    report = CheckReport(source, None if image_dir is None else os.fspath(image_dir), list(scan.problems))
    if not isinstance(data, dict) or any(p.kind == "json-structure" for p in scan.problems):
        return report
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"])
    report.num_categories = len(data["categories"])
    instances, problem = _training_instances(data, scan, source, opts.min_box_size)
    if problem is not None:
        report.problems.append(problem)
    if image_dir is not None:
        tasks = [(source, os.fspath(Path(image_dir) / info["file_name"]), info, instances.get(image_id, []))
                 for image_id, info in scan.images.items()]
        _check_images(report, tasks, opts)
    return report


def check_dataset_files(ann_file: str | os.PathLike[str], image_dir: str | os.PathLike[str] | None,
                        **options: Any) -> CheckReport:
    """Check a COCO instances file and (unless ``image_dir`` is None) its images and masks.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder that ``file_name`` entries are relative to; None checks the JSON only.
        options: ``workers``, ``progress``, ``min_box_size``, ``processes`` (see :class:`CheckOptions`).

    Raises:
        DatasetError: ``image_dir`` is given but is not a folder.

    A file that is missing or not JSON is reported as an error, not raised.
    """
    source = os.fspath(ann_file)
    if image_dir is not None and not Path(image_dir).is_dir():
        raise DatasetError(f"{os.fspath(image_dir)}: image directory not found (for {source})")
    try:
        data = read_coco_json(ann_file)
    except DatasetError as e:
        kind = "file-missing" if not Path(ann_file).is_file() else "json-invalid"
        return CheckReport(source, None if image_dir is None else os.fspath(image_dir), [Problem(kind, str(e))])
    return check_coco_data(data, source, image_dir, **options)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m maskrcnn.data.check",
        description="Report every problem of a COCO-format instance segmentation dataset, by the rules "
                    "training applies. Exit status: 0 no errors (warnings are what training repairs silently), "
                    "1 errors (training would stop), 2 a path is missing.")
    p.add_argument("annotations", help="COCO instances JSON")
    p.add_argument("images", nargs="?", help="folder the images' file_name entries are relative to "
                                             "(not needed with --no-images)")
    p.add_argument("--no-images", action="store_true", help="check the JSON only (quick): no image or mask decoding")
    p.add_argument("--workers", type=int, default=None, help="parallel image checks (default: min(8, CPUs))")
    p.add_argument("--processes", action="store_true", help="a process pool instead of threads")
    p.add_argument("--min-box-size", type=float, default=1.0,
                   help="boxes smaller than this (px, after clipping) are dropped by training: a warning "
                        "(the config's data.min_box_size: 1.0, the COCO preset 1e-5)")
    p.add_argument("--examples", type=int, default=3, help="messages shown per kind of problem")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not Path(a.annotations).is_file():
        print(f"error: {a.annotations}: annotation file not found", file=sys.stderr)
        return 2
    if not a.no_images:
        if a.images is None:
            print("error: give the IMAGES folder, or --no-images to check the JSON only", file=sys.stderr)
            return 2
        if not Path(a.images).is_dir():
            print(f"error: {a.images}: image directory not found", file=sys.stderr)
            return 2
    report = check_dataset_files(a.annotations, None if a.no_images else a.images, workers=a.workers,
                                 progress=not a.quiet, min_box_size=a.min_box_size, processes=a.processes)
    print(report.summary(a.examples))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
