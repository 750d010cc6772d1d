"""Training: the loop, its checkpoints and the end-of-run evaluation. The trainer keeps the loop and delegates:
the recipe (batch rule, optimiser, schedule) to maskrcnn.engine.recipe, every RNG to maskrcnn.engine.rng, the run
directory's policy to maskrcnn.engine.rundir, stop signals to maskrcnn.engine.signals, one step to
maskrcnn.engine.step, PreciseBN to maskrcnn.engine.precise_bn and the checkpoint files to maskrcnn.engine.checkpoint.

    from train import trainer_hooks
    run = Trainer(cfg, "runs/full", init="runs/rpn/model_final.pth", hooks=trainer_hooks()); run.train()

Nothing is lost: a checkpoint holds the model, optimiser, scheduler, grad scaler, iteration, every RNG
(python, numpy, torch CPU and CUDA, the model's own generators), the position in the data order and the loss
history, so a resumed run continues exactly where the checkpointed one was (bit-identical losses on CPU).
SIGTERM or SIGINT finishes the current step, writes a checkpoint, prints how to resume and exits with
128 + the signal number (143, 130); a second signal exits at once.

The trainer depends on nothing above the engine: the end-of-run evaluation, the TensorBoard pictures and weights
from elsewhere (torchvision's COCO model) reach it as `Hooks` from the entry point (train.py). It names no model
class: the model is built by build_model and gives and takes its own generators' state (rng_state methods).

Under torchrun the model is wrapped in DistributedDataParallel; each process loads its shard of the global
order (maskrcnn.data.loader); rank 0 alone writes the run directory (config, TensorBoard, pictures,
checkpoints of the unwrapped model, metrics) and shows the progress bar. `resolve_batch` adapts the recipe to
the global batch (solver.reference_batch, solver.scale_rule).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..cli import Stopped
from ..model.build import build_model
from ..model.fuse import prepare_training
from ..model.precision import choose_precision, training_precision
from .checkpoint import (FORMAT, LAST, config_to_yaml, link_checkpoint, load_resume_checkpoint, numbered_name,
                         partial_load, prune_checkpoints, save_checkpoint)
from ..config import Config, save_config
from ..data.build import build_datasets
from ..data.loader import build_loader
from . import distributed
from .device import use_deterministic_algorithms
from .precise_bn import update_bn_stats
from .recipe import build_optimizer, build_scheduler, resolve_batch
from .rng import rank_seed, rng_state, seed_everything, set_rng_state
from .rundir import check_run_dir, clear_run_dir, resume_command
from .signals import StopSignals, shutdown_time_note
from .step import grad_scaler, mean_stats, train_step


@dataclass
class Hooks:
    """What the trainer calls but does not define: train.py passes them in (train.trainer_hooks), so that the
    engine imports nothing of the evaluation, the drawing or other projects' weights."""
    # evaluate(model, dataset, device, *, batch_size, max_images, amp, mask_threshold, progress) -> (metrics for
    # metrics.json, a one-line summary, TensorBoard scalars): the end-of-run evaluation (train.eval_at_end)
    evaluate: Optional[Callable[..., tuple[dict, str, dict[str, float]]]] = None
    # log_images(writer, record, iteration, *, class_names, logits): pictures of a step (train.vis_period)
    log_images: Optional[Callable[..., None]] = None
    # analyse(writer, metrics, run_dir, iteration) -> paths: the end-of-run evaluation's error-analysis pictures,
    # written beside metrics.json and added to TensorBoard (writer None: files only)
    analyse: Optional[Callable[..., list[Path]]] = None
    # initialise(model, cfg, class_names) -> report line: weights from elsewhere (train.py --init torchvision);
    # it may change cfg (the run's config.yaml is written again after it)
    initialise: Optional[Callable[..., str]] = None


