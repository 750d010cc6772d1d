"""Evaluate a checkpoint: COCO box and mask AP (or proposal AR for an RPN-stage checkpoint), clean or
under image corruptions (COCO-C).

    python evaluate.py --checkpoint runs/full/model_final.pth
    python evaluate.py --checkpoint runs/full/model_final.pth --corruption gaussian_noise --severity 3
    python evaluate.py --checkpoint runs/full/model_final.pth --corruption all --severity 3
    python evaluate.py --checkpoint runs/full/model_final.pth --corruption benchmark   # P, mPC, rPC
    python evaluate.py --detections dets.json --annotations val.json   # any detector's COCO results file

--corruption benchmark evaluates clean and under the 15 COCO-C corruptions at severities 1..5 and reports
P (clean AP), mPC (mean AP under corruption) and rPC = mPC / P for boxes and masks (Michaelis et al. 2019),
with a table per corruption and severity. Corrupted images are 8-bit, as COCO-C's files, and cached on disk
(--cache-dir) so that the next checkpoint is evaluated on the same pixels, faster.

Writes detections (COCO results format) and metrics JSON into the checkpoint's run directory (or --out), named
after the evaluation's image set and what it evaluates (maskrcnn/evaluation/outputs.py): `eval_val_clean.json` and
`detections_val_clean.json` for every val image, `eval_val-first20_benchmark.json`,
`detections_val-first20_benchmark_clean.json`, ... for a benchmark on the first 20, so that no evaluation replaces
another's files.
Inference runs in fp32 unless --amp: `--amp` or `--amp auto` takes mixed precision where the device computes it
natively (fp16 on CUDA; bf16 on a CPU with AVX-512 BF16 or AMX, fp32 on other CPUs, where bf16 is emulated and
several times slower); `--amp true` forces it (with a warning where bf16 is emulated). Under torchrun the images are shared by the
processes and rank 0 evaluates the gathered detections (the same AP as one process) and writes the files:

    torchrun --nproc_per_node=8 evaluate.py --checkpoint runs/full/model_final.pth
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from maskrcnn.cli import keep_freed_memory, one_line_errors, use_huge_pages


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a model_final.pth / last_checkpoint.pth of a run")
    p.add_argument("--detections", metavar="FILE", help="instead of a checkpoint: evaluate and analyse this COCO "
                   "results file (from any detector) against --annotations")
    p.add_argument("--annotations", metavar="ANN.json", help="with --detections: the COCO annotations (every image "
                   "in them is evaluated)")
    p.add_argument("--config", help="YAML config (default: the config saved in the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--corruption", help="a corruption name, 'all' (every corruption at --severity) or 'benchmark' "
                                        "(COCO-C: clean + 15 corruptions x severities 1..5, P / mPC / rPC); "
                                        "see maskrcnn/evaluation/corruptions.py")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5 (default 3)")
    p.add_argument("--severities", nargs="*", metavar="S",
                   help="several severities, e.g. 1,3 (default: 1..5 for benchmark, else --severity)")
    p.add_argument("--corruptions", nargs="*", metavar="NAME",
                   help="with --corruption all / benchmark: only these (space or comma separated)")
    p.add_argument("--frost", default="auto", choices=["auto", "photos", "procedural"],
                   help="frost textures: the imagecorruptions package's photographs (auto: when installed) or "
                        "generated here")
    p.add_argument("--corruption-seed", type=int, help="seed of the random corruptions (default: the checkpoint's "
                   "train.seed); the same seed gives the same pixels to every checkpoint")
    p.add_argument("--cache-dir", help="where corrupted images are cached (default: <dataset>/corrupted, or "
                                       "<out>/corrupted when the dataset folder is not writable)")
    p.add_argument("--no-cache", action="store_true", help="corrupt every image afresh, keep nothing on disk")
    p.add_argument("--max-images", type=int, default=0, help="evaluate on the first N images (0: all); the files "
                   "name the set: <split>-first<N>")
    p.add_argument("--batch-size", type=int, help="images per inference batch (default: test.ims_per_batch, 1 in "
                   "the COCO presets: a batched image is padded to its partner's size, which can change its "
                   "detections)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: each process its own GPU)")
    p.add_argument("--amp", nargs="?", const="auto", default="false", metavar="auto|true|false",
                   help="mixed precision: fp16 autocast on CUDA, bf16 on a CPU. auto (also --amp alone): where the "
                   "device computes it natively, else fp32; true: always (bf16 emulated on a CPU without native "
                   "bfloat16: 7-16x slower); default false: fp32")
    p.add_argument("--out", help="output directory (default: the checkpoint's directory)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _split_list(values) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c']"""
    return [v for item in values or [] for v in str(item).split(",") if v]


