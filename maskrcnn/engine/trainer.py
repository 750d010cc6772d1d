"""Training: data, optimiser and schedule, the loop, checkpoints, and the end-of-run evaluation.

    from train import trainer_hooks
    run = Trainer(cfg, "runs/full", init="runs/rpn/model_final.pth", hooks=trainer_hooks()); run.train()

Nothing is lost: a checkpoint holds the model, optimiser, scheduler, grad scaler, iteration, every RNG
(python, numpy, torch CPU and CUDA, LatentNoise's generators), the position in the data order and the loss
history, so a resumed run continues exactly where the checkpointed one was (bit-identical losses on CPU).
SIGTERM or SIGINT finishes the current step, writes a checkpoint, prints how to resume and exits with
128 + the signal number (143, 130); a second signal exits at once.

The trainer depends on nothing above the engine: the end-of-run evaluation, the TensorBoard pictures and weights
from elsewhere (torchvision's COCO model) reach it as `Hooks` from the entry point (train.py).

Under torchrun the model is wrapped in DistributedDataParallel; each process loads its shard of the global
order (maskrcnn.data.loader); rank 0 alone writes the run directory (config, TensorBoard, pictures,
checkpoints of the unwrapped model, metrics) and shows the progress bar. `resolve_batch` adapts the recipe to
the global batch (solver.reference_batch, solver.scale_rule).
"""
from __future__ import annotations

import json
import math
import os
import random
import shlex
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..cli import Stopped
from ..model.build import build_model
from ..model.latent_noise import LatentNoise
from ..model.precision import choose_precision, training_precision
from .checkpoint import (FORMAT, LAST, NUMBERED, config_to_yaml, link_checkpoint, load_resume_checkpoint,
                         numbered_name, partial_load, prune_checkpoints, resume_candidates, save_checkpoint)
from ..config import Config, TrainConfig, save_config
from ..data.build import build_datasets
from ..data.loader import build_loader
from . import distributed
from .device import use_deterministic_algorithms
from .step import grad_scaler, mean_stats, train_step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # checkpoint, then exit 128 + signum (143 / 130)
DEFAULT_OUTPUT_DIR = TrainConfig.output_dir  # train.py --resume finds runs here without --set


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(model: torch.nn.Module) -> dict:
    """Every RNG the training loop draws from, as weights-only values (tensors, lists and tuples of ints)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            # Only when this process uses CUDA: get_rng_state_all() would initialise it.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "noise": {n: m.get_state() for n, m in model.named_modules() if isinstance(m, LatentNoise)}}


def set_rng_state(state: dict, model: torch.nn.Module) -> list[str]:
    """Restore `rng_state`; returns what could not be restored (e.g. CUDA states on a CPU-only machine)."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    missing = []
    if state["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            missing.append(f"CUDA RNG of {len(state['cuda'])} device(s)")
    modules = dict(model.named_modules())
    for n, noise_state in state["noise"].items():
        if isinstance(modules.get(n), LatentNoise):
            modules[n].set_state(noise_state)
        else:
            missing.append(f"LatentNoise generator {n!r}")
    return missing


def run_files(run_dir: Path) -> list[Path]:
    """The files a training run writes in its directory."""
    if not run_dir.is_dir():
        return []
    fixed = [run_dir / n for n in ("config.yaml", LAST, "model_final.pth", "metrics.json")]
    return sorted([p for p in fixed if p.exists()]
                  + [p for p in run_dir.iterdir() if NUMBERED.fullmatch(p.name)
                     or p.name.startswith("events.out.tfevents.") or p.name.endswith(".pth.tmp")])


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to start a new run in a directory that holds another one (a checkpoint), unless it is resumed or
    overwritten. Returns the files to delete before the new run writes: the old run's with --overwrite (its
    TensorBoard events would otherwise mix with the new ones), or those of a start that stopped before its first
    checkpoint (a directory without a checkpoint is no run: the same command starts it again)."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it again: choose one")
    if resume:
        if not resume_candidates(run_dir):
            started = (run_dir / "config.yaml").is_file()
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} to continue from ({LAST} or "
                                    "model_<iter>.pth)" + ("; its start stopped before the first checkpoint: run the "
                                                           "same command without --resume" if started else ""))
        return []
    old = run_files(run_dir)
    held = [p for p in old if p.suffix == ".pth"]
    if held and not overwrite:
        names = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise ValueError(f"{run_dir} already holds a run ({names}); continue it with --resume, "
                         "or start it again with --overwrite (deletes its checkpoints and events)")
    return old


