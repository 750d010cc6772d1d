"""Time of the error analysis (maskrcnn/evaluation/errors.py) against pycocotools' evaluate + accumulate, on
COCO val's size by default: 5000 images, 80 classes, ~7 GT boxes per image, 100 synthetic detections per image
(a third near a GT, the rest anywhere), boxes.

    python -m maskrcnn.evaluation.bench_errors                       # 5000 images x 100 detections
    python -m maskrcnn.evaluation.bench_errors --images 500 --repeat 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time

import numpy as np


def synthetic_coco(images: int, dets_per_image: int, classes: int = 80, seed: int = 0):
    from pycocotools.coco import COCO

    rng = np.random.default_rng(seed)
    cats = [{"id": k + 1, "name": f"c{k}", "supercategory": f"s{k // 8}"} for k in range(classes)]
    imgs, anns, res = [], [], []
    for i in range(1, images + 1):
        imgs.append({"id": i, "width": 640, "height": 480})
        n_gt = int(rng.poisson(7))
        boxes = np.c_[rng.uniform(0, 560, n_gt), rng.uniform(0, 400, n_gt), rng.uniform(8, 200, (n_gt, 2))]
        labels = rng.integers(1, classes + 1, n_gt)
        for b, c in zip(boxes, labels):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": b.tolist(),
                         "area": float(b[2] * b[3]), "iscrowd": int(rng.random() < 0.01)})
        near = min(dets_per_image // 3, 3 * n_gt)
        for _ in range(near):
            g = int(rng.integers(n_gt))
            b = boxes[g] + rng.normal(0, 0.15, 4) * np.r_[boxes[g][2:], boxes[g][2:]]
            c = int(labels[g]) if rng.random() < 0.8 else int(rng.integers(1, classes + 1))
            res.append({"image_id": i, "category_id": c, "bbox": [b[0], b[1], max(b[2], 1.0), max(b[3], 1.0)],
                        "score": float(rng.random())})
        for _ in range(dets_per_image - near):
            b = [*rng.uniform(0, 560, 1), *rng.uniform(0, 400, 1), *rng.uniform(8, 200, 2)]
            res.append({"image_id": i, "category_id": int(rng.integers(1, classes + 1)), "bbox": b,
                        "score": float(rng.random() * 0.5)})
    gt = COCO()
    gt.dataset = {"images": imgs, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, res


def main(argv=None) -> dict:
    import torch
    from pycocotools.cocoeval import COCOeval

    from .errors import analyze

    p = argparse.ArgumentParser(prog="python -m maskrcnn.evaluation.bench_errors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    gt, res = synthetic_coco(args.images, args.dets)
    ids = sorted(gt.getImgIds())
    times: dict[str, list[float]] = {"pycocotools loadRes+evaluate+accumulate": [], "error analysis": []}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes([dict(r) for r in res]), "bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
        t1 = time.perf_counter()
        out = analyze(gt, res, "bbox", ids)
        t2 = time.perf_counter()
        times["pycocotools loadRes+evaluate+accumulate"].append(t1 - t0)
        times["error analysis"].append(t2 - t1)
    p50 = ev.eval["precision"][0, :, :, 0, -1]
    ap50 = float(np.mean([p50[:, k].mean() for k in range(p50.shape[1]) if p50[0, k] > -1]))
    print(f"{args.images} images x {args.dets} detections ({len(res)}), {len(gt.anns)} GT, boxes; "
          f"CPU {platform.processor() or platform.machine()}, torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"  {name}: {min(ts):.1f} s (best of {len(ts)})")
    print(f"  AP50 pycocotools {ap50:.6f}, error analysis {out['AP50']:.6f}")
    return {k: min(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
