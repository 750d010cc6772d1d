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
# # Inspect the model, step by step
#
# One image through Mask R-CNN, stage by stage: the feature maps of each level, the latent noise at its
# configured site, the RPN's objectness, its top anchors before NMS and its proposals (with their recall of
# the ground truth), the box head's refinement from proposals to detections with a count at every step,
# the mask head's logits, probabilities, thresholded and pasted masks, and the detections against the
# ground truth.
#
# Every number and picture comes from one `model.probe()` pass (the same pass `forward` makes, with every
# intermediate result kept) and the `maskrcnn.vis` drawing functions; nothing here re-chains the stages.

# %% tags=["parameters"]
config = "configs/tiny.yaml"  # the model and data config (None with a checkpoint: the checkpoint's own)
overrides = []  # config overrides, as --set: e.g. ["model.roi_heads.score_thresh=0.3"]
checkpoint = None  # a training checkpoint (.pth) to load; None: the model as built from the config
split = "val"  # which split of the config's dataset: "train" or "val"
images = [0, 1]  # indices into that split, or paths of your own image files (then no ground truth)
seed = 0  # seeds Python, NumPy and PyTorch (the noise draws from them unless the config seeds it)
noise = True  # the walk-through with LatentNoise on (applied as in training, at its configured site) or off
score_thresh = 0.0  # detections drawn from this score up
gallery = None  # a folder: save this notebook's gallery picture there (README's guided tour)

# %%
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from maskrcnn.config import load_config
from maskrcnn.data.build import build_eval_dataset
from maskrcnn.data.coco import read_image
from maskrcnn.engine.checkpoint import model_from_checkpoint
from maskrcnn.model.box_ops import box_iou
from maskrcnn.model.build import build_model
from maskrcnn.model.postprocess import postprocess_detections
from maskrcnn.vis.panels import draw_proposals, relative_change
from maskrcnn.vis.primitives import (GT_COLOUR, caption, colour, draw_boxes, draw_masks, heatmap, save_png,
                                     side_by_side, stack, to_uint8_image)
from maskrcnn.vis.views import detections_view, features_view, input_image, noise_text, proposals_view

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
if checkpoint:
    model, cfg = model_from_checkpoint(checkpoint, config, overrides)
else:
    cfg = load_config(config, overrides)
    model = build_model(cfg)
model.eval()
if all(isinstance(k, int) for k in images):
    dataset = build_eval_dataset(cfg, split)
    class_names = dataset.class_names
    batch = [dataset[k] for k in images]
    inputs, targets = [im for im, _ in batch], [t for _, t in batch]
else:  # your own files: no ground truth
    class_names = getattr(model, "class_names", None)
    inputs = [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255 for p in images]
    targets = None
original_sizes = [tuple(im.shape[-2:]) for im in inputs]
print(f"{len(inputs)} images {original_sizes}; model: {cfg.stage} stage, noise {noise_text(model)}")


def show(picture, title="", width=10):
    """One picture (uint8 RGB) in the notebook."""
    h, w = picture.shape[:2]
    fig, ax = plt.subplots(figsize=(width, width * h / w))
    ax.imshow(picture)
    ax.set_title(title)
    ax.axis("off")
    plt.show()


# %% [markdown]
# ## One pass, every intermediate result
# `noise=True` applies the configured LatentNoise as in training (even in eval mode, even where the config
# has it off); `noise=False` skips it.

# %%
record = model.probe(inputs, targets, noise=noise)
print("the probe record holds:", ", ".join(sorted(record)))

# %% [markdown]
# ## Feature statistics per level
# Mean, standard deviation and share of exact zeros (after the ReLUs of the bottom-up pathway) over the valid
# (unpadded) region of image 0, for c2..c5 (bottom-up, as the noise site left them) and p2..p6 (FPN).

