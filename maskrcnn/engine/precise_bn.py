"""Precise BatchNorm statistics (detectron2's PreciseBN), recomputed once at the end of a training run."""
from __future__ import annotations

import torch

from . import distributed


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