def plan_runs(args: argparse.Namespace) -> tuple[list[tuple[str, int]], bool]:
    """The (corruption, severity) pairs to evaluate, and whether the clean images are evaluated too."""
    from maskrcnn.evaluation.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS
    from maskrcnn.evaluation.robustness import BENCHMARK_SEVERITIES

    if args.corruption is None:
        if args.corruptions or args.severities:
            raise ValueError("--corruptions / --severities need --corruption all or benchmark")
        return [], True
    group = args.corruption in ("all", "benchmark")
    if args.corruptions and not group:
        raise ValueError("--corruptions needs --corruption all or benchmark")
    names = _split_list(args.corruptions) or (list(BENCHMARK_CORRUPTIONS) if args.corruption == "benchmark"
                                              else list(CORRUPTIONS) if args.corruption == "all"
                                              else [args.corruption])
    for name in names:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption '{name}' (one of: {', '.join(CORRUPTIONS)}, all, benchmark)")
    if args.severities:
        try:
            severities = [int(s) for s in _split_list(args.severities)]
        except ValueError:
            raise ValueError(f"--severities must be integers 1..5, got {' '.join(args.severities)}") from None
    else:
        severities = list(BENCHMARK_SEVERITIES) if args.corruption == "benchmark" else [args.severity]
    for s in severities:
        if not 1 <= s <= 5:
            raise ValueError(f"severities must be 1..5, got {s}")
    runs = [(name, s) for name in dict.fromkeys(names) for s in dict.fromkeys(severities)]
    return runs, args.corruption == "benchmark"


def default_cache_dir(images_dir: str, out_dir: Path) -> Path:
    """<dataset>/corrupted next to the images folder (shared by every run), or <out>/corrupted if that folder
    cannot be written (a read-only dataset)."""
    root = Path(images_dir).resolve().parent
    if os.access(root, os.W_OK):
        return root / "corrupted"
    return out_dir / "corrupted"


def print_report(tag: str, metrics: dict) -> None:
    print(f"== {tag}")
    if "AR@100" in metrics:
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return
    from maskrcnn.evaluation.errors import category_table, error_table

    for iou_type in ("bbox", "segm"):
        if iou_type not in metrics:
            continue
        m = metrics[iou_type]
        print(f"-- {iou_type}")
        print(m["summary"].rstrip())
    for table in (category_table(metrics), error_table(metrics)):
        if table:
            print(table)


def _one_line(tag: str, metrics: dict) -> str:
    from maskrcnn.evaluation.robustness import headline

    return f"{tag}: " + "  ".join(f"{k} {v:.4f}" for k, v in headline(metrics).items())


