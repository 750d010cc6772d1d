"""train.py end to end on configs/tiny.yaml, resume and the NaN guard, and overfit checks of both stages."""
from __future__ import annotations

import json
import os
import math

import pytest
import torch

import train
from maskrcnn.model.box_ops import box_iou
from maskrcnn.model.build import build_model
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.config import Config, load_config
from maskrcnn.data.build import build_datasets

from conftest import fixture_seed, fixture_threads


def _train(tmp_path, *extra, name="run", stage="rpn"):
    return train.main(["--config", "configs/tiny.yaml", "--stage", stage, "--name", name, "--no-progress",
                       "--set", f"train.output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def rpn_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpn")
    return tmp, _train(tmp, name="rpn")


def test_rpn_stage_writes_run_directory(rpn_run):
    tmp, summary = rpn_run
    run = tmp / "rpn"
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").stage == "rpn"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val"]) == {"AR@100", "AR@1000"}
    assert 0.0 <= metrics["val"]["AR@100"] <= metrics["val"]["AR@1000"] <= 1.0
    state = load_checkpoint(run / "model_final.pth")
    assert isinstance(state["config"], Config) and state["stage"] == "rpn" and state["iteration"] == 4
    assert not any(k.startswith("roi_heads") for k in state["model"])
    assert list(run.glob("events.out.tfevents.*"))


