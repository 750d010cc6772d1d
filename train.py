r"""Train the RPN stage or the whole Mask R-CNN.

    python train.py --stage rpn
    python train.py --stage full --feature-noise --init runs/rpn/model_final.pth
    python train.py --config configs/torchvision_compat.yaml --stage full --init torchvision \
        --set data.train_ann=... data.val_ann=...   # transfer learning from torchvision's COCO weights
    python train.py --config configs/coco_r50_fpn_1x.yaml --set data.train_ann=... solver.max_iter=1000
    python train.py --name NAME --resume      # continue exactly where runs/NAME stopped (or was killed)
    torchrun --nproc_per_node=8 train.py --config configs/coco_r50_fpn_1x.yaml --set solver.ims_per_batch=2 ...

Under torchrun (one process per GPU, on one node or several) the model trains with DistributedDataParallel on
a global batch of solver.ims_per_batch x processes; rank 0 writes the run directory. `python train.py` is one
process. A global batch other than solver.reference_batch rescales the recipe (solver.scale_rule: linear or
accumulate), printed at the start and saved in the run's config.yaml.

SIGTERM or SIGINT (Ctrl-C) finishes the current step, writes a checkpoint, prints the command that resumes
the run and exits with status 128 + the signal (143 for SIGTERM, 130 for SIGINT); a second signal stops at
once. Exit status 2: a user error (one line), 3: a non-finite loss.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from maskrcnn.cli import add_config_args, keep_freed_memory, one_line_errors, use_huge_pages

DEFAULT_CONFIG = "configs/shapes.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, DEFAULT_CONFIG)
    p.set_defaults(config=None)  # None: not given (--resume says that it does not read one); resolve_config's default
    p.add_argument("--stage", choices=["rpn", "full"], help="rpn: backbone+FPN+RPN; full: Mask R-CNN "
                   "(default: the config's stage)")
    p.add_argument("--feature-noise", action="store_true", help="switch on the configured LatentNoise")
    p.add_argument("--init", help="checkpoint to initialise from (an RPN-stage run, or any compatible one), "
                   "or 'torchvision' for torchvision's COCO Mask R-CNN weights (use configs/torchvision_compat.yaml)")
    p.add_argument("--name", help="run name: runs/<name>/ (default: <stage>[-noise]-<time>)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--resume", action="store_true", help="continue the run <name> from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start the run <name> again, deleting the checkpoints and events of the run there")
    p.add_argument("--check-data", action="store_true", help="check every image and annotation of both splits "
                   "before the first iteration (as python -m maskrcnn.data.check) and stop on errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_data(cfg, progress: bool) -> None:
    """The dataset checker on both splits: its summary, and a one-line error when training would fail."""
    from maskrcnn.data.build import dataset_paths
    from maskrcnn.data.check import check_dataset_files
    from maskrcnn.data.coco import DatasetError

    paths = dataset_paths(cfg)
    for split in ("train", "val"):
        report = check_dataset_files(paths[f"{split}_ann"], paths[f"{split}_images"],
                                     workers=cfg.data.num_workers or None, progress=progress,
                                     min_box_size=cfg.data.min_box_size)
        print(f"{split}: {report.summary()}")
        if not report.ok:
            raise DatasetError(f"--check-data: the {split} split has {len(report.errors)} error(s) (listed above); "
                               f"training would stop on them")


def _resumed_config(cfg, args):
    """A resumed run continues with the config saved in its run directory (plus this command's --set), so
    forgetting --stage or --feature-noise cannot silently change the experiment half-way."""
    from maskrcnn.config import load_config
    from maskrcnn.engine.rundir import check_run_dir
    if not args.name:
        raise ValueError("--resume needs --name of the run to continue")
    if args.overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it again: choose one")
    run_dir = Path(cfg.train.output_dir) / args.name
    check_run_dir(run_dir, resume=True, overwrite=False)  # a checkpoint to continue from
    saved = load_config(run_dir / "config.yaml", args.set)
    if args.config is not None and os.environ.get("RANK", "0") == "0":
        print(f"note: --resume continues with {run_dir / 'config.yaml'} (and --set); --config {args.config} is not "
              "read")
    if args.stage and args.stage != saved.stage:
        raise ValueError(f"--resume: run {run_dir} is a {saved.stage}-stage run, not --stage {args.stage}")
    if args.feature_noise and not saved.model.noise.enabled:
        raise ValueError(f"--resume: run {run_dir} was trained without --feature-noise")
    saved.train.output_dir = cfg.train.output_dir
    return saved


def main(argv=None) -> dict:
    use_huge_pages()  # first: PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation
    keep_freed_memory()  # glibc: the next tensors reuse freed memory instead of faulting fresh pages
    args = parse_args(argv)
    with one_line_errors():
        from maskrcnn.engine import distributed
        cfg = resolve_config(args)
        # Under torchrun: join the process group; an error on any process ends the job (its one line, a non-zero
        # exit, and torchrun stops the others).
        with distributed.process_group(cfg.train.device, cfg.train.dist_timeout_min):
            return run(args, cfg)


def resolve_config(args):
    """The config of this run: the file and --set, or the resumed run's own; then --stage, --feature-noise, --seed."""
    from maskrcnn.config import load_config
    # --resume: the run's own config.yaml (the defaults and --set only say where the run is)
    cfg = load_config(None if args.resume else args.config or DEFAULT_CONFIG, args.set)
    if args.resume:
        cfg = _resumed_config(cfg, args)
    if args.stage:
        cfg.stage = args.stage
    if args.feature_noise:
        cfg.model.noise.enabled = True
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.init and args.init != "torchvision" and not Path(args.init).is_file():
        raise FileNotFoundError(f"--init checkpoint not found: {args.init}")
    check_device(cfg.train.device)
    return cfg


def check_device(name: str) -> None:
    """train.device names a device of this machine (checked before the run directory is made)."""
    from maskrcnn.engine.device import DeviceError, select_device

    try:
        select_device(name)
    except DeviceError as e:
        raise ValueError(f"train.device={name}: {e}") from None


def trainer_hooks(init_torchvision: bool = False):
    """What the trainer calls but does not import (maskrcnn.engine.trainer.Hooks): the end-of-run evaluation and
    its error-analysis pictures (beside metrics.json and in TensorBoard), TensorBoard pictures (drawing code
    loaded only when a picture is due) and, for --init torchvision, torchvision's COCO weights."""
    from maskrcnn.engine.trainer import Hooks
    from maskrcnn.evaluation.coco_eval import end_of_run_evaluation

    def log_images(*args, **kwargs) -> None:
        from maskrcnn.vis.tensorboard import log_training_images
        log_training_images(*args, **kwargs)

    def analyse(writer, metrics: dict, run_dir, iteration: int) -> list:
        from maskrcnn.evaluation.error_plots import analysis_pictures
        pictures = analysis_pictures(metrics, run_dir, "val", "training")["pictures"]
        if writer is not None and pictures:
            from maskrcnn.vis.tensorboard import log_pictures
            log_pictures(writer, pictures, iteration, "errors")
        return pictures

    def initialise(model, cfg, class_names) -> str:
        from maskrcnn.torchvision_weights import load_torchvision_coco
        return load_torchvision_coco(model, cfg.model.num_classes, class_names, cfg).summary()

    return Hooks(evaluate=end_of_run_evaluation, log_images=log_images, analyse=analyse,
                 initialise=initialise if init_torchvision else None)


def run(args, cfg) -> dict:
    from maskrcnn.data.coco import DatasetError
    from maskrcnn.engine import distributed
    from maskrcnn.engine.trainer import Trainer

    main = distributed.is_main()
    name = args.name or cfg.train.name or distributed.broadcast_object(  # rank 0's clock names the run
        f"{cfg.stage}{'-noise' if cfg.model.noise.enabled else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.train.name = name
    run_dir = Path(cfg.train.output_dir) / name
    if args.check_data:  # rank 0 checks; every process stops on its verdict
        problem = None
        if main:
            try:
                check_data(cfg, progress=not args.no_progress)
            except DatasetError as e:
                problem = str(e)
        problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise DatasetError(problem) if main else SystemExit(2)
    if main:
        print(f"run directory: {run_dir}")
    from_torchvision = args.init == "torchvision"
    trainer = Trainer(cfg, run_dir, init=None if from_torchvision else args.init, resume=args.resume,
                      progress=not args.no_progress, overwrite=args.overwrite, hooks=trainer_hooks(from_torchvision))
    summary = trainer.train()
    if main:
        print(f"checkpoint: {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    main()
