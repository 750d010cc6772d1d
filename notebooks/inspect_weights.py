# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect the weights and the training
#
# A statistics table of every parameter and BatchNorm buffer, grouped by stage (stem, res2..res5, FPN, RPN,
# box head, mask head), with flags for dead (constant) and overflowing tensors; full-tensor histograms per
# stage; the gradient norm of each stage from one backward pass; and how much each stage's weights move
# over a few training steps.
#
# Histograms and statistics are over whole tensors (every element of every tensor of a stage), never one
# kernel slice.

# %% tags=["parameters"]
config = "configs/tiny.yaml"  # the model and data config (None with a checkpoint: the checkpoint's own)
overrides = []  # config overrides, as --set: e.g. ["solver.base_lr=0.01"]
checkpoint = None  # a training checkpoint (.pth) to load; None: the model as built from the config
split = "train"  # the split the backward pass and the training steps read
images = [0, 1]  # the images of that split in the batch (indices)
seed = 0  # seeds Python, NumPy and PyTorch
noise = True  # LatentNoise on (as configured; it acts in training mode) or off for the backward and the steps
train_steps = 3  # training steps for the relative change of the weights
overflow = 1e4  # a tensor with an element beyond this magnitude (or not finite) is flagged
gallery = None  # a folder: save this notebook's gallery picture there (README's guided tour)

# %%
import copy
import random
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from maskrcnn.config import load_config
from maskrcnn.data.build import build_eval_dataset
from maskrcnn.engine.checkpoint import model_from_checkpoint
from maskrcnn.engine.step import total_loss
from maskrcnn.engine.recipe import build_optimizer
from maskrcnn.model.build import build_model

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
sets = [*overrides, f"model.noise.enabled={str(bool(noise)).lower()}"]
if checkpoint:
    model, cfg = model_from_checkpoint(checkpoint, config, sets)
else:
    cfg = load_config(config, sets)
    model = build_model(cfg)
dataset = build_eval_dataset(cfg, split)
batch = [dataset[k] for k in images]
inputs, targets = [im for im, _ in batch], [t for _, t in batch]

STAGES = {"bottom_up.conv1": "stem", "bottom_up.bn1": "stem", "bottom_up.layer1": "res2",
          "bottom_up.layer2": "res3", "bottom_up.layer3": "res4", "bottom_up.layer4": "res5", "fpn": "FPN",
          "rpn": "RPN", "roi_heads.box_head": "box head", "roi_heads.mask_head": "mask head"}


def stage_of(name: str) -> str:
    """The stage a parameter or buffer belongs to, by its name in the model."""
    for prefix, stage in STAGES.items():
        if name == prefix or name.startswith(prefix + "."):
            return stage
    return "other"


def norm_buffers(model):
    """(name, tensor) of every floating-point buffer of a BatchNorm layer (running statistics; a frozen
    BatchNorm's weight and bias too)."""
    for module_name, module in model.named_modules():
        if "BatchNorm" in type(module).__name__:
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point():
                    yield f"{module_name}.{name}", b


# %% [markdown]
# ## Statistics of every parameter and BatchNorm buffer
# `dead`: every element equal (a constant tensor: never trained, or collapsed; in a freshly built model the
# BatchNorm scales, shifts and running statistics and the zero-initialised biases are constant until trained);
# `overflow`: an element not finite or beyond `overflow` in magnitude.

# %%
tensors = [(n, p.detach(), "param" if p.requires_grad else "frozen") for n, p in model.named_parameters()]
tensors += [(n, b, "bn buffer") for n, b in norm_buffers(model)]
table = []
for name, t, kind in tensors:
    t = t.float()
    finite = torch.isfinite(t)
    table.append({"name": name, "stage": stage_of(name), "kind": kind, "shape": tuple(t.shape), "numel": t.numel(),
                  "mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0,
                  "min": float(t.min()), "max": float(t.max()),
                  "dead": bool(t.numel() > 1 and (t == t.flatten()[0]).all()),
                  "overflow": bool(not finite.all() or t.abs().max() > overflow)})
