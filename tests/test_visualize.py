"""Tests for maskrcnn.vis (primitives, panels, views, tensorboard) and visualize.py: every command writes a PNG
of the expected size with something drawn on it; printed anchor and label counts agree with the model's own
anchor generator and matcher; errors are one line; the training images are drawn from the training step's
own probe record and appear in a short training run's TensorBoard events (both stages)."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import visualize as vis_cli  # the top-level CLI
from maskrcnn.vis import panels
from maskrcnn.vis import primitives as vis
from maskrcnn.vis.tensorboard import log_training_images
from maskrcnn.vis.views import input_image
from maskrcnn.model.build import build_model
from maskrcnn.config import load_config
from maskrcnn.data.build import build_datasets
from maskrcnn.engine.checkpoint import config_to_yaml, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)  # configs and datasets are relative to the repository
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a busy CPU
    yield
    torch.set_num_threads(threads)
    os.chdir(old)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny full-stage model, its checkpoint, and val item 0 as the model sees it (eval)."""
    cfg = load_config(CONFIG)
    _, val = build_datasets(cfg, train=False)
    cfg.model.num_classes = val.num_classes
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False).eval()
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint({"model": model.state_dict(), "config": config_to_yaml(cfg), "stage": cfg.stage}, ckpt)
    image, target = val[0]
    target = {k: target[k] for k in ("boxes", "labels", "masks")}
    with torch.no_grad():
        image_list, targets, feats = model.features([image], [target])
    return {"cfg": cfg, "model": model, "ckpt": str(ckpt), "image": image, "target": target,
            "image_list": image_list, "targets": targets, "feats": feats}


def run(capsys, *argv):
    paths = vis_cli.main(list(argv))
    out = capsys.readouterr().out
    assert [str(p) for p in paths] == [line for line in out.splitlines() if line.endswith(".png")]
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths], out


def model_input(setup) -> np.ndarray:
    with torch.no_grad():
        return input_image({"images": setup["model"].input_images(setup["image_list"])})


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) > 50


# ---------------------------------------------------------------------------------------------- helpers
def test_save_png_full_colour_and_palette(tmp_path):
    img = vis.heatmap(np.random.default_rng(0).random((30, 40)), size=(80, 60))
    vis.save_png(img, tmp_path / "a" / "full.png")
    assert (cv2.cvtColor(cv2.imread(str(tmp_path / "a" / "full.png")), cv2.COLOR_BGR2RGB) == img).all()
    vis.save_png(img, tmp_path / "small.png", palette=16)
    small = cv2.imread(str(tmp_path / "small.png"))
    assert small.shape == img.shape and len(np.unique(small.reshape(-1, 3), axis=0)) <= 16


def test_drawing_helpers():
    img = np.full((40, 60, 3), 100, np.uint8)
    boxed = vis.draw_boxes(img, torch.tensor([[5.0, 5.0, 30.0, 20.0]]), (255, 0, 0), ["a"])
    assert boxed.shape == img.shape and (img == 100).all()  # input untouched
    assert tuple(boxed[12, 5]) == (255, 0, 0) and tuple(boxed[12, 15]) == (100, 100, 100)
    mask = np.zeros((1, 40, 60), bool)
    mask[0, 10:20, 10:20] = True
    masked = vis.draw_masks(img, mask, [(0, 255, 0)], contours=False)
    assert masked[15, 15, 1] > 100 and tuple(masked[30, 50]) == (100, 100, 100)
    assert vis.side_by_side([img, img[:30]]).shape == (40, 120 + vis.GAP, 3)
    assert vis.stack([img, img[:, :50]]).shape == (80 + vis.GAP, 60, 3)
    hm = vis.heatmap(np.arange(12.0).reshape(3, 4), size=(8, 6))
    assert hm.shape == (6, 8, 3) and not (hm[0, 0] == hm[-1, -1]).all()
    det = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 20.0], [35.0, 5.0, 55.0, 35.0]]), "labels": torch.tensor([1, 2]),
           "scores": torch.tensor([0.9, 0.2]), "masks": torch.from_numpy(mask[:, None].repeat(2, 0)).float()}
    drawn = panels.draw_detections(img, det, ["__background__", "a", "b"], score_thresh=0.5)
    assert differs(drawn, img)
    assert (drawn[25:34, 40:50] == 100).all()  # the 0.2 detection is below the threshold
    assert (panels.draw_detections(img, det, None, score_thresh=0.95) == img).all()


# ---------------------------------------------------------------------------------------------- commands
def test_dataset_command(setup, capsys, tmp_path):
    (png,), out = run(capsys, "dataset", "--config", CONFIG, "--out", str(tmp_path))
    h, w = setup["image_list"].image_sizes[0]
    assert png.shape[1:] == (w, 3) and png.shape[0] > h  # the header in a band above the image
    assert differs(png[-h:], model_input(setup))
    assert f"{len(setup['target']['boxes'])} objects" in out and "100% inside its box" in out
    (flipped,), out = run(capsys, "dataset", "--config", CONFIG, "--split", "train", "--flip", "--out",
                          str(tmp_path))
    assert "flipped" in out and "not flipped" not in out and flipped.ndim == 3


