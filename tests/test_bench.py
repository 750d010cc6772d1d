"""Smoke test of the benchmark (`python -m maskrcnn.bench --quick`): it runs end to end, prints the table and
writes the JSON. The numbers of a quick run are not measurements (no warm-up, one repeat, tiny heads)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn import bench, cli

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_table_and_json(tmp_path):
    """--bf16 always: the bf16 rows on any CPU (emulated ones with one warm-up and one repeat)."""
    out = tmp_path / "results" / "bench.json"  # a folder that does not exist yet: made at the start
    proc = subprocess.run([sys.executable, "-m", "maskrcnn.bench", "--quick", "--threads", "1", "--device", "cpu",
                           "--bf16", "always", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "training step" in proc.stdout
    result = json.loads(out.read_text())
    # The printout and the JSON start with what the bf16 rows depend on.
    native, evidence = bench.cpu_bf16_native()
    assert list(result)[0] == "cpu" and result["cpu"]["bf16_native"] == native
    assert result["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert proc.stdout.splitlines()[0] == bench.cpu_line(result["cpu"]) and evidence in proc.stdout.splitlines()[0]
    # and the process settings both models ran under: freed memory kept on glibc (maskrcnn.cli.keep_freed_memory)
    assert result["cpu"]["freed_memory_kept"] is (cli.glibc() and not cli.users_malloc_settings())
    names = [r["name"] for r in result["rows"]]
    for expected in ("training step", "inference", "RoIAlign fwd+bwd", "anchors + proposal selection",
                     "paste 100 masks", "mask targets", "training memory"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    bf16_rows = [n for n in names if "ours bf16" in n and n.endswith("tv fp32")]  # CPU: ours bf16, torchvision fp32
    assert [n.split(" (")[0] for n in bf16_rows] == ["training step", "inference"], names
    # and against torchvision under bf16 autocast: a row, or a note saying why it could not run
    peer = [n for n in names if "ours bf16" in n and n.endswith("tv bf16 autocast")]
    peer_notes = [n for n in result["notes"] if "tv bf16 autocast: not measured" in n]
    assert len(peer) + len(peer_notes) == 2, (names, result["notes"])
    assert not any(n.startswith("load + validate") for n in names)  # the COCO-sized file only on request
    for row in result["rows"]:
        if "extra peak memory" in row["name"]:  # a quick run's tiny masks may need no extra memory at all
            assert row["ours_mb"] >= 0 and row["torchvision_mb"] >= 0
            continue
        assert row["ratio"] > 0
    timed = [r for r in result["rows"] if "ours_ms" in r]
    assert all(r["ours_ms"] > 0 and r["torchvision_ms"] > 0 for r in timed)
    # each timed row keeps its repeats' own ratios (a quick run: one repeat each) and prints their range
    assert all(len(r["repeat_ratios"]) == 1 and r["ratio_range"] == r["repeat_ratios"] * 2 for r in timed), timed
    memory = next(r for r in result["rows"] if r["name"].startswith("training memory"))
    assert memory["ours_mb"] > 100 and memory["torchvision_mb"] > 100  # a real process with a real model
    assert "mmap threshold fixed" in memory["name"]  # the children ran with bench.MEMORY_CHILD_ENV
    assert result["settings"]["depth"] == 18 and result["environment"]["device"] == "cpu"
    # the fp32 rows carry the project's CPU targets, printed beside them
    fp32 = {k: next(r for r in result["rows"] if r["name"].startswith(prefix) and "bf16" not in r["name"])
            for k, prefix in (("training", "training step"), ("inference", "inference"), ("memory", "training memory"))}
    assert {k: r["target"] for k, r in fp32.items()} == {"training": 0.75, "inference": 0.6, "memory": 0.9}
    table = [line for line in proc.stdout.splitlines() if line.startswith(fp32["training"]["name"])]
    assert table and table[-1].rstrip().endswith("<= 0.75"), table


def test_memory_children_run_with_the_fixed_mmap_threshold(monkeypatch):
    """Both models' fresh processes get MEMORY_CHILD_ENV (so their peak RSS follows their live memory)."""
    envs = []

    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps({"peak_mb": 1.0, "setup_mb": 0.5})

    def fake_run(cmd, **kwargs):
        envs.append(kwargs.get("env") or {})
        return Done()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.measure_memory(bench.Settings(), {"w": torch.zeros(1)}, steps=1, runs=1)
    assert len(envs) == 2 and all(e.get("MALLOC_MMAP_THRESHOLD_") == "131072" for e in envs)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_rows_follow_the_cpu(monkeypatch, native):
    """--bf16 auto times the bf16 rows only where bfloat16 is native; elsewhere a note says why they are skipped
    and how to measure them. never skips them anywhere."""
    monkeypatch.setattr(bench, "cpu_bf16_native", lambda: (native, "CPU capability TEST"))
    monkeypatch.setattr(bench, "compare", lambda *a, **k: bench.Timing(1.0, 2.0, [0.5]))
    monkeypatch.setattr(bench, "fold_batchnorm", lambda m: m)
    monkeypatch.setattr(bench, "to_torchvision", lambda state: state)

    class Model(torch.nn.Conv2d):  # stands in for both models: nothing here is run
        def load_state_dict(self, *args, **kwargs):
            return None

    model = Model(1, 1, 1)
    for mode, expect_rows in (("auto", native), ("always", True), ("never", False)):
        rows, notes = [], []
        s = bench.Settings(bf16=mode)
        bench.bf16_rows(s, model, model, {}, [], [], "tag", lambda name, *a, **k: rows.append(name), notes,
                        lambda line: None)
        assert (len(rows) == 4) == expect_rows, (mode, rows)  # ours bf16 against tv fp32 and tv bf16 autocast
        assert bool(notes) == (not expect_rows), (mode, notes)
        if mode == "auto" and not native:
            assert "no native bfloat16" in notes[0] and "--bf16 always" in notes[0]
        if mode == "always" and not native:
            assert all("emulated" in r for r in rows)