def test_loss_scalars_logged(rpn_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(rpn_run[0] / "rpn"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss_rpn_cls", "loss/loss_rpn_box", "loss/total_loss", "lr", "time/sec_per_iter"} <= tags


def test_full_stage_init_from_rpn_reports_modules(rpn_run, capsys):
    tmp, summary = rpn_run
    out = train.main(["--config", "configs/tiny.yaml", "--stage", "full", "--feature-noise", "--init",
                      summary["checkpoint"], "--name", "full-noise", "--no-progress", "--set",
                      f"train.output_dir={tmp}", "train.eval_at_end=false"])
    printed = capsys.readouterr().out
    assert "loaded: bottom_up" in printed and "rpn.head" in printed
    assert "new: roi_heads.box_head, roi_heads.mask_head" in printed
    assert set(out["loss_end"]) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask",
                                       "total_loss"}
    assert load_config(tmp / "full-noise" / "config.yaml").model.noise.enabled


def test_full_stage_draws_its_error_analysis_beside_metrics_and_in_tensorboard(rpn_run):
    """train.error_pictures: the end-of-run evaluation's PR breakdown and confusion matrices as PNGs (and the
    confusion tables) beside metrics.json, named in it, and the same pictures as TensorBoard images; off, none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, summary = rpn_run
    pictures = ["pr_val_training.png", "confusion-box_val_training.png", "confusion-mask_val_training.png"]
    for on in (True, False):
        name = f"full-pictures-{on}"
        out = train.main(["--config", "configs/tiny.yaml", "--stage", "full", "--init", summary["checkpoint"],
                          "--name", name, "--no-progress", "--set", f"train.output_dir={tmp}",
                          "solver.max_iter=2", f"train.error_pictures={str(on).lower()}"])
        run = tmp / name
        metrics = json.loads((run / "metrics.json").read_text())
        assert "errors" in metrics["val"]["bbox"] and "errors" in metrics["val"]["segm"]
        acc = EventAccumulator(str(run), size_guidance={"images": 0})
        acc.Reload()
        if on:
            assert out["val_pictures"] == metrics["val_pictures"] == pictures
            assert all((run / p).stat().st_size > 0 for p in pictures)
            assert (run / "confusion-box_val_training.md").read_text().startswith("| GT \\ detected |")
            assert sorted(acc.Tags()["images"]) == sorted(f"errors/{p[:-4]}" for p in pictures)
            assert all(acc.Images(f"errors/{p[:-4]}")[0].step == 2 for p in pictures)
        else:
            assert "val_pictures" not in metrics and not list(run.glob("*.png"))
            assert acc.Tags()["images"] == []


def test_resume_continues_and_nan_keeps_last_checkpoint(tmp_path, capsys):
    _train(tmp_path, "solver.max_iter=2", "train.eval_at_end=false", name="r")
    # No --config, no --stage: a resumed run takes its own saved config (tiny, rpn stage), plus --set.
    summary = train.main(["--name", "r", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                          "solver.max_iter=3"])
    assert summary["iterations"] == 3 and summary["stage"] == "rpn"
    assert "resumed from" in capsys.readouterr().out
    before = load_checkpoint(tmp_path / "r" / "last_checkpoint.pth")["iteration"]
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/tiny.yaml", "--stage", "rpn", "--name", "r", "--resume", "--no-progress",
                    "--set", f"train.output_dir={tmp_path}", "solver.max_iter=6", "loss_weights.loss_rpn_cls=nan"])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss is nan" in err and "last_checkpoint.pth" in err
    assert load_checkpoint(tmp_path / "r" / "last_checkpoint.pth")["iteration"] == before == 3


def test_resume_errors_are_one_line(tmp_path, capsys):
    _train(tmp_path, "solver.max_iter=1", "train.eval_at_end=false", name="r1")
    for extra, expected in [(["--name", "nothing-here"], "no "), (["--name", "r1", "--stage", "full"], "rpn-stage"),
                            (["--name", "r1", "--feature-noise"], "without --feature-noise")]:
        with pytest.raises(SystemExit) as e:
            train.main(extra + ["--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    # a checkpoint whose optimiser has one parameter group (weight_decay_norm == weight_decay when written),
    # resumed with the norm layers in a group of their own
    _train(tmp_path, "solver.max_iter=1", "train.eval_at_end=false", "solver.weight_decay=1e-4",
           "solver.weight_decay_norm=1e-4", name="r2")
    with pytest.raises(SystemExit) as e:
        train.main(["--name", "r2", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                    "solver.max_iter=2", "solver.weight_decay_norm=0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parameter groups" in err and "last_checkpoint.pth" in err, err


def test_bad_config_key_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/tiny.yaml", "--set", "solver.max_iters=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "solver.max_iter" in err


def test_missing_init_checkpoint_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/tiny.yaml", "--init", "no/such/file.pth"])
    assert e.value.code == 2
    assert "no/such/file.pth" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- overfit
def _two_images(cfg):
    train_set, _ = build_datasets(cfg)
    train_set.transforms = None  # no flip: the same two images every step
    data = [train_set[0], train_set[1]]
    return [d[0] for d in data], [d[1] for d in data]


def _fit(model, images, targets, steps, lr=1e-3, opt=None):
    opt = opt or torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


RPN_STEPS = 60
# loss of the last 3 steps / the first 3 after 60 steps; seen 0.022-0.048 over seeds 0-2 at 2 and 1 threads and
# with ATen's scalar kernels (tests/variations.py, 12 variations on an AVX2 CPU): the threshold is 10x the worst
RPN_LOSS_RATIO = 0.5


@pytest.mark.trains
def test_overfit_rpn_loss_halves(margin):
    torch.set_num_threads(fixture_threads())  # restored after the test (conftest)
    torch.manual_seed(fixture_seed())
    cfg = load_config("configs/tiny.yaml", ["stage=rpn"])
    images, targets = _two_images(cfg)
    model = build_model(cfg)
    history = _fit(model, images, targets, steps=RPN_STEPS)
    start, end = sum(history[:3]) / 3, sum(history[-3:]) / 3
    margin.check("RPN loss end/start", end / start, "<=", RPN_LOSS_RATIO, (start, end))


def _worst_object(model, images, targets) -> tuple[float, float, bool]:
    """Over every GT object of `images`: the worst box IoU and mask IoU of its best-overlapping confident
    (score > 0.5) detection, and whether every such detection has the object's label."""
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    model.train()
    worst_box, worst_mask, labels_right = 1.0, 1.0, True
    for out, target in zip(outputs, targets, strict=True):
        keep = out["scores"] > 0.5
        boxes, labels, masks = out["boxes"][keep], out["labels"][keep], out["masks"][keep, 0] > 0.5
        if len(boxes) == 0:
            return 0.0, 0.0, False
        iou = box_iou(target["boxes"], boxes)  # [M, D]
        for g in range(len(target["boxes"])):
            j = int(iou[g].argmax())
            gt_mask = target["masks"][g].bool()
            mask_iou = float((masks[j] & gt_mask).sum() / (masks[j] | gt_mask).sum())
            worst_box, worst_mask = min(worst_box, float(iou[g, j])), min(worst_mask, mask_iou)
            labels_right &= bool(labels[j] == target["labels"][g])
    return worst_box, worst_mask, labels_right


# Trained to a target, not for a fixed number of steps: after 200 steps one CPU's trajectory had every object at
# mask IoU >= 0.7 and another's (AMX) one object at 0.686. The model is checked every FIT_CHECK steps from
# FIT_MIN_STEPS on; the verdict is whether it finds every object (right label, box and mask IoU > FIT_IOU) within
# FIT_MAX_STEPS. Seen: at the first check (150 steps) in 11 of 12 variations, at 200 in one (seeds 0-2 at 2 and 1
# threads and with ATen's scalar kernels, tests/variations.py, an AVX2 CPU): the cap is 3x the worst.
FIT_IOU, FIT_MIN_STEPS, FIT_CHECK, FIT_MAX_STEPS = 0.7, 150, 25, 600


@pytest.mark.trains
def test_overfit_full_model_detects_every_object(margin):
    """Trained on two shapes images, the full model finds every GT object there: right label, box IoU > 0.7,
    mask IoU > 0.7, within FIT_MAX_STEPS Adam steps."""
    torch.set_num_threads(fixture_threads())  # restored after the test (conftest)
    torch.manual_seed(fixture_seed())
    cfg = load_config("configs/tiny.yaml", ["model.roi_heads.mask_num_convs=2", "model.roi_heads.mask_conv_dim=32"])
    images, targets = _two_images(cfg)
    model = build_model(cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps, seen, found = 0, [], False
    while steps < FIT_MAX_STEPS and not found:
        chunk = FIT_MIN_STEPS if steps == 0 else FIT_CHECK
        _fit(model, images, targets, steps=chunk, opt=opt)
        steps += chunk
        box, mask, labels_right = _worst_object(model, images, targets)
        seen.append((steps, round(box, 3), round(mask, 3), labels_right))
        found = labels_right and box > FIT_IOU and mask > FIT_IOU
    margin.check("steps until every object is found", steps if found else math.inf, "<=", FIT_MAX_STEPS, seen)


# ------------------------------------------------------------------------------ --init torchvision
TV_ON_TINY = ["--config", "configs/torchvision_compat.yaml", "--stage", "full", "--init", "torchvision",
              "--no-progress", "--set", "data.dataset=shapes", "data.root=datasets/shapes-tiny", "data.num_workers=0",
              "data.shapes.num_train=8", "data.shapes.num_val=4", "data.shapes.image_size=[128,160]",
              "data.shapes.seed=0", "model.transform.min_size_train=[128]", "model.transform.max_size_train=192",
              "model.transform.min_size_test=128", "model.transform.max_size_test=192", "solver.ims_per_batch=2",
              "solver.scale_rule=none", "solver.max_iter=1", "solver.warmup_iters=0", "solver.steps=[1]",
              "train.eval_at_end=false",
              "model.roi_heads.batch_size_per_image=64", "model.backbone.weights=none"]


def test_init_torchvision_loads_coco_weights_and_new_predictors(tmp_path, offline_hub, capsys):
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv_state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    offline_hub.place(MaskRCNN_ResNet50_FPN_Weights.COCO_V1, tv_state)  # as if in torch.hub's cache
    summary = train.main(["--name", "tv"] + TV_ON_TINY + [f"train.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "COCO_V1" in out and "re-initialised" in out and "cls_score" in out
    state = load_checkpoint(summary["checkpoint"])
    # Frozen parts keep torchvision's values after a training step; the predictors are sized for 4 classes.
    assert torch.equal(state["model"]["bottom_up.conv1.weight"], tv_state["backbone.body.conv1.weight"])
    assert state["model"]["roi_heads.box_head.cls_score.weight"].shape[0] == 5
    assert state["config"].model.backbone.frozen_bn_eps == 0.0
    assert "frozen_bn_eps: 0.0" in (tmp_path / "tv" / "config.yaml").read_text()


def test_init_torchvision_offline_is_one_line(tmp_path, offline_hub, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--name", "tv-offline"] + TV_ON_TINY + [f"train.output_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "maskrcnn_resnet50_fpn_coco" in err


def test_optimizer_choice():
    from maskrcnn.config import SolverConfig
    from maskrcnn.engine.recipe import build_optimizer

    params = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(build_optimizer(params, SolverConfig(optimizer="sgd")), torch.optim.SGD)
    adamw = build_optimizer(params, SolverConfig(optimizer="adamw", base_lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="solver.optimizer"):
        build_optimizer(params, SolverConfig(optimizer="adam"))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_no_weight_decay_on_normalisation_layers_by_default(name):
    """detectron2's WEIGHT_DECAY_NORM: BatchNorm / GroupNorm weights and biases get solver.weight_decay_norm (0 by
    default), every other trained parameter solver.weight_decay; one group where they are equal."""
    from maskrcnn.config import SolverConfig
    from maskrcnn.engine.recipe import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1),
                                torch.nn.GroupNorm(2, 4))
    model[2].weight.requires_grad_(False)  # frozen parameters stay out of the optimiser
    opt = build_optimizer(model, SolverConfig(optimizer=name, weight_decay=1e-4))
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[0] == {id(model[0].weight), id(model[0].bias), id(model[2].bias)}
    assert ids[1] == {id(p) for i in (1, 3) for p in model[i].parameters()}
    one = build_optimizer(model, SolverConfig(optimizer=name, weight_decay=1e-4, weight_decay_norm=1e-4))
    assert len(one.param_groups) == 1 and len(one.param_groups[0]["params"]) == 7
    # a step leaves an all-zero-gradient norm weight alone without decay, and shrinks it with decay
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = model[1].weight.detach().clone()
    opt.step()
    assert torch.equal(model[1].weight, before)
    one.step()
    assert (model[1].weight < before).all()
    assert SolverConfig().weight_decay_norm == 0.0


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_makes_the_same_update_as_the_loop(name):
    from maskrcnn.config import SolverConfig
    from maskrcnn.engine.recipe import build_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (5, 7)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    solver = SolverConfig(optimizer=name, base_lr=0.01, weight_decay=0.05)
    results = []
    for fused in (True, False):
        params = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in start])
        opt = build_optimizer(params, solver)
        if not fused:  # torch's per-parameter loop as the reference
            opt = (torch.optim.SGD(params, lr=0.01, momentum=solver.momentum, weight_decay=0.05, foreach=False)
                   if name == "sgd" else torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, foreach=False))
        assert bool(opt.defaults.get("fused")) is fused
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for a, b, s0 in zip(*results, start):
        assert (a - s0).abs().max() > 1e-3  # the steps moved the parameters
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_precise_bn_recomputes_statistics_of_trained_batchnorm():
    from maskrcnn.data.loader import build_loader
    from maskrcnn.engine.precise_bn import update_bn_stats

    cfg = load_config("configs/tiny.yaml")
    train_set, _ = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False).eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(1e4)
    params = [p.clone() for p in model.parameters()]
    loader = build_loader(train_set, 2, shuffle=False, num_workers=0, seed=0)
    assert update_bn_stats(model, loader, 2, torch.device("cpu")) == len(bns) > 0
    assert all(bn.running_mean.abs().max() < 50 and bn.running_var.max() < 1e3 for bn in bns)
    assert all(bn.momentum == 0.1 for bn in bns) and not model.training
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # only statistics change


