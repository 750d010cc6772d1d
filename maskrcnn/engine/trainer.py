"""Training: data, optimiser and schedule, the loop, checkpoints, and the end-of-run evaluation.

    run = Trainer(cfg, init="runs/rpn/model_final.pth"); run.train()
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..model.build import build_model
from .checkpoint import load_checkpoint, partial_load, save_checkpoint
from ..config import Config, save_config
from ..data.build import build_datasets
from ..data.loader import build_loader
from ..evaluation.coco_eval import evaluate_model, format_metrics
from .device import select_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(solver) -> callable:
    """Linear warmup from warmup_factor, then x gamma at each step."""
    def f(it: int) -> float:
        factor = solver.gamma ** sum(it >= s for s in solver.steps)
        if it < solver.warmup_iters:
            alpha = it / solver.warmup_iters
            factor *= solver.warmup_factor * (1 - alpha) + alpha
        return factor
    return f


def build_optimizer(params, solver) -> torch.optim.Optimizer:
    if solver.optimizer == "sgd":
        return torch.optim.SGD(params, lr=solver.base_lr, momentum=solver.momentum,
                               weight_decay=solver.weight_decay)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=solver.base_lr, weight_decay=solver.weight_decay)
    raise ValueError(f"solver.optimizer: expected sgd or adamw, got {solver.optimizer!r}")


def total_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The one place loss weights are applied: a loss not named in `weights` weighs 1.0."""
    unknown = sorted(set(weights) - set(losses))
    if unknown:
        raise ValueError(f"loss_weights names {unknown[0]!r}, which the model does not return "
                         f"(its losses: {', '.join(losses)})")
    return sum(weights.get(name, 1.0) * value for name, value in losses.items())


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, init: Optional[str] = None, resume: bool = False,
                 progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        seed_everything(cfg.train.seed)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = select_device(cfg.train.device)
        self.train_set, self.val_set = build_datasets(cfg)
        if cfg.model.num_classes != self.train_set.num_classes:
            print(f"model.num_classes set to {self.train_set.num_classes} from the dataset "
                  f"(was {cfg.model.num_classes})")
            cfg.model.num_classes = self.train_set.num_classes
        save_config(cfg, self.run_dir / "config.yaml")
        resume_path = self.run_dir / "last_checkpoint.pth"
        resuming = resume and resume_path.exists()
        from_coco = init == "torchvision" and not resuming
        self.model = build_model(cfg, load_weights=not resuming and not from_coco)
        if from_coco:  # torchvision's COCO Mask R-CNN; new class predictors when the classes differ
            from ..torchvision_weights import load_torchvision_coco
            report = load_torchvision_coco(self.model, cfg.model.num_classes,
                                           getattr(self.train_set, "class_names", None), cfg)
            save_config(cfg, self.run_dir / "config.yaml")  # frozen-BN eps changed with these weights
            print(report.summary())
        elif init and not resuming:
            report = partial_load(self.model, init)
            print(report.summary())
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        s = cfg.solver
        self.optimizer = build_optimizer(params, s)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(s))
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_iter = 0
        if resume and resume_path.exists():
            state = load_checkpoint(resume_path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_iter = state["iteration"]
            print(f"resumed from {resume_path} at iteration {self.start_iter}")

    def checkpoint(self, iteration: int, final: bool = False) -> Path:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "iteration": iteration,
                 "config": self.cfg, "stage": self.cfg.stage, "class_names": self.train_set.class_names}
        save_checkpoint(state, self.run_dir / "last_checkpoint.pth")
        if final:
            path = self.run_dir / "model_final.pth"
            save_checkpoint({k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}, path)
            return path
        return self.run_dir / "last_checkpoint.pth"

    def train(self) -> dict:
        cfg, s, t = self.cfg, self.cfg.solver, self.cfg.train
        loader = build_loader(self.train_set, s.ims_per_batch, shuffle=True, num_workers=cfg.data.num_workers,
                              seed=t.seed + self.start_iter, drop_last=True, infinite=True,
                              pin_memory=self.device.type == "cuda")
        writer = SummaryWriter(str(self.run_dir))
        self.model.train()
        it = self.start_iter
        bar = tqdm(total=s.max_iter, initial=it, desc=f"train {cfg.stage}", disable=not self.progress,
                   dynamic_ncols=True)
        data_iter = iter(loader)
        history = []
        t_last = time.perf_counter()
        while it < s.max_iter:
            images, targets = next(data_iter)
            images = [img.to(self.device, non_blocking=True) for img in images]
            targets = [{k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                        for k, v in tg.items()} for tg in targets]
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                losses = self.model(images, targets)
            loss = total_loss({k: v.float() for k, v in losses.items()}, cfg.loss_weights)
            if not math.isfinite(loss.item()):
                bar.close()
                last = self.run_dir / "last_checkpoint.pth"
                where = (f"the last good checkpoint is {last}" if last.exists()
                         else "no checkpoint was written yet (train.checkpoint_period)")
                raise FloatingPointError(
                    f"iteration {it}: loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} }); {where}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if s.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            it += 1
            now = time.perf_counter()
            sec_per_iter, t_last = now - t_last, now
            values = {k: v.item() for k, v in losses.items()}
            values["total_loss"] = loss.item()
            history.append(values)
            bar.update(1)
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()}, refresh=False)
            if it % t.log_period == 0 or it == s.max_iter:
                for k, v in values.items():
                    writer.add_scalar(f"loss/{k}", v, it)
                writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], it)
                writer.add_scalar("time/sec_per_iter", sec_per_iter, it)
            if t.vis_period > 0 and it % t.vis_period == 0:
                from ..vis.drawing import log_training_images  # drawing only when asked for
                log_training_images(writer, self.model, images, targets, it,
                                    class_names=getattr(self.train_set, "class_names", None))
            if it % t.checkpoint_period == 0 and it < s.max_iter:
                self.checkpoint(it)
        bar.close()
        if t.precise_bn_iters > 0 and it > self.start_iter:
            n = update_bn_stats(self.model, build_loader(self.train_set, s.ims_per_batch, shuffle=True,
                                                         num_workers=0, seed=t.seed + 7919, drop_last=True),
                                t.precise_bn_iters, self.device)
            if n:
                print(f"BatchNorm statistics of {n} layers recomputed over {t.precise_bn_iters} batches")
        final = self.checkpoint(it, final=True)
        summary = {"stage": cfg.stage, "iterations": it, "checkpoint": str(final),
                   "first_losses": history[0] if history else {}, "last_losses": history[-1] if history else {}}
        if history:
            n = max(1, min(20, len(history) // 5))
            summary["loss_start"] = {k: float(np.mean([h[k] for h in history[:n]])) for k in history[0]}
            summary["loss_end"] = {k: float(np.mean([h[k] for h in history[-n:]])) for k in history[0]}
        if t.eval_at_end:
            metrics, results = evaluate_model(self.model, self.val_set, self.device, cfg.test.ims_per_batch,
                                              cfg.test.max_images, self.amp,
                                              cfg.model.roi_heads.mask_threshold, self.progress, "evaluate val")
            summary["val"] = _strip_summaries(metrics)
            print(f"val: {format_metrics(metrics)}")
            for k, v in _flat_scalars(metrics).items():
                writer.add_scalar(f"val/{k}", v, it)
        writer.close()
        (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary


@torch.no_grad()
def update_bn_stats(model: torch.nn.Module, loader, num_batches: int, device: torch.device) -> int:
    """Precise BatchNorm statistics (detectron2's PreciseBN): the running mean and variance of every trained
    BatchNorm layer are replaced by their plain average over `num_batches` training batches, computed with
    the final weights (the running averages mix in statistics of weights from earlier iterations).
    Returns the number of layers updated (0 when the model has no trained BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and any(p.requires_grad for p in m.parameters())]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    for i, (images, targets) in enumerate(loader):
        if i == num_batches:
            break
        model.features([img.to(device) for img in images])
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)
    return len(bns)


def _strip_summaries(metrics: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "summary"} if isinstance(v, dict) else v)
            for k, v in metrics.items()}


def _flat_scalars(metrics: dict) -> dict[str, float]:
    if "AR@100" in metrics:
        return dict(metrics)
    return {f"{t}_{k}": v for t in ("bbox", "segm") if t in metrics for k, v in metrics[t]["stats"].items()}
