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
# # Inspect the data: what the model is given to learn from
#
# The dataset as the model sees it: classes and instance counts, object sizes and aspect ratios, samples
# with their ground truth after the model's resize, boxes recomputed from the masks, the 28x28 mask targets
# pasted back, the anchors of each level, how well the best anchor fits each object, the anchor labels
# before and after sampling, the positive anchors with their regression targets applied, and the RoI
# samples of the box head.
#
# Everything comes from the public API: `load_config`, `build_model`, the dataset builders, one
# `model.probe()` pass and the `maskrcnn.vis` drawing functions. Change the parameters below to look at
# your own trained model and data (a COCO-format dataset: `data.dataset=coco` and its paths in `overrides`).

# %% tags=["parameters"]
config = "configs/tiny.yaml"  # the model and data config (None with a checkpoint: the checkpoint's own)
overrides = []  # config overrides, as --set: e.g. ["data.root=datasets/shapes-tiny"]
checkpoint = None  # a training checkpoint (.pth) to load; None: the model as built from the config
split = "train"  # which split of the config's dataset: "train" or "val"
images = [0, 1]  # the images of that split to look at closely (indices)
seed = 0  # seeds Python, NumPy and PyTorch (the anchor and RoI sampling draw from them)
noise = False  # LatentNoise on (as the config places it) or off; the data does not depend on it
max_stats_images = 500  # images read for the class, size and aspect statistics
gallery = None  # a folder: save this notebook's gallery picture there (README's guided tour)

# %%
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from maskrcnn.config import load_config
from maskrcnn.data.build import build_eval_dataset
from maskrcnn.engine.checkpoint import model_from_checkpoint
from maskrcnn.model.box_ops import box_iou
from maskrcnn.model.build import build_model
from maskrcnn.model.mask_targets import mask_targets
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.vis.panels import label_counts
from maskrcnn.vis.primitives import GT_COLOUR, caption, colour, draw_boxes, draw_masks, save_png, side_by_side
from maskrcnn.vis.views import anchor_labels_view, anchor_levels, anchors_view, dataset_view, input_image, rois_view

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
sets = [*overrides, f"model.noise.enabled={str(bool(noise)).lower()}"]
if checkpoint:
    model, cfg = model_from_checkpoint(checkpoint, config, sets)
else:
    cfg = load_config(config, sets)
    model = build_model(cfg)
model.eval()
dataset = build_eval_dataset(cfg, split)  # every image, no augmentation
class_names = dataset.class_names  # index 0 is the background
print(f"{cfg.data.dataset} {split}: {len(dataset)} images, classes {class_names[1:]}")
print(f"model: {cfg.stage} stage, {sum(p.numel() for p in model.parameters()):,} parameters")


def show(picture, title="", width=10):
    """One picture (uint8 RGB) in the notebook."""
    h, w = picture.shape[:2]
    fig, ax = plt.subplots(figsize=(width, width * h / w))
    ax.imshow(picture)
    ax.set_title(title)
    ax.axis("off")
    plt.show()


# %% [markdown]
# ## Classes, instance counts, object sizes and aspect ratios
# Over the first `max_stats_images` images of the split, in the images' own pixels (before the model's
# resize). Size is the square root of the box area; aspect is width / height.

# %%
labels, sizes, aspects, per_image = [], [], [], []
for k in range(min(len(dataset), max_stats_images)):
    _, target = dataset[k]
    b = target["boxes"]
    w, h = (b[:, 2] - b[:, 0]), (b[:, 3] - b[:, 1])
    labels += target["labels"].tolist()
    sizes += (w * h).sqrt().tolist()
    aspects += (w / h).tolist()
    per_image.append(len(b))
labels, sizes, aspects = np.array(labels), np.array(sizes), np.array(aspects)
class_counts = {class_names[c]: int((labels == c).sum()) for c in range(1, len(class_names))}
print(f"{len(per_image)} images, {len(labels)} instances, {np.mean(per_image):.1f} per image "
      f"(min {min(per_image)}, max {max(per_image)})")