def check_hooks(cfg: Config, hooks: Hooks) -> None:
    """A setting that needs a hook (train.py passes them) is refused when the trainer has none."""
    for key, on, hook in (("train.eval_at_end", cfg.train.eval_at_end, hooks.evaluate),
                          ("train.vis_period", cfg.train.vis_period > 0, hooks.log_images)):
        if on and hook is None:
            raise ValueError(f"{key} is set but this Trainer was given no hook for it (train.py passes "
                             "train.trainer_hooks())")


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, init: Optional[str] = None, resume: bool = False,
                 progress: bool = True, overwrite: bool = False, hooks: Optional[Hooks] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.hooks = hooks = hooks or Hooks()
        check_hooks(cfg, hooks)
        # Under torchrun (maskrcnn.engine.distributed.init already called): rank 0 writes, every rank trains.
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        if cfg.train.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0, got {cfg.train.keep_checkpoints}")
        # Everything that can fail on the user's input (the run directory, device, data, checkpoint, model, weights,
        # data loader) is checked before the directory is made or anything in it is deleted or written.
        old_files = check_run_dir(self.run_dir, resume, overwrite)
        self.progress = progress and self.main
        self._set_up_process()
        self._load_data()
        # Before anything is written: a bad checkpoint stops here. An unreadable last_checkpoint.pth (a copy cut
        # short) falls back to the newest numbered checkpoint that reads.
        resume_path, state, note = load_resume_checkpoint(self.run_dir) if resume else (None, None, None)
        if note:
            self._print(note)
        resumed_step = ((state.get("position") or {}).get("samples_per_step")) if state is not None else None
        self.accumulate, lines = resolve_batch(cfg, self.world, resumed_step)
        for line in lines:
            self._print(line)
        self._build_model(init, from_checkpoint=state is not None)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver)
        self.scaler = grad_scaler(self.device, self.amp)
        self._init_run_state(state)
        if state is not None:
            self._load_state(state, resume_path)
        self.loader = self._build_loader()
        if self.main:  # nothing failed: now the run directory
            clear_run_dir(self.run_dir, old_files, overwrite)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml", comment=self._precision_comment())
        # `self.model` is the model itself (state dicts, attributes such as rpn or features); `self.ddp` runs the
        # training forward: DistributedDataParallel under torchrun, else the model.
        self.ddp = self._wrap_ddp() if self.world > 1 else self.model

    # ----------------------------------------------------------------------------------------- set-up
    def _set_up_process(self) -> None:
        """Seeds, threads, the device, deterministic algorithms and the precision of training and evaluation."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = distributed.device(cfg.train.device)
        if cfg.train.deterministic:
            self._print(use_deterministic_algorithms())
        # fp16 + grad scaler on CUDA (train.amp); bf16 (no scaler needed) on a CPU (train.cpu_amp: auto takes it
        # where the CPU computes bf16 natively)
        self.precision = training_precision(cfg.train, self.device)
        self.eval_precision = choose_precision(self.device, cfg.test.amp, "test.amp")
        self.amp = self.precision.autocast
        self._print(self.precision.line() + ("" if self.eval_precision.name == self.precision.name else
                                             f"; evaluation {self.eval_precision.name} ({self.eval_precision.reason})"))
        for p in (self.precision, self.eval_precision):
            if p.warning:
                self._print(p.warning)

    def _load_data(self) -> None:
        """The training and validation sets; model.num_classes follows the dataset."""
        cfg = self.cfg
        with distributed.main_first():  # the shapes set is generated by rank 0 alone
            self.train_set, self.val_set = build_datasets(cfg)
        if cfg.model.num_classes != self.train_set.num_classes:
            self._print(f"model.num_classes set to {self.train_set.num_classes} from the dataset "
                        f"(was {cfg.model.num_classes})")
            cfg.model.num_classes = self.train_set.num_classes

    def _build_model(self, init: Optional[str], from_checkpoint: bool) -> None:
        """The model with its first weights (unless a checkpoint brings them), on the device, in its layout."""
        cfg, hooks = self.cfg, self.hooks
        from_elsewhere = hooks.initialise is not None and not from_checkpoint
        self.model = build_model(cfg, load_weights=not from_checkpoint and not from_elsewhere)
        if from_elsewhere:  # e.g. torchvision's COCO Mask R-CNN
            # the weights may come with settings (torchvision's: the frozen-BN eps), saved in config.yaml below
            report = hooks.initialise(self.model, cfg, getattr(self.train_set, "class_names", None))
            self._print(report)
        elif init and not from_checkpoint:
            report = partial_load(self.model, init)
            self._print(report.summary())
        if self.rank > 0:  # the same initial weights everywhere, then each process its own random stream
            seed_everything(rank_seed(cfg.train.seed, self.rank))
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        prepare_training(self.model, self.device, cfg.train.winograd, cfg.train.frozen_as_inference,
                         cfg.train.channels_last)
        if cfg.train.sync_bn:
            self._convert_sync_bn()

    def _init_run_state(self, state: Optional[dict]) -> None:
        self.start_iter = 0
        self.resume_state = state  # RNGs, data position and loss history are restored by train()
        self.history: list[dict[str, float]] = []
        self.writer = None
        self._saved_iter = None
        self._checkpoint_seconds = 0.0  # how long the last checkpoint took to write (rank 0)
        self._shutdown_checked = False
        self._signals = StopSignals(announce=self.main)
        self._bar = None

    def _load_state(self, state: dict, resume_path: Path) -> None:
        """The model, optimiser, scheduler and grad scaler of the run being resumed, and its iteration."""
        if "optimizer" not in state:
            raise ValueError(f"{resume_path}: holds no optimiser state, so the run cannot be continued")
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. a checkpoint written before the norm layers had their own group
            raise ValueError(f"{resume_path}: its optimiser state does not fit this run's parameter groups "
                             f"({e}); set solver.weight_decay_norm equal to solver.weight_decay to resume a "
                             "run written with one group") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.start_iter = state["iteration"]
        self._print(f"resumed from {resume_path} at iteration {self.start_iter}")

    def _build_loader(self):
        """Seeded by train.seed alone: the order of epoch e is the same in a run and in its resumed part. (It draws
        from its own generators only: building it here changes no random stream.)"""
        cfg = self.cfg
        return build_loader(self.train_set, cfg.solver.ims_per_batch, shuffle=True, num_workers=cfg.data.num_workers,
                            seed=cfg.train.seed, drop_last=True, infinite=True, pin_memory=self.device.type == "cuda",
                            aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, num_replicas=self.world,
                            rank=self.rank, accumulate=self.accumulate)

    def _precision_comment(self) -> str:
        """What the run's config.yaml says of the precision chosen (train.cpu_amp / test.amp may say auto)."""
        return (f"training {self.precision.line()}\nevaluation {self.eval_precision.line()}")

    def _print(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)

    def _convert_sync_bn(self) -> None:
        trained = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if self.world == 1:
            self._print("train.sync_bn: one process, nothing to synchronise")
            return
        if not trained:
            self._print("train.sync_bn: no trained BatchNorm layer (frozen BatchNorm is unaffected)")
            return
        if self.device.type != "cuda":
            raise ValueError("train.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU implementation); "
                             "set train.sync_bn=false to train on the CPU")
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self._print(f"SyncBatchNorm: {len(trained)} BatchNorm layers use the statistics of the global batch")

    def _wrap_ddp(self) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers need broadcasting only where a trained, unsynchronised BatchNorm updates them.
        bn_buffers = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                         and not isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules())
        # device_ids=None: the model is on this process's one device already, and DDP then passes the forward's
        # arguments through untouched (the trainer's `record` dict is filled in place on picture iterations).
        # Every trained parameter receives a gradient at every step (losses of empty batches are kept in the
        # graph as sum() * 0), so find_unused_parameters is off.
        return DistributedDataParallel(self.model, device_ids=None, forward_sync_buffers=bn_buffers,
                                       find_unused_parameters=False)

    # ------------------------------------------------------------------------------------- checkpoints
    def _state(self, iteration: int, final: bool, rngs: Optional[list] = None) -> dict:
        names = getattr(self.train_set, "class_names", None)
        loader = self.loader
        epoch, index = loader.position if loader is not None else (0, 0)
        history = ({k: torch.tensor([h[k] for h in self.history], dtype=torch.float64) for k in self.history[0]}
                   if self.history else {})
        state = {"format": FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "iteration": iteration, "final": final, "config": config_to_yaml(self.cfg), "stage": self.cfg.stage,
                 "class_names": list(names) if names is not None else None, "rng": rng_state(self.model),
                 "data": {"epoch": epoch, "index": index, "seed": self.cfg.train.seed,
                          "batches_per_epoch": loader.batches_per_epoch if loader is not None else 0},
                 "history": history}
        if loader is not None:  # in global samples: continues on any number of processes
            epoch, samples = loader.sample_position
            state["position"] = {"epoch": epoch, "samples": samples, "samples_per_step": loader.samples_per_step,
                                 "samples_per_epoch": loader.samples_per_epoch, "world_size": self.world,
                                 "aspect_ratio_grouping": self.cfg.data.aspect_ratio_grouping}
        if rngs is not None:
            state["rng_ranks"] = rngs  # each process's RNGs, restored when resumed on as many processes
        return state

    def checkpoint(self, iteration: int, final: bool = False) -> Path:
        """Write the full training state: model_<iter>.pth (the newest train.keep_checkpoints are kept) and
        last_checkpoint.pth (the same file); with `final`, also model_final.pth (the model alone). Under
        torchrun every process calls it (their RNG states are gathered) and rank 0 writes."""
        start = time.perf_counter()
        rngs = distributed.gather_object(rng_state(self.model)) if self.world > 1 else None
        last = self.run_dir / LAST
        self._saved_iter = iteration
        if not self.main:
            return self.run_dir / "model_final.pth" if final else last
        state = self._state(iteration, final, rngs)
        keep = self.cfg.train.keep_checkpoints
        if keep > 0:
            path = self.run_dir / numbered_name(iteration)
            save_checkpoint(state, path)
            link_checkpoint(path, last)
        else:
            save_checkpoint(state, last)
        prune_checkpoints(self.run_dir, keep)
        if self.writer is not None:
            self.writer.flush()  # the events up to a checkpoint survive a kill
        self._checkpoint_seconds = time.perf_counter() - start
        if final:
            path = self.run_dir / "model_final.pth"
            save_checkpoint({k: state[k] for k in ("format", "model", "iteration", "config", "stage", "class_names")},
                            path)
            return path
        return last

    def _restore_progress(self, state: dict) -> None:
        """Loss history and data position of a resumed run (its RNGs are restored just before the loop)."""
        t, loader = self.cfg.train, self.loader
        history = state.get("history") or {}
        columns = {k: v.tolist() for k, v in history.items()}
        self.history = [dict(zip(columns, row)) for row in zip(*columns.values())]
        data, pos = state.get("data") or {}, state.get("position")
        self._notes = []
        if (pos is not None and data.get("seed") == t.seed and pos["samples_per_epoch"] == loader.samples_per_epoch
                and pos["aspect_ratio_grouping"] == self.cfg.data.aspect_ratio_grouping
                and pos["samples"] % loader.samples_per_step == 0):
            loader.set_sample_position(pos["epoch"], pos["samples"])
        elif (pos is None and data.get("batches_per_epoch") == loader.batches_per_epoch and data.get("seed") == t.seed
              and self.world == 1 and self.accumulate == 1):  # a checkpoint from before "position"
            loader.set_position(data["epoch"], data["index"])
        else:
            epoch, step = divmod(self.start_iter, loader.batches_per_epoch // self.accumulate)
            loader.set_position(epoch, step * self.accumulate)
            self._notes.append("the data order (the checkpoint is older, or train.seed, the images per step or "
                               "the aspect-ratio grouping changed)")
        if len(self.history) != self.start_iter:
            self._notes.append(f"the loss history (it covers {len(self.history)} of {self.start_iter} iterations)")

    def _restore_rng(self, state: dict) -> None:
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world:
            self._notes += set_rng_state(ranks[self.rank], self.model)
        elif "rng" not in state:
            self._notes.append("the RNG states (an older checkpoint)")
        else:  # rank 0 continues rank 0's stream; the others keep their own seeded ones
            if self.main:
                self._notes += set_rng_state(state["rng"], self.model)
            if ranks is not None or self.world > 1:
                self._notes.append(f"the RNG states of every process (the run had {len(ranks or [0])} "
                                   f"process(es), it continues on {self.world})")

    def _stop_requested(self) -> bool:
        """Whether to stop after this step: a signal here, or (under torchrun) on any process."""
        return self._signals.requested(self.world, self.device)

    def _stop(self, it: int, bar, writer) -> None:
        if self._saved_iter != it:
            self.checkpoint(it)
        bar.close()
        if writer is not None:
            writer.close()
        if not self.main:  # rank 0 says it
            raise SystemExit(128 + self._signals.signum)
        name = signal.Signals(self._signals.signum).name
        raise Stopped(f"{name}: stopped at iteration {it}/{self.cfg.solver.max_iter} with checkpoint "
                      f"{self.run_dir / LAST}; resume with: {resume_command(self.run_dir, self.world)}",
                      128 + self._signals.signum)

    # --------------------------------------------------------------------------------------------- loop
    def _step(self, data_iter: Iterator, it: int, record: Optional[dict], stats: Optional[dict] = None
              ) -> dict[str, float]:
        """One optimiser step over `accumulate` micro-batches (maskrcnn.engine.step.train_step); returns the
        losses averaged over micro-batches and processes. A non-finite loss stops every process at this step."""
        k = self.accumulate
        return train_step(self.ddp, (next(data_iter) for _ in range(k)), self.optimizer, amp=self.amp,
                          scaler=self.scaler, loss_weights=self.cfg.loss_weights,
                          clip_grad_norm=self.cfg.solver.clip_grad_norm, accumulate=k, record=record,
                          no_sync=None if self.ddp is self.model else self.ddp.no_sync,
                          reduce=lambda values: distributed.all_reduce(values, "mean"),
                          check=lambda values: self._non_finite(it, values)
                          if not math.isfinite(values["total_loss"]) else None, stats=stats)

    def _check_shutdown_time(self, sec_per_iter: float) -> None:
        """Under torchrun, once, after the first checkpoint: whether a stop fits in torchrun's shutdown timeout."""
        if self._shutdown_checked or not self.main or "TORCHELASTIC_RUN_ID" not in os.environ:
            return
        self._shutdown_checked = True
        note = shutdown_time_note(sec_per_iter, self._checkpoint_seconds)
        if note:
            self._print(note)

    def _non_finite(self, it: int, values: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
        if not self.main:  # rank 0 says it
            raise SystemExit(3)
        last = self.run_dir / LAST
        where = (f"the last good checkpoint is {last}" if last.exists()
                 else "no checkpoint was written yet (train.checkpoint_period)")
        losses = {k: v for k, v in values.items() if k != "total_loss"}
        raise FloatingPointError(f"iteration {it}: loss is {values['total_loss']} ({losses}); {where}")

    def train(self) -> dict:
        cfg, s = self.cfg, self.cfg.solver
        self._notes = []
        self.stats_history: list[dict[str, float]] = []  # training statistics of this session's steps (not resumed)
        if self.resume_state is not None:
            self._restore_progress(self.resume_state)
        # purge_step: TensorBoard drops the events a killed run logged after its last checkpoint.
        self.writer = (SummaryWriter(str(self.run_dir), purge_step=self.start_iter + 1 if self.start_iter else None)
                       if self.main else None)
        self.model.train()
        self._bar = tqdm(total=s.max_iter, initial=self.start_iter, desc=f"train {cfg.stage}",
                         disable=not self.progress, dynamic_ncols=True)
        data_iter = iter(self.loader)
        if self.resume_state is not None:
            self._restore_rng(self.resume_state)
            if self._notes:
                self._print(f"note: not restored: {'; '.join(self._notes)}: the resumed run is not an exact "
                            "continuation")
        it = self._loop(data_iter, self.start_iter)
        self._bar.close()
        self._precise_bn(it)
        summary = self._summary(it, self.checkpoint(it, final=True))
        if cfg.train.eval_at_end:
            self._evaluate(summary, it)
        if self.writer is not None:
            self.writer.close()
        self.writer = None
        if self.main:
            (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _loop(self, data_iter: Iterator, it: int) -> int:
        """Optimiser steps from iteration `it` to solver.max_iter, with the logging, pictures and checkpoints of
        each; a stop signal ends it after the current step (with a checkpoint). Returns the last iteration."""
        s, t = self.cfg.solver, self.cfg.train
        t_last = time.perf_counter()
        with self._signals.installed():
            while it < s.max_iter:
                # On a picture iteration the step records what it sees (the model's probe record), at no extra cost.
                record = {} if self.main and t.vis_period > 0 and (it + 1) % t.vis_period == 0 else None
                stats: dict[str, float] = {}
                values = self._step(data_iter, it, record, stats)
                self.scheduler.step()
                it += 1
                now = time.perf_counter()
                sec_per_iter, t_last = now - t_last, now
                self.history.append(values)
                self.stats_history.append(stats)
                self._log(it, values, stats, sec_per_iter, record)
                if it % t.checkpoint_period == 0 and it < s.max_iter:
                    self.checkpoint(it)
                    self._check_shutdown_time(sec_per_iter)
                if self._stop_requested():
                    self._stop(it, self._bar, self.writer)
        return it

    def _log(self, it: int, values: dict[str, float], stats: dict[str, float], sec_per_iter: float,
             record: Optional[dict]) -> None:
        """The progress bar, TensorBoard's scalars (every train.log_period and at the end) and pictures."""
        s, t, writer, bar = self.cfg.solver, self.cfg.train, self.writer, self._bar
        bar.update(1)
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()}, refresh=False)
        if writer is not None and (it % t.log_period == 0 or it == s.max_iter):
            for k, v in values.items():
                writer.add_scalar(f"loss/{k}", v, it)
            for k, v in stats.items():
                writer.add_scalar(f"stats/{k}", v, it)
            writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], it)
            writer.add_scalar("time/sec_per_iter", sec_per_iter, it)
        if record is not None:
            self.hooks.log_images(writer, record, it, class_names=getattr(self.train_set, "class_names", None),
                                  logits=not self.model.rpn.sigmoid_scores)

    def _precise_bn(self, it: int) -> None:
        """Precise BN once per run: not again when a finished run is resumed (its final checkpoint has it)."""
        s, t = self.cfg.solver, self.cfg.train
        resumed_final = self.resume_state is not None and self.resume_state.get("final", False)
        if t.precise_bn_iters <= 0 or it <= 0 or (it == self.start_iter and resumed_final):
            return
        bn_loader = build_loader(self.train_set, s.ims_per_batch, shuffle=True, num_workers=0,
                                 seed=t.seed + 7919, drop_last=True, num_replicas=self.world, rank=self.rank)
        n = update_bn_stats(self.model, bn_loader, t.precise_bn_iters, self.device)
        if n:
            self._print(f"BatchNorm statistics of {n} layers recomputed over "
                        f"{min(t.precise_bn_iters, len(bn_loader))} batches"
                        + (f" on each of {self.world} processes" if self.world > 1 else ""))

    def _summary(self, it: int, final: Path) -> dict:
        """metrics.json without the evaluation: the stage, iterations, final checkpoint, precision and losses."""
        history = self.history
        summary = {"stage": self.cfg.stage, "iterations": it, "checkpoint": str(final),
                   "precision": {"train": self.precision.as_dict(), "eval": self.eval_precision.as_dict()}}
        # The losses at the start and end of the whole run: means over its first and last n iterations (n = a fifth
        # of the run, 1 to 20; a run of under 10 iterations: its first and last). Every iteration is in TensorBoard.
        n = max(1, min(20, len(history) // 5))
        summary["loss_start"] = {k: float(np.mean([h[k] for h in history[:n]])) for k in history[0]} if history else {}
        summary["loss_end"] = {k: float(np.mean([h[k] for h in history[-n:]])) for k in history[0]} if history else {}
        summary["stats_end"] = mean_stats(self.stats_history[-n:])  # anchor / RoI sample counts, accuracies
        return summary

    def _evaluate(self, summary: dict, it: int) -> None:
        """The end-of-run evaluation (the evaluate hook) into `summary` and TensorBoard: every process infers on
        its share of the images; rank 0 runs pycocotools."""
        cfg = self.cfg
        summary["val"], line, scalars = self.hooks.evaluate(
            self.model, self.val_set, self.device, batch_size=cfg.test.ims_per_batch,
            max_images=cfg.test.max_images, amp=self.eval_precision.autocast,
            mask_threshold=cfg.model.roi_heads.mask_threshold, progress=self.progress)
        self._print(f"val: {line}")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"val/{k}", v, it)
        if self.main and cfg.train.error_pictures and self.hooks.analyse is not None:
            pictures = self.hooks.analyse(self.writer, summary["val"], self.run_dir, it)
            summary["val_pictures"] = [Path(p).name for p in pictures]
