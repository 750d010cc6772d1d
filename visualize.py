"""Draw what the model sees and does, as PNG files (CPU is enough). Each command prints the paths it wrote.

    python visualize.py dataset --split train --index 3            # GT boxes/names/masks as the model gets them
    python visualize.py anchors --at 120 90 --level p3             # anchors of one location + one level's grid
    python visualize.py anchor-labels --index 0                    # positive/negative/ignored, before/after sampling
    python visualize.py proposals --checkpoint runs/rpn/model_final.pth --top 50 --levels p2 p3
    python visualize.py rois --checkpoint runs/full/model_final.pth  # RoIs sampled for the box head
    python visualize.py detections --checkpoint runs/full/model_final.pth --image photo.jpg --score-thresh 0.5
    python visualize.py features --checkpoint runs/full/model_final.pth  # c2..c5, p2..p6 with/without noise
    python visualize.py report --checkpoint C --against C_LAST_WEEK --out runs/report   # the weekly check-up page
    python visualize.py report --config configs/shapes.yaml --out runs/first-day    # no checkpoint: anchors, data

Images come from the dataset of the config (`--split`, `--index`) or from a file (`--image`). With
`--checkpoint`, the config saved in it is used unless `--config` is given; without one, a randomly initialised
model is used (enough for anchors and their labels, which do not depend on weights). Coordinates and pictures
are in the frame of the model's input (the image after the model's resizing), except `detections`, which is
drawn on the image as given. `--palette 256` writes smaller (indexed-colour) PNGs, e.g. for documentation.

`report` writes one HTML page (DIR/index.html, pictures beside it, DIR/report.json with every number): the seven
views on N validation images, anchor fit over the training set with k-means anchor suggestions, proposal recall
and the worst-covered objects, the run's losses and AP/AR, and with --against the same for another checkpoint and
a summary of the differences. Without a checkpoint: anchor fit, object sizes, suggested settings and a measured
time per training iteration (the first day with new data).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/shapes.yaml"


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
    common.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
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
    sub.add_parser("features", parents=[common], help="c2..c5 and p2..p6 mean activations without and with the "
                   "config's LatentNoise (switched on for this picture)")
    add_report_parser(sub)
    return p.parse_args(argv)


def add_report_parser(sub) -> None:
    from maskrcnn.cli import add_config_args

    s = sub.add_parser("report", help="one HTML page: views, anchor fit and suggestions, proposal recall, the run; "
                       "--against compares with another checkpoint")
    add_config_args(s, DEFAULT_CONFIG)
    s.set_defaults(config=None)
    s.add_argument("--checkpoint", help="the checkpoint to look at (without one: anchors and data from the config)")
    s.add_argument("--against", metavar="CHECKPOINT", help="another checkpoint (last week's) to compare with")
    s.add_argument("--images", type=int, default=4, help="validation images drawn in the seven views (default 4)")
    s.add_argument("--out", default="runs/report", help="output folder: index.html, report.json, img/ (default "
                   "runs/report)")
    s.add_argument("--train-images", type=int, default=0, metavar="N",
                   help="anchor fit over the first N training images (default 0: all)")
    s.add_argument("--val-images", type=int, default=0, metavar="N",
                   help="proposal recall over the first N validation images (default 0: all)")
    s.add_argument("--top", type=int, default=50, help="proposals drawn in the proposals view (default 50)")
    s.add_argument("--score-thresh", type=float, default=0.5, help="detections drawn above this (default 0.5)")
    s.add_argument("--minutes", type=float, default=30.0,
                   help="without a checkpoint: training time to suggest solver.max_iter for (default 30)")
    s.add_argument("--timing-steps", type=int, default=3,
                   help="without a checkpoint: training steps timed after one warm-up step (default 3; 0: skip)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random model and of the anchor sampling")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.add_argument("--palette", type=int, default=0, metavar="N", help="view PNGs of at most N colours")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


# ------------------------------------------------------------------------------------------------ loading
def load_model(args):
    """(config, model in eval mode, class names or None) from --checkpoint (its config unless --config is
    given) or, without one, a randomly initialised model of the config (sized for its data)."""
    import torch

    from maskrcnn.config import ConfigError, load_config
    from maskrcnn.data.build import build_datasets
    from maskrcnn.data.coco import DatasetError
    from maskrcnn.engine.checkpoint import model_from_checkpoint
    from maskrcnn.model.build import build_model

    overrides = list(args.set)
    if args.checkpoint:
        model, cfg = model_from_checkpoint(args.checkpoint, args.config, overrides, args.device)
        return cfg, model, model.class_names
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    try:  # a random model sized for the data, as training does
        val = build_datasets(cfg, train=False)[1]
        cfg.model.num_classes, class_names = val.num_classes, val.class_names
    except (ConfigError, DatasetError, FileNotFoundError):
        if not args.image:
            raise
        class_names = None  # an image file needs no dataset
    torch.manual_seed(args.seed)
    return cfg, build_model(cfg, load_weights=False).to(args.device).eval(), class_names


def load_image(args, cfg, need_target: bool):
    """(image [3, H, W] 0..1, target or None, file stem, description) from --image or the dataset."""
    import torch

    from maskrcnn.data.build import build_datasets
    from maskrcnn.data.coco import read_image

    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        if need_target:
            raise ValueError(f"'{args.what}' needs ground truth: use --index (a dataset item), not --image")
        image = torch.from_numpy(read_image(path).transpose(2, 0, 1).copy()).float() / 255
        return image.to(args.device), None, path.stem, str(path)
    train_set, val_set = build_datasets(cfg, train=args.split == "train")
    dataset = train_set if args.split == "train" else val_set
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index {args.index} out of range: the {args.split} split has {len(dataset)} images")
    dataset.transforms = None  # the flip is applied by the `dataset` command, where it is shown
    image, target = dataset[args.index]
    target = {k: target[k].to(args.device) for k in ("boxes", "labels", "masks")}
    return (image.to(args.device), target, f"{args.split}{args.index}",
            f"{args.split} #{args.index} (image id {dataset.image_ids[args.index]})")


def draw(args) -> tuple[Path, list[str]]:
    """Run the command: (path of the PNG written, lines to print)."""
    import random

    import torch

    from maskrcnn.vis import views
    from maskrcnn.vis.primitives import header, save_png, to_uint8_image

    cfg, model, class_names = load_model(args)
    if args.what in ("rois", "detections") and model.roi_heads is None:
        raise ValueError(f"{args.what} needs a full-stage model (this is the RPN stage); use a full-stage "
                         "checkpoint or config" + ("" if args.what == "rois" else " (see `proposals`)"))
    image, target, stem, source = load_image(args, cfg, need_target=args.what in NEED_TARGETS)
    head = []
    if args.what == "dataset":
        from maskrcnn.data.transforms import hflip

        train = args.split == "train"
        torch.manual_seed(args.seed)
        flipped = args.flip or (train and torch.rand(()).item() < cfg.data.flip_prob)
        if flipped:
            image, target = hflip(image, target)
        model.transform.train(train)  # the training resize (a random short side) for the train split
        h0, w0 = image.shape[-2:]
        head = [f"{source}: {w0}x{h0} px, {'training' if train else 'test'} resize, "
                f"{'flipped' if flipped else 'not flipped'}"]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # features probes twice below (without and with noise); every other view draws from one probe
    record = None if args.what == "features" else model.probe([image], None if target is None else [target])
    if args.what == "dataset":
        view = views.dataset_view(record, 0, class_names)
        view.picture = header(view.picture, f"{stem}: {view.lines[0]}")
    elif args.what == "anchors":
        view = views.anchors_view(record, 0, model, args.at, args.level)
    elif args.what == "anchor-labels":
        view = views.anchor_labels_view(record, 0, model)
    elif args.what == "proposals":
        view = views.proposals_view(record, 0, model, args.top, args.levels)
    elif args.what == "rois":
        view = views.rois_view(record, 0, model, class_names)
    elif args.what == "detections":
        view = views.detections_view(to_uint8_image(image), record["output"][0], class_names, args.score_thresh,
                                     cfg.model.roi_heads.mask_threshold)
    else:  # features: the same image without and with the configured LatentNoise (probe switches it on)
        torch.manual_seed(args.seed)
        clean = model.probe([image], noise=False)
        torch.manual_seed(args.seed)
        view = views.features_view(clean, model.probe([image], noise=True), 0, views.noise_text(model))
    path = Path(args.out) / f"{args.what.replace('-', '_')}_{stem}.png"
    save_png(view.picture, path, args.palette)
    return path, head + ([f"{source}: {view.lines[0]}"] if not head else view.lines[:1]) + view.lines[1:]


NEED_TARGETS = ("dataset", "anchor-labels", "rois")


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    from maskrcnn.cli import one_line_errors

    with one_line_errors():
        from maskrcnn.engine.device import select_device
        args.device = str(select_device(args.device))  # an unknown or absent device: one line, exit status 2
        if args.what == "report":
            from maskrcnn.report.command import make_report

            path, lines = make_report(args, DEFAULT_CONFIG)
        else:
            path, lines = draw(args)
    print("\n".join(lines))
    print(path)
    return [path]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
