"""Tests for the whole model (maskrcnn.model.mask_rcnn with configs/tiny.yaml): the eval output format in the
coordinates of the input images, the named training losses of each stage, RPN-stage proposals in input
coordinates, the transform / postprocess round trip, batch padding, pixel mean/std buffers, no `.cuda()`,
detached proposals, and the probe (every intermediate result from the same pass)."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from maskrcnn.model.build import build_model
from maskrcnn.config import load_config
from maskrcnn.model.postprocess import postprocess_detections
from maskrcnn.model.transform import ImageTransform

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
# Smaller images than tiny.yaml's 128 px keep these tests fast on 2 CPU cores.
SMALL = ["model.transform.min_size_train=[64]", "model.transform.max_size_train=96",
         "model.transform.min_size_test=64", "model.transform.max_size_test=96"]
# Input (h, w) -> size after the resize (short side 64, long side at most 96, rounded as detectron2), by hand:
# 150x200: scale min(64/150, 96/200) = 0.4267 -> 64 x round(85.33) = 64 x 85
# 180x130: scale min(64/130, 96/180) = 0.4923 -> round(88.62) x 64 = 89 x 64
INPUT_SIZES = [(150, 200), (180, 130)]
RESIZED = [(64, 85), (89, 64)]
PADDED = (96, 96)  # max(64, 89) -> 96, max(85, 64) -> 96
FULL_LOSSES = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
RPN_LOSSES = {"loss_rpn_cls", "loss_rpn_box"}


def make_model(stage: str):
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"stage={stage}", *SMALL])
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def full():
    return make_model("full")


@pytest.fixture(scope="module")
def rpn():
    return make_model("rpn")


def make_images(sizes=INPUT_SIZES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def make_targets(sizes=INPUT_SIZES) -> list[dict]:
    out = []
    for i, (h, w) in enumerate(sizes):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [60.0, 40.0, 120.0, 110.0]])[: 2 - i % 2 + 1]
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        out.append({"boxes": boxes, "labels": torch.arange(1, len(boxes) + 1), "masks": masks})
    return out


# ------------------------------------------------------------------------------------------ eval output
def test_full_eval_output_format_in_input_pixels(full, monkeypatch):
    cfg, model = full
    model.eval()
    raw = {}
    real_forward = model.roi_heads.forward

    def spy(*args, **kwargs):  # keep the detections in the resized frame, before postprocessing
        out = real_forward(*args, **kwargs)
        raw["dets"] = [{k: v.clone() for k, v in d.items()} for d in out[0]]
        return out

    monkeypatch.setattr(model.roi_heads, "forward", spy)
    images = make_images()
    with torch.no_grad():
        outputs = model(images)
    assert isinstance(outputs, list) and len(outputs) == 2
    k = cfg.model.num_classes
    total = 0
    for out, (h, w), (rh, rw), r in zip(outputs, INPUT_SIZES, RESIZED, raw["dets"], strict=True):
        assert set(out) >= {"boxes", "labels", "scores", "masks"}
        d = out["boxes"].shape[0]
        total += d
        assert d <= cfg.model.roi_heads.detections_per_image
        assert out["boxes"].shape == (d, 4) and out["boxes"].dtype == torch.float32
        assert out["labels"].shape == (d,) and out["labels"].dtype == torch.int64
        assert out["scores"].shape == (d,) and out["scores"].is_floating_point()
        assert out["masks"].shape == (d, 1, h, w)
        assert out["masks"].is_floating_point()
        assert out["masks"].min() >= 0 and out["masks"].max() <= 1
        assert ((out["labels"] >= 1) & (out["labels"] <= k)).all()
        b = out["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        # The boxes are the resized-frame detections scaled by (w / rw, h / rh), computed here by hand.
        scale = torch.tensor([w / rw, h / rh, w / rw, h / rh])
        torch.testing.assert_close(b, r["boxes"] * scale, atol=1e-3, rtol=1e-5)
        assert torch.equal(out["labels"], r["labels"])
        assert torch.equal(out["scores"], r["scores"])
    assert total > 0  # untrained scores (~1/(K+1)) are above 0.05: the format was really checked


# --------------------------------------------------------------------------------------------- training
def test_full_training_returns_five_losses_and_detached_proposals(full, monkeypatch):
    _, model = full
    model.train()
    seen = {}
    real_forward = model.roi_heads.forward

    def spy(features, proposals, *args, **kwargs):
        seen["proposals"] = proposals
        return real_forward(features, proposals, *args, **kwargs)

    monkeypatch.setattr(model.roi_heads, "forward", spy)
    losses = model(make_images(), make_targets())
    assert set(losses) == FULL_LOSSES
    for name, v in losses.items():
        assert v.dim() == 0 and math.isfinite(v.item()), name
    assert len(seen["proposals"]) == 2
    for p in seen["proposals"]:
        assert p.shape[1] == 4 and p.shape[0] > 0
        assert not p.requires_grad and p.grad_fn is None
    model.zero_grad()
    sum(losses.values()).backward()
    assert model.rpn.head.bbox_pred.weight.grad is not None
    model.zero_grad()


def test_full_training_with_an_empty_image(full):
    _, model = full
    model.train()
    targets = make_targets()
    h, w = INPUT_SIZES[1]
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
    losses = model(make_images(), targets)
    assert set(losses) == FULL_LOSSES
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_rpn_training_returns_two_losses(rpn):
    _, model = rpn
    model.train()
    losses = model(make_images(), make_targets())
    assert set(losses) == RPN_LOSSES
    for name, v in losses.items():
        assert v.dim() == 0 and math.isfinite(v.item()), name


def test_rpn_eval_returns_proposals_in_input_pixels(rpn):
    """The RPN stage's eval output (once also in test_rpn.py): each image's proposals, scaled from the resized
    frame back to the input's pixels, scores unchanged, inside the input image."""
    _, model = rpn
    model.eval()
    images = make_images()
    with torch.no_grad():
        outputs = model(images)
        image_list, _, feats = model.features(images)
        proposals, _ = model.rpn(image_list, feats)
    assert image_list.image_sizes == RESIZED
    assert len(outputs) == 2
    for out, p, (h, w), (rh, rw) in zip(outputs, proposals, INPUT_SIZES, RESIZED, strict=True):
        assert set(out) == {"boxes", "scores"}
        n = out["boxes"].shape[0]
        assert n > 0 and out["scores"].shape == (n,)
        scale = torch.tensor([w / rw, h / rh, w / rw, h / rh])
        torch.testing.assert_close(out["boxes"], p["boxes"] * scale, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(out["scores"], p["scores"])
        b = out["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
    # Boxes clipped at the resized image's right / bottom edge come back at the input's edge.
    assert max(o["boxes"][:, 2].max().item() for o in outputs[:1]) > RESIZED[0][1] + 1


# ------------------------------------------------------------------------------------ transform round trip
def make_transform(cfg) -> ImageTransform:
    t = cfg.model.transform
    return ImageTransform(min_size_train=t.min_size_train, max_size_train=t.max_size_train,
                          min_size_test=t.min_size_test, max_size_test=t.max_size_test, pixel_mean=t.pixel_mean,
                          pixel_std=t.pixel_std, size_divisibility=t.size_divisibility,
                          resize_rounding=t.resize_rounding, mask_resize=t.mask_resize)


def test_transform_resizes_and_postprocess_maps_back():
    cfg = load_config(CONFIG, SMALL)
    transform = make_transform(cfg).eval()
    boxes = [torch.tensor([[0.0, 0.0, 200.0, 150.0], [10.5, 20.25, 77.0, 91.0]]),
             torch.tensor([[3.0, 4.0, 130.0, 180.0], [50.0, 60.0, 51.0, 62.0], [100.0, 7.0, 129.0, 33.0]])]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    image_list, new_targets = transform(make_images(), targets)
    assert image_list.image_sizes == RESIZED
    for b, t, (h, w), (rh, rw) in zip(boxes, new_targets, INPUT_SIZES, RESIZED, strict=True):
        expected = b * torch.tensor([rw / w, rh / h, rw / w, rh / h])
        torch.testing.assert_close(t["boxes"], expected, atol=1e-4, rtol=1e-6)
    # The whole-image box of image 0 becomes the whole resized image.
    torch.testing.assert_close(new_targets[0]["boxes"][0], torch.tensor([0.0, 0.0, 85.0, 64.0]))
    dets = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"],
             "masks": torch.ones(len(t["boxes"]), 1, 28, 28)} for t in new_targets]
    back = postprocess_detections(dets, image_list.image_sizes, INPUT_SIZES)
    for b, r, (h, w) in zip(boxes, back, INPUT_SIZES, strict=True):
        torch.testing.assert_close(r["boxes"], b, atol=1e-3, rtol=1e-6)
        assert r["masks"].shape == (len(b), 1, h, w)
    # An all-ones mask pasted on the whole-image box covers the input image (bilinear paste with zero
    # padding fades over the outermost pixels only).
    assert back[0]["masks"][0, 0, 3:-3, 3:-3].min() > 0.5