def test_anchors_command(setup, capsys, tmp_path):
    (png,), out = run(capsys, "anchors", "--config", CONFIG, "--level", "p3", "--out", str(tmp_path))
    model, feats = setup["model"], setup["feats"]
    gen = model.rpn.anchor_generator
    sizes = [tuple(feats[n].shape[-2:]) for n in model.rpn.in_features]
    anchors = gen(sizes, tuple(setup["image_list"].tensor.shape[-2:]))
    h, w = setup["image_list"].image_sizes[0]
    for name, a in zip(model.rpn.in_features, anchors):
        assert re.search(rf"{name}: .* = {len(a)} anchors", out)
    assert f"total {sum(len(a) for a in anchors)} anchors" in out
    # The canvas of the left panel extends as far as the anchors nearest the image centre stick out.
    near = []
    for a in anchors:
        centres = (a[:, :2] + a[:, 2:]) / 2
        d = (centres - torch.tensor([w / 2, h / 2])).abs().max(1).values
        near.append(a[d == d.min()][: gen.num_anchors])  # the first nearest location
    b = torch.cat(near)
    over = max(0.0, -b[:, 0].min().item(), -b[:, 1].min().item(), b[:, 2].max().item() - w,
               b[:, 3].max().item() - h)
    m = min(int(np.ceil(over)) + 2 if over > 0 else 0, max(h, w) // 2)
    assert png.shape == (h + 2 * m, w + 2 * m + vis.GAP + w, 3)
    right = png[:h, w + 2 * m + vis.GAP :]
    assert differs(right, model_input(setup))


def test_anchor_labels_counts_match_the_model(setup, capsys, tmp_path):
    (png,), out = run(capsys, "anchor-labels", "--config", CONFIG, "--out", str(tmp_path))
    model, feats, targets = setup["model"], setup["feats"], setup["targets"]
    rpn = model.rpn
    anchors = torch.cat(rpn.anchor_generator([tuple(feats[n].shape[-2:]) for n in rpn.in_features],
                                             tuple(setup["image_list"].tensor.shape[-2:])))
    labels, _ = rpn.label_anchors(anchors, targets[0]["boxes"])
    pos, neg, ign = int((labels == 1).sum()), int((labels == 0).sum()), int((labels == -1).sum())
    assert pos > 0 and neg > 0
    assert f"anchors: {len(anchors)} total, {pos} positive, {neg} negative, {ign} ignored" in out
    n_pos = min(pos, int(rpn.sampler.batch_size_per_image * rpn.sampler.positive_fraction))
    n_neg = min(neg, rpn.sampler.batch_size_per_image - n_pos)
    assert f"sampled: {n_pos} positive, {n_neg} negative" in out
    h, w = setup["image_list"].image_sizes[0]
    assert png.shape == (h, 2 * w + vis.GAP, 3)
    assert differs(png[:, :w], model_input(setup)) and differs(png[:, w + vis.GAP :], model_input(setup))


def test_proposals_from_checkpoint_filtered_by_level(setup, capsys, tmp_path):
    # No --config: the checkpoint's (tiny) config is used, so the frame is the tiny model's.
    (png,), out = run(capsys, "proposals", "--checkpoint", setup["ckpt"], "--top", "10", "--levels", "p2", "p3",
                      "--out", str(tmp_path))
    h, w = setup["image_list"].image_sizes[0]
    assert png.shape == (h, w, 3) and differs(png, model_input(setup))
    counts = dict(re.findall(r"(p\d) (\d+)", out.split("drawn the top")[1]))
    assert int(counts["p2"]) + int(counts["p3"]) == 10 and counts["p4"] == counts["p5"] == counts["p6"] == "0"


def test_rois_and_detections(setup, capsys, tmp_path):
    (png,), out = run(capsys, "rois", "--checkpoint", setup["ckpt"], "--out", str(tmp_path))
    h, w = setup["image_list"].image_sizes[0]
    assert png.shape[1:] == (w, 3) and png.shape[0] > h and differs(png[-h:], model_input(setup))
    n_pos, n_neg = map(int, re.search(r"sampled (\d+) positive, (\d+) negative", out).groups())
    assert n_pos >= len(setup["target"]["boxes"]) and n_pos + n_neg <= model_rois_batch(setup)
    (png,), out = run(capsys, "detections", "--checkpoint", setup["ckpt"], "--score-thresh", "0", "--out",
                      str(tmp_path))
    original = vis.to_uint8_image(setup["image"])
    assert png.shape[1:] == original.shape[1:] and png.shape[0] > original.shape[0]  # on the image as given,
    assert differs(png[-original.shape[0]:], original)  # under a header band
    assert re.search(r"\d+ detections, \d+ with score >= 0", out)


def model_rois_batch(setup) -> int:
    return setup["model"].roi_heads.sampler.batch_size_per_image


def test_features_grid(setup, capsys, tmp_path):
    (png,), out = run(capsys, "features", "--config", CONFIG, "--out", str(tmp_path))
    h, w = setup["image_list"].image_sizes[0]
    cell_h = round(128 * h / w)
    levels = len(setup["feats"]) + 4  # p2..p6 and c2..c5
    assert png.shape == (3 * cell_h + 2 * 2, (levels + 1) * 128 + levels * 2, 3)
    change = dict(re.findall(r"(\w\d) (\d+\.\d+)", out.split("clean||:")[1]))
    assert float(change["c2"]) == 0 and float(change["c5"]) > 0.05 and float(change["p2"]) > 0  # seed000: c5


def test_one_line_errors(setup, capsys, tmp_path):
    cases = [(["dataset", "--config", CONFIG, "--index", "999"],
              "error: --index 999 out of range: the val split has 4 images"),
             (["detections", "--config", CONFIG, "--image", str(tmp_path / "missing.png")],
              f"error: image not found: {tmp_path / 'missing.png'}"),
             (["anchor-labels", "--config", CONFIG, "--image", str(ROOT / "datasets/shapes-tiny/val/000000.png")],
              "error: 'anchor-labels' needs ground truth: use --index (a dataset item), not --image"),
             (["rois", "--config", CONFIG, "--set", "stage=rpn"],
              "error: rois needs a full-stage model (this is the RPN stage); use a full-stage checkpoint or config"),
             (["anchors", "--config", CONFIG, "--at", "5000", "10"],
              "error: --at 5000 10 is outside the model input (139x128 px, after resizing)"),
             (["proposals", "--checkpoint", str(tmp_path / "none.pth")],
              f"error: checkpoint not found: {tmp_path / 'none.pth'}"),
             # An explicit --config wins over the checkpoint's: here it does not fit the weights.
             (["proposals", "--checkpoint", setup["ckpt"], "--config", CONFIG, "--set", "model.fpn.out_channels=16"],
              f"error: {setup['ckpt']}: weights do not fit the model built from the config")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            vis_cli.main(argv + ["--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, (argv, err)
        if "--set" not in argv or argv[0] == "rois":  # the whole line; the weights' mismatch: its first part
            assert err == message + "\n", (argv, err)
        elif "weights do not fit" in message:  # then its first problem, named, not torch's header alone
            assert re.search(r"\(size mismatch for fpn\.[\w.]+: .*; \d+ more problem\(s\)\)$", err.strip()), err


# ------------------------------------------------------------------------------------------ during training
class Recorder:
    def __init__(self):
        self.images = {}

    def add_image(self, tag, img, step, dataformats="CHW"):
        assert dataformats == "HWC" and img.dtype == np.uint8 and img.ndim == 3
        self.images[tag] = (img, step)


def test_training_images_come_from_the_training_step_itself(setup):
    """Recording a training step changes none of its losses, and drawing from the record runs no model and
    draws no random number."""
    model = setup["model"]
    images, targets = [setup["image"], setup["image"].flip(-1)], [setup["target"], setup["target"]]
    model.train()
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(7)
        with torch.no_grad():
            plain = model(images, targets)
        model.load_state_dict(state)  # BatchNorm statistics as before the first pass
        torch.manual_seed(7)
        record = {}
        with torch.no_grad():
            recorded = model(images, targets, record)
        assert {k: v.item() for k, v in plain.items()} == {k: v.item() for k, v in recorded.items()}
        torch_rng, py_rng = torch.get_rng_state(), random.getstate()
        writer = Recorder()
        log_training_images(writer, record, 5, class_names=["bg", "a", "b", "c", "d"])
        assert set(writer.images) == {"vis/gt_proposals", "vis/rois"}
        assert all(step == 5 for _, step in writer.images.values())
        assert torch.equal(torch_rng, torch.get_rng_state()) and py_rng == random.getstate()
    finally:
        model.load_state_dict(state)
        model.eval()


def test_training_run_logs_images_for_both_stages(tmp_path):
    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = {"rpn": {"vis/gt_proposals"}, "full": {"vis/gt_proposals", "vis/rois"}}
    # Two iterations on small images keep this fast; images are logged at iteration 2.
    small = ["solver.max_iter=2", "model.transform.min_size_train=[64]", "model.transform.max_size_train=96",
             "model.transform.min_size_test=64", "model.transform.max_size_test=96"]
    for stage, tags in expected.items():
        train.main(["--config", CONFIG, "--stage", stage, "--name", stage, "--no-progress", "--set",
                    "train.vis_period=2", f"train.output_dir={tmp_path}", "train.eval_at_end=false", *small])
        acc = EventAccumulator(str(tmp_path / stage), size_guidance={"images": 0})
        acc.Reload()
        assert set(acc.Tags()["images"]) == tags, stage
        for tag in tags:
            (event,) = acc.Images(tag)
            assert event.step == 2 and event.width > 0 and event.height > 0, (stage, tag)
            decoded = cv2.imdecode(np.frombuffer(event.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
            assert decoded.shape[:2] == (event.height, event.width) and decoded.std() > 0
