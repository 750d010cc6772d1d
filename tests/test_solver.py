"""The recipe at another batch: solver.reference_batch with the linear scaling rule (detectron2's
auto_scale_workers numbers) or gradient accumulation (the same gradient as one batch k times larger), and the
run's saved config holding what actually ran."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import train
from maskrcnn.config import load_config
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.recipe import resolve_batch
from maskrcnn.engine.trainer import Trainer

COCO = "configs/coco_r50_fpn_1x.yaml"


def _coco(*sets):
    return load_config(COCO, list(sets))


# ------------------------------------------------------------------------------------------- linear rule
@pytest.mark.parametrize("world, ims, lr, max_iter, steps, warmup, period", [
    (1, 2, 0.0025, 720000, [480000, 640000], 8000, 40000),  # one GPU, 2 images: 8x the schedule
    (1, 4, 0.005, 360000, [240000, 320000], 4000, 20000),
    (4, 2, 0.01, 180000, [120000, 160000], 2000, 10000),  # 4 GPUs x 2
    (2, 16, 0.04, 45000, [30000, 40000], 500, 2500),  # a batch larger than the reference
])
def test_linear_rule_scales_lr_and_schedule(world, ims, lr, max_iter, steps, warmup, period):
    cfg = _coco(f"solver.ims_per_batch={ims}")
    k, lines = resolve_batch(cfg, world)
    s = cfg.solver
    assert k == 1
    assert s.base_lr == pytest.approx(lr, rel=1e-12)
    assert (s.max_iter, s.steps, s.warmup_iters, cfg.train.checkpoint_period) == (max_iter, steps, warmup, period)
    assert s.reference_batch == ims * world  # the saved config is the recipe at this batch
    assert len(lines) == 1 and "linear scaling rule" in lines[0] and f"{max_iter}" in lines[0]
    again, lines = resolve_batch(cfg, world)  # resolving the resolved config (a resumed run) changes nothing
    assert again == 1 and cfg.solver.max_iter == max_iter and not any("scaling" in line for line in lines)


def test_reference_batch_unchanged_off_or_none():
    for sets, world in [((), 1), (("solver.ims_per_batch=2",), 8), (("solver.reference_batch=0",), 1),
                        (("solver.ims_per_batch=2", "solver.scale_rule=none"), 1)]:
        cfg = _coco(*sets)
        before = (cfg.solver.base_lr, cfg.solver.max_iter, list(cfg.solver.steps), cfg.solver.warmup_iters)
        k, _ = resolve_batch(cfg, world)
        assert k == 1 and before == (cfg.solver.base_lr, cfg.solver.max_iter, cfg.solver.steps,
                                     cfg.solver.warmup_iters), sets
    # the shapes preset has no reference batch: untouched at any batch
    shapes = load_config("configs/shapes.yaml", ["solver.ims_per_batch=8"])
    assert resolve_batch(shapes, 1)[0] == 1 and shapes.solver.base_lr == 0.001 and shapes.solver.max_iter == 600


def test_accumulate_micro_batches_and_errors():
    cfg = _coco("solver.ims_per_batch=2", "solver.scale_rule=accumulate")
    k, lines = resolve_batch(cfg, 1)
    assert k == 8 and cfg.solver.base_lr == 0.02 and cfg.solver.max_iter == 90000 and cfg.solver.steps == [60000, 80000]
    assert "8 micro-batches of 2 images" in lines[0]
    assert resolve_batch(_coco("solver.ims_per_batch=2", "solver.scale_rule=accumulate"), 4)[0] == 2
    for ims, world in [(3, 1), (32, 1), (2, 3)]:
        with pytest.raises(ValueError, match="not a multiple of the global batch") as e:
            resolve_batch(_coco(f"solver.ims_per_batch={ims}", "solver.scale_rule=accumulate"), world)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="solver.scale_rule: expected linear, accumulate, none"):
        resolve_batch(_coco("solver.scale_rule=sqrt"), 1)


def test_resume_keeps_the_global_batch():
    cfg = _coco("solver.ims_per_batch=16", "solver.reference_batch=16")
    k, lines = resolve_batch(cfg, 4, resumed_step=16)
    assert k == 1 and cfg.solver.ims_per_batch == 4 and cfg.solver.max_iter == 90000
    assert "solver.ims_per_batch 16 -> 4" in lines[0]
    with pytest.raises(ValueError, match="do not split over 3 processes"):
        resolve_batch(_coco(), 3, resumed_step=16)


def test_train_prints_and_saves_the_scaled_recipe(tmp_path, capsys):
    summary = train.main(["--config", "configs/tiny.yaml", "--stage", "rpn", "--name", "lin", "--no-progress", "--set",
                          f"train.output_dir={tmp_path}", "train.eval_at_end=false", "solver.reference_batch=4",
                          "solver.max_iter=2", "solver.warmup_iters=2", "solver.steps=[1]", "train.checkpoint_period=1",
                          "train.precise_bn_iters=0"])
    out = capsys.readouterr().out
    assert "linear scaling rule, global batch 2 (one process) instead of 4: base_lr 0.001 -> 0.0005" in out
    saved = load_config(tmp_path / "lin" / "config.yaml")
    s = saved.solver
    assert (s.base_lr, s.max_iter, s.steps, s.warmup_iters, s.reference_batch) == (0.0005, 4, [2], 4, 2)
    assert saved.train.checkpoint_period == 2
    assert summary["iterations"] == 4
    assert load_checkpoint(tmp_path / "lin" / "last_checkpoint.pth")["position"]["samples_per_step"] == 2


# --------------------------------------------------------------------------------------------- accumulate
class _Toy(nn.Module):
    """A float64 regression on each image's mean colour: its loss is a plain mean over images (no BatchNorm, no
    sampling), so the mean of k micro-batch losses is the loss of their union."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, images, targets=None, record=None, stats=None):  # the trainer's model signature
        x = torch.stack([img.double().mean((1, 2)) for img in images])  # [N, 3]
        y = torch.tensor([float(len(t["boxes"])) for t in targets], dtype=torch.float64)
        return {"loss_toy": ((x @ self.w + self.b - y) ** 2).mean()}


