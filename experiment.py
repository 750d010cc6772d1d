"""The whole latent-noise experiment in one command, on the generated shapes data by default:

  0. the data (the shapes set is generated on first use);
  1. the RPN stage;
  2. the full model without noise and with --feature-noise, both initialised from the RPN stage, for each seed;
  3. evaluation of every full run: clean on every val image (fp32), and under the COCO-C corruptions (the
     benchmark's 15 at severity 3 by default) on the first val images (20, or 10 in the fp32 schedule), every
     run on the same corrupted pixels, in the trainings' precision (`--corruption-fp32` for fp32): P, mPC, rPC;
  4. the loss-comparison chart and the AP table, with differences paired by seed (95% t-interval), a second
     interval over the evaluation images (paired bootstrap) and the smallest difference the seeds could detect,
     and every error type's dAP (TIDE) for both arms with noise - baseline paired by seed.

    python experiment.py                      # the demo: configs/shapes.yaml, seeds 0, 1 and 2
    python experiment.py --seeds 0 1 2 3 --name noise-study --set model.noise.strength=0.3
    python experiment.py --overwrite          # run the demo again in runs/demo/ (else: refused, it holds runs)
    python experiment.py --resume             # continue runs/demo/ after a stop, with the settings it started with

Every training and evaluation is its own `train.py` / `evaluate.py` process. On a CPU, `--jobs 2` (the default
with two or more cores) runs two of them side by side with half the cores each: small models use one core
better than two (measured on 2 cores: 1.25x the throughput of one run at a time); each process then writes
its output to runs/<name>/logs/. Ctrl-C or SIGTERM stops the runs in progress at their next step with a
checkpoint; `--resume` then continues the experiment: each stopped training from its checkpoint, the finished
ones skipped, then the evaluations it lacks and the comparison, with the settings saved in
runs/<name>/experiment_args.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from maskrcnn.cli import Stopped, add_config_args, one_line_errors

HERE = Path(__file__).resolve().parent
SAVED_ARGS = "experiment_args.json"  # the settings of an experiment, in runs/<name>/, for --resume
# the options --resume may change: they do not change what the experiment computes
NOT_SAVED = ("resume", "overwrite", "jobs", "no_progress")


@dataclass(frozen=True)
class Schedule:
    """What the demo changes of the config (the training image size, the memory format) and how much it evaluates
    under corruption: sized so that the whole experiment on configs/shapes.yaml fits in 20 minutes on 2 CPU cores
    in the precision the trainings run in (both schedules train RPN 800 + full 600 iterations: --rpn-iters, the
    preset's solver.max_iter)."""
    name: str  # its key in SCHEDULES (--schedule)
    corruption_images: int  # val images evaluated under each corruption
    train_scale: float  # side of the training images, as a fraction of the config's own
    channels_last: Optional[bool]  # train.channels_last (None: the config's)
    note: str  # what it costs and gives with configs/shapes.yaml, in one line (measured, README)

    def sets(self, cfg) -> list[str]:
        """Config overrides of this schedule for `cfg` (before --set, which wins): the config's own training sizes
        (model.transform.min_size_train, max_size_train) times train_scale, to a multiple of 8 (shapes.yaml's
        192-256 / 384 px at 0.7x: 136-176 / 272), and the memory format."""
        out = []
        if self.train_scale != 1:
            t = cfg.model.transform
            scaled = [scale_size(s, self.train_scale) for s in t.min_size_train]
            out += [f"model.transform.min_size_train=[{','.join(str(s) for s in scaled)}]",
                    f"model.transform.max_size_train={scale_size(t.max_size_train, self.train_scale)}"]
        if self.channels_last is not None:
            out.append(f"train.channels_last={str(self.channels_last).lower()}")
        return out

    def describe(self, cfg) -> str:
        """What it changes of `cfg`, in words."""
        if self.train_scale == 1 and self.channels_last is None:
            return "the config's image sizes"
        return (f"training images at {self.train_scale:g}x the config's side ({' '.join(self.sets(cfg))}), "
                f"evaluated at the config's test size")


def scale_size(pixels: int, scale: float) -> int:
    """`pixels` x `scale`, to the nearest multiple of 8 (at least 8)."""
    return max(8, int(round(pixels * scale / 8)) * 8)


# The schedule follows the precision. On 2 CPU cores, native bf16 trains ~1.7x faster than fp32 (the
# convolutions, ~80% of a step, run at ~70% of the cores' fp32 peak, so fp32 has no faster path): the mixed
# schedule takes 18-20 min with native bf16 and ~40 min in fp32. The fp32 schedule fits 20 min by training at
# 0.7x the image side (about half the pixels) without channels-last (in fp32 on an AVX2 CPU 0.94x the step time
# of channels-last; with bf16 channels-last is the faster) and corrupting 10 images instead of 20; it evaluates
# at the config's own size, where the models trained small find more than at their training size (box AP over
# 3 seeds 0.41 at 224 px against 0.36 at 160; make demo on an AVX2 CPU: 0.44 in 18.7 min, README).
# `--schedule` picks one whatever the precision.
SCHEDULES = {
    "mixed": Schedule("mixed", 20, 1.0, None, "configs/shapes.yaml: 18-20 min on 2 cores with native bf16"),
    "fp32": Schedule("fp32", 10, 0.7, False, "configs/shapes.yaml: ~20 min on 2 cores in fp32"),
}


def parse_args(argv=None, defaults: Optional[dict] = None) -> argparse.Namespace:
    """The command line; `defaults` (a saved experiment's settings) replace the parser's own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "configs/shapes.yaml")
    p.add_argument("--name", default="demo", help="experiment directory: runs/<name>/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the full-stage runs")
    p.add_argument("--amp", choices=["auto", "true", "false"],
                   help="mixed precision of the trainings and of the evaluation under corruption (bf16 on a CPU, fp16 "
                   "on CUDA): auto where the device computes it natively, else fp32; true; false (default: the config's "
                   "train.cpu_amp on a CPU, auto in configs/shapes.yaml; train.amp on CUDA, true); the schedule "
                   "follows the choice (see SCHEDULES)")
    p.add_argument("--schedule", choices=["auto", *SCHEDULES],
                   help="auto (the default): mixed where the trainings run in mixed precision, else fp32 (see "
                   "SCHEDULES in this file); mixed on a CPU without native bf16 takes ~40 min")
    p.add_argument("--rpn-iters", type=int, default=800,
                   help="iterations of the RPN stage (learning rate x0.1 after 8/9 of them)")
    p.add_argument("--full-iters", type=int, help="iterations of each full run (default: the config's; "
                   "learning rate x0.1 after 8/9 of them)")
    p.add_argument("--corruptions", nargs="*",
                   help="corruptions to evaluate under (default: the 15 of the COCO-C benchmark; none, or the option "
                   "alone: no evaluation under corruption)")
    p.add_argument("--severities", type=int, nargs="+", default=[3], help="corruption severities 1..5")
    p.add_argument("--corruption-seed", type=int, default=0,
                   help="seed of the random corruptions, the same for every run (same pixels)")
    p.add_argument("--eval-images", type=int, default=0, help="clean evaluation on at most N val images (0: all)")
    p.add_argument("--corruption-images", type=int,
                   help="evaluation under corruption on the first N val images (default: the schedule's; 0: all)")
    p.add_argument("--corruption-fp32", action="store_true",
                   help="evaluate under corruption in fp32 (default: in the trainings' precision, evaluate.py --amp: "
                   "bf16 gives the fp32 AP within 0.01, tests/test_bf16.py, at 0.7x the time)")
    p.add_argument("--jobs", type=int, help="processes side by side (default: 2 on a CPU with 2 or more cores, "
                   "else 1); each gets cores / jobs threads")
    p.add_argument("--overwrite", action="store_true",
                   help="run again in runs/<name>/, deleting the checkpoints and events of its earlier runs")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped experiment in runs/<name>/ with its own settings (saved in "
                   f"runs/<name>/{SAVED_ARGS}): each unfinished training from its checkpoint, the finished ones "
                   "skipped, then the evaluations and the comparison")
    p.add_argument("--no-progress", action="store_true")
    if defaults:
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.corruptions is not None and [c.lower() for c in args.corruptions] == ["none"]:
        args.corruptions = []  # none: skip, as the option alone
    return args


def default_jobs(device: str) -> int:
    """Two processes side by side on a CPU with at least two cores; one on a GPU (they would share it)."""
    import torch
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu or (os.cpu_count() or 1) < 2 else 2


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _stopped_at(log: Optional[Path]) -> str:
    """"stopped at iteration 29/400 " from a training's last line (its log), else "stopped "."""
    m = re.search(r"stopped at iteration \d+/\d+", _last_line(log)) if log else None
    return (m.group(0) if m else "stopped") + " "


class Runner:
    """Runs `python <script> ...` commands, at most `jobs` at a time, each with cores // jobs threads. With one
    job a command prints to this terminal; with several each writes runs/<name>/logs/<task>.log and a line
    says when it ends. A failed command stops the others and ends the experiment with its last line."""

    def __init__(self, jobs: int, log_dir: Path, progress: bool):
        self.jobs, self.log_dir, self.progress = max(1, jobs), log_dir, progress
        self.running: dict[subprocess.Popen, tuple] = {}
        self.signal: int | None = None
        self.stopped: list[str] = []  # tasks that ended on the signal, unfinished
        self.resume_hint = "python experiment.py --resume"

    def env(self, jobs: int) -> dict:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def run(self, tasks: list[tuple[str, list[str]]], jobs: int | None = None) -> dict[str, float]:
        """Run every (task name, argv) and return the seconds each took."""
        jobs = min(jobs or self.jobs, len(tasks)) or 1
        env, pending, seconds = self.env(jobs), list(tasks), {}
        quiet = ["--no-progress"] if (jobs > 1 or not self.progress) else []
        try:
            while pending or self.running:
                while pending and len(self.running) < jobs and self.signal is None:
                    name, argv = pending.pop(0)
                    cmd = [sys.executable, str(HERE / argv[0]), *argv[1:], *quiet]
                    if jobs > 1:
                        self.log_dir.mkdir(parents=True, exist_ok=True)
                        log = self.log_dir / f"{name}.log"
                        out = open(log, "w")
                        print(f"  {name}: started (log: {log})", flush=True)
                    else:
                        log, out = None, None
                    # a session of its own: Ctrl-C reaches only this process, which passes it on once (a second
                    # signal would stop a training without its checkpoint)
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                                            start_new_session=True)
                    self.running[proc] = (name, log, out, time.perf_counter())
                if self.signal is not None and not self.running:
                    break
                time.sleep(0.2)
                for proc in [p for p in self.running if p.poll() is not None]:
                    name, log, out, start = self.running.pop(proc)
                    if out:
                        out.close()
                    seconds[name] = time.perf_counter() - start
                    if proc.returncode != 0 and self.signal is not None:  # stopped by the signal passed on
                        self.stopped.append(name)
                        if jobs > 1:
                            code = proc.returncode if proc.returncode > 0 else 128 - proc.returncode
                            print(f"  {name}: {_stopped_at(log)}after {seconds[name]:.0f} s (exit {code})",
                                  flush=True)
                        continue
                    if proc.returncode != 0:
                        why = _last_line(log) if log else "its error is printed above"
                        raise Stopped(f"experiment: {name} failed (exit {proc.returncode}): {why}"
                                      + (f" (log: {log})" if log else ""), proc.returncode if proc.returncode > 0
                                      else 128 - proc.returncode)
                    if jobs > 1:
                        print(f"  {name}: done in {seconds[name]:.0f} s", flush=True)
            if self.signal is not None:
                raise Stopped(f"experiment: stopped by signal {self.signal}; the trainings in progress wrote a "
                              f"checkpoint; continue with: {self.resume_hint}", 128 + self.signal)
        finally:
            self.stop()
        return seconds

    def forward(self, signum, frame) -> None:
        """SIGINT / SIGTERM: passed on to the running commands (training checkpoints and stops); no new ones."""
        self.signal = signum
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop(self) -> None:
        for proc, (name, log, out, _) in list(self.running.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # training: a checkpoint, then exit 143
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            if out:
                out.close()
        self.running.clear()


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        from maskrcnn.config import load_config

        root = Path("runs") / args.name
        if args.resume:
            args = resumed_args(args, argv, root)
        cfg = load_config(args.config, args.set)
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        if any(s.startswith("train.output_dir=") for s in args.set):
            raise ValueError("experiment.py writes to runs/<name>/: choose the directory with --name, not "
                             "--set train.output_dir")
        check_corruptions(args.corruptions)
        held = [r for r in training_names(args.seeds) if holds_run(root / r)]
        if held and not (args.resume or args.overwrite):
            raise ValueError(f"{root} already holds runs ({', '.join(held[:3])}"
                             f"{', ...' if len(held) > 3 else ''}): continue it with --resume, or start it again "
                             "with --overwrite (deletes their checkpoints and events)")
        precision, sched, why = choose_schedule(cfg, args.amp, args.schedule)
        if args.resume:
            why = f"as chosen when {root} started ({root / SAVED_ARGS})"
        else:  # the settings --resume continues with; the schedule as chosen on this machine
            root.mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
            (root / SAVED_ARGS).write_text(json.dumps({**saved, "schedule": sched.name}, indent=2))
        print(precision.line(), flush=True)
        if precision.warning:
            print(precision.warning, flush=True)
        runner = Runner(args.jobs or default_jobs(cfg.train.device), root / "logs", not args.no_progress)
        runner.resume_hint = f"python experiment.py --name {shlex.quote(args.name)} --resume"
        previous = {s: signal.signal(s, runner.forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return _experiment(args, cfg, root, runner, precision, sched, why)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def resumed_args(args: argparse.Namespace, argv, root: Path) -> argparse.Namespace:
    """The settings of the experiment in `root` (saved when it started), with this command's --jobs and
    --no-progress; any other option given must agree with them."""
    if args.overwrite:
        raise ValueError("--resume continues an experiment and --overwrite starts it again: choose one")
    path = root / SAVED_ARGS
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {root} holds no experiment to continue (no {path})")
    saved = json.loads(path.read_text())
    resumed = parse_args(argv, defaults=saved)
    differ = [k for k, v in saved.items() if getattr(resumed, k, v) != v]
    if differ:
        raise ValueError(f"--resume continues {root} with the settings it started with ({path}): "
                         + "; ".join(f"--{k.replace('_', '-')} {getattr(resumed, k)} here, {saved[k]} there"
                                     for k in differ)
                         + ": leave them out, or start again with --overwrite")
    return resumed


def training_names(seeds: list[int]) -> list[str]:
    """The experiment's trainings, in the order they run."""
    return ["rpn"] + [f"full{'-noise' if noise else ''}-s{seed}" for seed in seeds for noise in (False, True)]


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() or any(run_dir.glob("*.pth"))


def training_state(run_dir: Path) -> str:
    """finished (its final model and metrics.json, written last), stopped (a checkpoint to resume from), or new."""
    if (run_dir / "metrics.json").is_file() and (run_dir / "model_final.pth").is_file():
        return "finished"
    return "stopped" if (run_dir / "last_checkpoint.pth").is_file() else "new"


def check_corruptions(names: Optional[list[str]]) -> None:
    """Unknown corruption names are an error before any training (evaluate.py would find them only at the end)."""
    from maskrcnn.evaluation.corruptions import CORRUPTIONS

    for name in [n for item in names or [] for n in item.split(",") if n]:
        if name not in CORRUPTIONS:
            raise ValueError(f"--corruptions: unknown corruption '{name}' (one of: {', '.join(CORRUPTIONS)}; or none)")


def choose_schedule(cfg, amp: Optional[str], name: Optional[str] = None):
    """The trainings' precision (--amp, else the config's train.cpu_amp on a CPU / train.amp on CUDA) on this
    machine, the schedule that goes with it (or the one `name` asks for) and why that schedule, in words."""
    from maskrcnn.engine.device import select_device
    from maskrcnn.model.precision import training_precision

    precision = training_precision(cfg.train, select_device(cfg.train.device), amp)
    if name not in (None, "auto"):
        return precision, SCHEDULES[name], f"--schedule {name}"
    name = "mixed" if precision.autocast else "fp32"
    return precision, SCHEDULES[name], f"the trainings run in {precision.name}: {precision.reason}"


def schedule(iterations: int) -> list[str]:
    """--set values for `iterations` iterations with the learning rate x0.1 after 8/9 of them."""
    return [f"solver.max_iter={iterations}", f"solver.steps=[{int(iterations * 8 / 9)}]"]


def evaluation_tasks(run: Path, args, corruption_images: int, eval_amp: str) -> list[tuple[str, list[str]]]:
    """The evaluations of one full run, in the order they are started: clean on --eval-images val images (fp32),
    then, unless --corruptions none, the corruption benchmark on the first `corruption_images` (`eval_amp`)."""
    ckpt = str(run / "model_final.pth")
    tasks = [(f"eval-{run.name}", ["evaluate.py", "--checkpoint", ckpt, "--max-images", str(args.eval_images)])]
    if args.corruptions is None or len(args.corruptions) > 0:
        tasks.append((f"eval-{run.name}-corrupted",
                      ["evaluate.py", "--checkpoint", ckpt, "--corruption", "benchmark",
                       "--severities", *[str(s) for s in args.severities], "--corruption-seed",
                       str(args.corruption_seed), "--max-images", str(corruption_images)]
                      + (["--corruptions", *args.corruptions] if args.corruptions else [])
                      + ["--amp", eval_amp]))
    return tasks


def _experiment(args, cfg, root: Path, runner: Runner, precision, sched: Schedule, why: str) -> dict:
    import compare
    from maskrcnn.data.build import dataset_paths
    from maskrcnn.evaluation import outputs

    start = time.perf_counter()
    minutes: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str, title: str):
        """One numbered phase: its title, then its minutes (printed and kept for experiment.json)."""
        print(f"[{len(minutes)}/4] {title}", flush=True)
        t0 = time.perf_counter()
        yield
        minutes[name] = (time.perf_counter() - t0) / 60
        print(f"  ({minutes[name]:.1f} min)", flush=True)

    rpn_iters, full_iters = args.rpn_iters, args.full_iters
    corruption_images = sched.corruption_images if args.corruption_images is None else args.corruption_images
    corrupt = args.corruptions is None or len(args.corruptions) > 0
    sched_sets = sched.sets(cfg)
    print(f"schedule: {sched.name} ({why}): RPN {rpn_iters} + full {full_iters or cfg.solver.max_iter} iterations, "
          f"{sched.describe(cfg)}; "
          + (f"corruptions on {corruption_images or 'all'} val images" if corrupt
             else "no evaluation under corruption (--corruptions none)")
          + f" ({sched.note})", flush=True)
    common = ["--config", args.config] + (["--overwrite"] if args.overwrite else [])
    # --amp reaches every training (train.amp on CUDA, train.cpu_amp on a CPU); else each resolves the config's.
    amp_sets = [f"train.amp={args.amp}", f"train.cpu_amp={args.amp}"] if args.amp else []
    sets = ["train.output_dir=" + str(root), *sched_sets] + list(args.set) + amp_sets
    full_sets = sets + (schedule(full_iters) if full_iters else [])

    with phase("data", "data"):
        paths = dataset_paths(cfg)  # generated here once, not by two processes at the same time
        val_images = len(json.loads(Path(paths["val_ann"]).read_text())["images"])

    def training(name: str, argv: list[str]) -> list[tuple[str, list[str]]]:
        """The task that trains `name` (argv: its train.py options); with --resume none for a finished training,
        and train.py --resume (the run's own config) for a stopped one."""
        if not args.resume:
            return [(name, ["train.py", *common, *argv])]
        state = training_state(root / name)
        print(f"  {name}: " + {"finished": "finished (skipped)", "stopped": "stopped: resumed from its checkpoint",
                               "new": "not started: starts now"}[state], flush=True)
        if state == "finished":
            return []
        if state == "stopped":
            return [(name, ["train.py", "--config", args.config, "--name", name, "--resume", "--set",
                            f"train.output_dir={root}"])]
        return [(name, ["train.py", *common, "--overwrite", *argv])]  # what a stop left before any checkpoint goes

    with phase("rpn", f"RPN stage ({rpn_iters} iterations)"):
        runner.run(training("rpn", ["--stage", "rpn", "--name", "rpn", "--set", *sets, *schedule(rpn_iters)]), jobs=1)
        rpn_ckpt = root / "rpn" / "model_final.pth"
        rpn_val = json.loads((root / "rpn" / "metrics.json").read_text()).get("val")

    with phase("full", f"full model, {len(args.seeds)} seeds x (baseline, --feature-noise), {runner.jobs} at a time"):
        tasks, runs = [], []
        for seed in args.seeds:
            for noise in (False, True):
                name = f"full{'-noise' if noise else ''}-s{seed}"
                runs.append(root / name)
                tasks += training(name, ["--stage", "full", "--name", name, "--seed", str(seed), "--init",
                                         str(rpn_ckpt), "--set", *full_sets, "train.eval_at_end=false"]
                                  + (["--feature-noise"] if noise else []))
        train_seconds = runner.run(tasks)

    # under corruption: the trainings' precision, as chosen above (--corruption-fp32: fp32)
    eval_amp = "true" if precision.autocast and not args.corruption_fp32 else "false"
    # the files each evaluation writes are named after its image set (every val image, or the first N)
    image_sets = {"clean": outputs.image_set("val", args.eval_images, val_images)}
    if corrupt:
        image_sets["corrupted"] = outputs.image_set("val", corruption_images, val_images)
    with phase("evaluation", f"evaluation, clean{' and under corruption' if corrupt else ''}"):
        tasks = []
        for run in runs:
            files = [run / outputs.metrics_file(image_sets["clean"], "clean")] + (
                [run / outputs.metrics_file(image_sets["corrupted"], "benchmark")] if corrupt else [])
            for task, done in zip(evaluation_tasks(run, args, corruption_images, eval_amp), files):
                # --resume: an evaluation written after the run's final model is kept
                if args.resume and done.is_file() and done.stat().st_mtime >= (run / "model_final.pth").stat().st_mtime:
                    print(f"  {task[0]}: finished (skipped)", flush=True)
                else:
                    tasks.append(task)
        runner.run(tasks)
        evaluated = {}
        for run in runs:
            clean = json.loads((run / outputs.metrics_file(image_sets["clean"], "clean")).read_text())
            entry = {"clean": clean["results"]["clean"]}
            if corrupt:
                entry["corrupted"] = json.loads((run / outputs.metrics_file(image_sets["corrupted"], "benchmark"))
                                                .read_text())["benchmark"]
            evaluated[run.name] = entry

    with phase("comparison", "comparison"):
        chart, table_path = root / "comparison.png", root / "table.md"
        table = compare.main([str(r) for r in runs] + ["--out", str(chart), "--table", str(table_path)])
        # per error type (TIDE's dAP), box and mask: each arm's mean and noise - baseline paired by seed
        error_types = compare.error_type_rows(compare.group_runs(runs))
    summary = {"precision": precision.as_dict(), "schedule": {**asdict(sched), "sets": sched_sets, "reason": why,
                                                               "rpn_iters": rpn_iters,
                                                               "full_iters": full_iters or cfg.solver.max_iter,
                                                               "corruption_images": corruption_images if corrupt
                                                               else None},
               "image_sets": image_sets,
               "rpn": rpn_val, "runs": evaluated, "error_types": error_types, "jobs": runner.jobs,
               "train_seconds": {k: round(v, 1) for k, v in train_seconds.items()},
               "phase_minutes": {k: round(v, 2) for k, v in minutes.items()},
               "minutes": (time.perf_counter() - start) / 60}
    (root / "experiment.json").write_text(json.dumps(summary, indent=2))
    print(f"\nexperiment finished in {summary['minutes']:.1f} min "
          f"({', '.join(f'{k} {v:.1f}' for k, v in minutes.items())})")
    print(f"chart: {chart}\ntable: {table_path}\nsummary: {root / 'experiment.json'}")
    return {"table": table, **summary}


if __name__ == "__main__":
    main()
