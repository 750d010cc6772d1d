"""Nothing lost: a run killed with SIGKILL after a checkpoint and resumed, or stopped by SIGTERM / SIGINT and
resumed, gives bit-identical losses at every iteration (and the same final weights) as an uninterrupted run.

The interrupted runs are real child processes running train.py; a small wrapper pauses the child at a given
iteration (after that iteration is logged) until the test has sent its signal, so the timing is exact."""
from __future__ import annotations

import json
import random
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from maskrcnn.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ITERS, PERIOD = 6, 3
# Full stage with seeded latent noise: the RPN and RoI samplers, the noise generator, multi-scale choice and
# flips all draw random numbers; 8 images in batches of 2 make 4 batches per epoch, so 6 iterations cross one.
ARGS = ["--config", "configs/tiny.yaml", "--stage", "full", "--feature-noise", "--no-progress"]
SETS = [f"solver.max_iter={ITERS}", f"train.checkpoint_period={PERIOD}", "train.log_period=1",
        "train.eval_at_end=false", "train.precise_bn_iters=0", "train.num_threads=1", "model.noise.seed=1",
        "model.transform.min_size_train=[112,128]"]
LOSSES = ["loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "total_loss"]

WRAPPER = """
import os, sys, time
from maskrcnn.engine import trainer

PAUSE_AT, MARK = int(os.environ["PAUSE_AT"]), os.environ["MARK"]


class Writer(trainer.SummaryWriter):
    def add_scalar(self, tag, value, step=None, *args, **kwargs):
        super().add_scalar(tag, value, step, *args, **kwargs)
        if tag == "time/sec_per_iter" and step == PAUSE_AT:  # the last scalar of iteration PAUSE_AT
            self.flush()
            open(MARK, "w").close()
            deadline = time.time() + 60
            while not os.path.exists(MARK + ".go") and time.time() < deadline:
                time.sleep(0.01)


trainer.SummaryWriter = Writer
import train
train.main(sys.argv[1:])
"""


def _sets(out: Path) -> list[str]:
    return [f"train.output_dir={out}"] + SETS


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (in this process; torch's thread count restored afterwards)."""
    out = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    try:
        train.main(ARGS + ["--name", "ref", "--set", *_sets(out)])
    finally:
        torch.set_num_threads(threads)
    return out / "ref"


def _child(tmp_path: Path, name: str, pause_at: int, *sets: str,
           own_group: bool = False) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    mark = tmp_path / f"{name}.paused"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAUSE_AT": str(pause_at), "MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "wrapper.py"), *ARGS, "--name", name, "--set",
                             *_sets(tmp_path), *sets], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=own_group)
    deadline = time.time() + 240
    while not mark.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"child never reached iteration {pause_at}: {err[-2000:]}")
        time.sleep(0.02)
    return proc, mark


def _resume(out: Path, name: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "train.py", "--name", name, "--resume", "--no-progress", "--set",
                           f"train.output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in (f"loss/{k}" for k in LOSSES)}


def _assert_same_run(run: Path, ref: Path) -> None:
    a, b = load_checkpoint(run / "last_checkpoint.pth"), load_checkpoint(ref / "last_checkpoint.pth")
    assert a["iteration"] == b["iteration"] == ITERS
    assert set(a["history"]) == set(LOSSES)
    for k in LOSSES:  # every iteration, float64, bit for bit
        assert torch.equal(a["history"][k], b["history"][k]), (k, a["history"][k], b["history"][k])
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    # TensorBoard: every logged iteration once, the killed run's events after its checkpoint purged.
    scalars = _scalars(run)
    assert scalars == _scalars(ref)
    assert [s for s, _ in scalars["loss/total_loss"]] == list(range(1, ITERS + 1))
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run, ref))
    for key in ("loss_start", "loss_end", "iterations"):
        assert ma[key] == mb[key], key


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(reference, tmp_path):
    proc, _ = _child(tmp_path, "killed", PERIOD + 1)  # iteration 4 done and logged, the checkpoint is at 3
    assert load_checkpoint(tmp_path / "killed" / "last_checkpoint.pth")["iteration"] == PERIOD
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed = _resume(tmp_path, "killed")
    assert f"resumed from {tmp_path / 'killed' / 'last_checkpoint.pth'} at iteration {PERIOD}" in resumed.stdout
    assert "not restored" not in resumed.stdout
    _assert_same_run(tmp_path / "killed", reference)


def test_sigterm_checkpoints_prints_resume_command_and_resumes_exactly(reference, tmp_path):
    proc, mark = _child(tmp_path, "term", 2)  # not a checkpoint iteration: the stop writes one
    proc.send_signal(signal.SIGTERM)
    Path(str(mark) + ".go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last == (f"SIGTERM: stopped at iteration 2/{ITERS} with checkpoint {tmp_path / 'term' / 'last_checkpoint.pth'}"
                    f"; resume with: python train.py --name term --resume --set train.output_dir={tmp_path}")
    assert load_checkpoint(tmp_path / "term" / "last_checkpoint.pth")["iteration"] == 2
    assert not (tmp_path / "term" / "metrics.json").exists()
    _resume(tmp_path, "term")
    _assert_same_run(tmp_path / "term", reference)