def test_precise_bn_skips_frozen_batchnorm():
    from maskrcnn.engine.precise_bn import update_bn_stats

    cfg = load_config("configs/tiny.yaml", ["model.backbone.norm=frozen_bn"])
    model = build_model(cfg, load_weights=False)
    assert update_bn_stats(model, [], 5, torch.device("cpu")) == 0


def test_check_data_stops_before_training_on_a_broken_image(tmp_path, capsys):
    """--check-data runs the dataset checker on both splits: a clean set trains, an unreadable image stops the
    run with one line before anything is written."""
    import shutil

    from maskrcnn.data.build import dataset_paths

    paths = dataset_paths(load_config("configs/tiny.yaml"))
    sets = ["data.dataset=coco", *(f"data.{k}={paths[k]}" for k in ("train_ann", "train_images", "val_ann", "val_images"))]
    _train(tmp_path, "solver.max_iter=1", "train.eval_at_end=false", *sets, "--check-data", name="clean")
    assert "OK: no errors" in capsys.readouterr().out
    broken = tmp_path / "val_images"
    shutil.copytree(paths["val_images"], broken)
    first = sorted(broken.iterdir())[0]
    first.write_bytes(b"not an image")
    bad_sets = [s for s in sets if not s.startswith("data.val_images=")] + [f"data.val_images={broken}"]
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "solver.max_iter=1", *bad_sets, "--check-data", name="broken")
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert first.name in out  # the checker's summary names the file
    assert err.count("\n") == 1 and "--check-data: the val split has 1 error(s)" in err
    assert not (tmp_path / "broken").exists()  # stopped before the run directory was made


