"""Draw what the model sees and does, as PNG files (CPU is enough). Each command prints the paths it wrote.

    python visualize.py dataset --split train --index 3            # GT boxes/names/masks as the model gets them
    python visualize.py anchors --at 120 90 --level p3             # anchors of one location + one level's grid
    python visualize.py anchor-labels --index 0                    # positive/negative/ignored, before/after sampling
    python visualize.py proposals --checkpoint runs/rpn/model_final.pth --top 50 --levels p2 p3
    python visualize.py rois --checkpoint runs/full/model_final.pth  # RoIs sampled for the box head
    python visualize.py detections --checkpoint runs/full/model_final.pth --image photo.jpg --score-thresh 0.5
    python visualize.py features --checkpoint runs/full/model_final.pth  # c2..c5, p2..p6 with/without noise

Images come from the dataset of the config (`--split`, `--index`) or from a file (`--image`). With
`--checkpoint`, the config saved in it is used unless `--config` is given; without one, a randomly initialised
model is used (enough for anchors and their labels, which do not depend on weights). Coordinates and pictures
are in the frame of the model's input (the image after the model's resizing), except `detections`, which is
drawn on the image as given. `--palette 256` writes smaller (indexed-colour) PNGs, e.g. for documentation.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Optional

DEFAULT_CONFIG = "configs/shapes.yaml"
COMMANDS = ("dataset", "anchors", "anchor-labels", "proposals", "rois", "detections", "features")


def parse_args(argv=None) -> argparse.Namespace:
    from maskrcnn.cli import add_config_args

    common = argparse.ArgumentParser(add_help=False)
    add_config_args(common, DEFAULT_CONFIG)
    common.set_defaults(config=None)  # None: the checkpoint's config, else DEFAULT_CONFIG
    common.add_argument("--checkpoint", help="model checkpoint (its saved config is used unless --config is given)")
    src = common.add_mutually_exclusive_group()
    src.add_argument("--index", type=int, default=0, help="dataset index (default 0)")
    src.add_argument("--image", help="an image file instead of a dataset item (no ground truth)")
    common.add_argument("--split", choices=["train", "val"], default="val", help="dataset split (default val)")
    common.add_argument("--out", default="runs/vis", help="output folder (default runs/vis)")
    common.add_argument("--seed", type=int, default=0, help="seed of the random model, flip, resize and sampling")
    common.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    common.add_argument("--palette", type=int, default=0, metavar="N",
                        help="save PNGs of at most N colours (smaller files, e.g. 256 for docs; default: full colour)")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    s = sub.add_parser("dataset", parents=[common], help="ground truth after the model's resizing (and flip)")
    s.add_argument("--flip", action="store_true",
                   help="flip the image (default: the train split flips with data.flip_prob, val never)")
    s = sub.add_parser("anchors", parents=[common], help="anchors of one location, and one level's grid")
    s.add_argument("--at", nargs=2, type=float, metavar=("X", "Y"),
                   help="location in model-input pixels (default: the image centre)")
    s.add_argument("--level", help="level of the grid picture (default: the second anchor level)")
    sub.add_parser("anchor-labels", parents=[common], help="anchor labels before and after sampling, with counts")
    s = sub.add_parser("proposals", parents=[common], help="top proposals coloured by objectness")
    s.add_argument("--top", type=int, default=50, help="number of proposals (default 50)")
    s.add_argument("--levels", nargs="+", metavar="LEVEL", help="keep proposals from these levels (e.g. p2 p3)")
    sub.add_parser("rois", parents=[common], help="RoIs sampled for the box head and their ground truth")
    s = sub.add_parser("detections", parents=[common], help="final boxes, classes, scores and masks")
    s.add_argument("--score-thresh", type=float, default=0.5, help="draw detections above this (default 0.5)")
    sub.add_parser("features", parents=[common], help="c2..c5 and p2..p6 mean activations with/without noise")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ loading
class Item:
    """One image for a command: the image, its ground truth (None for --image), names and the model."""

    def __init__(self, cfg, model, image, target, class_names, stem: str, source: str):
        self.cfg, self.model, self.image, self.target = cfg, model, image, target
        self.class_names, self.stem, self.source = class_names, stem, source


def resolve_config(args):
    """(config, checkpoint state or None): the checkpoint's config unless --config is given, then --set."""
    from maskrcnn.engine.checkpoint import load_checkpoint
    from maskrcnn.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config

    state = None
    if args.checkpoint:
        try:
            state = load_checkpoint(args.checkpoint)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    if args.config is not None or state is None or state.get("config") is None:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.set)
    else:
        saved = state["config"]
        cfg = config_from_dict(config_to_dict(saved) if isinstance(saved, Config) else dict(saved))  # a copy
        apply_overrides(cfg, args.set)
    if state is not None and state.get("stage") in ("rpn", "full"):
        cfg.stage = state["stage"]  # the weights decide which modules exist
    return cfg, state


