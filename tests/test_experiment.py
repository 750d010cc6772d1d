"""Tests for experiment.py: the whole experiment on tiny runs (two seeds, two processes side by side), the
corrupted pixels shared by every run, a failing process ending it with one line, and SIGTERM stopping the
runs in progress with their checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiment
from maskrcnn.cli import Stopped

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
DATA_ROOT = str(ROOT / "datasets" / "shapes-tiny")
SMALL = [f"data.root={DATA_ROOT}", "model.transform.min_size_train=[48]", "model.transform.max_size_train=64",
         "model.transform.min_size_test=48", "model.transform.max_size_test=64", "train.precise_bn_iters=0",
         "train.checkpoint_period=1000", "model.rpn.pre_nms_topk_test=50", "model.rpn.post_nms_topk_test=50",
         "model.roi_heads.score_thresh=0.0"]  # every evaluated image has detections (checked per file)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cwd = os.getcwd()
    work = tmp_path_factory.mktemp("experiment")
    os.chdir(work)
    try:
        out = experiment.main(["--config", CONFIG, "--name", "t", "--seeds", "0", "1", "--rpn-iters", "3",
                               "--full-iters", "3", "--corruptions", "gaussian_noise", "brightness",
                               "--corruption-images", "2", "--eval-images", "3", "--jobs", "2", "--no-progress",
                               "--set", *SMALL])
    finally:
        os.chdir(cwd)
    return work / "runs" / "t", out


def test_every_phase_writes_its_files(demo):
    import numpy as np

    root, out = demo
    summary = json.loads((root / "experiment.json").read_text())
    box_ap, mpc = {}, {}
    for run in ("full-s0", "full-noise-s0", "full-s1", "full-noise-s1"):
        assert (root / run / "model_final.pth").is_file()
        clean = json.loads((root / run / "eval_val-first3_clean.json").read_text())
        assert clean["image_set"] == "val-first3" and clean["images"] == 3
        assert set(clean["results"]["clean"]) == {"bbox", "segm"}
        # experiment.json holds the evaluation the run's files hold
        assert summary["runs"][run]["clean"] == clean["results"]["clean"]
        box_ap[run] = clean["results"]["clean"]["bbox"]["stats"]["AP"]
        bench = json.loads((root / run / "eval_val-first2_benchmark.json").read_text())
        assert set(bench["benchmark"]["corruptions"]) == {"gaussian_noise", "brightness"}
        assert bench["benchmark"]["severities"] == [3]
        assert summary["runs"][run]["corrupted"] == bench["benchmark"]
        mpc[run] = bench["benchmark"]["metrics"]["bbox"]["mPC"]
        assert (root / "logs" / f"{run}.log").is_file()  # two jobs: each process writes its own log
    for f in ("comparison.png", "experiment.json"):
        assert (root / f).stat().st_size > 0
    assert summary["jobs"] == 2
    assert set(summary["phase_minutes"]) == {"data", "rpn", "full", "evaluation", "comparison"}
    assert set(summary["runs"]) == {"full-s0", "full-noise-s0", "full-s1", "full-noise-s1"}
    assert summary["image_sets"] == {"clean": "val-first3", "corrupted": "val-first2"}
    table = (root / "table.md").read_text()
    assert out["table"] and out["table"] == table.rstrip("\n")  # what compare.py printed is what it wrote
    assert table.startswith("| run | seeds | box AP | mask AP | box mPC | mask mPC |")
    assert "Paired by seed" in table
    # the verdict's second interval (over the 3 evaluated images) and its detectable difference
    line = next(ln for ln in table.splitlines() if ln.startswith("- full-noise - full, box AP"))
    assert "Over the evaluation images (paired bootstrap, the same 3 images" in line and "Smallest difference" in line
    # per error type, noise - baseline paired by seed, in the table and in experiment.json
    assert "| box | loc |" in table and "| mask | miss |" in table
    rows = {(r["iou_type"], r["error"]): r for r in summary["error_types"]}
    assert len(rows) == 16 and rows[("bbox", "bkg")]["difference"]["full-noise"]["n"] == 2
    # the baseline's row: the mean and spread of its two seeds' box AP and box mPC, read from the right files
    row = next(ln for ln in table.splitlines() if ln.startswith("| full | 2 |"))
    for values in ([box_ap["full-s0"], box_ap["full-s1"]], [mpc["full-s0"], mpc["full-s1"]]):
        assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" in row


def val_ids(n: int) -> list[int]:
    """The ids of the first n images of the tiny val set, in evaluation order."""
    from maskrcnn.config import load_config
    from maskrcnn.data.build import build_eval_dataset

    dataset = build_eval_dataset(load_config(CONFIG, SMALL), "val")
    return [int(dataset[i][1]["image_id"]) for i in range(n)]


def check_evaluations(run: Path) -> list[str]:
    """Every evaluation in `run`: its detections files hold exactly the images its metrics file says it evaluated
    (the first N val images, each with detections at score threshold 0). Returns the names of its files."""
    from maskrcnn.evaluation import outputs

    names = []
    for metrics_path in sorted(run.glob("eval_*.json")):
        report = json.loads(metrics_path.read_text())
        m = outputs.METRICS.fullmatch(metrics_path.name)
        assert m["set"] == report["image_set"], metrics_path
        expected = set(val_ids(report["images"]))
        passes = list(report["results"])
        names.append(metrics_path.name)
        for p in passes:
            name = outputs.detections_file(report["image_set"], m["tag"], p, len(passes) == 1)
            dets = json.loads((run / name).read_text())
            assert {d["image_id"] for d in dets} == expected, (metrics_path.name, name)
            names.append(name)
    return names


def test_every_detections_file_belongs_to_its_evaluation(demo, tmp_path):
    """The demo's evaluations one after the other, in experiment.py's order: clean on every val image, then the
    benchmark on the first 2, whose clean pass once replaced the clean evaluation's detections file (so that
    detections_val_clean.json held 2 images and eval_val_clean.json the AP of 4). Each detections file now
    matches its evaluation."""
    import shutil

    import evaluate

    root, _ = demo
    run = tmp_path / "full-s0"
    run.mkdir()
    shutil.copy(root / "full-s0" / "model_final.pth", run)
    args = experiment.parse_args(["--config", CONFIG, "--corruptions", "gaussian_noise", "brightness"])
    tasks = experiment.evaluation_tasks(run, args, corruption_images=2, eval_amp="false")
    assert [name for name, _ in tasks] == ["eval-full-s0", "eval-full-s0-corrupted"]
    for _, argv in tasks:
        assert argv[0] == "evaluate.py"
        evaluate.main(argv[1:] + ["--no-progress"])
    assert sorted(check_evaluations(run)) == sorted([
        "eval_val_clean.json", "detections_val_clean.json", "eval_val-first2_benchmark.json",
        "detections_val-first2_benchmark_clean.json", "detections_val-first2_benchmark_gaussian_noise-3.json",
        "detections_val-first2_benchmark_brightness-3.json"])
    assert len(val_ids(4)) == 4  # "val" is every image of the tiny val set
    # the experiment's own runs (two evaluations of each side by side): the same holds for each
    for name in ("full-s0", "full-noise-s0", "full-s1", "full-noise-s1"):
        assert sorted(check_evaluations(root / name)) == sorted([
            "eval_val-first3_clean.json", "detections_val-first3_clean.json", "eval_val-first2_benchmark.json",
            "detections_val-first2_benchmark_clean.json", "detections_val-first2_benchmark_gaussian_noise-3.json",
            "detections_val-first2_benchmark_brightness-3.json"])


def test_the_schedule_follows_the_precision(demo, monkeypatch):
    """The trainings' precision is chosen once (auto: bf16 where the CPU computes it natively) and picks the
    schedule; both are printed and kept in experiment.json. tiny.yaml trains in fp32 (train.cpu_amp false)."""
    from maskrcnn.config import load_config
    from maskrcnn.model import precision

    root, _ = demo
    summary = json.loads((root / "experiment.json").read_text())
    assert summary["precision"]["name"] == "fp32" and summary["schedule"]["name"] == "fp32"
    assert summary["schedule"]["rpn_iters"] == 3 and summary["schedule"]["corruption_images"] == 2
    cfg = load_config(ROOT / "configs" / "shapes.yaml", ["train.device=cpu"])
    assert cfg.train.cpu_amp == "auto"  # the demo's preset
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (native, "CPU capability TEST"))
        chosen, sched, why = experiment.choose_schedule(cfg, None)
        assert chosen.autocast is native and chosen.name == ("bf16 autocast" if native else "fp32")
        assert sched is experiment.SCHEDULES["mixed" if native else "fp32"]
        assert why.startswith(f"the trainings run in {chosen.name}: train.cpu_amp=auto")
        chosen, sched, why = experiment.choose_schedule(cfg, "false", "mixed")  # both asked for explicitly
        assert not chosen.autocast and sched is experiment.SCHEDULES["mixed"] and why == "--schedule mixed"
    # a config that switches bf16 off gets the fp32 schedule for that reason, native bf16 or not
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (True, "CPU capability TEST"))
    chosen, sched, why = experiment.choose_schedule(load_config(CONFIG, ["train.device=cpu"]), None)
    assert sched.name == "fp32" and why == "the trainings run in fp32: train.cpu_amp=false"


def test_the_fp32_schedule_scales_the_configs_own_sizes():
    """0.7x the side of the config's own training images (to a multiple of 8), not the shapes preset's numbers
    whatever the config; evaluation at the config's test size."""
    from maskrcnn.config import load_config

    fp32, mixed = experiment.SCHEDULES["fp32"], experiment.SCHEDULES["mixed"]
    shapes = load_config(ROOT / "configs" / "shapes.yaml")
    assert fp32.sets(shapes) == ["model.transform.min_size_train=[136,160,176]",  # the measured schedule
                                 "model.transform.max_size_train=272", "train.channels_last=false"]
    tiny = load_config(CONFIG)  # 128 / 192 px
    assert fp32.sets(tiny) == ["model.transform.min_size_train=[88]", "model.transform.max_size_train=136",
                               "train.channels_last=false"]
    assert mixed.sets(tiny) == [] and mixed.describe(tiny) == "the config's image sizes"
    assert not any(x.startswith("model.transform.min_size_test=") for x in fp32.sets(tiny))


