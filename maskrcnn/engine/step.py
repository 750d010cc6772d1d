"""One optimiser step of training: the function the trainer runs, the first-day report times and the benchmark
measures, so that all three time and train the same thing in the same precision.

    values = train_step(model, [(images, targets)], optimizer, amp=True)
    seconds, precision = time_training_steps(cfg, model, loader, 5)   # the first-day report's time per iteration

A step is: zero the gradients; per micro-batch, the forward under autocast (when `amp`: bf16 on a CPU, fp16 on
CUDA), the losses in fp32, their weighted sum (`total_loss`: the one place loss weights are applied), and the
backward (through the grad scaler, which is a no-op unless enabled); then gradient clipping and the update.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import Tensor, nn

from ..model.precision import autocast, training_precision

Batch = tuple[list[Tensor], list[dict]]


def total_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """The one place loss weights are applied: a loss not named in `weights` weighs 1.0; a weight for a loss of
    the model that this stage does not compute (loss_mask in the RPN stage) is unused. The config checks the
    names when it is loaded (maskrcnn.config.LOSS_NAMES); a name neither returned here nor the model's is an error."""
    from ..config import LOSS_NAMES
    unknown = sorted(set(weights) - set(losses) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"loss_weights names {unknown[0]!r}, which the model does not return "
                         f"(its losses: {', '.join(dict.fromkeys([*losses, *LOSS_NAMES]))})")
    return sum(weights.get(name, 1.0) * value for name, value in losses.items())


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each training statistic averaged over the steps that have it (train_step's `stats` of several steps)."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return {k: sum(row[k] for row in rows if k in row) / sum(k in row for row in rows) for k in keys}


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Images and target tensors moved to `device` (non-blocking: pinned memory overlaps the copy on CUDA)."""
    images, targets = batch
    return ([img.to(device, non_blocking=True) for img in images],
            [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
             for t in targets])


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """The loss scaler of a training step: on for fp16 autocast (CUDA), a no-op otherwise (bf16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=amp and torch.device(device).type == "cuda")


def train_step(model: nn.Module, micro_batches: Iterable[Batch], optimizer: torch.optim.Optimizer, *, amp: bool,
               scaler: Optional[torch.amp.GradScaler] = None, loss_weights: Optional[dict[str, float]] = None,
               clip_grad_norm: float = 0.0, accumulate: int = 1, record: Optional[dict] = None,
               no_sync: Optional[Callable[[], ContextManager]] = None,
               reduce: Optional[Callable[[Tensor], Tensor]] = None,
               check: Optional[Callable[[dict[str, float]], None]] = None,
               stats: Optional[dict[str, float]] = None) -> dict[str, float]:
    """One optimiser step over `accumulate` micro-batches (each loss divided by their number, so the gradient is
    that of their mean); returns the named losses and "total_loss", averaged over the micro-batches.

    model: the training forward, model(images, targets[, record]) -> {loss name: scalar} (a DDP wrapper works).
    micro_batches: `accumulate` (images, targets) pairs, moved to the device of the model's parameters here.
    amp: autocast on the images' device (bf16 on a CPU, fp16 on CUDA); `scaler` scales fp16 losses on CUDA.
    record: filled by the last micro-batch's forward (the model's probe record), when given.
    no_sync: a context in which the backward of every micro-batch but the last does not synchronise gradients
        (DDP's no_sync). reduce: the averaged values -> their average over processes (all_reduce).
    check: called with the values before the backward (e.g. the trainer's stop on a non-finite loss).
    stats: receives the model's training statistics (model(..., stats=dict): name -> [2] numerator,
        denominator, see MaskRCNN.forward), each numerator and denominator summed over the micro-batches and
        processes, then divided (a statistic with no denominator, e.g. mask accuracy without a foreground RoI,
        is left out); read with the losses, in the same transfer, so at no extra synchronisation."""
    weights = loss_weights or {}
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    totals, result, m = None, {}, -1
    for m, batch in enumerate(micro_batches):
        last = m == accumulate - 1
        images, targets = to_device(batch, device)
        sync = nullcontext() if last or no_sync is None else no_sync()
        with sync:
            kwargs: dict = {} if record is None or not last else {"record": record}
            if stats is not None:
                kwargs["stats"] = micro = {}
            with autocast(device, amp):
                losses = model(images, targets, **kwargs)
            losses = {name: v.float() for name, v in losses.items()}  # fp32 whatever autocast made of them
            loss = total_loss(losses, weights)
            values = torch.stack([v.detach() for v in losses.values()] + [loss.detach()])
            if stats is not None and micro:  # [numerator, denominator] pairs after the losses
                values = torch.cat((values, torch.stack(list(micro.values())).flatten()))
            totals = values if totals is None else totals + values
            if last:
                result = _step_values(totals, accumulate, reduce, list(losses),
                                      list(micro) if stats is not None else [], stats)
                if check is not None:
                    check(result)
            loss = loss / accumulate if accumulate > 1 else loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if m + 1 != accumulate:  # a lazy iterable's length is known only now; no update from a wrong count
        raise ValueError(f"train_step: accumulate={accumulate} but {m + 1} micro-batches were given")
    _update(optimizer, scaler, clip_grad_norm)
    return result


def _step_values(totals: Tensor, accumulate: int, reduce: Optional[Callable[[Tensor], Tensor]], names: list[str],
                 stat_names: list[str], stats: Optional[dict[str, float]]) -> dict[str, float]:
    """The micro-batches' summed values (the losses, the total, then the statistics' [numerator, denominator]
    pairs) -> the losses and "total_loss" averaged over micro-batches and processes; the statistics go into `stats`
    as ratios (one with a zero denominator is left out)."""
    mean = totals / accumulate if accumulate > 1 else totals
    if reduce is not None:
        mean = reduce(mean)
    numbers = mean.tolist()
    if stats is not None and stat_names:
        pairs = numbers[len(names) + 1:]
        stats.update({k: pairs[2 * i] / pairs[2 * i + 1] for i, k in enumerate(stat_names) if pairs[2 * i + 1] > 0})
    return dict(zip([*names, "total_loss"], numbers))


def _update(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler], clip_grad_norm: float) -> None:
    """The optimiser step after the backward passes: gradient clipping (of the unscaled gradients), then the step
    (through the fp16 grad scaler when there is one)."""
    if clip_grad_norm > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def time_training_steps(cfg, model: nn.Module, loader: Iterable[Batch], n: int,
                        tick: Optional[Callable[[], None]] = None) -> tuple[float, object]:
    """Median seconds of `n` training steps (data, forward, backward, update) of `model` on batches drawn from
    `loader`, after one warm-up step that is not counted: train_step with the run's optimiser, loss weights and
    gradient clipping, in the precision the run would choose on the model's device (training_precision's answer,
    returned with the seconds).
    The model is trained by these steps: give it a fresh one. `tick` is called after every step (progress)."""
    from .recipe import build_optimizer

    if n < 1:
        raise ValueError(f"time_training_steps: n must be >= 1 (steps timed after the warm-up), got {n}")
    device = next(model.parameters()).device
    precision = training_precision(cfg.train, device)
    model.train()
    optimizer = build_optimizer(model, cfg.solver)
    scaler = grad_scaler(device, precision.autocast)
    batches = iter(loader)
    times = []
    for _ in range(n + 1):
        start = time.perf_counter()
        train_step(model, [next(batches)], optimizer, amp=precision.autocast, scaler=scaler,
                   loss_weights=cfg.loss_weights, clip_grad_norm=cfg.solver.clip_grad_norm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if tick is not None:
            tick()
    return float(statistics.median(times[1:])), precision