def load_item(args, need_target: bool = False) -> Item:
    import torch

    from maskrcnn.model.build import build_model
    from maskrcnn.config import ConfigError
    from maskrcnn.data.coco import DatasetError, read_image
    from maskrcnn.data.build import build_datasets

    cfg, state = resolve_config(args)
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        if need_target:
            raise ValueError(f"'{args.what}' needs ground truth: use --index (a dataset item), not --image")
        pixels = read_image(path)  # uint8 RGB
        image = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 255
        target, stem, source = None, path.stem, str(path)
        try:  # class names only; the image itself needs no dataset
            dataset = build_datasets(cfg, train=False)[1]
            class_names = dataset.class_names
        except (ConfigError, DatasetError, ValueError, FileNotFoundError):
            dataset, class_names = None, None
    else:
        train_set, val_set = build_datasets(cfg, train=args.split == "train")
        dataset = train_set if args.split == "train" else val_set
        if not 0 <= args.index < len(dataset):
            raise ValueError(f"--index {args.index} out of range: the {args.split} split has {len(dataset)} images")
        dataset.transforms = None  # the flip is applied by the `dataset` command, where it is shown
        image, target = dataset[args.index]
        target = {k: target[k] for k in ("boxes", "labels", "masks")}
        class_names = dataset.class_names
        stem = f"{args.split}{args.index}"
        source = f"{args.split} #{args.index} (image id {dataset.image_ids[args.index]})"
    if state is None and dataset is not None and cfg.model.num_classes != dataset.num_classes:
        cfg.model.num_classes = dataset.num_classes  # a random model sized for the data, as training does
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = build_model(cfg, load_weights=False)
    if state is not None:
        own, saved = model.state_dict(), state["model"]
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in saved.items()
                  if k in own and v.shape != own[k].shape]
        if missing or unexpected or shapes:
            example = (shapes or missing or unexpected)[0]
            raise ValueError(f"{args.checkpoint} does not fit the {cfg.stage}-stage model of the config: "
                             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another "
                             f"shape (e.g. {example})")
        model.load_state_dict(saved)
    device = torch.device(args.device)
    model.to(device).eval()
    image = image.to(device)
    if target is not None:
        target = {k: v.to(device) for k, v in target.items()}
    return Item(cfg, model, image, target, class_names, stem, source)


def write(args, image, what: Optional[str] = None) -> Path:
    from maskrcnn.vis.drawing import save_png

    path = Path(args.out) / f"{(what or args.what).replace('-', '_')}_{args.stem}.png"
    save_png(image, path, args.palette)
    print(path)
    return path


