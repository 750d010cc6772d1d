"""Run a checkpoint on an image or a folder of images: per image, a picture with boxes, labels, scores and
masks drawn, and a JSON of the detections.

    python infer.py --checkpoint runs/demo/full-s0/model_final.pth --input photo.jpg
    python infer.py --checkpoint runs/demo/full-s0/model_final.pth --input my_images/ --out runs/infer

Each image gives <out>/<stem>_det.png and <out>/<stem>_det.json; images that share a stem (photo.jpg and
photo.png) keep their extension in the name (photo-jpg_det.png, photo-png_det.png), so none replaces another.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from maskrcnn.cli import keep_freed_memory, one_line_errors, use_huge_pages

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return images
    raise FileNotFoundError(f"input not found: {path}")


def output_stems(images: list[Path]) -> list[str]:
    """The name each image's outputs start with (`<name>_det.png`, `<name>_det.json`): the file's stem or, where
    two images share a stem (photo.jpg and photo.png; case ignored, as a case-insensitive disk does), the stem
    and the extension (`photo-jpg`, `photo-png`), so that no output replaces another's. Names that still clash
    (photo.jpg and photo.JPG) are an error before any work."""
    counts = Counter(path.stem.lower() for path in images)
    stems = [path.stem if counts[path.stem.lower()] == 1 else f"{path.stem}-{path.suffix.lstrip('.')}"
             for path in images]
    first: dict[str, Path] = {}
    for path, stem in zip(images, stems):
        if stem.lower() in first:
            raise ValueError(f"{first[stem.lower()]} and {path} would both write {stem}_det.png and "
                             f"{stem}_det.json (names compared without case): rename one")
        first[stem.lower()] = path
    return stems


def main(argv=None) -> list[dict]:
    use_huge_pages()  # first: PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation
    keep_freed_memory()  # glibc: the next tensors reuse freed memory instead of faulting fresh pages
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a full-stage checkpoint")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", default="runs/infer", help="output folder (default runs/infer)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw and save detections above this")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    with one_line_errors():
        import numpy as np
        import pycocotools.mask as mask_util
        import torch
        from tqdm import tqdm

        from maskrcnn.engine.checkpoint import model_from_checkpoint
        from maskrcnn.data.coco import read_image
        from maskrcnn.engine.device import select_device
        from maskrcnn.vis.panels import draw_detections
        from maskrcnn.vis.primitives import save_png

        device = select_device(args.device)  # an unknown or absent device: one line, before any work
        images = list_images(Path(args.input))
        stems = output_stems(images)
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        model, cfg = model_from_checkpoint(args.checkpoint, None, args.set, str(device), fold_bn=True)
        if model.stage != "full":
            raise ValueError(f"{args.checkpoint} is an RPN-stage checkpoint; infer.py needs a full-stage one")
        class_names = model.class_names
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for start in tqdm(range(0, len(images), args.batch_size), desc="infer"):
            paths = images[start : start + args.batch_size]
            names = stems[start : start + args.batch_size]
            arrays = [read_image(path) for path in paths]
            tensors = [torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(device) for a in arrays]
            with torch.no_grad():
                outputs = model(tensors)
            for path, stem, array, out in zip(paths, names, arrays, outputs):
                keep = out["scores"] >= args.score_thresh
                det = {k: v[keep].cpu() for k, v in out.items()}
                picture = out_dir / f"{stem}_det.png"
                save_png(draw_detections(array, det, class_names, args.score_thresh), picture)
                dets = []
                for i in range(len(det["scores"])):
                    rec = {"box_xyxy": [round(float(v), 2) for v in det["boxes"][i]],
                           "label": int(det["labels"][i]), "score": round(float(det["scores"][i]), 4)}
                    if class_names:
                        rec["class"] = class_names[rec["label"]]
                    if "masks" in det:
                        binary = (det["masks"][i, 0] >= cfg.model.roi_heads.mask_threshold).numpy()
                        rle = mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))
                        rec["mask_rle"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                    dets.append(rec)
                (out_dir / f"{stem}_det.json").write_text(json.dumps(
                    {"image": str(path), "height": array.shape[0], "width": array.shape[1], "detections": dets}))
                records.append({"image": str(path), "picture": str(picture), "detections": len(dets)})
                print(f"{path}: {len(dets)} detections -> {picture}")
        return records


if __name__ == "__main__":
    main()