print(f"{'name':<44} {'stage':<9} {'kind':<9} {'shape':>18} {'mean':>9} {'std':>9} {'min':>9} {'max':>9} flags")
for r in table:
    flags = " ".join(f for f in ("dead", "overflow") if r[f])
    print(f"{r['name']:<44} {r['stage']:<9} {r['kind']:<9} {str(r['shape']):>18} {r['mean']:9.4f} {r['std']:9.4f} "
          f"{r['min']:9.4f} {r['max']:9.4f} {flags}")
per_stage = defaultdict(lambda: [0, 0, 0, 0])
for r in table:
    s = per_stage[r["stage"]]
    s[0] += 1
    s[1] += r["numel"]
    s[2] += r["dead"]
    s[3] += r["overflow"]
print(f"\n{'stage':<10} {'tensors':>8} {'elements':>12} {'dead':>5} {'overflow':>9}")
for stage, (n, numel, dead, over) in per_stage.items():
    print(f"{stage:<10} {n:8d} {numel:12,d} {dead:5d} {over:9d}")

# %% [markdown]
# ## Histograms per stage
# Every element of every weight tensor (parameters, not biases or BatchNorm) of the stage.

# %%
weights = defaultdict(list)
for name, p in model.named_parameters():
    if p.dim() > 1:
        weights[stage_of(name)].append(p.detach().float().flatten())
stages = list(weights)
fig, axes = plt.subplots(2, (len(stages) + 1) // 2, figsize=(3 * ((len(stages) + 1) // 2), 5.5))
histogram_counts = {}
for ax, stage in zip(axes.flat, stages):
    values = torch.cat(weights[stage]).numpy()
    counts, _, _ = ax.hist(values, bins=50)
    histogram_counts[stage] = int(counts.sum())
    ax.set_title(f"{stage} ({values.size:,})", fontsize=9)
    ax.tick_params(labelsize=7)
for ax in list(axes.flat)[len(stages):]:
    ax.axis("off")
fig.tight_layout()
if gallery:
    Path(gallery).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(gallery) / "inspect_weights.png", dpi=60)
plt.show()

# %% [markdown]
# ## Gradient norms per stage, one backward pass
# The training losses of the batch (the model in training mode, the noise as configured), backward once;
# the norm of each stage's gradient over all its parameters.

# %%
model.train()
model.zero_grad()
losses = model(inputs, targets)
loss = total_loss(losses, cfg.loss_weights)
loss.backward()
print("losses: " + ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items()) + f"; total {loss.item():.4f}")
squares = defaultdict(float)
for name, p in model.named_parameters():
    if p.grad is not None:
        squares[stage_of(name)] += float(p.grad.float().pow(2).sum())
grad_norms = {stage: v ** 0.5 for stage, v in squares.items()}
for stage, g in grad_norms.items():
    print(f"{stage:<10} grad norm {g:.3e}")
model.zero_grad()

# %% [markdown]
# ## How far each stage's weights move in a few training steps
# `train_steps` steps of the configured optimiser on the same batch; the relative change
# ||w_after - w_before|| / ||w_before|| of each stage's parameters.

# %%
before = {n: p.detach().clone() for n, p in model.named_parameters()}
trained = copy.deepcopy(model)  # the steps change a copy: the tables above stay the model's
optimizer = build_optimizer(trained, cfg.solver)
step_losses = []
for _ in range(train_steps):
    optimizer.zero_grad()
    loss = total_loss(trained(inputs, targets), cfg.loss_weights)
    loss.backward()
    optimizer.step()
    step_losses.append(loss.item())
diff, norm = defaultdict(float), defaultdict(float)
for name, p in trained.named_parameters():
    stage = stage_of(name)
    diff[stage] += float((p.detach() - before[name]).pow(2).sum())
    norm[stage] += float(before[name].pow(2).sum())
relative_change = {stage: (diff[stage] / max(norm[stage], 1e-30)) ** 0.5 for stage in diff}
print("loss per step: " + " ".join(f"{v:.4f}" for v in step_losses))
for stage, r in relative_change.items():
    print(f"{stage:<10} relative change {r:.2e}")
model.eval()

# %%
summary = {"table_names": [r["name"] for r in table], "dead": [r["name"] for r in table if r["dead"]],
           "overflow": [r["name"] for r in table if r["overflow"]], "histogram_counts": histogram_counts,
           "grad_norms": grad_norms, "relative_change": relative_change, "step_losses": step_losses}
{k: v for k, v in summary.items() if k != "table_names"}