def evaluate(args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    from maskrcnn.data.build import build_eval_dataset, dataset_paths
    from maskrcnn.engine import distributed
    from maskrcnn.engine.checkpoint import model_from_checkpoint
    from maskrcnn.evaluation.coco_eval import evaluate_model
    from maskrcnn.evaluation import outputs
    from maskrcnn.evaluation.corruptions import Corrupt, frost_source
    from maskrcnn.evaluation.robustness import headline, markdown, summarize
    from maskrcnn.model.precision import choose_precision, parse_setting

    corrupted_runs, with_clean = plan_runs(args)
    amp_setting = parse_setting(args.amp, "--amp")  # a wrong value is an error before the model loads
    frost = frost_source(args.frost)  # checked before the model loads
    device = distributed.device(args.device)
    main = distributed.is_main()  # rank 0 prints and writes; every process infers on its share
    # BatchNorm folded into the convolutions: the same detections, one pass less per convolution (ResNet-50 at
    # 512x512 on a CPU: 0.81 of torchvision's inference time instead of 0.96)
    model, cfg = model_from_checkpoint(args.checkpoint, args.config, args.set, device=str(device), fold_bn=True)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with distributed.main_first():  # a shapes set is generated once
        dataset = build_eval_dataset(cfg, args.split)
    cache_dir = None
    if corrupted_runs and not args.no_cache:
        cache_dir = Path(args.cache_dir) if args.cache_dir else \
            default_cache_dir(dataset_paths(cfg)[f"{args.split}_images"], out_dir)
    corruption_seed = cfg.train.seed if args.corruption_seed is None else args.corruption_seed
    runs = ([("clean", None)] if with_clean else []) + [
        (f"{name}-{sev}", Corrupt(name, sev, seed=corruption_seed, frost=frost, cache_dir=cache_dir, uint8=True))
        for name, sev in corrupted_runs]
    batch = args.batch_size or cfg.test.ims_per_batch
    precision = choose_precision(device, amp_setting, "--amp")
    amp = precision.autocast  # fp16 autocast on CUDA, bf16 on a CPU (run_inference); fp32 by default
    if main:
        print(precision.line())
        if precision.warning:
            print(precision.warning)
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "stage": model.stage,
              "precision": precision.name, "precision_reason": precision.reason, "results": {}}
    if corrupted_runs:
        report["corruption_settings"] = {
            "seed": corruption_seed, "pixels": "8-bit", "cache_dir": str(cache_dir) if cache_dir else None,
            "frost": frost if any(n == "frost" for n, _ in corrupted_runs) else None}
        if report["corruption_settings"]["frost"] and main:
            print(f"frost textures: {'the imagecorruptions package photographs' if frost == 'photos' else 'procedural (generated here; the reference photographs need `pip install imagecorruptions`)'}")
    benchmark = args.corruption == "benchmark"
    if args.corruption is None:
        tag = "clean"
    elif benchmark:
        tag = "benchmark"
    else:
        tag = f"{args.corruption}-{','.join(str(s) for s in dict.fromkeys(s for _, s in corrupted_runs))}"
    # every file of this evaluation carries its image set and tag: no other evaluation writes the same names
    n_images = len(dataset) if args.max_images <= 0 else min(args.max_images, len(dataset))
    image_set = outputs.image_set(args.split, args.max_images, len(dataset))
    report["image_set"], report["images"] = image_set, n_images
    # the evaluated images, in order: compare.py resamples them (a paired bootstrap over images)
    report["image_ids"] = [int(i) for i in dataset.image_ids[:n_images]]
    report["annotations"] = str(Path(dataset.ann_file).resolve())
    report["cat_ids"] = sorted(int(c) for c in dataset.contiguous_to_cat_id.values())
    one_pass = len(runs) == 1
    if main:  # the passes of an earlier same-named evaluation that this one does not repeat would pass for its own
        kept = {outputs.detections_file(image_set, tag, t, one_pass) for t, _ in runs}
        for old in [*out_dir.glob(outputs.detections_file(image_set, tag, "*", False)),
                    out_dir / outputs.detections_file(image_set, tag, tag, True)]:
            if old.name not in kept:
                old.unlink(missing_ok=True)
    progress = not args.no_progress
    outer = tqdm(total=len(runs), desc=args.corruption or "evaluate",
                 disable=not (progress and len(runs) > 1 and main))
    start = time.perf_counter()
    for run_tag, transform in runs:
        dataset.transforms = transform
        with torch.no_grad():
            metrics, results = evaluate_model(model, dataset, device, batch, args.max_images, amp,
                                              cfg.model.roi_heads.mask_threshold, progress and main,
                                              desc=f"evaluate {run_tag}")
        if main:
            if benchmark:
                tqdm.write(_one_line(run_tag, metrics)) if progress else print(_one_line(run_tag, metrics))
            else:
                print_report(run_tag, metrics)
            (out_dir / outputs.detections_file(image_set, tag, run_tag, one_pass)).write_text(json.dumps(results))
            if one_pass:  # the error analysis drawn: PR breakdown and confusion matrices
                from maskrcnn.evaluation.error_plots import analysis_pictures

                drawn = analysis_pictures(metrics, out_dir, image_set, tag)
                if drawn["pictures"]:
                    print("error analysis: " + ", ".join(p.name for p in drawn["pictures"] + drawn["tables"]))
        report["results"][run_tag] = {k: ({kk: vv for kk, vv in v.items() if kk != "summary"}
                                      if isinstance(v, dict) else v) for k, v in metrics.items()}
        outer.update(1)
    outer.close()
    report["seconds"] = round(time.perf_counter() - start, 1)
    transforms = [t for _, t in runs if t is not None]
    if cache_dir is not None:
        counts = distributed.all_gather_object((sum(t.hits for t in transforms), sum(t.misses for t in transforms)))
        hits, misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
        report["corruption_settings"]["cache"] = {"read": hits, "written": misses}
        if main:
            print(f"corrupted-image cache {cache_dir}: {hits} read, {misses} written")
    if not main:
        return report
    if args.corruption == "all" and model.stage == "full":
        for iou_type in ("bbox", "segm"):
            aps = [r[iou_type]["stats"]["AP"] for r in report["results"].values() if iou_type in r]
            if aps:
                report[f"mean_corrupted_{iou_type}_AP"] = sum(aps) / len(aps)
                print(f"mean {iou_type} AP under corruption (severity "
                      f"{','.join(str(s) for s in sorted({s for _, s in corrupted_runs}))}): {sum(aps) / len(aps):.4f}")
    if benchmark:
        clean = headline(report["results"]["clean"])
        summary = summarize(clean, {(n, s): headline(report["results"][f"{n}-{s}"]) for n, s in corrupted_runs})
        report["benchmark"] = summary
        table = markdown(summary)
        print(table, end="")
        (out_dir / outputs.benchmark_table_file(image_set)).write_text(table)
        for key, m in summary["metrics"].items():
            if key in ("bbox", "segm"):
                report[f"mean_corrupted_{key}_AP"] = m["mPC"]
    path = out_dir / outputs.metrics_file(image_set, tag)
    path.write_text(json.dumps(report, indent=2))
    print(f"metrics: {path}  ({report['seconds']} s)")
    return report