# %%
h0, w0 = record["image_sizes"][0]
hp, wp = record["padded_size"]
feature_stats = {}
print(f"{'level':>6} {'shape':>16} {'mean':>9} {'std':>9} {'zeros':>6}")
for name, x in {**record["noisy"], **record["fpn"]}.items():
    fh, fw = x.shape[-2:]
    v = x[0, :, : max(1, -(-h0 * fh // hp)), : max(1, -(-w0 * fw // wp))].float()
    feature_stats[name] = {"mean": float(v.mean()), "std": float(v.std()), "zeros": float((v == 0).float().mean())}
    s = feature_stats[name]
    print(f"{name:>6} {str(tuple(x.shape[1:])):>16} {s['mean']:9.4f} {s['std']:9.4f} {s['zeros']:6.1%}")
level = "p3"
channels = record["fpn"][level][0, :4, : max(1, -(-h0 * record["fpn"][level].shape[-2] // hp))]
show(side_by_side([caption(heatmap(c, (160, round(160 * c.shape[0] / c.shape[1]))), f"{level} channel {k}")
                   for k, c in enumerate(channels)]), f"the first channels of {level}", width=12)

# %% [markdown]
# ## The noise at its site
# The same images probed with the noise switched off and on: mean activation per level, the relative
# change ||noisy - clean|| / ||clean|| per level, and the detections of both passes.

# %%
torch.manual_seed(seed)
clean = model.probe(inputs, targets, noise=False)
noisy = model.probe(inputs, targets, noise=True)
view = features_view(clean, noisy, 0, noise_text(model))
show(view.picture, "mean activation without and with noise", width=14)
print("\n".join(view.lines))
noise_change = {k: relative_change(clean["bottom_up"][k], noisy["noisy"][k]) for k in clean["bottom_up"]}
noise_change.update({k: relative_change(clean["fpn"][k], noisy["fpn"][k]) for k in clean["fpn"]})
if model.roi_heads is not None:
    pictures = [detections_view(to_uint8_image(inputs[0]), r["output"][0], class_names, score_thresh)
                for r in (clean, noisy)]
    show(side_by_side([caption(p.picture, t) for p, t in zip(pictures, ("noise off", "noise on"))]),
         "detections without and with noise", width=12)
    print(f"detections: {len(clean['output'][0]['scores'])} without noise, {len(noisy['output'][0]['scores'])} with")

# %% [markdown]
# ## RPN: objectness per level
# The highest objectness probability of the A anchors of each cell, per level, for image 0.

# %%
names = model.rpn.in_features
num_anchors = model.rpn.anchor_generator.num_anchors
maps = []
for name, logits in zip(names, record["objectness"]):
    fh, fw = record["fpn"][name].shape[-2:]
    prob = logits[0].view(fh, fw, num_anchors).sigmoid().amax(-1)  # the anchor order: cell-major, then A
    maps.append(caption(heatmap(prob, (128, round(128 * fh / fw)), 0.0, 1.0), f"{name} max {float(prob.max()):.2f}"))
show(side_by_side(maps), "objectness per level (0..1)", width=14)
deltas = record["rpn_deltas"]
print("mean |RPN delta| (dx, dy, dw, dh) per level: " + "; ".join(
    f"{n} {', '.join(f'{v:.3f}' for v in d[0].abs().mean(0).tolist())}" for n, d in zip(names, deltas)))

# %% [markdown]
# ## RPN: top anchors before NMS, proposals after NMS, recall
# Left: the best-scoring anchors of every level, decoded with their deltas (the per-level top-k the RPN
# takes before NMS); right: the proposals that survive NMS.

# %%
pre = record["pre_nms"][0]
order = pre["scores"].argsort(descending=True)[:50]
image = input_image(record, 0)
if record["targets"] is not None:
    image = draw_boxes(image, record["targets"][0]["boxes"], GT_COLOUR, thickness=2, outline=True)
left = caption(draw_proposals(image, pre["boxes"][order], pre["scores"][order], logits=not model.rpn.sigmoid_scores),
               f"top 50 of {len(pre['boxes'])} before NMS")
right = proposals_view(record, 0, model, top=50)
show(side_by_side([left, right.picture]), "RPN before and after NMS", width=14)
print(f"pre-NMS: {len(pre['boxes'])} boxes ({model.rpn.pre_nms_topk[1]} per level at most) -> "
      f"{len(record['proposals'][0]['boxes'])} proposals after NMS at IoU {model.rpn.nms_thresh:g}")
rpn_recall = None
if record["targets"] is not None:
    best = torch.cat([box_iou(t["boxes"], p["boxes"]).amax(1) if len(p["boxes"]) else torch.zeros(len(t["boxes"]))
                      for t, p in zip(record["targets"], record["proposals"])])
    rpn_recall = {f"{t:g}": float((best >= t).float().mean()) for t in (0.5, 0.7)}
    print(f"RPN recall over {len(best)} objects: " + ", ".join(f"IoU {k}: {v:.2f}" for k, v in rpn_recall.items()))

# %% [markdown]
# ## Box refinement, stage by stage
# proposals -> each proposal's box for every class (its class-specific deltas applied) -> score threshold
# -> per-class NMS -> the top `detections_per_image`. The counts shrink at every step and end at the
# detections the model returns.

# %%
refinement_counts = []
if model.roi_heads is not None:
    head = model.roi_heads.box_head
    print(f"score threshold {head.score_thresh:g}, NMS IoU {head.nms_thresh:g}, "
          f"top {head.detections_per_image}; {head.num_classes} classes")
    print(f"{'image':>5} {'proposals':>10} " + " ".join(f"{s:>16}" for s in record["box_refinement"][0]["steps"]))
    for i, ref in enumerate(record["box_refinement"]):
        counts = [len(ref["proposals"])] + [len(s["boxes"]) for s in ref["steps"].values()]
        refinement_counts.append(counts)
        print(f"{i:5d} {counts[0]:10d} " + " ".join(f"{c:16d}" for c in counts[1:]))
    ref = record["box_refinement"][0]
    image = input_image(record, 0)
    panels = [caption(draw_boxes(image, ref["proposals"][:30], (255, 200, 0)), f"proposals ({len(ref['proposals'])})")]
    for step, s in ref["steps"].items():
        top = s["scores"].argsort(descending=True)[:30]
        cols = [colour(int(lab) - 1) for lab in s["labels"][top]]
        panels.append(caption(draw_boxes(image, s["boxes"][top], cols), f"{step} ({len(s['boxes'])})"))
    refinement_picture = side_by_side(panels)
    show(refinement_picture, "the top 30 boxes at each step, coloured by class", width=16)
    print("mean |class-specific delta| of the detections' classes: " + ", ".join(
        f"{v:.3f}" for v in ref["box_deltas"].view(len(ref["proposals"]), -1, 4)[
            ref["steps"]["top_k"]["roi"], ref["steps"]["top_k"]["labels"]].abs().mean(0).tolist()))

# %% [markdown]
# ## Masks: logits, probabilities, thresholded, pasted
# The best detection of image 0: its class's 28x28 logits before the sigmoid, the probabilities, the
# mask at 0.5, and the probabilities pasted into the image (the model's own postprocess).

# %%
pasted_max_diff = None
if model.roi_heads is not None and model.roi_heads.mask_on and len(record["mask_logits"][0]):
    logits = record["mask_logits"][0][0]
    prob = logits.sigmoid()
    # the model's postprocess on the detections of the probe: the masks forward returns
    pasted = postprocess_detections(record["detections"], record["image_sizes"], original_sizes, model.mask_paste)
    pasted_max_diff = max(float((p["masks"] - o["masks"]).abs().max()) if len(o["masks"]) else 0.0
                          for p, o in zip(pasted, record["output"]))
    cell = (112, 112)
    full = pasted[0]["masks"][0, 0]
    box = pasted[0]["boxes"][0]
    show(side_by_side([caption(heatmap(logits, cell), f"logits {float(logits.min()):.1f}..{float(logits.max()):.1f}"),
                       caption(heatmap(prob, cell, 0.0, 1.0), "sigmoid"),
                       caption(heatmap((prob >= 0.5).float(), cell, 0.0, 1.0), ">= 0.5"),
                       caption(draw_boxes(draw_masks(to_uint8_image(inputs[0]), full[None] >= 0.5, colour(0)), box[None],
                                          GT_COLOUR), "pasted")]), "the best detection's mask", width=12)
    print(f"pasted masks against forward's output masks: largest difference {pasted_max_diff:g}")

# %% [markdown]
# ## Detections against the ground truth

# %%
best_detection_iou = []
for i, out in enumerate(record["output"]):
    if "labels" not in out:
        break
    image = to_uint8_image(inputs[i])
    if targets is not None:
        image = draw_boxes(image, targets[i]["boxes"], GT_COLOUR, thickness=2, outline=True)
        iou = box_iou(targets[i]["boxes"], out["boxes"])
        best_detection_iou += (iou.amax(1) if iou.numel() else torch.zeros(len(targets[i]["boxes"]))).tolist()
    view = detections_view(image, out, class_names, score_thresh)
    show(view.picture, f"image {i}: detections (colour) and ground truth (white)")
    print("\n".join(view.lines[:6]))
if best_detection_iou:
    print("best detection IoU per ground-truth object: " + " ".join(f"{v:.2f}" for v in best_detection_iou))

# %% [markdown]
# Forward itself, without the probe: the same detections (with the noise off, the model in eval mode).

# %%
forward_detections = None
if not noise and model.roi_heads is not None:
    with torch.no_grad():
        plain = model(inputs)
    forward_detections = [len(o["scores"]) for o in plain]
    assert all(torch.equal(o["boxes"], r["boxes"]) and torch.equal(o["masks"], r["masks"])
               for o, r in zip(plain, record["output"])), "the probe's detections differ from forward's"
    print(f"forward returns {forward_detections} detections, the same as the probe's")

# %%
if gallery and model.roi_heads is not None:
    Path(gallery).mkdir(parents=True, exist_ok=True)
    save_png(refinement_picture, Path(gallery) / "inspect_model.png", palette=256)
summary = {"refinement_counts": refinement_counts,
           "output_detections": [len(o["scores"]) for o in record["output"]],
           "forward_detections": forward_detections, "pasted_max_diff": pasted_max_diff,
           "noise_change": noise_change, "feature_stats": feature_stats, "rpn_recall": rpn_recall,
           "best_detection_iou": best_detection_iou}
summary