def _toy_step(tmp_path, name, *sets):
    cfg = load_config("configs/tiny.yaml", ["stage=rpn", f"train.output_dir={tmp_path}", "train.eval_at_end=false",
                                            "solver.max_iter=1", "solver.optimizer=sgd", "solver.base_lr=0.1",
                                            "solver.warmup_iters=0", "solver.steps=[]", "solver.clip_grad_norm=0",
                                            "train.precise_bn_iters=0", *sets])
    trainer = Trainer(cfg, tmp_path / name, progress=False)
    trainer.model = trainer.ddp = _Toy()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda it: 1.0)
    summary = trainer.train()
    return trainer.model, summary


@pytest.mark.trains
def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch(tmp_path, margin):
    big, s_big = _toy_step(tmp_path, "big", "solver.ims_per_batch=4")
    start = _Toy()
    moved = (big.w - start.w).abs().max()
    assert moved > 1e-3  # the step did something
    for ims in (2, 1):  # 2 x 2 and 4 x 1 micro-batches
        acc, s_acc = _toy_step(tmp_path, f"acc{ims}", f"solver.ims_per_batch={ims}", "solver.reference_batch=4",
                               "solver.scale_rule=accumulate")
        # float64 sums in another order: equal to ~1e-16, the tolerance 1e-14
        error = max(float((acc.w - big.w).detach().abs().max()), float((acc.b - big.b).detach().abs()))
        margin.check(f"{ims}-image micro-batches vs one batch: weight error", error, "<=", 1e-14)
        assert s_acc["loss_end"]["loss_toy"] == pytest.approx(s_big["loss_end"]["loss_toy"], rel=1e-12)
    # not a test that cannot fail: half the batch without accumulation moves the weights elsewhere
    half, _ = _toy_step(tmp_path, "half", "solver.ims_per_batch=2")
    assert (half.w - big.w).abs().max() > 1e-6


def test_train_step_refuses_a_wrong_number_of_micro_batches():
    """train_step takes its micro-batches lazily (one in memory at a time): fewer or more than `accumulate` is
    an error before any update, not a silently mis-scaled or skipped step."""
    from maskrcnn.engine.step import train_step

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, images, targets):
            return {"loss": (self.w * images[0].mean()).sum()}

    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = ([torch.ones(3, 4, 4)], [{}])
    assert train_step(model, [batch, batch], opt, amp=False, accumulate=2)["total_loss"] == pytest.approx(2.0)
    after = model.w.detach().clone()
    for n in (1, 3):
        with pytest.raises(ValueError, match=f"accumulate=2 but {n} micro-batches"):
            train_step(model, [batch] * n, opt, amp=False, accumulate=2)
    assert torch.equal(model.w.detach(), after)
