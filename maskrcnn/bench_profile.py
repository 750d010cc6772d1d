"""Where the time of one training step and one inference goes, stage by stage, for this project's Mask R-CNN and
torchvision's, on the benchmark's settings and weights (maskrcnn/bench.py):

    python -m maskrcnn.bench_profile                  # 512x512, batch 2, median of 3 steps after 1 warm-up
    python -m maskrcnn.bench_profile --repeats 5 --out profile.json

Each stage is timed by forward hooks on the module that computes it (pre-hook: start, hook: stop), on both
models alike; a stage's time excludes the stages inside it. The backward pass and the optimiser step are timed
as wholes (autograd runs the stages' backward interleaved), "other" is the rest of the forward (the input
transform, mask pasting and what runs between the stages). On a CPU every kernel is synchronous, so the
wall-clock times add up; on CUDA each hook synchronises first.

The inference's arithmetic is counted too: the floating-point operations (2 per multiply-add) of every convolution
and linear layer, as a direct computation does them, per stage, and the rate each stage reached. Beside them, the
rate of one 3x3 convolution of the mask head's shape timed alone (the reference: what this device's convolution
kernel reaches on the shape of this model's largest layer) and the time ours' arithmetic would take at that rate,
against torchvision's whole inference: where the inference ratio would stand with every layer at that rate and
nothing else, which only layers faster than that kernel (fewer multiplications) go below.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cli import keep_freed_memory, ready_to_write, use_huge_pages
from .model.precision import autocast

_CPU = torch.device("cpu")  # --bf16 is a CPU's mixed precision (bf16 autocast there)

# stage -> (our module, torchvision's modules); a module's stage is the innermost stage that contains it
STAGES = {
    "bottom-up (ResNet)": (["bottom_up"], ["backbone.body"]),
    "FPN": (["fpn"], ["backbone.fpn"]),
    "RPN head (conv)": (["rpn.head"], ["rpn.head"]),
    "RPN: anchors, proposals, losses": (["rpn"], ["rpn"]),
    "RoIAlign (box and mask)": (["roi_heads.box_pooler", "roi_heads.mask_pooler"],
                                ["roi_heads.box_roi_pool", "roi_heads.mask_roi_pool"]),
    "box head (FCs + predictor)": (["roi_heads.box_head"], ["roi_heads.box_head", "roi_heads.box_predictor"]),
    "mask head (convs + predictor)": (["roi_heads.mask_head"], ["roi_heads.mask_head", "roi_heads.mask_predictor"]),
    "RoI heads: sampling, targets, losses, post-processing": (["roi_heads"], ["roi_heads"]),
}
OTHER = "other (transform, paste, between stages)"
LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class StageTimer:
    """Forward hooks that add each stage's exclusive time (its own, less the timed stages inside it)."""

    def __init__(self, model: nn.Module, names: dict[str, list[str]], sync: Callable[[], None]):
        self.seconds: dict[str, float] = {stage: 0.0 for stage in names}
        self.stack: list[list] = []  # [stage, start, time spent in timed stages inside]
        self.sync = sync
        self.handles = []
        modules = dict(model.named_modules())
        for stage, paths in names.items():
            for path in paths:
                m = modules[path]
                self.handles.append(m.register_forward_pre_hook(self._enter(stage)))
                self.handles.append(m.register_forward_hook(self._leave()))

    def _enter(self, stage: str):
        def hook(module, args):
            self.sync()
            self.stack.append([stage, time.perf_counter(), 0.0])
        return hook

    def _leave(self):
        def hook(module, args, output):
            self.sync()
            stage, start, inner = self.stack.pop()
            total = time.perf_counter() - start
            self.seconds[stage] += total - inner
            if self.stack:
                self.stack[-1][2] += total
        return hook

    def reset(self) -> None:
        self.seconds = {k: 0.0 for k in self.seconds}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def one_step(net: nn.Module, kind: str, timer: StageTimer, opt, images, targets, sync: Callable[[], None],
             bf16: bool = False) -> dict[str, float]:
    """Seconds per stage of one training step (forward stages, other, backward, optimiser) or inference; with
    `bf16`, the forward under bf16 autocast (a CPU's mixed precision, as train.py's train.cpu_amp)."""
    timer.reset()
    sync()
    t0 = time.perf_counter()
    after = {}
    if kind == "training":
        net.train()
        opt.zero_grad(set_to_none=True)
        with autocast(_CPU, bf16):
            losses = net(images, targets)
        sync()
        t1 = time.perf_counter()
        sum(losses.values()).backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        after = {"backward": t2 - t1, "optimiser": time.perf_counter() - t2}
        forward = t1 - t0
    else:
        net.eval()
        with torch.no_grad(), autocast(_CPU, bf16):
            net(images)
        sync()
        forward = time.perf_counter() - t0
    row = dict(timer.seconds)
    row[OTHER] = forward - sum(timer.seconds.values())
    row.update(after)
    row["total"] = sum(row.values())
    return row


