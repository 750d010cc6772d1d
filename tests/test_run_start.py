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
VALID = "loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask"


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
    for stage in ("rpn", "full"):
        cfg.stage = stage
        torch.manual_seed(0)
        model = build_model(cfg, load_weights=False).train()
        returned[stage] = list(model([image], [target]))
    assert set(returned["full"]) == set(LOSS_NAMES) and set(returned["rpn"]) == set(LOSS_NAMES[:2])


def test_a_weight_for_a_loss_of_the_other_stage_is_no_error(tmp_path):
    """--stage rpn computes no mask loss; loss_weights.loss_mask is the model's, so the run trains."""
    summary = train.main(TINY + ["--stage", "rpn", "--name", "w", "--set", f"train.output_dir={tmp_path}", *QUICK,
                                 "loss_weights.loss_mask=2", "loss_weights.loss_rpn_box=0.5"])
    assert summary["iterations"] == 1 and set(summary["last_losses"]) == {"loss_rpn_cls", "loss_rpn_box", "total_loss"}
    last = summary["last_losses"]
    assert last["total_loss"] == pytest.approx(last["loss_rpn_cls"] + 0.5 * last["loss_rpn_box"])
    assert load_config(tmp_path / "w" / "config.yaml").loss_weights == {"loss_mask": 2.0, "loss_rpn_box": 0.5}


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
    assert metrics["iterations"] == 1 and "loss_mask" not in metrics["last_losses"]