@pytest.fixture
def first_task(monkeypatch, tmp_path):
    """experiment.main up to its first process: (its stdout, the task it would run)."""
    started = []

    def run(self, tasks, jobs=None):
        started.extend(tasks)
        raise Stopped("stopped before the first process (test)", 5)

    monkeypatch.setattr(experiment.Runner, "run", run)
    monkeypatch.chdir(tmp_path)
    return started


def test_the_schedule_line_states_its_sizes_and_reason(first_task, monkeypatch, capsys):
    """tiny.yaml (cpu_amp: false) on a CPU with native bf16: the fp32 schedule, because of the config, at 0.7x
    tiny's own 128 / 192 px; with --corruptions none no corruption is announced."""
    from maskrcnn.model import precision

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (True, "CPU capability TEST"))
    with pytest.raises(SystemExit) as e:
        experiment.main(["--config", CONFIG, "--name", "t", "--corruptions", "none", "--no-progress",
                         "--set", f"data.root={DATA_ROOT}"])
    assert e.value.code == 5
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("schedule:"))
    assert line.startswith("schedule: fp32 (the trainings run in fp32: train.cpu_amp=false): ")
    assert "no native" not in line
    assert "model.transform.min_size_train=[88] model.transform.max_size_train=136" in line
    assert "no evaluation under corruption (--corruptions none)" in line and "corruptions on" not in line
    (name, argv), = first_task
    assert name == "rpn"
    assert "model.transform.min_size_train=[88]" in argv and "train.channels_last=false" in argv
    assert experiment.parse_args(["--corruptions", "none"]).corruptions == []
    assert experiment.parse_args(["--corruptions"]).corruptions == []