def test_aspect_ratio_grouping_trains_and_resumes_exactly(tmp_path, capsys):
    """data.aspect_ratio_grouping in training: a run stopped at iteration 2 and resumed gives the losses of an
    uninterrupted run, bit for bit (the grouped order is recomputed from (seed, epoch) and skipped to the
    position), across an epoch boundary."""
    sets = ["data.aspect_ratio_grouping=true", "train.eval_at_end=false", "train.precise_bn_iters=0",
            "train.checkpoint_period=2", "train.num_threads=1"]
    _train(tmp_path, *sets, "solver.max_iter=5", name="whole")
    _train(tmp_path, *sets, "solver.max_iter=2", name="part")
    train.main(["--name", "part", "--resume", "--no-progress", "--set", f"train.output_dir={tmp_path}",
                "solver.max_iter=5"])
    assert "not restored" not in capsys.readouterr().out
    whole, part = (load_checkpoint(tmp_path / n / "last_checkpoint.pth") for n in ("whole", "part"))
    assert whole["position"]["aspect_ratio_grouping"] and whole["iteration"] == part["iteration"] == 5
    assert whole["data"]["batches_per_epoch"] <= 4 and whole["position"]["epoch"] >= 1  # crossed an epoch
    for k, v in whole["history"].items():
        assert torch.equal(v, part["history"][k]), k


