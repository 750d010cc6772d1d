"""Run the tests whose verdict depends on a training trajectory (`pytest -m trains`) under variations that move
the low-order bits of training as another CPU does, and print every thresholded statistic next to its threshold.

    python tests/variations.py                       # 3 seeds x (2 threads, 1 thread, AVX2, SSE): 12 pytest runs
    python tests/variations.py --seeds 1 --variations 1t      # one of them
    python tests/variations.py -- -k overfit         # arguments after -- go to pytest

A variation is a seed of the training fixtures (MASKRCNN_TEST_SEED) and one of:
  2t    two threads (the suite's default)
  1t    one thread (MASKRCNN_TEST_THREADS=1, OMP_NUM_THREADS=1): float sums in another order
  avx2  two threads with ATen, oneDNN and MKL limited to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
        MKL_ENABLE_INSTRUCTIONS=AVX2): other kernels, and bf16 emulated instead of native (on a CPU whose best
        is AVX2 this is the same as 2t)
  sse   two threads with ATen's scalar kernels and oneDNN and MKL limited to SSE4.1/4.2 (ATEN_CPU_CAPABILITY=default
        ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2): other kernels on every x86 CPU, and slower
Each test states its statistics through tests/conftest.py's `margin` fixture; the table has one row per
statistic, the value under each variation, and the worst margin (how far the worst value is from the
threshold, relative to the threshold; for a lower bound on a statistic with a limit of its own, such as a cosine,
an IoU or a fraction, which can never pass 1, relative to the room the threshold leaves below that limit). The
exit status is 1 if any pytest run failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VARIATIONS = {
    "2t": {"MASKRCNN_TEST_THREADS": "2"},
    "1t": {"MASKRCNN_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "avx2": {"MASKRCNN_TEST_THREADS": "2", **AVX2},
    "sse": {"MASKRCNN_TEST_THREADS": "2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def margin_of(value: float, op: str, threshold: float, limit: float | None = None) -> float:
    """How far `value` is on the passing side of `threshold` (negative: failed), relative to the threshold: a loss
    drop of 0.06 against >= 0.015 is +300%. For a lower bound on a statistic whose own limit is given (`limit`: 1
    for a cosine, an IoU, a fraction), relative to the room the threshold leaves below the limit: a cosine of
    0.9998 against >= 0.999 is 80% of the way from the threshold to 1."""
    if math.isinf(value):
        return -math.inf
    room = value - threshold if op.startswith(">") else threshold - value
    if op.startswith(">") and limit is not None and threshold < limit:
        return room / (limit - threshold)
    return room / abs(threshold) if threshold else room


def table(records: list[dict], columns: list[str]) -> str:
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        row = rows.setdefault((r["test"], r["statistic"]),
                              {"op": r["op"], "threshold": r["threshold"], "limit": r.get("limit"), "values": {}})
        # a statistic checked several times in one test (per image, per kind) keeps its worst value
        old = row["values"].get(r["column"])
        if old is None or (margin_of(r["value"], r["op"], r["threshold"], row["limit"])
                           < margin_of(old, r["op"], r["threshold"], row["limit"])):
            row["values"][r["column"]] = r["value"]
    width = max(6, *(len(c) for c in columns))
    lines = [f"{'statistic':<72} {'threshold':>12} " + " ".join(f"{c:>{width}}" for c in columns) + "  worst margin"]
    for (test, stat), row in rows.items():
        values = [row["values"].get(c) for c in columns]
        margins = [margin_of(v, row["op"], row["threshold"], row["limit"]) for v in values if v is not None]
        name = f"{test.split('::')[-1]}: {stat}"
        cells = " ".join(f"{'-' if v is None else f'{v:.4g}':>{width}}" for v in values)
        worst = f"{min(margins):+.0%}" if margins else "-"
        bound = f"{row['op']} {row['threshold']:g}"
        lines.append(f"{name[:72]:<72} {bound:>12} {cells}  {worst}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tests/variations.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fixture seeds (default: 0 1 2)")
    p.add_argument("--variations", nargs="+", default=list(VARIATIONS), choices=list(VARIATIONS),
                   help="default: all")
    p.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (-k, file names)")
    args = p.parse_args(argv)
    columns, records, failed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.variations:
                column = f"s{seed}/{name}"
                columns.append(column)
                out = Path(tmp) / f"{column.replace('/', '-')}.jsonl"
                env = {**os.environ, **VARIATIONS[name], "MASKRCNN_TEST_SEED": str(seed), "MASKRCNN_MARGINS": str(out)}
                start = time.time()
                print(f"[{column}] pytest -m trains ...", flush=True)
                done = subprocess.run([sys.executable, "-m", "pytest", "-m", "trains", "-q",
                                       *args.pytest_args], cwd=ROOT, env=env, capture_output=True, text=True)
                summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
                print(f"[{column}] {summary} ({time.time() - start:.0f} s)", flush=True)
                if done.returncode != 0:
                    failed.append(column)
                    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
                if out.is_file():
                    records += [{**json.loads(line), "column": column} for line in out.read_text().splitlines()]
    print()
    print(table(records, columns))
    print()
    if failed:
        print(f"failed: {', '.join(failed)}")
    print(f"variations: {len(columns) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
