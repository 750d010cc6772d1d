"""torchrun on the CPU (gloo, 2 processes): one DistributedDataParallel step equals one process on the same
global batch, the processes hold identical weights, rank 0 alone writes one run directory, distributed
evaluation (end of training and evaluate.py) equals one process exactly, a run continues on another number of
processes, and a process that fails ends the job with its one line.

The training comparison uses a batch of four copies of one image with every anchor and RoI sampled and frozen
BatchNorm: Mask R-CNN normalises its losses by the anchors / RoIs of a process's batch and samples them at
random, so only then is the mean of the per-process gradients (DDP) the gradient of the whole batch."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from maskrcnn.config import load_config
from maskrcnn.data.build import dataset_paths
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import load_checkpoint

from conftest import fixture_seed

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """
import os, sys
import torch
from maskrcnn.engine import distributed, step, trainer

OUT = os.environ.get("PARAMS_OUT")
_train = trainer.Trainer.train


def train(self):
    summary = _train(self)
    if OUT:  # every process's weights after training, to compare them
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, f"{OUT}/rank{self.rank}.pt")
    return summary


trainer.Trainer.train = train
if "FAIL_RANK" in os.environ:  # this process fails with a user error in its first step
    _loss = step.total_loss

    def total_loss(losses, weights):
        if distributed.rank() == int(os.environ["FAIL_RANK"]):
            raise ValueError(f"rank {distributed.rank()} cannot go on (a failure made by the test)")
        return _loss(losses, weights)

    step.total_loss = total_loss
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torchrun(tmp_path: Path, script: str, args: list[str], env: dict | None = None, timeout: int = 240,
             nproc: int = 2) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(wrapper), script, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def same_image_sets(tmp_path_factory) -> list[str]:
    """--set for a training set of four copies of one image: no flip, every anchor and RoI sampled, frozen BN,
    plain SGD for one step; the tiny val set (4 images) evaluated one image per batch."""
    tmp = tmp_path_factory.mktemp("same")
    paths = dataset_paths(load_config("configs/tiny.yaml"))
    data = json.loads(Path(paths["train_ann"]).read_text())
    image = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    data["images"] = [{**image, "id": i + 1} for i in range(4)]
    data["annotations"] = [{**a, "id": 100 * i + j + 1, "image_id": i + 1}
                           for i in range(4) for j, a in enumerate(anns)]
    ann = tmp / "train.json"
    ann.write_text(json.dumps(data))
    return ["data.dataset=coco", f"data.train_ann={ann}", f"data.train_images={paths['train_images']}",
            f"data.val_ann={paths['val_ann']}", f"data.val_images={paths['val_images']}", "data.flip_prob=0.0",
            "model.backbone.norm=frozen_bn", "model.rpn.batch_size_per_image=100000",
            "model.rpn.positive_fraction=1.0", "model.roi_heads.batch_size_per_image=100000",
            "model.roi_heads.positive_fraction=1.0", "solver.optimizer=sgd", "solver.base_lr=0.02",
            "solver.warmup_iters=0", "solver.steps=[]", "solver.clip_grad_norm=0.0", "solver.max_iter=1",
            "train.precise_bn_iters=0", "train.num_threads=1", "test.ims_per_batch=1"]


ARGS = ["--config", "configs/tiny.yaml", "--stage", "full", "--no-progress", "--seed", str(fixture_seed())]