def test_cpu_amp_trains_in_bf16_and_evaluates(tmp_path):
    """train.cpu_amp: bf16 autocast on a CPU, no grad scaler; the losses are finite and the run evaluates."""
    from maskrcnn.engine.trainer import Trainer

    cfg = load_config("configs/tiny.yaml", ["stage=full", "train.cpu_amp=true", "test.amp=true", "solver.max_iter=2",
                                            f"train.output_dir={tmp_path}", "test.max_images=2", "train.device=cpu"])
    trainer = Trainer(cfg, tmp_path / "amp", progress=False, hooks=train.trainer_hooks())
    assert trainer.amp and not trainer.scaler.is_enabled()
    summary = trainer.train()
    assert all(math.isfinite(v) for v in summary["loss_end"].values())
    assert "bbox" in summary["val"]
    assert summary["precision"]["train"]["name"] == summary["precision"]["eval"]["name"] == "bf16 autocast"


def test_the_run_prints_and_keeps_its_precision(tmp_path, capsys):
    """train.cpu_amp=auto: one line at the start says what was chosen and why; the run's config.yaml says it too
    (as comments above the config, which still reads back unchanged) and so does metrics.json."""
    from maskrcnn.engine.trainer import Trainer
    from maskrcnn.model.precision import cpu_bf16_native

    cfg = load_config("configs/tiny.yaml", ["stage=rpn", "train.cpu_amp=auto", "solver.max_iter=1",
                                            f"train.output_dir={tmp_path}", "train.eval_at_end=false",
                                            "train.device=cpu"])
    trainer = Trainer(cfg, tmp_path / "auto", progress=False)
    native, evidence = cpu_bf16_native()
    name = "bf16 autocast" if native else "fp32"
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("precision: "))
    assert line.startswith(f"precision: {name} (train.cpu_amp=auto") and evidence in line
    assert trainer.amp is native
    text = (tmp_path / "auto" / "config.yaml").read_text()
    assert text.startswith(f"# training precision: {name} (train.cpu_amp=auto")
    assert load_config(tmp_path / "auto" / "config.yaml").train.cpu_amp == "auto"
    summary = trainer.train()
    assert summary["precision"]["train"]["name"] == name and summary["precision"]["eval"]["name"] == "fp32"
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["precision"] == summary["precision"]


def test_deterministic_option_switches_deterministic_algorithms_on(tmp_path, capsys, monkeypatch):
    """train.deterministic: PyTorch's deterministic algorithms and cuDNN settings for the run (what exact resume
    needs on CUDA; a CPU run is deterministic anyway), said in one line."""
    from maskrcnn.engine.trainer import Trainer

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        cfg = load_config("configs/tiny.yaml", ["stage=rpn", "train.deterministic=true", "solver.max_iter=1",
                                                f"train.output_dir={tmp_path}", "train.eval_at_end=false"])
        Trainer(cfg, tmp_path / "det", progress=False).train()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert "train.deterministic: deterministic algorithms" in capsys.readouterr().out
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_under_torchrun_a_slow_stop_says_which_flag_to_pass(tmp_path, capsys, monkeypatch):
    """Under torchrun a stop needs a step and a checkpoint before torchrun's --shutdown-timeout; when that is
    tight, one note after the first checkpoint says what to pass."""
    from maskrcnn.engine.trainer import Trainer

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0.001")  # every step is slow against this
    cfg = load_config("configs/tiny.yaml", ["stage=rpn", "solver.max_iter=3", "train.checkpoint_period=1",
                                            f"train.output_dir={tmp_path}", "train.eval_at_end=false"])
    Trainer(cfg, tmp_path / "slow", progress=False).train()
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "--shutdown-timeout" in ln]
    assert len(notes) == 1 and "a stop on SIGTERM takes about" in notes[0]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "3600")
    Trainer(cfg, tmp_path / "fast", progress=False).train()
    assert "--shutdown-timeout" not in capsys.readouterr().out
