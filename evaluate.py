"""Evaluate a checkpoint: COCO box and mask AP (or proposal AR for an RPN-stage checkpoint), clean or
under image corruptions (COCO-C).

    python evaluate.py --checkpoint runs/full/model_final.pth
    python evaluate.py --checkpoint runs/full/model_final.pth --corruption gaussian_noise --severity 3
    python evaluate.py --checkpoint runs/full/model_final.pth --corruption all --severity 3

Writes detections (COCO results format) and metrics JSON into the checkpoint's run directory (or --out).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskrcnn.cli import one_line_errors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model_final.pth / last_checkpoint.pth of a run")
    p.add_argument("--config", help="YAML config (default: the config saved in the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--corruption", help="a corruption name, or 'all' (see maskrcnn/corruptions.py)")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5 (default 3)")
    p.add_argument("--corruptions", nargs="*", help="with --corruption all: only these corruptions")
    p.add_argument("--max-images", type=int, default=0, help="evaluate on at most N images (0: all)")
    p.add_argument("--batch-size", type=int, help="inference batch (default: test.ims_per_batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="output directory (default: the checkpoint's directory)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def print_report(tag: str, metrics: dict) -> None:
    print(f"== {tag}")
    if "AR@100" in metrics:
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return
    for iou_type in ("bbox", "segm"):
        if iou_type not in metrics:
            continue
        m = metrics[iou_type]
        print(f"-- {iou_type}")
        print(m["summary"].rstrip())
        print("  per-category AP: " + ", ".join(f"{k} {v:.3f}" for k, v in m["per_category"].items()))


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from maskrcnn.engine.checkpoint import model_from_checkpoint
    from maskrcnn.evaluation.corruptions import CORRUPTIONS, Corrupt
    from maskrcnn.data.build import build_eval_dataset
    from maskrcnn.engine.device import select_device
    from maskrcnn.evaluation.coco_eval import evaluate_model

    device = select_device(args.device)
    model, cfg = model_from_checkpoint(args.checkpoint, args.config, args.set, device=str(device))
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.corruption is None:
        runs = [("clean", None)]
    else:
        if not 1 <= args.severity <= 5:
            raise ValueError(f"--severity must be 1..5, got {args.severity}")
        names = (list(args.corruptions) if args.corruptions else list(CORRUPTIONS)) \
            if args.corruption == "all" else [args.corruption]
        for name in names:
            if name not in CORRUPTIONS:
                raise ValueError(f"unknown corruption '{name}' (one of: {', '.join(CORRUPTIONS)}, all)")
        runs = [(f"{name}-{args.severity}", Corrupt(name, args.severity, seed=cfg.train.seed)) for name in names]
    batch = args.batch_size or cfg.test.ims_per_batch
    amp = cfg.train.amp and device.type == "cuda"
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "stage": model.stage, "results": {}}
    for tag, transform in runs:
        dataset = build_eval_dataset(cfg, args.split, transforms=transform)
        with torch.no_grad():
            metrics, results = evaluate_model(model, dataset, device, batch, args.max_images, amp,
                                              cfg.model.roi_heads.mask_threshold, not args.no_progress,
                                              desc=f"evaluate {tag}")
        print_report(tag, metrics)
        (out_dir / f"detections_{args.split}_{tag}.json").write_text(json.dumps(results))
        report["results"][tag] = {k: ({kk: vv for kk, vv in v.items() if kk != "summary"}
                                      if isinstance(v, dict) else v) for k, v in metrics.items()}
    if args.corruption == "all" and model.stage == "full":
        for iou_type in ("bbox", "segm"):
            aps = [r[iou_type]["stats"]["AP"] for r in report["results"].values() if iou_type in r]
            if aps:
                report[f"mean_corrupted_{iou_type}_AP"] = sum(aps) / len(aps)
                print(f"mean {iou_type} AP under corruption (severity {args.severity}): {sum(aps) / len(aps):.4f}")
    tag = "clean" if args.corruption is None else f"{args.corruption}-{args.severity}"
    path = out_dir / f"eval_{args.split}_{tag}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"metrics: {path}")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        return evaluate(args)


if __name__ == "__main__":
    main()
