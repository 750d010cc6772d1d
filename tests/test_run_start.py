"""Starting a run: loss weights checked against every loss of the model (not of the stage) before anything is
done, and a start that failed (a bad value, too few images, a non-finite loss at iteration 1, a bad device)
leaves nothing that blocks the same command once the problem is fixed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import train
from maskrcnn.config import LOSS_NAMES, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.yaml", "--no-progress"]
QUICK = ["train.eval_at_end=false", "train.precise_bn_iters=0", "solver.max_iter=1"]
VALID = "loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask, loss_maskiou"


def _one_line_exit(capsys, main, argv, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# ------------------------------------------------------------------------------------------ loss weights
def test_loss_names_are_those_the_model_returns_in_both_stages():
    import torch

    from maskrcnn.model.build import build_model

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}
    returned = {}
    for stage, mask_head in (("rpn", "standard"), ("full", "standard"), ("full", "maskiou")):
        cfg.stage, cfg.model.roi_heads.mask_head = stage, mask_head
        torch.manual_seed(0)
        model = build_model(cfg, load_weights=False).train()
        returned[stage, mask_head] = list(model([image], [target]))
    assert set(returned["rpn", "standard"]) == set(LOSS_NAMES[:2])
    assert set(returned["full", "standard"]) == set(LOSS_NAMES) - {"loss_maskiou"}
    assert set(returned["full", "maskiou"]) == set(LOSS_NAMES)  # every name is some model's loss


def test_a_weight_for_a_loss_of_the_other_stage_is_no_error(tmp_path):
    """--stage rpn computes no mask loss; loss_weights.loss_mask is the model's, so the run trains."""
    summary = train.main(TINY + ["--stage", "rpn", "--name", "w", "--set", f"train.output_dir={tmp_path}", *QUICK,
                                 "loss_weights.loss_mask=2", "loss_weights.loss_rpn_box=0.5"])
    assert summary["iterations"] == 1 and set(summary["loss_end"]) == {"loss_rpn_cls", "loss_rpn_box", "total_loss"}
    last = summary["loss_end"]
    assert last["total_loss"] == pytest.approx(last["loss_rpn_cls"] + 0.5 * last["loss_rpn_box"])
    assert load_config(tmp_path / "w" / "config.yaml").loss_weights == {"loss_mask": 2.0, "loss_rpn_box": 0.5}
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())  # the losses once, not twice
    assert metrics["loss_end"] == last and not {"first_losses", "last_losses"} & set(metrics)


def test_a_weight_no_stage_returns_is_one_line_before_the_run_directory(tmp_path, capsys):
    err = _one_line_exit(capsys, train.main, TINY + ["--stage", "rpn", "--name", "typo", "--set",
                                                     f"train.output_dir={tmp_path}", "loss_weights.loss_msk=2"])
    assert err == (f"error: loss_weights.loss_msk: not a loss of this model (its losses, over both stages: "
                   f"{VALID}); did you mean loss_mask?")
    assert not (tmp_path / "typo").exists()


def test_experiment_takes_a_mask_loss_weight_and_refuses_an_unknown_one(tmp_path, monkeypatch, capsys):
    """experiment.py passes --set to the RPN stage too: it must train there. An unknown name stops it before
    anything runs. (The RPN stage is run for real; the experiment is stopped after it.)"""
    import experiment

    monkeypatch.chdir(tmp_path)
    sets = [f"data.root={ROOT / 'datasets' / 'shapes-tiny'}", "train.precise_bn_iters=0", "loss_weights.loss_mask=2"]
    err = _one_line_exit(capsys, experiment.main, ["--config", str(ROOT / "configs" / "tiny.yaml"), "--name", "e",
                                                   "--no-progress", "--set", *sets, "loss_weights.loss_msk=1"])
    assert err.startswith("error: loss_weights.loss_msk: not a loss of this model") and VALID in err
    assert not (tmp_path / "runs").exists()

    class AfterRPN(Exception):
        pass

    real_run = experiment.Runner.run

    def run(self, tasks, jobs=None):
        assert [name for name, _ in tasks] == ["rpn"]
        real_run(self, tasks, jobs)
        raise AfterRPN

    monkeypatch.setattr(experiment.Runner, "run", run)
    with pytest.raises(AfterRPN):
        experiment.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--name", "e", "--no-progress",
                         "--rpn-iters", "1", "--seeds", "0", "--set", *sets])
    metrics = json.loads((tmp_path / "runs" / "e" / "rpn" / "metrics.json").read_text())
    assert metrics["iterations"] == 1 and "loss_mask" not in metrics["loss_end"]