@contextlib.contextmanager
def one_thread():
    """The torchrun processes run one thread each (OMP_NUM_THREADS=1): the single-process reference does too,
    so that the CPU kernels sum in the same order and the detections can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _evaluate(argv: list[str]) -> dict:
    import evaluate

    with one_thread(), contextlib.redirect_stdout(io.StringIO()):
        return evaluate.main(argv)


def _single(out: Path, name: str, sets: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(ARGS + ["--name", name, "--set", f"train.output_dir={out}", *sets])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, same_image_sets):
    """One step on 2 processes x 2 images, with the end-of-run evaluation; each process's weights saved."""
    tmp = tmp_path_factory.mktemp("ddp")
    done = torchrun(tmp, "train.py", ARGS + ["--name", "ddp", "--set", f"train.output_dir={tmp}",
                                             "solver.ims_per_batch=2", *same_image_sets],
                    env={"PARAMS_OUT": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, done


# ------------------------------------------------------------------------------------ single process
def test_helpers_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu") as started:
        assert not started and not distributed.is_distributed()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        distributed.barrier()
        assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
        assert distributed.gather_object(3) == [3] and distributed.broadcast_object("x") == "x"
        t = torch.tensor([1.0, 2.0])
        assert distributed.all_reduce(t, "mean") is t and t.tolist() == [1.0, 2.0]
        with distributed.main_first():
            pass


def test_sync_bn_option(tmp_path, capsys, monkeypatch):
    """train.sync_bn with one process changes nothing (and says so); with several processes on a CPU it is a
    one-line error before training, since PyTorch's SyncBatchNorm needs CUDA."""
    from maskrcnn.engine.trainer import Trainer

    sets = ["train.eval_at_end=false", "train.sync_bn=true", "train.precise_bn_iters=0", "train.device=cpu"]
    train.main(ARGS + ["--name", "sbn", "--set", f"train.output_dir={tmp_path}", "solver.max_iter=1", *sets])
    assert "train.sync_bn: one process, nothing to synchronise" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "sbn" / "model_final.pth")
    assert "bottom_up.bn1.running_mean" in state["model"]  # BatchNorm2d's names: loads at any world size
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as rank 0 of 2 (the DDP wrap is never reached)
    cfg = load_config("configs/tiny.yaml", [f"train.output_dir={tmp_path}", *sets])
    with pytest.raises(ValueError, match="train.sync_bn needs CUDA") as e:
        Trainer(cfg, tmp_path / "sbn2", progress=False)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- torchrun
@pytest.mark.trains
def test_ddp_step_equals_one_process_and_ranks_agree(ddp_run, same_image_sets, tmp_path, margin):
    tmp, done = ddp_run
    rank0 = torch.load(tmp / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical weights on both processes
    final = load_checkpoint(tmp / "ddp" / "model_final.pth")["model"]
    assert all(torch.equal(final[k], rank0[k]) for k in rank0)  # the unwrapped model was saved
    _single(tmp_path, "one", [*same_image_sets, "solver.ims_per_batch=4", "train.eval_at_end=false"])
    _single(tmp_path, "init", [*same_image_sets, "solver.max_iter=0", "train.eval_at_end=false"])
    one = load_checkpoint(tmp_path / "one" / "model_final.pth")["model"]
    init = load_checkpoint(tmp_path / "init" / "model_final.pth")["model"]
    moved = max(float((one[k] - init[k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-3  # the step moved the weights well beyond the tolerance below
    assert set(one) == set(rank0)
    # torch.testing.assert_close(rank0[k], one[k], rtol=1e-4, atol=1e-6) for every k, as one statistic: the worst
    # |a - b| / (1e-6 + 1e-4 |b|) over all elements must be <= 1
    errors = {k: float(((rank0[k].double() - one[k].double()).abs() / (1e-6 + 1e-4 * one[k].double().abs())).max())
              for k in one if one[k].is_floating_point() and one[k].numel()}
    worst = max(errors, key=errors.get)
    margin.check("DDP vs one process: error / (1e-6 + 1e-4 |w|) (worst)", errors[worst], "<=", 1.0, worst)
    for k in one:
        if not one[k].is_floating_point():
            assert torch.equal(rank0[k], one[k]), k
    # one run directory, written by rank 0 alone
    run = tmp / "ddp"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == [
        "config.yaml", "last_checkpoint.pth", "metrics.json", "model_0000001.pth", "model_final.pth"]
    assert done.stdout.count("run directory:") == 1 and "global batch 4 (2 x 2 processes)" in done.stdout
    assert load_checkpoint(run / "last_checkpoint.pth")["position"]["samples_per_step"] == 4


def test_end_of_run_evaluation_equals_one_process(ddp_run, tmp_path):
    """metrics.json of the 2-process run (each process inferred on half the val images) equals evaluate.py in
    one process on the saved model, number for number."""
    tmp, _ = ddp_run
    val = json.loads((tmp / "ddp" / "metrics.json").read_text())["val"]
    report = _evaluate(["--checkpoint", str(tmp / "ddp" / "model_final.pth"), "--out", str(tmp_path),
                        "--no-progress", "--device", "cpu"])
    single = report["results"]["clean"]
    for iou_type in ("bbox", "segm"):
        assert val[iou_type]["stats"] == single[iou_type]["stats"], iou_type
        assert val[iou_type]["per_category"] == single[iou_type]["per_category"]


def test_evaluate_under_torchrun_equals_one_process(ddp_run, tmp_path):
    tmp, _ = ddp_run
    checkpoint = str(tmp / "ddp" / "model_final.pth")
    done = torchrun(tmp_path, "evaluate.py", ["--checkpoint", checkpoint, "--out", str(tmp_path / "dist"),
                                              "--no-progress", "--device", "cpu"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("metrics:") == 1  # rank 0 reports
    _evaluate(["--checkpoint", checkpoint, "--out", str(tmp_path / "one"), "--no-progress", "--device", "cpu"])
    dist_dets = json.loads((tmp_path / "dist" / "detections_val_clean.json").read_text())
    one_dets = json.loads((tmp_path / "one" / "detections_val_clean.json").read_text())
    assert len(one_dets) > 0 and dist_dets == one_dets  # the same detections, in the same order
    a, b = (json.loads((tmp_path / d / "eval_val_clean.json").read_text())["results"] for d in ("dist", "one"))
    assert a == b


def test_resume_on_one_process_keeps_the_global_batch(ddp_run, tmp_path, capsys):
    """The 2-process run (2 images each) continued by one process: 4 images per step, from the position in global
    samples; the run's weights load into the unwrapped model."""
    tmp, _ = ddp_run
    shutil.copytree(tmp / "ddp", tmp_path / "ddp")
    # the resumed run's config sets train.num_threads=1 for this process (tests/conftest.py restores it)
    summary = train.main(["--name", "ddp", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                          "solver.max_iter=2", "train.eval_at_end=false"])
    out = capsys.readouterr().out
    assert "solver.ims_per_batch 2 -> 4, the run's 4 images per step" in out
    assert "at iteration 1" in out and "the data order" not in out
    assert "the RNG states of every process (the run had 2 process(es), it continues on 1)" in out
    assert summary["iterations"] == 2
    state = load_checkpoint(tmp_path / "ddp" / "last_checkpoint.pth")
    assert state["position"]["samples_per_step"] == 4 and state["position"]["world_size"] == 1


def test_a_failing_rank_ends_the_job_with_its_one_line(tmp_path):
    start = time.monotonic()
    done = torchrun(tmp_path, "train.py", ["--config", "configs/tiny.yaml", "--stage", "rpn", "--name", "fail",
                                           "--no-progress", "--set", f"train.output_dir={tmp_path}",
                                           "train.eval_at_end=false", "train.num_threads=1"],
                    env={"FAIL_RANK": "1"}, timeout=180)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines[0] == "error: rank 1 cannot go on (a failure made by the test)", done.stderr[-3000:]
    # rank 0 is either stopped by torchrun or says in one line that it lost the other process (no traceback)
    assert all(line.startswith("error: rank 0: stopped because another process failed") for line in lines[1:])
    assert "[rank0]: Traceback" not in done.stderr
    assert elapsed < 120, elapsed  # no hang: the other process did not wait for the timeout