for name, n in class_counts.items():
    print(f"  {name:>12}: {n:5d} instances ({100 * n / max(len(labels), 1):.0f}%)")
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
axes[0].bar(list(class_counts), list(class_counts.values()))
axes[0].set_title("instances per class")
axes[1].hist(sizes, bins=30)
axes[1].set_title("object size sqrt(w h), px")
axes[2].hist(np.log2(aspects), bins=30)
axes[2].set_title("aspect log2(w / h)")
plt.show()

# %% [markdown]
# ## Samples as the model gets them
# One probe pass (eval mode, with the ground truth): the images and targets after the model's resize, the
# anchors and their labels, the proposals and the RoI samples all come from the same pass.

# %%
batch = [dataset[k] for k in images]
record = model.probe([im for im, _ in batch], [t for _, t in batch])
for i, k in enumerate(images):
    view = dataset_view(record, i, class_names)
    show(view.picture, f"{split} image {k}: ground truth in the model's input frame")
    print("\n".join(view.lines))

# %% [markdown]
# ## Boxes recomputed from the masks
# The box that tightly encloses each (resized) mask against the stored box: a large difference means a
# box and a mask that disagree in the annotations, or a resize that moves one and not the other.

# %%
box_from_mask_diff = []
for i, target in enumerate(record["targets"]):
    for m, box in zip(target["masks"].bool(), target["boxes"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs) == 0:
            box_from_mask_diff.append(float("inf"))  # an empty mask after the resize
            continue
        from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=box.dtype)
        box_from_mask_diff.append(float((from_mask - box).abs().max()))
print(f"{len(box_from_mask_diff)} objects: largest |box from mask - stored box| per object (px, model frame):")
print("  " + " ".join(f"{d:.1f}" for d in box_from_mask_diff))

# %% [markdown]
# ## Mask targets at 28x28, pasted back
# What the mask head learns for a RoI that is exactly the ground-truth box: the mask cut from the GT mask
# at the mask head's resolution, then pasted back into the image as the model pastes its predictions.
# The IoU with the GT mask says how much detail the resolution keeps.

# %%
heads = model.roi_heads
size = 28
mask_iou, tiles = [], []
for i, target in enumerate(record["targets"]):
    gt = target["masks"]
    boxes = target["boxes"]
    small = mask_targets(gt, torch.arange(len(gt)), boxes, size, heads.mask_head.aligned if heads else True)
    pasted = paste_masks(small[:, None], boxes, tuple(gt.shape[-2:]))[:, 0] >= 0.5
    for m, p in zip(gt.bool(), pasted):
        mask_iou.append(float((m & p).sum() / (m | p).sum().clamp(min=1)))
    image = input_image(record, i)
    tiles.append(side_by_side([draw_masks(image, gt, [colour(j) for j in range(len(gt))]),
                               draw_masks(image, pasted, [colour(j) for j in range(len(gt))])]))
show(tiles[0], f"GT masks (left) and their {size}x{size} targets pasted back (right)")
print(f"IoU of the pasted {size}x{size} target with the GT mask: " + " ".join(f"{v:.3f}" for v in mask_iou))

# %% [markdown]
# ## Anchors per level
# Left: every anchor of the location at the image centre, one colour per level; right: the grid of one level.

# %%
view = anchors_view(record, 0, model)
show(view.picture, "anchors at the centre cell (left) and one level's grid (right)", width=14)
print("\n".join(view.lines))

# %% [markdown]
# ## Best-anchor IoU per object
# An object whose best anchor has IoU below the RPN's positive threshold becomes positive only through the
# low-quality matching rule (if on), or not at all.