def test_compare_keeps_each_repeats_ratio_and_the_table_prints_their_range(monkeypatch):
    """The ratio is of the medians; beside it the range of the repeats' own ratios (each repeat's pair measured
    back to back, who goes first alternating), from which a reader sees how far one run's ratio moves."""
    clock = iter([0.0, 1.0, 1.0, 3.0,   # repeat 0: ours 1 s, then torchvision 2 s
                  3.0, 7.0, 7.0, 10.0,  # repeat 1: torchvision 4 s first, then ours 3 s
                  10.0, 12.0, 12.0, 14.0])  # repeat 2: ours 2 s, torchvision 2 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls = []
    timing = bench.compare(lambda: calls.append("ours"), lambda: calls.append("tv"),
                           bench.Settings(repeats=3, warmup=0, device="cpu"))
    assert calls == ["ours", "tv", "tv", "ours", "ours", "tv"]
    assert (timing.ours_s, timing.tv_s) == (2.0, 2.0)
    assert timing.ratios == [0.5, 0.75, 1.0]
    row = bench.timing_row("inference", timing, 0.6, batch=2)
    assert row["ratio"] == 1.0 and row["ratio_range"] == [0.5, 1.0] and row["repeat_ratios"] == [0.5, 0.75, 1.0]
    assert (row["ours_ms"], row["torchvision_ms"], row["ours_img_s"], row["target"]) == (2000.0, 2000.0, 1.0, 0.6)
    assert "ours_img_s" not in bench.timing_row("RoIAlign", timing)  # images per second only where asked
    memory = {"name": "training memory", "ours_mb": 1.0, "torchvision_mb": 2.0, "ratio": 0.5, "target": 0.9}
    result = {"cpu": bench.cpu_header(), "rows": [row, memory], "notes": [],
              "environment": {"torch": "t", "torchvision": "v", "device": "cpu", "threads": 2}}
    lines = bench.format_table(result).splitlines()
    assert "repeats" in lines[1]
    assert lines[2].split()[-4:] == ["1.00", "0.50-1.00", "<=", "0.6"], lines[2]
    assert lines[3].split() == ["images", "/", "s", "1.00", "1.00"], lines[3]
    assert lines[4].split()[-4:] == ["0.50", "-", "<=", "0.9"], lines[4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_cuda_without_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err


def test_mask_target_benchmark_compares_the_same_targets(monkeypatch):
    """The two functions the bench times compute the same targets: both target functions are wrapped (the bench
    imports them when it builds its timed functions) so that what each timed call returns is kept, and the kept
    tensors are compared. Ours (soft, not aligned) equals torchvision's project_masks_on_boxes within 1e-5."""
    import torchvision.models.detection.roi_heads as tv_roi_heads

    import maskrcnn.model.mask_targets as ours_module

    original = ours_module.mask_targets
    calls: dict[str, list] = {"ours": [], "tv": []}

    def recording(key, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls[key].append((args, kwargs, out))
            return out
        return wrapper

    monkeypatch.setattr(ours_module, "mask_targets", recording("ours", ours_module.mask_targets))
    monkeypatch.setattr(tv_roi_heads, "project_masks_on_boxes",
                        recording("tv", tv_roi_heads.project_masks_on_boxes))
    s = bench.Settings(batch=2, mask_target_size=(96, 120), mask_objects=4, mask_fg_rois=30)
    f_ours, f_tv, label = bench.mask_target_fns(s)
    assert label.startswith("mask targets (2x30 fg RoIs")
    f_ours()
    f_tv()
    assert len(calls["ours"]) == len(calls["tv"]) == s.batch  # one call per image, each side
    for (o_args, _, ours), (t_args, _, theirs) in zip(calls["ours"], calls["tv"], strict=True):
        masks, idx, boxes = o_args[:3]
        assert t_args[0] is masks and t_args[1] is boxes and t_args[2] is idx  # the same inputs, not copies
        assert ours.shape == theirs.shape == (s.mask_fg_rois, 28, 28)
        # Not a trivial match: the targets are masks, partly inside the RoIs (not all 0, not all 1).
        assert 0.05 < float((theirs > 0.5).float().mean()) < 0.95
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The comparison sees a difference: the two images' targets differ, and so do the aligned (half-pixel)
    # RoIAlign's targets, which the bench does not time, by far more than the tolerance.
    (masks, idx, boxes), first = calls["ours"][0][0][:3], calls["ours"][0][2]
    assert first.shape == calls["ours"][1][2].shape and not torch.allclose(first, calls["ours"][1][2], atol=0.1)
    assert (original(masks, idx, boxes, 28, aligned=True, soft=True) - first).abs().max() > 1e-3


def test_coco_size_annotation_file_loads_in_both(tmp_path):
    """The generated file (here 50 images, 400 instances) is valid for our loader and for pycocotools."""
    path = tmp_path / "ann.json"
    size = bench.write_coco_size_ann(str(path), images=50, instances=400)
    assert size == path.stat().st_size > 400 * 300
    data = json.loads(path.read_text())
    assert len(data["images"]) == 50 and len(data["annotations"]) == 400 and len(data["categories"]) == 80
    ours = bench.ann_child("ours", str(path))
    theirs = bench.ann_child("pycocotools", str(path))
    assert ours["images"] == theirs["images"] == 50
    assert ours["seconds"] > 0 and ours["peak_mb"] > 0


def test_a_wrong_out_path_is_one_line_before_anything_is_measured(monkeypatch, capsys, tmp_path):
    """--out under a file (its folder cannot be made): one line and exit status 2 at the start, not a traceback
    after minutes of measuring; a missing folder is made."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before checking --out"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "a_file" / "bench.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --out: cannot create the folder")
    from maskrcnn.cli import ready_to_write

    ready_to_write(str(tmp_path / "new" / "folder" / "bench.json"))
    assert (tmp_path / "new" / "folder").is_dir()
    with pytest.raises(SystemExit):
        ready_to_write(str(tmp_path / "new"))  # a folder, not a file