# ----------------------------------------------------------------------------------------------- commands
def cmd_dataset(args) -> list[Path]:
    import torch

    from maskrcnn.data.transforms import hflip
    from maskrcnn.vis.drawing import caption, class_name, draw_ground_truth, to_uint8_image

    item = load_item(args, need_target=True)
    image, target = item.image, item.target
    h0, w0 = image.shape[-2:]
    train = args.split == "train"
    flipped = args.flip or (train and torch.rand(()).item() < item.cfg.data.flip_prob)
    if flipped:
        image, target = hflip(image.cpu(), {k: v.cpu() for k, v in target.items()})
    transform = item.model.transform
    transform.train(train)  # the training resize (a random short side) for the train split
    random.seed(args.seed)
    image, target = transform.resize(image, target)
    h, w = image.shape[-2:]
    picture = draw_ground_truth(to_uint8_image(image), target, item.class_names)
    head = f"{item.stem}: {w0}x{h0} -> {w}x{h}{', flipped' if flipped else ''}, {len(target['boxes'])} objects"
    print(f"{item.source}: {w0}x{h0} px resized to {w}x{h} ({'training' if train else 'test'} resize), "
          f"{'flipped' if flipped else 'not flipped'}, {len(target['boxes'])} objects")
    masks = target["masks"].bool()
    for i, (box, label, mask) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist(), masks)):
        x0, y0, x1, y1 = box
        n = int(mask.sum())
        inside = int(mask[max(int(y0), 0) : int(y1) + 1, max(int(x0), 0) : int(x1) + 1].sum())
        print(f"  {i}: {class_name(item.class_names, label)} box [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}] "
              f"mask {n} px, {100 * inside / max(n, 1):.0f}% inside its box")
    args.stem = item.stem
    return [write(args, caption(picture, head))]


def cmd_anchors(args) -> list[Path]:
    import torch

    from maskrcnn.vis.drawing import (GT_COLOUR, anchor_grid_size, anchors_at, draw_anchor_grid, draw_anchors_at,
                                    draw_boxes, model_input_image, side_by_side)

    item = load_item(args)
    model = item.model
    with torch.no_grad():
        image_list, targets, feats = model.features([item.image], [item.target] if item.target else None)
    gen, names = model.rpn.anchor_generator, model.rpn.in_features
    sizes = [tuple(feats[n].shape[-2:]) for n in names]
    anchors = gen(sizes, anchor_grid_size(image_list))
    h, w = image_list.image_sizes[0]
    x, y = args.at if args.at else (w / 2, h / 2)
    if not (0 <= x <= w and 0 <= y <= h):
        raise ValueError(f"--at {x:g} {y:g} is outside the model input ({w}x{h} px, after resizing)")
    level = args.level or names[min(1, len(names) - 1)]
    if level not in names:
        raise ValueError(f"--level {level} is not an anchor level {names}")
    li = names.index(level)
    image = model_input_image(model, image_list)
    if targets is not None:
        image = draw_boxes(image, targets[0]["boxes"], GT_COLOUR)  # for scale
    per_level = anchors_at(anchors, gen.num_anchors, x, y)
    desc = [f"{n}: stride {s}, size {z:g}, ratios {'/'.join(f'{r:g}' for r in gen.ratios)}"
            for n, s, z in zip(names, gen.strides, gen.sizes)]
    left = draw_anchors_at(image, per_level, names, (x, y), desc)
    right = draw_anchor_grid(image, anchors[li], gen.num_anchors, gen.ratios, per_level[li], level,
                             gen.strides[li], sizes[li])
    print(f"{item.source}: model input {w}x{h}; anchors at ({x:.0f}, {y:.0f}):")
    for n, s, z, a, (fh, fw), lvl in zip(names, gen.strides, gen.sizes, anchors, sizes, per_level):
        centre = ((lvl[0, :2] + lvl[0, 2:]) / 2).tolist()
        print(f"  {n}: stride {s}, size {z:g}, {fh}x{fw} cells x {gen.num_anchors} ratios = {len(a)} anchors; "
              f"nearest centre ({centre[0]:.0f}, {centre[1]:.0f})")
    print(f"  total {sum(len(a) for a in anchors)} anchors")
    args.stem = item.stem
    return [write(args, side_by_side([left, right]))]