def test_an_unknown_corruption_is_an_error_before_any_training(first_task, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(["--config", CONFIG, "--name", "t", "--corruptions", "snow,hail", "--no-progress",
                         "--set", f"data.root={DATA_ROOT}"])
    assert e.value.code == 2 and not first_task
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown corruption 'hail'" in err


def test_the_noise_arm_has_noise_and_the_baseline_none(demo):
    import yaml
    root, _ = demo
    for seed in (0, 1):
        base = yaml.safe_load((root / f"full-s{seed}" / "config.yaml").read_text())
        noise = yaml.safe_load((root / f"full-noise-s{seed}" / "config.yaml").read_text())
        assert base["model"]["noise"]["enabled"] is False and noise["model"]["noise"]["enabled"] is True
        assert base["train"]["seed"] == noise["train"]["seed"] == seed


def test_every_run_sees_the_same_corrupted_pixels(demo):
    """One corruption seed for all runs: the images are corrupted once and read from the cache after."""
    root, _ = demo
    settings = [json.loads((root / r / "eval_val-first2_benchmark.json").read_text())["corruption_settings"]
                for r in ("full-s0", "full-noise-s0", "full-s1", "full-noise-s1")]
    assert {s["seed"] for s in settings} == {0}
    assert len({s["cache_dir"] for s in settings}) == 1
    written = sum(s["cache"]["written"] for s in settings)
    # 2 corruptions x 2 images, written at most twice (two first evaluations side by side; none where an earlier
    # session's cache, <dataset>/corrupted, holds them)
    assert written <= 2 * 2 * 2
    assert written + sum(s["cache"]["read"] for s in settings) == 4 * 2 * 2  # each image of each run, once


def test_a_failing_process_ends_the_experiment_with_its_line(tmp_path):
    runner = experiment.Runner(2, tmp_path / "logs", progress=False)
    with pytest.raises(Stopped) as e:
        runner.run([("ok", ["compare.py", "--help"]), ("broken", ["no_such_script.py"])])
    msg = str(e.value)
    assert "broken failed (exit 2)" in msg and "no_such_script.py" in msg and "\n" not in msg
    assert e.value.status == 2
    assert not runner.running


def test_output_dir_cannot_be_set(capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(["--config", CONFIG, "--set", "train.output_dir=/tmp/x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: experiment.py writes to runs/<name>/: choose the directory "
                                               "with --name, not --set train.output_dir")


def test_resume_needs_an_experiment_and_excludes_overwrite(first_task, capsys):
    for argv, needle in ((["--resume"], "--resume: runs/demo holds no experiment to continue (no "
                                        "runs/demo/experiment_args.json)"),
                         (["--resume", "--overwrite"], "--resume continues an experiment and --overwrite starts it "
                                                       "again: choose one")):
        with pytest.raises(SystemExit) as e:
            experiment.main(argv)
        assert e.value.code == 2 and not first_task
        assert capsys.readouterr().err.strip() == f"error: {needle}"


def test_a_stopped_experiment_is_refused_then_resumed(tmp_path):
    """SIGTERM to experiment.py reaches each training once: it checkpoints, is reported as stopped (not done),
    and the experiment exits 143. Run again as it was, it is refused before any work (one line: --resume or
    --overwrite); `--resume` (with no other option: the saved settings) skips the finished RPN stage, resumes
    each full run from its checkpoint to its last iteration, then evaluates and compares; a second --resume finds
    everything done and only compares."""
    iters = 100
    base = [sys.executable, str(ROOT / "experiment.py"), "--name", "t", "--no-progress"]
    cmd = base + ["--config", CONFIG, "--seeds", "0", "--rpn-iters", "2", "--full-iters", str(iters), "--jobs", "2",
                  "--corruptions", "none", "--eval-images", "2", "--set", *SMALL]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "runs" / "t"
    runs = ("full-s0", "full-noise-s0")
    deadline = time.time() + 120
    # both full runs have started training once their TensorBoard events exist
    while time.time() < deadline and not all(list((root / r).glob("events.*")) for r in runs):
        time.sleep(0.1)
    time.sleep(1)  # the trainings' own SIGTERM handlers are in place
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("experiment: stopped by signal 15; the trainings in progress wrote a "
                                            "checkpoint; continue with: python experiment.py --name t --resume")
    stopped_at = {}
    for run in runs:
        assert (root / run / "last_checkpoint.pth").is_file(), (out, err)
        assert not (root / run / "model_final.pth").exists()
        assert f"{run}: done" not in out
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {run}: stopped at iteration "))
        stopped_at[run] = int(line.split("stopped at iteration ")[1].split("/")[0])
        assert line.split("stopped at iteration ")[1].startswith(f"{stopped_at[run]}/{iters} after ")
        assert line.endswith("(exit 143)")
        assert stopped_at[run] < iters
    rpn_final = (root / "rpn" / "model_final.pth").stat().st_mtime_ns

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stdout == ""  # before any work
    assert again.stderr.strip() == ("error: runs/t already holds runs (rpn, full-s0, full-noise-s0): continue it "
                                    "with --resume, or start it again with --overwrite (deletes their checkpoints "
                                    "and events)")
    other = subprocess.run(base + ["--resume", "--seeds", "0", "1"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 2 and other.stdout == ""
    assert len(other.stderr.strip().splitlines()) == 1 and "--seeds [0, 1] here, [0] there" in other.stderr

    done = subprocess.run(base + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "  rpn: finished (skipped)" in done.stdout.splitlines()
    assert (root / "rpn" / "model_final.pth").stat().st_mtime_ns == rpn_final
    for run in runs:
        assert f"  {run}: stopped: resumed from its checkpoint" in done.stdout.splitlines()
        assert f"  {run}: done in " in done.stdout
        assert f"at iteration {stopped_at[run]}" in (root / "logs" / f"{run}.log").read_text()  # resumed there
        assert json.loads((root / run / "metrics.json").read_text())["iterations"] == iters
        assert (root / run / "eval_val-first2_clean.json").is_file()
    summary = json.loads((root / "experiment.json").read_text())
    assert summary["schedule"]["full_iters"] == iters and set(summary["runs"]) == set(runs)
    assert "| full-noise | 1 |" in (root / "table.md").read_text()

    finished = {run: (root / run / "eval_val-first2_clean.json").stat().st_mtime_ns for run in runs}
    once_more = subprocess.run(base + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert once_more.returncode == 0, once_more.stderr[-3000:]
    lines = once_more.stdout.splitlines()
    for run in runs:
        assert f"  {run}: finished (skipped)" in lines and f"  eval-{run}: finished (skipped)" in lines
        assert (root / run / "eval_val-first2_clean.json").stat().st_mtime_ns == finished[run]
    assert not any(": started (log: " in ln for ln in lines)  # no process but the comparison's
