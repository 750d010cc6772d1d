"""One optimiser step of training: the function the trainer runs, the first-day report times and the benchmark
measures, so that all three time and train the same thing in the same precision.

    values = train_step(model, [(images, targets)], optimizer, amp=True)

A step is: zero the gradients; per micro-batch, the forward under autocast (when `amp`: bf16 on a CPU, fp16 on
CUDA), the losses in fp32, their weighted sum (`total_loss`: the one place loss weights are applied), and the
backward (through the grad scaler, which is a no-op unless enabled); then gradient clipping and the update.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import Tensor, nn

from ..model.precision import autocast

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
                mean = totals / accumulate if accumulate > 1 else totals
                if reduce is not None:
                    mean = reduce(mean)
                numbers = mean.tolist()
                result = dict(zip([*losses, "total_loss"], numbers))
                if stats is not None and micro:
                    pairs = numbers[len(losses) + 1:]
                    stats.update({k: pairs[2 * i] / pairs[2 * i + 1] for i, k in enumerate(micro)
                                  if pairs[2 * i + 1] > 0})
                if check is not None:
                    check(result)
            loss = loss / accumulate if accumulate > 1 else loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if m + 1 != accumulate:  # a lazy iterable's length is known only now; no update from a wrong count
        raise ValueError(f"train_step: accumulate={accumulate} but {m + 1} micro-batches were given")
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
    return result