def clear_run_dir(run_dir: Path, old: list[Path], overwrite: bool) -> None:
    """Delete `old` (check_run_dir's list), saying so."""
    for p in old:
        p.unlink(missing_ok=True)
    if old and overwrite:
        print(f"--overwrite: removed {len(old)} files of the previous run in {run_dir}")
    elif old:
        print(f"note: {run_dir} held a start that stopped before its first checkpoint "
              f"({', '.join(p.name for p in old)}): removed, starting again")


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
    cmd = f"{launcher} train.py --name {shlex.quote(run_dir.name)} --resume"
    if run_dir.parent != Path(DEFAULT_OUTPUT_DIR):
        cmd += f" --set train.output_dir={shlex.quote(str(run_dir.parent))}"
    return cmd


def lr_lambda(solver) -> callable:
    """Linear warmup from warmup_factor, then x gamma at each step."""
    def f(it: int) -> float:
        factor = solver.gamma ** sum(it >= s for s in solver.steps)
        if it < solver.warmup_iters:
            alpha = it / solver.warmup_iters
            factor *= solver.warmup_factor * (1 - alpha) + alpha
        return factor
    return f


SCALE_RULES = ("linear", "accumulate", "none")


def resolve_batch(cfg: Config, world_size: int = 1, resumed_step: Optional[int] = None) -> tuple[int, list[str]]:
    """Adapt the recipe to the global batch (solver.ims_per_batch x `world_size` processes); returns the number
    of micro-batches per optimiser step and the lines that say what changed.

    With solver.reference_batch > 0 and a different global batch, solver.scale_rule decides:
      linear      base_lr x batch/reference; max_iter, steps, warmup_iters and train.checkpoint_period x
                  reference/batch (detectron2's auto_scale_workers); the config is changed in place and its
                  reference_batch set to the batch, so the saved config is the recipe actually run;
      accumulate  reference/batch micro-batches per optimiser step, each loss divided by their number, the
                  schedule unchanged (iterations count optimiser steps); the reference must be a multiple;
      none        the recipe as written.
    `resumed_step`: images per step of the run being resumed; unless accumulating, solver.ims_per_batch is set
    so that the global batch stays what it was (the iteration count and schedule are in that run's steps)."""
    s = cfg.solver
    if s.scale_rule not in SCALE_RULES:
        raise ValueError(f"solver.scale_rule: expected {', '.join(SCALE_RULES)}, got {s.scale_rule!r}")
    if s.reference_batch < 0 or s.ims_per_batch < 1:
        raise ValueError(f"solver.reference_batch must be >= 0 and solver.ims_per_batch >= 1, got "
                         f"{s.reference_batch} and {s.ims_per_batch}")
    lines = []
    accumulating = s.scale_rule == "accumulate" and s.reference_batch > 0
    if resumed_step and not accumulating and s.ims_per_batch * world_size != resumed_step:
        if resumed_step % world_size:
            raise ValueError(f"--resume: the run's {resumed_step} images per step do not split over {world_size} "
                             "processes; resume it on a number of processes that divides them")
        lines.append(f"--resume on {world_size} process(es): solver.ims_per_batch {s.ims_per_batch} -> "
                     f"{resumed_step // world_size}, the run's {resumed_step} images per step")
        s.ims_per_batch = resumed_step // world_size
    batch, ref = s.ims_per_batch * world_size, s.reference_batch
    split = f"{s.ims_per_batch} x {world_size} processes" if world_size > 1 else "one process"
    if ref == 0 or s.scale_rule == "none" or batch == ref:
        if world_size > 1:
            lines.append(f"global batch {batch} ({split})" + (
                f"; solver.reference_batch {ref}: learning rate and schedule as written" if batch != ref else ""))
        return 1, lines
    if accumulating:
        if ref % batch:
            raise ValueError(f"solver.scale_rule=accumulate: solver.reference_batch {ref} is not a multiple of the "
                             f"global batch {batch} ({split}); choose solver.ims_per_batch so that it divides "
                             f"{ref}, or use solver.scale_rule=linear")
        k = ref // batch
        lines.append(f"gradient accumulation: {k} micro-batches of {batch} images ({split}) per optimiser step, "
                     f"the reference batch of {ref}; the schedule is unchanged (iterations are optimiser steps)")
        return k, lines
    scale = batch / ref
    before = (s.base_lr, s.max_iter, list(s.steps), s.warmup_iters, cfg.train.checkpoint_period)
    s.base_lr = s.base_lr * scale
    s.max_iter = max(1, int(round(s.max_iter / scale)))
    s.steps = [int(round(step / scale)) for step in s.steps]
    s.warmup_iters = int(round(s.warmup_iters / scale))
    cfg.train.checkpoint_period = max(1, int(round(cfg.train.checkpoint_period / scale)))
    s.reference_batch = batch  # the saved config is this recipe: resolving it again changes nothing
    after = (s.base_lr, s.max_iter, s.steps, s.warmup_iters, cfg.train.checkpoint_period)
    names = ("base_lr", "max_iter", "steps", "warmup_iters", "train.checkpoint_period")
    lines.append(f"linear scaling rule, global batch {batch} ({split}) instead of {ref}: " + ", ".join(
        f"{n} {b:g} -> {a:g}" if isinstance(a, float) else f"{n} {b} -> {a}" for n, b, a in zip(names, before, after))
        + " (solver.scale_rule=accumulate keeps the schedule)")
    return 1, lines


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s RNGs after the model is built (rank 0 keeps the run's own stream)."""
    return int(np.random.SeedSequence([int(seed), int(rank), 0x5EED]).generate_state(1)[0])


NORM_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def param_groups(model: torch.nn.Module, solver) -> list[dict]:
    """The trained parameters in optimiser groups: the normalisation layers' weights and biases get
    solver.weight_decay_norm (detectron2's WEIGHT_DECAY_NORM, 0 by default: decaying a BatchNorm or GroupNorm
    scale towards 0 only fights the normalisation), every other parameter solver.weight_decay. One group where
    the two are equal."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in trained if id(p) in norm_ids]
    if not norm or solver.weight_decay_norm == solver.weight_decay:
        return [{"params": trained, "weight_decay": solver.weight_decay}]
    return [{"params": [p for p in trained if id(p) not in norm_ids], "weight_decay": solver.weight_decay},
            {"params": norm, "weight_decay": solver.weight_decay_norm}]


def build_optimizer(model: torch.nn.Module, solver) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the model's trained parameters (param_groups: no weight decay on
    normalisation layers unless solver.weight_decay_norm says so), fused (one kernel over all parameters) where
    torch has the kernel: the same update as the loop over parameters, and on a CPU 7x faster for AdamW (12 vs
    87 ms a step for the 12M parameters of the shapes model on one core: a fifth of its training step)."""
    groups = param_groups(model, solver)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum, fused=fused)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=solver.base_lr, fused=fused)
    raise ValueError(f"solver.optimizer: expected sgd or adamw, got {solver.optimizer!r}")


