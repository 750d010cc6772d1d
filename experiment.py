"""The whole latent-noise experiment in one command, on the generated shapes data by default:

  1. the RPN stage;
  2. the full model without noise and with --feature-noise, both initialised from the RPN stage, for each seed;
  3. evaluation of every full run, clean (every val image) and under corruption (COCO-C, one severity, the
     first 30 val images by default);
  4. the loss-comparison chart and the AP table.

    python experiment.py                      # the demo: configs/shapes.yaml, seeds 0 and 1
    python experiment.py --seeds 0 1 2 --name noise-study --set model.noise.strength=0.3
    python experiment.py --overwrite          # run the demo again in runs/demo/ (else: refused, it holds runs)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from maskrcnn.cli import add_config_args, one_line_errors

DEMO_CORRUPTIONS = ["gaussian_noise", "shot_noise", "gaussian_blur", "motion_blur", "brightness", "contrast",
                    "jpeg_compression"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "configs/shapes.yaml")
    p.add_argument("--name", default="demo", help="experiment directory: runs/<name>/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the full-stage runs")
    p.add_argument("--rpn-iters", type=int, default=350,
                   help="iterations of the RPN stage (learning rate x0.1 after 8/9 of them)")
    p.add_argument("--full-iters", type=int, help="iterations of each full run (default: the config's; "
                   "learning rate x0.1 after 8/9 of them)")
    p.add_argument("--corruptions", nargs="*", default=DEMO_CORRUPTIONS, help="corruptions to evaluate under")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5")
    p.add_argument("--eval-images", type=int, default=0, help="clean evaluation on at most N val images (0: all)")
    p.add_argument("--corruption-images", type=int, default=30,
                   help="evaluation under each corruption on the first N val images (0: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="run again in runs/<name>/, deleting the checkpoints and events of its earlier runs")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        import compare
        import evaluate
        import train

        start = time.perf_counter()
        root = Path("runs") / args.name
        common = (["--config", args.config] + (["--no-progress"] if args.no_progress else [])
                  + (["--overwrite"] if args.overwrite else []))
        sets = ["train.output_dir=" + str(root)] + list(args.set)
        full_sets = sets + ([f"solver.max_iter={args.full_iters}", f"solver.steps=[{int(args.full_iters * 8 / 9)}]"]
                            if args.full_iters else [])

        print(f"[1/4] RPN stage ({args.rpn_iters} iterations)")
        rpn_iters = [f"solver.max_iter={args.rpn_iters}", f"solver.steps=[{int(args.rpn_iters * 8 / 9)}]"]
        rpn = train.main(common + ["--stage", "rpn", "--name", "rpn", "--set", *sets, *rpn_iters])
        print(f"[2/4] full model, {len(args.seeds)} seeds x (baseline, --feature-noise)")
        runs = []
        for seed in args.seeds:
            for noise in (False, True):
                name = f"full{'-noise' if noise else ''}-s{seed}"
                train.main(common + ["--stage", "full", "--name", name, "--seed", str(seed), "--init",
                                     rpn["checkpoint"], "--set", *full_sets, "train.eval_at_end=false"]
                           + (["--feature-noise"] if noise else []))
                runs.append(root / name)
        print("[3/4] evaluation, clean and under corruption")
        evaluated = {}
        for run in runs:
            ckpt = str(run / "model_final.pth")
            quiet = ["--no-progress"] if args.no_progress else []
            clean = evaluate.main(["--checkpoint", ckpt, "--max-images", str(args.eval_images), *quiet])
            corrupted = evaluate.main(["--checkpoint", ckpt, "--corruption", "all", "--severity",
                                       str(args.severity), "--corruptions", *args.corruptions,
                                       "--max-images", str(args.corruption_images), *quiet])
            evaluated[run.name] = {"clean": clean["results"]["clean"],
                                   "corrupted": {k: v for k, v in corrupted.items() if k.startswith("mean")}}
        print("[4/4] comparison")
        chart, table_path = root / "comparison.png", root / "table.md"
        table = compare.main([str(r) for r in runs] + ["--out", str(chart), "--table", str(table_path)])
        summary = {"rpn": rpn.get("val"), "runs": evaluated, "minutes": (time.perf_counter() - start) / 60}
        (root / "experiment.json").write_text(json.dumps(summary, indent=2))
        print(f"\nexperiment finished in {summary['minutes']:.1f} min")
        print(f"chart: {chart}\ntable: {table_path}\nsummary: {root / 'experiment.json'}")
        return {"table": table, **summary}


if __name__ == "__main__":
    main()