def test_sigterm_to_the_process_group_with_loader_workers_stops_with_a_checkpoint(reference, tmp_path):
    """A scheduler's preemption (or Ctrl-C in a terminal) signals every process of the run: the data loader's
    worker processes leave the signal to the main process, which stops after its step as usual; the data order
    does not depend on the number of workers, so the resumed run is still the uninterrupted one."""
    proc, mark = _child(tmp_path, "group", 2, "data.num_workers=2", own_group=True)
    os.killpg(proc.pid, signal.SIGTERM)
    Path(str(mark) + ".go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.count("stopping after this step") == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("SIGTERM: stopped at iteration 2/")
    assert load_checkpoint(tmp_path / "group" / "last_checkpoint.pth")["iteration"] == 2
    _resume(tmp_path, "group")
    _assert_same_run(tmp_path / "group", reference)


def test_sigint_stops_with_status_130(tmp_path):
    proc, mark = _child(tmp_path, "int", 1)
    proc.send_signal(signal.SIGINT)
    Path(str(mark) + ".go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: stopped at iteration 1/" in err and "--name int --resume" in err
    assert load_checkpoint(tmp_path / "int" / "last_checkpoint.pth")["iteration"] == 1


def test_second_signal_exits_at_once(tmp_path):
    proc, mark = _child(tmp_path, "twice", PERIOD + 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # let the first one be handled (the child waits, so it cannot finish its step)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert "send it again to stop at once" in err and "resume with" not in err
    run = tmp_path / "twice"
    assert load_checkpoint(run / "last_checkpoint.pth")["iteration"] == PERIOD  # no checkpoint at the stop
    assert not list(run.glob("*.tmp"))


# ------------------------------------------------------------------ an unreadable last_checkpoint.pth
TINY_RPN = ["--config", "configs/tiny.yaml", "--stage", "rpn", "--no-progress"]


def _rewrite(path: Path, data: bytes) -> None:
    """Replace the file (not write through it: last_checkpoint.pth is a hard link of the newest numbered one)."""
    path.unlink()
    path.write_bytes(data)


def test_resume_skips_an_unreadable_last_checkpoint_for_the_newest_numbered_one(tmp_path, capsys):
    sets = [f"train.output_dir={tmp_path}", "train.eval_at_end=false", "train.precise_bn_iters=0",
            "train.checkpoint_period=1", "train.keep_checkpoints=3"]
    train.main(TINY_RPN + ["--name", "cut", "--set", "solver.max_iter=3", *sets])
    run = tmp_path / "cut"
    assert sorted(p.name for p in run.glob("model_0*.pth")) == [f"model_000000{i}.pth" for i in (1, 2, 3)]
    capsys.readouterr()
    last, third = run / "last_checkpoint.pth", run / "model_0000003.pth"
    _rewrite(last, last.read_bytes()[:5000])  # truncated by a copy
    summary = train.main(["--name", "cut", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                          "solver.max_iter=4"])
    out = capsys.readouterr().out
    assert (f"warning: --resume skipped unreadable last_checkpoint.pth (not a PyTorch checkpoint file); "
            f"continuing from {third} at iteration 3\n") in out
    assert f"resumed from {third} at iteration 3" in out and summary["iterations"] == 4
    assert load_checkpoint(last)["iteration"] == 4  # written again

    # Random bytes in last_checkpoint.pth and in the newest numbered one: the next one.
    fourth = run / "model_0000004.pth"
    for path in (last, fourth):
        _rewrite(path, random.Random(0).randbytes(50_000))
    train.main(["--name", "cut", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                "solver.max_iter=5"])
    out = capsys.readouterr().out
    assert (f"warning: --resume skipped unreadable last_checkpoint.pth (not a PyTorch checkpoint file), "
            f"model_0000004.pth (not a PyTorch checkpoint file); continuing from {third} at iteration 3\n") in out

    # None readable: one line naming them all, exit 2.
    for path in run.glob("model_0*.pth"):
        _rewrite(path, b"")
    _rewrite(last, b"oops")
    with pytest.raises(SystemExit) as e:
        train.main(["--name", "cut", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    names = ["last_checkpoint.pth"] + [f"model_000000{i}.pth" for i in (5, 4, 3)]
    assert e.value.code == 2 and err == (f"error: --resume: no checkpoint of {run} can be read: "
                                         + ", ".join(f"{n} (not a PyTorch checkpoint file)" for n in names) + "\n")