def cmd_anchor_labels(args) -> list[Path]:
    import torch

    from maskrcnn.vis.drawing import (anchor_grid_size, draw_anchor_labels, label_and_sample_anchors, label_counts,
                                    model_input_image, side_by_side)

    item = load_item(args, need_target=True)
    model = item.model
    with torch.no_grad():
        image_list, targets, feats = model.features([item.image], [item.target])
    rpn = model.rpn
    anchors = rpn.anchor_generator([tuple(feats[n].shape[-2:]) for n in rpn.in_features],
                                   anchor_grid_size(image_list))
    torch.manual_seed(args.seed)
    res = label_and_sample_anchors(rpn, anchors, targets[0]["boxes"])
    before, after = label_counts(res["labels"]), label_counts(res["sampled"])
    total = len(res["anchors"])
    image = model_input_image(model, image_list)
    gt = targets[0]["boxes"]
    left = draw_anchor_labels(image, res["anchors"], res["labels"], gt, f"before sampling ({total} anchors)")
    right = draw_anchor_labels(image, res["anchors"], res["sampled"], gt,
                               f"after sampling ({rpn.sampler.batch_size_per_image} per image)", sampled=True)
    h, w = image_list.image_sizes[0]
    print(f"{item.source}: model input {w}x{h}, {len(gt)} ground-truth boxes")
    print(f"anchors: {total} total, {before['positive']} positive, {before['negative']} negative, "
          f"{before['ignored']} ignored")
    print(f"sampled: {after['positive']} positive, {after['negative']} negative "
          f"(batch {rpn.sampler.batch_size_per_image}, positive fraction {rpn.sampler.positive_fraction:g})")
    for i, name in enumerate(rpn.in_features):
        on = res["levels"] == i
        c, s = label_counts(res["labels"][on]), label_counts(res["sampled"][on])
        print(f"  {name}: {int(on.sum())} anchors, {c['positive']} positive, {c['negative']} negative, "
              f"{c['ignored']} ignored; sampled {s['positive']} positive, {s['negative']} negative")
    args.stem = item.stem
    return [write(args, side_by_side([left, right]))]


def cmd_proposals(args) -> list[Path]:
    import torch

    from maskrcnn.vis.drawing import (GT_COLOUR, caption, draw_boxes, draw_proposals, model_input_image, objectness,
                                    rpn_scores_are_logits)

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    item = load_item(args)
    model = item.model
    names = model.rpn.in_features
    unknown = [lv for lv in (args.levels or []) if lv not in names]
    if unknown:
        raise ValueError(f"--levels {unknown[0]} is not an anchor level {names}")
    with torch.no_grad():
        image_list, targets, feats = model.features([item.image], [item.target] if item.target else None)
        p = model.rpn(image_list, feats)[0][0]
    boxes, scores, levels = p["boxes"], p["scores"], p["levels"]
    if args.levels:
        keep = torch.isin(levels, torch.tensor([names.index(lv) for lv in args.levels], device=levels.device))
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    boxes, scores, levels = boxes[: args.top], scores[: args.top], levels[: args.top]  # sorted by score
    image = model_input_image(model, image_list)
    if targets is not None:
        image = draw_boxes(image, targets[0]["boxes"], GT_COLOUR, thickness=2, outline=True)
    logits = rpn_scores_are_logits(model)
    picture = draw_proposals(image, boxes, scores, thickness=2 if args.top <= 100 else 1, logits=logits)
    per_level = {n: int((levels == i).sum()) for i, n in enumerate(names)}
    which = "" if not args.levels else f" from {' '.join(args.levels)}"
    text = [f"top {len(boxes)} of {len(p['boxes'])} proposals{which}",
            " ".join(f"{n}:{c}" for n, c in per_level.items() if c)]
    prob = objectness(scores, logits)
    print(f"{item.source}: {len(p['boxes'])} proposals; drawn the top {len(boxes)}{which}: "
          + ", ".join(f"{n} {c}" for n, c in per_level.items())
          + (f"; objectness {float(prob.max()):.3f} .. {float(prob.min()):.3f}" if len(prob) else ""))
    args.stem = item.stem
    return [write(args, caption(picture, text))]