# ------------------------------------------------------------------------------------ a failed start
def _start(tmp_path, *sets, name="again"):
    return TINY + ["--stage", "rpn", "--name", name, "--set", f"train.output_dir={tmp_path}", *QUICK, *sets]


@pytest.fixture
def no_training(monkeypatch):
    """train.main gets past the start (the Trainer is built, config.yaml written) and trains nothing."""
    from maskrcnn.engine.trainer import Trainer

    monkeypatch.setattr(Trainer, "train", lambda self: {"checkpoint": "(not trained)", "started": True})


@pytest.mark.parametrize("bad, expected", [
    ("model.noise.site=neck", "error: model.noise.site: expected one of bottom_up, fpn, roi, got 'neck'"),
    ("solver.ims_per_batch=20", "error: dataset of 8 images gives no step of 20 with drop_last=True"),
    ("train.device=gpu", "error: train.device=gpu: unknown device 'gpu' (choose auto, cpu, cuda or cuda:N)"),
    ("model.backbone.weights=imagenet", "error: ImageNet weights for ResNet-18 could not be downloaded (URLError"),
])
def test_a_start_that_fails_on_the_input_leaves_no_run_directory(tmp_path, capsys, offline_hub, no_training,
                                                                 bad, expected):
    err = _one_line_exit(capsys, train.main, _start(tmp_path, bad))
    assert err.startswith(expected), err
    assert not (tmp_path / "again").exists()
    assert train.main(_start(tmp_path))["started"]  # the same command, fixed
    assert (tmp_path / "again" / "config.yaml").is_file()


def test_a_directory_without_a_checkpoint_is_no_run(tmp_path, capsys):
    """A non-finite loss at iteration 1 stops the run before its first checkpoint: the directory holds its
    config.yaml and events only. --resume has nothing to continue and says how to start again; the same
    command without the problem starts the run again, removing what the failed start wrote."""
    with pytest.raises(SystemExit) as e:
        train.main(_start(tmp_path, "loss_weights.loss_rpn_cls=nan"))
    assert e.value.code == 3
    run = tmp_path / "again"
    failed = sorted(p.name for p in run.iterdir())
    assert "config.yaml" in failed and not list(run.glob("*.pth"))
    capsys.readouterr()
    err = _one_line_exit(capsys, train.main, ["--name", "again", "--resume", "--no-progress", "--set",
                                              f"train.output_dir={tmp_path}"])
    assert err == (f"error: --resume: no checkpoint in {run} to continue from (last_checkpoint.pth or "
                   "model_<iter>.pth); its start stopped before the first checkpoint: run the same command "
                   "without --resume")
    summary = train.main(_start(tmp_path))
    out = capsys.readouterr().out
    assert f"note: {run} held a start that stopped before its first checkpoint ({', '.join(failed)}): removed" in out
    assert summary["iterations"] == 1 and load_config(run / "config.yaml").loss_weights == {}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the failed start's events are gone
    # Now it is a run: refused without --resume or --overwrite.
    err = _one_line_exit(capsys, train.main, _start(tmp_path))
    assert "already holds a run (last_checkpoint.pth, model_0000001.pth, model_final.pth)" in err


# ------------------------------------------------------------------------------------------ command line
def test_resume_says_that_it_does_not_read_config(tmp_path, capsys, no_training, monkeypatch):
    train.main(_start(tmp_path))  # config.yaml written
    (tmp_path / "again" / "last_checkpoint.pth").write_bytes(b"")  # a checkpoint to continue from (not opened:)
    monkeypatch.setattr(train, "run", lambda args, cfg: {})
    argv = ["--name", "again", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}"]
    capsys.readouterr()
    train.main(argv)
    assert "--config" not in capsys.readouterr().out
    train.main(argv + ["--config", "configs/coco_r50_fpn_1x.yaml"])
    assert (f"note: --resume continues with {tmp_path / 'again' / 'config.yaml'} (and --set); --config "
            "configs/coco_r50_fpn_1x.yaml is not read\n") in capsys.readouterr().out


def test_help_shows_the_example_line_continuation(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "--init torchvision \\\n        --set data.train_ann=..." in out