def profile(models: list[nn.Module], kind: str, images, targets, repeats: int, device: str, bf16: bool = False
            ) -> list[dict[str, float]]:
    """{stage: median ms} of each model (ours first, torchvision's second), one warm-up each, then `repeats`
    steps interleaved (alternating who goes first, as maskrcnn/bench.py does). Training: SGD with momentum, as
    the benchmark's step."""
    from .bench import synchronize

    def sync() -> None:
        synchronize(device)

    timers = [StageTimer(m, {k: v[which] for k, v in STAGES.items()}, sync) for which, m in enumerate(models)]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                            weight_decay=1e-4) for m in models]
    runs: list[list[dict]] = [[] for _ in models]
    for r in range(repeats + 1):  # the first is a warm-up
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            row = one_step(models[i], kind, timers[i], opts[i], images, targets, sync, bf16)
            if r > 0:
                runs[i].append(row)
    for t in timers:
        t.remove()
    return [{k: 1e3 * statistics.median(run[k] for run in model_runs) for k in model_runs[0]}
            for model_runs in runs]


def layer_flops(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    """Floating-point operations (2 per multiply-add) of one call of a convolution or linear layer computed
    directly (Winograd's convolutions do fewer multiplications for the same result)."""
    if isinstance(module, nn.Linear):
        return 2.0 * out.numel() * x.shape[-1]
    taps = math.prod(module.kernel_size)
    if isinstance(module, nn.ConvTranspose2d):  # every input value meets out_channels / groups filters' taps
        return 2.0 * x.numel() * (module.out_channels // module.groups) * taps
    return 2.0 * out.numel() * (module.in_channels // module.groups) * taps


def stage_of(path: str, names: dict[str, list[str]]) -> str:
    """The innermost stage whose module contains the module at `path` (as StageTimer counts time), else "other"."""
    best, depth = OTHER, -1
    for stage, paths in names.items():
        for p in paths:
            if (path == p or path.startswith(p + ".")) and p.count(".") > depth:
                best, depth = stage, p.count(".")
    return best


def count_flops(net: nn.Module, names: dict[str, list[str]], images, bf16: bool = False) -> dict[str, float]:
    """{stage: GFLOP} of the convolutions and linear layers of one inference of `net` (hooks on every layer, one
    pass); a layer called through its weight rather than its module (ours' per-class mask predictor) is not seen."""
    gflop = {stage: 0.0 for stage in [*names, OTHER]}

    def counter(stage: str):
        def hook(module, args, out):
            gflop[stage] += layer_flops(module, args[0], out) / 1e9
        return hook

    handles = [m.register_forward_hook(counter(stage_of(path, names)))
               for path, m in net.named_modules() if isinstance(m, LAYERS)]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad(), autocast(_CPU, bf16):
            net(images)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    gflop["total"] = sum(gflop.values())
    return gflop


def reference_rate(device: str, bf16: bool, rois: int = 64, repeats: int = 7) -> dict:
    """GFLOP/s of one 3x3 convolution (256 to 256 channels) of `rois` RoIs of 14x14, the mask head's shape, alone:
    channels-last, in bf16 or fp32 as the profile runs, without autograd; the best of `repeats` after a warm-up."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rois, 256, 14, 14, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    from .bench import synchronize

    best = math.inf
    with torch.no_grad():
        for r in range(repeats + 1):
            synchronize(device)
            t0 = time.perf_counter()
            F.conv2d(x, w, padding=1)
            synchronize(device)
            if r > 0:
                best = min(best, time.perf_counter() - t0)
    gflop = 2.0 * rois * 14 * 14 * 256 * 256 * 9 / 1e9
    return {"what": f"a 3x3 convolution of the mask head's shape alone ({rois} RoIs x 256 x 14x14, "
                    f"{'bf16' if bf16 else 'fp32'}, channels-last)", "gflop": gflop, "gflop_per_s": gflop / best}


def run(height: int = 512, width: int = 512, batch: int = 2, repeats: int = 3, device: str = "cpu", depth: int = 50,
        winograd="auto", bf16: bool = False, log: Callable[[str], None] = print) -> dict:
    """With `bf16`, both models under bf16 autocast (a CPU's mixed precision), ours as the benchmark's bf16 rows
    run it: channels-last, and BatchNorm folded for inference (Winograd's convolutions are fp32's only)."""
    from . import bench
    from .model.fuse import prepare_inference, prepare_training
    from .torchvision_weights import to_torchvision

    s = bench.Settings(height=height, width=width, batch=batch, device=device, amp=False, depth=depth)
    state = bench.seeded_state(s)
    ours, tv = bench.load_pair(s, state)
    images, targets = bench.make_batch(s)
    # as train.py trains it (train.winograd, train.frozen_as_inference: auto); under bf16 autocast Winograd's
    # convolutions and the frozen stages' layout are fp32's only, their folded BatchNorm stays, as in the benchmark's
    # bf16 rows (a channels-last copy of this model)
    with_winograd = prepare_training(ours, device, winograd)[0] > 0
    trained = bench.bf16_training_model(ours) if bf16 else ours
    result = {"cpu": bench.cpu_header(), "settings": {"height": height, "width": width, "batch": batch,
                                                       "repeats": repeats, "device": device, "depth": depth,
                                                       "winograd": with_winograd and not bf16, "bf16": bf16},
              "ours": {}, "torchvision": {}}
    log("training ...")
    result["ours"]["training"], result["torchvision"]["training"] = profile([trained, tv], "training", images,
                                                                            targets, repeats, device, bf16)
    ours.load_state_dict(state)  # inference sees the seeded weights (100 detections per image), as the benchmark
    tv.load_state_dict(to_torchvision(state))
    log("inference ...")
    # ours as its inference entry points run it: BatchNorm folded, channels-last and Winograd's 3x3 convolutions
    # where each gains (model/fuse.py: prepare_inference, test.channels_last and test.winograd: auto), as the
    # benchmark
    fast = bench.bf16_inference_model(ours) if bf16 else prepare_inference(ours, device, winograd=winograd)
    result["ours"]["inference"], result["torchvision"]["inference"] = profile(
        [fast, tv], "inference", images, targets, repeats, device, bf16)
    log("arithmetic ...")
    result["arithmetic"] = {"ours": count_flops(fast, {k: v[0] for k, v in STAGES.items()}, images, bf16),
                            "torchvision": count_flops(tv, {k: v[1] for k, v in STAGES.items()}, images, bf16),
                            "reference": reference_rate(device, bf16)}
    return result


def format_table(result: dict) -> str:
    lines = [bench_cpu_line(result)]
    for kind in ("training", "inference"):
        s = result["settings"]
        how = ", ours with Winograd's 3x3 convolutions" if s.get("winograd") else ""
        how += ", both under bf16 autocast" if s.get("bf16") else ""
        lines += ["", f"{kind} ({s['batch']} x {s['height']}x{s['width']}, median of {s['repeats']}{how}; ms)", "",
                  "| stage | ours | torchvision | ours / torchvision | share of ours |", "|---|---|---|---|---|"]
        ours, tv = result["ours"][kind], result["torchvision"][kind]
        for stage in ours:
            ratio = ours[stage] / tv[stage] if tv[stage] > 0.05 else float("nan")
            lines.append(f"| {stage} | {ours[stage]:.1f} | {tv[stage]:.1f} | {ratio:.2f} | "
                         f"{100 * ours[stage] / ours['total']:.0f}% |")
    if "arithmetic" in result:
        lines += ["", *format_arithmetic(result)]
    return "\n".join(lines)


def format_arithmetic(result: dict) -> list[str]:
    """The inference's GFLOP and GFLOP/s per stage for both models, the reference rate and ours' floor."""
    a, ref = result["arithmetic"], result["arithmetic"]["reference"]
    times = {which: result[which]["inference"] for which in ("ours", "torchvision")}
    lines = ["inference arithmetic (convolutions and linear layers, 2 FLOP per multiply-add as a direct computation "
             "does them; a rate above the reference is Winograd's fewer multiplications)", "",
             "| stage | GFLOP: ours | torchvision | GFLOP/s: ours | torchvision |", "|---|---|---|---|---|"]
    for stage in a["ours"]:
        g = [a[w][stage] for w in ("ours", "torchvision")]
        if max(g) < 0.05:
            continue
        rate = [f"{a[w][stage] / times[w][stage] * 1e3:.0f}" if times[w][stage] > 0.05 else "-"
                for w in ("ours", "torchvision")]
        label = "total (rate: over the whole inference's time)" if stage == "total" else stage
        lines.append(f"| {label} | {g[0]:.1f} | {g[1]:.1f} | {rate[0]} | {rate[1]} |")
    floor = a["ours"]["total"] / ref["gflop_per_s"] * 1e3
    lines += ["", f"reference: {ref['what']}: {ref['gflop_per_s']:.0f} GFLOP/s. Ours' {a['ours']['total']:.0f} GFLOP "
              f"at that rate: {floor:.0f} ms, {floor / times['torchvision']['total']:.2f} of torchvision's inference "
              f"({times['torchvision']['total']:.0f} ms)"]
    return lines


def bench_cpu_line(result: dict) -> str:
    from .bench import cpu_line
    return cpu_line(result["cpu"])


def main(argv=None) -> dict:
    use_huge_pages()  # as train.py and evaluate.py run, for both models alike
    keep_freed_memory()  # likewise
    p = argparse.ArgumentParser(prog="python -m maskrcnn.bench_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (medians)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--depth", type=int, default=50, help="ResNet depth of both models (18: a smoke run)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--winograd", choices=["auto", "never"], default="auto",
                   help="ours' 3x3 convolutions by Winograd's F(2x2, 3x3) as train.py and evaluate.py run them: "
                   "auto (default; on an AVX2 or AVX-512 CPU, fp32) or never")
    p.add_argument("--bf16", action="store_true",
                   help="both models under bf16 autocast (ours channels-last, BatchNorm folded for inference), as "
                   "the benchmark's rows against torchvision's bf16; on a CPU without native bfloat16 it is emulated "
                   "and 7-16x slower")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.bf16 and not args.device.startswith("cpu"):
        print("error: --bf16: a CPU's mixed precision; on CUDA python -m maskrcnn.bench runs fp16 autocast",
              file=sys.stderr)
        sys.exit(2)
    if args.out:
        ready_to_write(args.out)
    from .engine.device import DeviceError, select_device
    try:  # an unknown name or an absent GPU: one line, exit status 2
        args.device = str(select_device(args.device))
    except DeviceError as e:
        print(f"error: --device: {e}", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .bench import winograd_setting
    result = run(args.size[0], args.size[1], args.batch, args.repeats, args.device, args.depth,
                 winograd_setting(args.winograd), args.bf16)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