def test_transform_resizes_target_masks_in_training():
    cfg = load_config(CONFIG, SMALL)
    transform = make_transform(cfg).train()  # min_size_train [64], max 96: same sizes as at test time
    targets = make_targets()
    image_list, new_targets = transform(make_images(), targets)
    assert image_list.image_sizes == RESIZED
    for t, (rh, rw) in zip(new_targets, RESIZED, strict=True):
        assert t["masks"].shape[1:] == (rh, rw)
        assert t["masks"].dtype == torch.uint8
        # The box of each mask, scaled, still bounds its resized mask (to within a pixel).
        for m, b in zip(t["masks"], t["boxes"], strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert abs(xs.min().item() - b[0].item()) <= 1.5 and abs(xs.max().item() + 1 - b[2].item()) <= 1.5
            assert abs(ys.min().item() - b[1].item()) <= 1.5 and abs(ys.max().item() + 1 - b[3].item()) <= 1.5


def test_transform_resizes_empty_target_masks():
    cfg = load_config(CONFIG, SMALL)
    transform = make_transform(cfg).train()
    h, w = INPUT_SIZES[0]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
    image_list, (t,) = transform(make_images(INPUT_SIZES[:1]), [empty])
    assert image_list.image_sizes == RESIZED[:1]
    assert tuple(t["masks"].shape) == (0, *RESIZED[0])


# (64, 96) is not resized and needs no padding; 128x160 -> 64x80 -> 64x96; 100x100 -> 64x64;
# 128x150 -> 64x75 and 128x128 -> 64x64 -> 64x96.
@pytest.mark.parametrize("sizes,padded", [(INPUT_SIZES, PADDED), ([(64, 96)], (64, 96)), ([(128, 160)], (64, 96)),
                                          ([(100, 100)], (64, 64)), ([(128, 150), (128, 128)], (64, 96))])
def test_batch_padding_to_multiple_of_32(sizes, padded):
    cfg = load_config(CONFIG, SMALL)
    assert cfg.model.transform.size_divisibility == 32
    transform = make_transform(cfg).eval()
    images = make_images(sizes)
    image_list, _ = transform(images)
    n = len(sizes)
    assert tuple(image_list.tensor.shape) == (n, 3, *padded)
    for i, (h, w) in enumerate(image_list.image_sizes):
        pad = image_list.tensor[i]
        assert (pad[:, h:, :] == 0).all() and (pad[:, :, w:] == 0).all()  # padding is zero
        assert pad[:, :h, :w].abs().sum() > 0


def test_pixel_mean_std_are_buffers_that_move():
    cfg, model = make_model("rpn")
    buffers = dict(model.named_buffers())
    assert "transform.pixel_mean" in buffers and "transform.pixel_std" in buffers
    assert "transform.pixel_mean" not in dict(model.named_parameters())
    mean = torch.tensor(cfg.model.transform.pixel_mean)
    std = torch.tensor(cfg.model.transform.pixel_std)
    # Normalisation of a constant image (64x64: not resized): (x - mean) / std per channel.
    image = torch.full((3, 64, 64), 0.7)
    image_list, _ = model.transform.eval()([image])
    assert tuple(image_list.tensor.shape) == (1, 3, 64, 64)
    torch.testing.assert_close(image_list.tensor[0, :, 5, 9], (0.7 - mean) / std)
    t = copy.deepcopy(model.transform)
    t.to(torch.float64)
    assert t.pixel_mean.dtype == torch.float64 and t.pixel_std.dtype == torch.float64
    t.to("meta")
    assert t.pixel_mean.device.type == "meta" and t.pixel_std.device.type == "meta"


def test_no_cuda_calls_in_the_package():
    offenders = []
    for path in sorted((ROOT / "maskrcnn").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\.cuda\s*\(", code):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert len(list((ROOT / "maskrcnn").rglob("*.py"))) > 10
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------------------------ probe
def same(a, b) -> bool:
    """Nested equality of tensors, dicts and lists."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def test_probe_in_eval_mode_returns_every_stage_and_the_same_detections(full):
    _, model = full
    model.eval()
    images, targets = make_images(), make_targets()
    with torch.no_grad():
        expected = model(images)
    torch.manual_seed(1)
    rec = model.probe(images, targets)
    assert same(rec["output"], expected)  # the probe is the forward pass, not a copy of it
    assert rec["image_sizes"] == RESIZED and rec["padded_size"] == PADDED
    assert [tuple(im.shape) for im in rec["images"]] == [(3, h, w) for h, w in RESIZED]
    assert set(rec["bottom_up"]) == {"c2", "c3", "c4", "c5"} and set(rec["fpn"]) == {"p2", "p3", "p4", "p5", "p6"}
    assert same(rec["noisy"], rec["bottom_up"])  # LatentNoise off in this config
    rpn = model.rpn
    assert len(rec["anchors"]) == len(rpn.in_features) == len(rec["objectness"])
    total = sum(len(a) for a in rec["anchors"])
    assert rec["anchor_labels"].shape == rec["sampled_anchor_labels"].shape == (2, total)
    # The labels are the RPN's own labelling of these anchors.
    labels0, _ = rpn.label_anchors(torch.cat(rec["anchors"]), rec["targets"][0]["boxes"])
    assert torch.equal(rec["anchor_labels"][0], labels0)
    sampled = rec["sampled_anchor_labels"]
    assert ((sampled >= 0).sum(1) <= rpn.sampler.batch_size_per_image).all()
    assert ((sampled == 1) <= (rec["anchor_labels"] == 1)).all()  # a sampled positive was a positive
    assert len(rec["proposals"]) == 2 and len(rec["roi_samples"]) == 2
    for s, tgt in zip(rec["roi_samples"], rec["targets"], strict=True):
        assert (s["labels"] > 0).any() and (s["matched_idx"] < len(tgt["boxes"])).all()


def test_probe_without_targets_has_no_labels(rpn):
    _, model = rpn
    model.eval()
    rec = model.probe(make_images())
    assert rec["targets"] is None and "anchor_labels" not in rec and "roi_samples" not in rec
    assert len(rec["output"]) == 2 and set(rec["output"][0]) == {"boxes", "scores"}


def test_probe_in_training_mode_gives_the_training_losses(full):
    _, model = full
    model.train()
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            expected = model(make_images(), make_targets())
        torch.manual_seed(3)
        rec = model.probe(make_images(), make_targets())
    finally:
        model.eval()
    assert same(rec["output"], expected)
    assert not any(v.requires_grad for v in rec["output"].values())  # no graph kept


def test_probe_noise_switch_and_state_restored():
    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["stage=rpn", *SMALL, "model.noise.enabled=true", "model.noise.seed=5"])
    model = build_model(cfg).eval()
    images = make_images()
    rec = model.probe(images)  # train-only noise: identity in eval mode
    assert same(rec["noisy"], rec["bottom_up"])
    rec_on = model.probe(images, noise=True)
    assert not torch.equal(rec_on["noisy"]["c5"], rec_on["bottom_up"]["c5"])
    assert torch.equal(rec_on["noisy"]["c4"], rec_on["bottom_up"]["c4"])  # only the configured level
    ratio = rec_on["noisy"]["c5"] / rec_on["bottom_up"]["c5"].where(rec_on["bottom_up"]["c5"] != 0, torch.ones(()))
    nz = rec_on["bottom_up"]["c5"] != 0
    assert ratio[nz].min() >= 0.8 - 1e-5 and ratio[nz].max() <= 1.2 + 1e-5
    assert not model.noise.training and model.noise.enabled  # restored
    model.train()
    rec_off = model.probe(images, [t for t in make_targets()], noise=False)
    assert same(rec_off["noisy"], rec_off["bottom_up"])
    assert model.training and model.noise.training and model.noise.enabled
    model.eval()


def test_probe_without_heads_stops_after_the_rpn(full):
    _, model = full
    model.eval()
    images, targets = make_images(), make_targets()
    torch.manual_seed(2)
    rec = model.probe(images, targets, heads=False)
    torch.manual_seed(2)
    whole = model.probe(images, targets)
    assert model.roi_heads is not None and model.stage == "full"  # restored
    assert "roi_samples" not in rec and set(rec["output"][0]) == {"boxes", "scores"}
    assert same(rec["proposals"], whole["proposals"])  # the same RPN pass


# -------------------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_eval_and_training_run_with_fp32_outputs(full):
    """Under CPU bf16 autocast the model runs both modes and gives fp32 detections and losses (the comparison
    with fp32 on trained weights is tests/test_bf16.py)."""
    cfg, model = full
    images = make_images()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
    for out, (h, w) in zip(outputs, INPUT_SIZES, strict=True):
        assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32
        assert out["masks"].shape[-2:] == (h, w)
    model.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(images, make_targets())
    finally:
        model.eval()
    assert set(losses) == FULL_LOSSES
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    model.zero_grad(set_to_none=True)