def evaluate_file(args: argparse.Namespace) -> dict:
    """--detections FILE --annotations ANN.json: COCO AP, per-category AP and the error analysis of a results file
    over every image of the annotations, written beside it (or into --out) as eval_<split>_file-<stem>.json."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from maskrcnn.evaluation import outputs
    from maskrcnn.evaluation.coco_eval import check_results, coco_evaluate
    from maskrcnn.evaluation.error_plots import analysis_pictures

    det_path, ann_path = Path(args.detections), Path(args.annotations)
    for path in (det_path, ann_path):
        if not path.is_file():
            raise FileNotFoundError(f"not found: {path}")
    try:
        results = json.loads(det_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{det_path}: not JSON ({e})") from None
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco_gt = COCO(str(ann_path))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{ann_path}: not COCO annotations ({type(e).__name__}: {e})") from None
    iou_types = ["bbox"] + (["segm"] if results and all("segmentation" in r for r in results if isinstance(r, dict))
                            else [])
    check_results(coco_gt, results, str(det_path), iou_types)
    image_ids = sorted(coco_gt.getImgIds())
    if not results:
        print(f"{det_path}: no detections: every AP is 0, every object missed")
    metrics = {t: coco_evaluate(coco_gt, results, t, image_ids) for t in iou_types}
    tag = f"file-{det_path.stem}"
    print_report(tag, metrics)
    out_dir = Path(args.out) if args.out else det_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = analysis_pictures(metrics, out_dir, args.split, tag)
    report = {"detections": str(det_path), "annotations": str(ann_path), "split": args.split,
              "image_set": args.split, "images": len(image_ids), "detections_count": len(results),
              "results": {tag: {t: {k: v for k, v in m.items() if k != "summary"} for t, m in metrics.items()}}}
    path = out_dir / outputs.metrics_file(args.split, tag)
    path.write_text(json.dumps(report, indent=2))
    print("error analysis: " + ", ".join(p.name for p in drawn["pictures"] + drawn["tables"]))
    print(f"metrics: {path}")
    return report


def main(argv=None) -> dict:
    use_huge_pages()  # first: PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation
    keep_freed_memory()  # glibc: the next tensors reuse freed memory instead of faulting fresh pages
    args = parse_args(argv)
    with one_line_errors():
        from maskrcnn.engine import distributed
        if args.detections or args.annotations:
            if args.checkpoint or not (args.detections and args.annotations):
                raise ValueError("--detections FILE needs --annotations ANN.json, and no --checkpoint")
            return evaluate_file(args)
        if not args.checkpoint:
            raise ValueError("give --checkpoint (or --detections FILE --annotations ANN.json)")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        with distributed.process_group(args.device):  # under torchrun; an error on any process ends the job
            return evaluate(args)


if __name__ == "__main__":
    main()
