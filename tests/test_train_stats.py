"""Training statistics (detectron2's event-storage scalars, without the global storage): the RPN's sampled
positive / negative anchors, the RoI heads' foreground / background samples, box classification accuracy (all
and foreground) and mask accuracy, from the tensors the losses already use; summed over micro-batches before
the division; logged as stats/* in TensorBoard and as stats_end in metrics.json; the losses unchanged."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from maskrcnn.config import load_config
from maskrcnn.engine.step import mean_stats, train_step
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_head import BoxHead
from maskrcnn.model.build import build_model
from maskrcnn.model.mask_head import MaskHead

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
NAMES = {"rpn_pos_anchors", "rpn_neg_anchors", "roi_fg_samples", "roi_bg_samples", "cls_accuracy",
         "fg_cls_accuracy", "mask_accuracy"}


def batch():
    images, targets = [], []
    for i in range(2):
        images.append(torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(i)))
        masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
        masks[0, 20:60, 30:90] = 1
        masks[1, 50:90, 10:40] = 1
        targets.append({"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0], [10.0, 50.0, 40.0, 90.0]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def test_the_model_gives_its_statistics_from_the_sampled_tensors_and_the_same_losses():
    cfg = load_config(CONFIG)
    images, targets = batch()
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False).train()
    state = torch.get_rng_state()
    plain = model(images, targets)
    torch.set_rng_state(state)
    record, stats = {}, {}
    losses = model(images, targets, record, stats)
    assert set(losses) == set(plain) and all(torch.equal(losses[k], plain[k]) for k in plain)  # no other losses
    assert set(stats) == NAMES and not NAMES & set(losses)
    sampled = record["sampled_anchor_labels"]  # [N, A]: the sample the RPN's loss used
    assert stats["rpn_pos_anchors"].tolist() == [float((sampled == 1).sum()), 2.0]
    assert stats["rpn_neg_anchors"].tolist() == [float((sampled == 0).sum()), 2.0]
    labels = torch.cat([s["labels"] for s in record["roi_samples"]])
    assert stats["roi_fg_samples"].tolist() == [float((labels > 0).sum()), 2.0]
    assert stats["roi_bg_samples"].tolist() == [float((labels == 0).sum()), 2.0]
    assert stats["cls_accuracy"][1] == len(labels) and stats["fg_cls_accuracy"][1] == (labels > 0).sum()
    assert not any(v.requires_grad for v in stats.values())


def test_box_accuracy_planted():
    head = BoxHead(in_channels=1, resolution=1, fc_dim=4, num_classes=2, box_coder=BoxCoder(weights=(10, 10, 5, 5)))
    samples = [{"boxes": torch.tensor([[0.0, 0, 10, 10]] * 4), "labels": torch.tensor([0, 1, 2, 0]),
                "matched_idx": torch.tensor([0, 0, 1, 0])}]
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 12, 12]])}]
    scores = torch.tensor([[5.0, 0, 0], [0, 5, 0], [5, 0, 0], [0, 5, 0]])  # right, right, wrong, wrong
    stats = {}
    head.losses((scores, torch.zeros(4, 12)), samples, targets, stats)
    assert stats["cls_accuracy"].tolist() == [2.0, 4.0] and stats["fg_cls_accuracy"].tolist() == [1.0, 2.0]


def test_mask_accuracy_planted():
    head = MaskHead(in_channels=1, conv_dim=1, num_convs=1, num_classes=2)
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    masks[0, :, :2] = 1  # left half
    samples = [{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([2]), "matched_idx": torch.tensor([0])}]
    logits = torch.full((1, 3, 4, 4), -1.0)
    logits[0, 2, :, :1] = 1.0  # predicts a quarter: the first column; class 2's logits are the ones read
    logits[0, 1] = 1.0
    stats = {}
    head.losses(logits, samples, [{"masks": masks}], stats)
    assert stats["mask_accuracy"].tolist() == [12.0, 16.0]  # 4 of the 16 cells wrong: the second column


class _Counting(nn.Module):
    """A model with one loss and one statistic whose numerator / denominator differ between micro-batches."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images, targets, record=None, stats=None):
        if stats is not None:
            stats["hits"] = torch.tensor([float(targets[0]["hits"]), float(targets[0]["of"])])
            stats["never"] = torch.tensor([0.0, 0.0])
        return {"loss": self.w * 2}


def test_statistics_are_summed_over_micro_batches_then_divided():
    model = _Counting()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    micro = [([torch.zeros(1)], [{"hits": 1, "of": 2}]), ([torch.zeros(1)], [{"hits": 3, "of": 4}])]
    stats = {}
    values = train_step(model, micro, opt, amp=False, accumulate=2, stats=stats)
    assert stats == {"hits": pytest.approx(4 / 6)}  # not the mean of 1/2 and 3/4; no denominator: left out
    assert values == {"loss": pytest.approx(2.0), "total_loss": pytest.approx(2.0)}
    assert train_step(model, micro[:1], opt, amp=False) == values  # no stats asked: none given, same losses


def test_mean_stats():
    assert mean_stats([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}
    assert mean_stats([]) == {}


def test_training_logs_them_to_tensorboard_and_metrics_json(tmp_path):
    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.main(["--config", str(CONFIG), "--name", "s", "--no-progress", "--set",
                              f"train.output_dir={tmp_path}", "solver.max_iter=2", "train.log_period=1",
                              "train.checkpoint_period=1000", "train.eval_at_end=false"])
    acc = EventAccumulator(str(tmp_path / "s"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"stats/{n}" for n in NAMES - {"fg_cls_accuracy"}} <= tags and not any("loss/stats" in t for t in tags)
    pos = [e.value for e in acc.Scalars("stats/rpn_pos_anchors")]
    assert len(pos) == 2 and all(0 < v <= 64 for v in pos)  # tiny.yaml samples 64 anchors per image
    for acc_name in ("stats/cls_accuracy", "stats/mask_accuracy"):
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars(acc_name))
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert NAMES - {"fg_cls_accuracy"} <= set(metrics["stats_end"]) and metrics["stats_end"] == summary["stats_end"]
    assert not NAMES & set(metrics["loss_end"])