@dataclass
class Hooks:
    """What the trainer calls but does not define: train.py passes them in (train.trainer_hooks), so that the
    engine imports nothing of the evaluation, the drawing or other projects' weights."""
    # evaluate(model, dataset, device, *, batch_size, max_images, amp, mask_threshold, progress) -> (metrics for
    # metrics.json, a one-line summary, TensorBoard scalars): the end-of-run evaluation (train.eval_at_end)
    evaluate: Optional[Callable[..., tuple[dict, str, dict[str, float]]]] = None
    # log_images(writer, record, iteration, *, class_names, logits): pictures of a step (train.vis_period)
    log_images: Optional[Callable[..., None]] = None
    # initialise(model, cfg, class_names) -> report line: weights from elsewhere (train.py --init torchvision);
    # it may change cfg (the run's config.yaml is written again after it)
    initialise: Optional[Callable[..., str]] = None


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, init: Optional[str] = None, resume: bool = False,
                 progress: bool = True, overwrite: bool = False, hooks: Optional[Hooks] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.hooks = hooks = hooks or Hooks()
        for key, on, hook in (("train.eval_at_end", cfg.train.eval_at_end, hooks.evaluate),
                              ("train.vis_period", cfg.train.vis_period > 0, hooks.log_images)):
            if on and hook is None:
                raise ValueError(f"{key} is set but this Trainer was given no hook for it (train.py passes "
                                 "train.trainer_hooks())")
        # Under torchrun (maskrcnn.engine.distributed.init already called): rank 0 writes, every rank trains.
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        if cfg.train.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0, got {cfg.train.keep_checkpoints}")
        # Everything that can fail on the user's input (the run directory, device, data, checkpoint, model, weights,
        # data loader) is checked before the directory is made or anything in it is deleted or written.
        old_files = check_run_dir(self.run_dir, resume, overwrite)
        self.progress = progress and self.main
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
        with distributed.main_first():  # the shapes set is generated by rank 0 alone
            self.train_set, self.val_set = build_datasets(cfg)
        if cfg.model.num_classes != self.train_set.num_classes:
            self._print(f"model.num_classes set to {self.train_set.num_classes} from the dataset "
                        f"(was {cfg.model.num_classes})")
            cfg.model.num_classes = self.train_set.num_classes
        # Before anything is written: a bad checkpoint stops here. An unreadable last_checkpoint.pth (a copy cut
        # short) falls back to the newest numbered checkpoint that reads.
        resume_path, state, note = load_resume_checkpoint(self.run_dir) if resume else (None, None, None)
        if note:
            self._print(note)
        resumed_step = ((state.get("position") or {}).get("samples_per_step")) if state is not None else None
        self.accumulate, lines = resolve_batch(cfg, self.world, resumed_step)
        for line in lines:
            self._print(line)
        from_elsewhere = hooks.initialise is not None and state is None
        self.model = build_model(cfg, load_weights=state is None and not from_elsewhere)
        if from_elsewhere:  # e.g. torchvision's COCO Mask R-CNN
            # the weights may come with settings (torchvision's: the frozen-BN eps), saved in config.yaml below
            report = hooks.initialise(self.model, cfg, getattr(self.train_set, "class_names", None))
            self._print(report)
        elif init and state is None:
            report = partial_load(self.model, init)
            self._print(report.summary())
        if self.rank > 0:  # the same initial weights everywhere, then each process its own random stream
            seed_everything(rank_seed(cfg.train.seed, self.rank))
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn:
            self._convert_sync_bn()
        s = cfg.solver
        self.optimizer = build_optimizer(self.model, s)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(s))
        self.scaler = grad_scaler(self.device, self.amp)
        self.start_iter = 0
        self.resume_state = state  # RNGs, data position and loss history are restored by train()
        self.history: list[dict[str, float]] = []
        self.writer = None
        self._saved_iter = None
        self._checkpoint_seconds = 0.0  # how long the last checkpoint took to write (rank 0)
        self._shutdown_checked = False
        self._stop_signal = None
        self._bar = None
        if state is not None:
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
        # Seeded by train.seed alone: the order of epoch e is the same in a run and in its resumed part. (It draws
        # from its own generators only: building it here changes no random stream.)
        self.loader = build_loader(self.train_set, s.ims_per_batch, shuffle=True, num_workers=cfg.data.num_workers,
                                   seed=cfg.train.seed, drop_last=True, infinite=True,
                                   pin_memory=self.device.type == "cuda",
                                   aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, num_replicas=self.world,
                                   rank=self.rank, accumulate=self.accumulate)
        if self.main:  # nothing failed: now the run directory
            clear_run_dir(self.run_dir, old_files, overwrite)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml", comment=self._precision_comment())
        # `self.model` is the model itself (state dicts, attributes such as rpn or features); `self.ddp` runs the
        # training forward: DistributedDataParallel under torchrun, else the model.
        self.ddp = self._wrap_ddp() if self.world > 1 else self.model

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

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM / SIGINT ask the loop to stop after the current step; a second one stops the process at
        once (by the signal's default action; the atomic checkpoint writes leave no half-written file)."""
        self._stop_signal = None

        def handler(signum, frame):
            if self._stop_signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._stop_signal = signum
            if self.main:
                os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                            "(send it again to stop at once)\n".encode())  # os.write: safe inside a handler

        main = threading.current_thread() is threading.main_thread()  # handlers only work there
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS} if main else {}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _stop_requested(self) -> bool:
        """Whether to stop after this step: a signal here, or (under torchrun) on any process, so that all
        stop at the same step."""
        if self.world == 1:
            return self._stop_signal is not None
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        signum = int(distributed.all_reduce(flag, "max").item())
        if signum and self._stop_signal is None:
            self._stop_signal = signum
        return bool(signum)

    def _stop(self, it: int, bar, writer) -> None:
        if self._saved_iter != it:
            self.checkpoint(it)
        bar.close()
        if writer is not None:
            writer.close()
        if not self.main:  # rank 0 says it
            raise SystemExit(128 + self._stop_signal)
        name = signal.Signals(self._stop_signal).name
        raise Stopped(f"{name}: stopped at iteration {it}/{self.cfg.solver.max_iter} with checkpoint "
                      f"{self.run_dir / LAST}; resume with: {resume_command(self.run_dir, self.world)}",
                      128 + self._stop_signal)

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
        """Under torchrun, once: a stop on SIGTERM finishes the step and writes a checkpoint, and torchrun kills
        its workers --shutdown-timeout seconds after its own SIGTERM (30 by default). Say so when this run needs
        more than 80% of that."""
        if self._shutdown_checked or not self.main or "TORCHELASTIC_RUN_ID" not in os.environ:
            return
        self._shutdown_checked = True
        need = sec_per_iter + self._checkpoint_seconds
        limit = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
        if need > 0.8 * limit:
            self._print(f"note: a stop on SIGTERM takes about {need:.0f} s here (a step {sec_per_iter:.1f} s + a "
                        f"checkpoint {self._checkpoint_seconds:.1f} s), and torchrun kills its workers "
                        f"{limit:g} s after its SIGTERM unless told otherwise: start it with torchrun "
                        f"--shutdown-timeout {int(2 * need) + 10} (ignore this if you did)")

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
        cfg, s, t = self.cfg, self.cfg.solver, self.cfg.train
        loader = self.loader
        self._notes = []
        if self.resume_state is not None:
            self._restore_progress(self.resume_state)
        # purge_step: TensorBoard drops the events a killed run logged after its last checkpoint.
        self.writer = writer = (SummaryWriter(str(self.run_dir), purge_step=self.start_iter + 1 if self.start_iter
                                              else None) if self.main else None)
        self.model.train()
        it = self.start_iter
        self._bar = bar = tqdm(total=s.max_iter, initial=it, desc=f"train {cfg.stage}", disable=not self.progress,
                               dynamic_ncols=True)
        data_iter = iter(loader)
        history = self.history
        stats_history: list[dict[str, float]] = []  # training statistics of this session's steps (not resumed)
        if self.resume_state is not None:
            self._restore_rng(self.resume_state)
            if self._notes:
                self._print(f"note: not restored: {'; '.join(self._notes)}: the resumed run is not an exact "
                            "continuation")
        t_last = time.perf_counter()
        with self._stop_on_signals():
            while it < s.max_iter:
                # On a picture iteration the step records what it sees (the model's probe record), at no extra cost.
                record = {} if self.main and t.vis_period > 0 and (it + 1) % t.vis_period == 0 else None
                stats: dict[str, float] = {}
                values = self._step(data_iter, it, record, stats)
                self.scheduler.step()
                it += 1
                now = time.perf_counter()
                sec_per_iter, t_last = now - t_last, now
                history.append(values)
                stats_history.append(stats)
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
                if it % t.checkpoint_period == 0 and it < s.max_iter:
                    self.checkpoint(it)
                    self._check_shutdown_time(sec_per_iter)
                if self._stop_requested():
                    self._stop(it, bar, writer)
        bar.close()
        # Precise BN once per run: not again when a finished run is resumed (its final checkpoint has it).
        resumed_final = self.resume_state is not None and self.resume_state.get("final", False)
        if t.precise_bn_iters > 0 and it > 0 and not (it == self.start_iter and resumed_final):
            bn_loader = build_loader(self.train_set, s.ims_per_batch, shuffle=True, num_workers=0,
                                     seed=t.seed + 7919, drop_last=True, num_replicas=self.world, rank=self.rank)
            n = update_bn_stats(self.model, bn_loader, t.precise_bn_iters, self.device)
            if n:
                self._print(f"BatchNorm statistics of {n} layers recomputed over "
                            f"{min(t.precise_bn_iters, len(bn_loader))} batches"
                            + (f" on each of {self.world} processes" if self.world > 1 else ""))
        final = self.checkpoint(it, final=True)
        summary = {"stage": cfg.stage, "iterations": it, "checkpoint": str(final),
                   "precision": {"train": self.precision.as_dict(), "eval": self.eval_precision.as_dict()}}
        # The losses at the start and end of the whole run: means over its first and last n iterations (n = a fifth
        # of the run, 1 to 20; a run of under 10 iterations: its first and last). Every iteration is in TensorBoard.
        n = max(1, min(20, len(history) // 5))
        summary["loss_start"] = {k: float(np.mean([h[k] for h in history[:n]])) for k in history[0]} if history else {}
        summary["loss_end"] = {k: float(np.mean([h[k] for h in history[-n:]])) for k in history[0]} if history else {}
        summary["stats_end"] = mean_stats(stats_history[-n:])  # anchor / RoI sample counts, accuracies
        if t.eval_at_end:  # every process infers on its share of the images; rank 0 runs pycocotools
            summary["val"], line, scalars = self.hooks.evaluate(
                self.model, self.val_set, self.device, batch_size=cfg.test.ims_per_batch,
                max_images=cfg.test.max_images, amp=self.eval_precision.autocast,
                mask_threshold=cfg.model.roi_heads.mask_threshold, progress=self.progress)
            self._print(f"val: {line}")
            if writer is not None:
                for k, v in scalars.items():
                    writer.add_scalar(f"val/{k}", v, it)
        if writer is not None:
            writer.close()
        self.writer = None
        if self.main:
            (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary


@torch.no_grad()
def update_bn_stats(model: torch.nn.Module, loader, num_batches: int, device: torch.device) -> int:
    """Precise BatchNorm statistics (detectron2's PreciseBN): the running mean and variance of every trained
    BatchNorm layer are replaced by their plain average over `num_batches` training batches, computed with
    the final weights (the running averages mix in statistics of weights from earlier iterations). Under
    torchrun each process runs `num_batches` of its own and the statistics are averaged over processes.
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
        if distributed.is_distributed():  # the average over every process's batches (same count on each)
            distributed.all_reduce(bn.running_mean, "mean")
            distributed.all_reduce(bn.running_var, "mean")
    model.train(was_training)
    return len(bns)

