"""Smoke test of the benchmark (`python -m maskrcnn.bench --quick`): it runs end to end, prints the table and
writes the JSON. The numbers of a quick run are not measurements (no warm-up, one repeat, tiny heads)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn import bench

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "maskrcnn.bench", "--quick", "--threads", "1", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "training step" in proc.stdout
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["rows"]]
    for expected in ("training step", "inference", "RoIAlign fwd+bwd", "anchors + proposal selection",
                     "paste 100 masks", "training memory"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    for row in result["rows"]:
        assert row["ratio"] > 0
    timed = [r for r in result["rows"] if "ours_ms" in r]
    assert all(r["ours_ms"] > 0 and r["torchvision_ms"] > 0 for r in timed)
    memory = next(r for r in result["rows"] if r["name"].startswith("training memory"))
    assert memory["ours_mb"] > 100 and memory["torchvision_mb"] > 100  # a real process with a real model
    assert result["settings"]["depth"] == 18 and result["environment"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_cuda_without_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err