# %%
anchors = torch.cat(record["anchors"])
level_of = anchor_levels(record["anchors"])
names = model.rpn.in_features
best_anchor_iou = []
for i, target in enumerate(record["targets"]):
    iou = box_iou(target["boxes"], anchors)  # [M, Atot]
    best, where = iou.max(1)
    for j, (b, a) in enumerate(zip(best.tolist(), where.tolist())):
        best_anchor_iou.append(b)
        print(f"image {images[i]} object {j} ({class_names[int(target['labels'][j])]}): best anchor IoU {b:.2f} "
              f"at {names[int(level_of[a])]}")
print(f"RPN positive threshold {model.rpn.matcher.high:g}; "
      f"{sum(b < model.rpn.matcher.high for b in best_anchor_iou)} of {len(best_anchor_iou)} objects below it")

# %% [markdown]
# ## Anchor labels per level, before and after sampling

# %%
view = anchor_labels_view(record, 0, model)
show(view.picture, "anchor labels before (left) and after (right) sampling", width=14)
print("\n".join(view.lines))
label_table = {}
for k, name in enumerate(names):
    on = level_of == k
    label_table[name] = (label_counts(record["anchor_labels"][0][on]),
                         label_counts(record["sampled_anchor_labels"][0][on]))

# %% [markdown]
# ## Positive anchors with their regression targets applied
# Each sampled positive anchor (thin) and the box its regression target turns it into (thick): encoding
# against the matched GT box and decoding again must land on the GT box.

# %%
coder = model.rpn.box_coder
pos = record["sampled_anchor_labels"][0] == 1
matched = record["anchor_matched_boxes"][0][pos]
targets_delta = coder.encode(anchors[pos], matched)  # what the RPN learns to predict
applied = coder.decode(targets_delta, anchors[pos])
regression_error = float((applied - matched).abs().max()) if len(matched) else 0.0
picture = draw_boxes(input_image(record, 0), anchors[pos], (255, 200, 0), thickness=1)
picture = draw_boxes(picture, applied, GT_COLOUR, thickness=2, outline=True)
show(picture, f"{int(pos.sum())} positive anchors (yellow) and their targets applied (white)")
print(f"targets: dx, dy mean {targets_delta[:, :2].abs().mean():.3f}, dw, dh mean {targets_delta[:, 2:].abs().mean():.3f}; "
      f"largest |applied - GT| {regression_error:.2e} px")

# %% [markdown]
# ## RoI samples for the box head
# The test-time proposals of this pass (plus the GT boxes) matched and sampled as in training: the
# foreground share is what the box and mask heads learn from.

# %%
roi_fg_share = None
if record.get("roi_samples") is not None:
    view = rois_view(record, 0, model, class_names)
    show(view.picture, "sampled RoIs")
    print("\n".join(view.lines))
    s = record["roi_samples"][0]
    roi_fg_share = float((s["labels"] > 0).float().mean())
    per_class = {class_names[c]: int((s["labels"] == c).sum()) for c in range(1, len(class_names))}
    print(f"foreground share {roi_fg_share:.2f} (target {heads.sampler.positive_fraction:g}); per class {per_class}")
else:
    print("an RPN-stage model: no RoI heads")

# %%
if gallery:
    Path(gallery).mkdir(parents=True, exist_ok=True)
    n = len(record["targets"][0]["boxes"])
    pasted_back = caption(tiles[0][:, -record["image_sizes"][0][1] :], f"{size}x{size} targets, IoU >= {min(mask_iou[:n]):.2f}")
    save_png(side_by_side([dataset_view(record, 0, class_names).picture, pasted_back]),
             Path(gallery) / "inspect_data.png", palette=256)
summary = {"instances": len(labels), "images": len(per_image), "class_counts": class_counts,
           "box_from_mask_diff": box_from_mask_diff, "mask_iou": mask_iou, "best_anchor_iou": best_anchor_iou,
           "regression_error": regression_error, "roi_fg_share": roi_fg_share,
           "sampled": {n: after for n, (_, after) in label_table.items()}}
summary