def cmd_rois(args) -> list[Path]:
    import torch

    from maskrcnn.vis.drawing import caption, draw_sampled_rois, model_input_image, rpn_outputs

    item = load_item(args, need_target=True)
    model = item.model
    if model.roi_heads is None:
        raise ValueError("rois needs a full-stage model (this is the RPN stage); use a full-stage checkpoint "
                         "or config")
    with torch.no_grad():
        image_list, targets, feats = model.features([item.image], [item.target])
        torch.manual_seed(args.seed)
        proposals = rpn_outputs(model, image_list, feats, targets, training=True)  # training top-k
        s = model.roi_heads.sample_proposals([p["boxes"] for p in proposals], targets)[0]
    pos, neg = int((s["labels"] > 0).sum()), int((s["labels"] == 0).sum())
    heads = model.roi_heads
    image = model_input_image(model, image_list)
    picture = draw_sampled_rois(image, s["boxes"], s["labels"], s["matched_idx"], targets[0]["boxes"],
                                item.class_names, targets[0]["labels"])
    text = [f"{len(proposals[0]['boxes'])} proposals{' + GT' if heads.add_gt_as_proposals else ''}",
            f"sampled {pos} positive (GT colour), {neg} negative (red)"]
    print(f"{item.source}: {len(proposals[0]['boxes'])} proposals (training top-k)"
          f"{' + ' + str(len(targets[0]['boxes'])) + ' ground-truth boxes' if heads.add_gt_as_proposals else ''}"
          f"; sampled {pos} positive, {neg} negative (batch {heads.sampler.batch_size_per_image}, "
          f"positive fraction {heads.sampler.positive_fraction:g}, IoU {heads.matcher.high:g})")
    args.stem = item.stem
    return [write(args, caption(picture, text))]


def cmd_detections(args) -> list[Path]:
    import torch

    from maskrcnn.vis.drawing import caption, draw_detections, to_uint8_image

    item = load_item(args)
    model = item.model
    if model.roi_heads is None:
        raise ValueError("detections needs a full-stage model (this is the RPN stage; see `proposals`)")
    with torch.no_grad():
        det = model([item.image])[0]
    thresh = args.score_thresh
    shown = int((det["scores"] >= thresh).sum())
    picture = draw_detections(to_uint8_image(item.image), det, item.class_names, thresh,
                              item.cfg.model.roi_heads.mask_threshold)
    print(f"{item.source}: {len(det['scores'])} detections, {shown} with score >= {thresh:g}")
    for b, lab, sc in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
        if sc >= thresh:
            name = item.class_names[lab] if item.class_names and lab < len(item.class_names) else f"class {lab}"
            print(f"  {name} {sc:.3f} [{b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f}]")
    args.stem = item.stem
    return [write(args, caption(picture, f"{shown} detections, score >= {thresh:g}"))]


def cmd_features(args) -> list[Path]:
    import torch

    from maskrcnn.model.latent_noise import LatentNoise
    from maskrcnn.vis.drawing import feature_grid, model_input_image, relative_change

    item = load_item(args)
    model = item.model
    configured = item.cfg.model.noise.enabled
    noise = model.noise if configured else LatentNoise.seed000(seed=args.seed).to(item.image.device)
    text = noise.extra_repr() if configured else "seed000 preset: c5 x U(0.8, 1.2) per position"
    with torch.no_grad():
        image_list, _ = model.transform([item.image])
        bottom_up = model.bottom_up(image_list.tensor)
        clean = {**bottom_up, **model.fpn(bottom_up)}  # everything in eval mode, no noise
        torch.manual_seed(args.seed)
        was = noise.training
        noise.train()  # the noise module alone in training mode, so that only the noise differs
        try:
            noisy_bottom_up = noise(bottom_up)
        finally:
            noise.train(was)
        noisy = {**noisy_bottom_up, **model.fpn(noisy_bottom_up)}
    grid = feature_grid(model_input_image(model, image_list), clean, noisy, image_list.image_sizes[0],
                        tuple(image_list.tensor.shape[-2:]), noise_text=text)
    print(f"{item.source}: noise {'(configured) ' if configured else ''}{text}")
    print("relative change ||noisy - clean|| / ||clean||: "
          + ", ".join(f"{k} {relative_change(clean[k], noisy[k]):.3f}" for k in clean))
    args.stem = item.stem
    return [write(args, grid)]


HANDLERS = {"dataset": cmd_dataset, "anchors": cmd_anchors, "anchor-labels": cmd_anchor_labels,
            "proposals": cmd_proposals, "rois": cmd_rois, "detections": cmd_detections, "features": cmd_features}


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    from maskrcnn.cli import one_line_errors

    with one_line_errors():
        return HANDLERS[args.what](args)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
