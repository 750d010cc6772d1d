"""bfloat16 autocast on a CPU (`torch.autocast("cpu", dtype=torch.bfloat16)`): the same model and weights give
the same detections and AP as in fp32, the same training losses and gradients, and BatchNorm statistics;
the numbers that become pixels or rankings stay fp32; and BatchNorm folding (maskrcnn.model.fuse) is exact.

The comparisons run on a model trained here for a short while on four shapes images (configs/tiny.yaml, about
a minute on 2 cores): random weights give near-tied scores everywhere, and a comparison on them says
nothing about a detector."""
from __future__ import annotations

import copy

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.data.build import build_datasets
from maskrcnn.evaluation.coco_eval import coco_evaluate, detections_to_coco
from maskrcnn.model.box_ops import box_iou
from maskrcnn.model.build import build_model
from maskrcnn.model.fuse import count_batchnorms, fold_batchnorm
from maskrcnn.model.postprocess import paste_masks, paste_masks_torchvision

OVERRIDES = ["model.roi_heads.mask_num_convs=2", "model.roi_heads.mask_conv_dim=32"]


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _fit(model, images, targets, steps: int) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    history = []
    for it in range(steps):
        batch = [0, 1] if it % 2 == 0 else [2, 3]
        losses = model([images[i] for i in batch], [targets[i] for i in batch])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


@pytest.fixture(scope="module")
def trained():
    """(dataset, model trained in fp32 for 300 steps on 4 images, images, targets); the model in eval mode.
    Trained this long its detections are confident and rarely near-duplicates, so NMS rarely flips."""
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    train_set, _ = build_datasets(cfg)
    train_set.transforms = None  # no flip: the same four images every time
    data = [train_set[i] for i in range(4)]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    model = build_model(cfg)
    # The weights after 300 steps depend on the order of float sums, hence on the thread count: always train
    # with two threads (whatever an earlier test left), so the fixture is the same model in every run.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        history = _fit(model, images, targets, steps=300)
    finally:
        torch.set_num_threads(threads)
    assert sum(history[-10:]) < 0.6 * sum(history[:10])  # it did learn
    model.eval()
    return train_set, model, images, targets


def infer(model, images, autocast: bool):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(images)


def assert_detections_match(ref: list[dict], got: list[dict], min_score: float = 0.2, box_px: float = 1.0,
                            min_matched: float = 0.9):
    """The detections of `ref` scoring >= min_score are found in `got`: at least `min_matched` of them have a
    detection of the same label with box IoU >= 0.8, and every such matched pair has its box within `box_px`
    on every side (measured: <= 0.25 px), the score within 0.02 and, for masks of 100 px or more, binary masks
    (>= 0.5) of IoU >= 0.95 (a 20 px mask moves a lot with its box's sub-pixel shift, whatever the precision).
    A detection may go unmatched when two near-duplicate candidates of one object have nearly equal scores
    and the other one survives NMS; that is a flip, not an error of precision, and AP counts it."""
    matched = total = 0
    for r, g in zip(ref, got):
        assert g["boxes"].dtype == g["scores"].dtype == g["masks"].dtype == torch.float32
        for i in torch.nonzero(r["scores"] >= min_score).squeeze(1).tolist():
            total += 1
            iou = box_iou(r["boxes"][i : i + 1], g["boxes"])[0] * (g["labels"] == r["labels"][i])
            if iou.numel() == 0 or iou.max() < 0.8:
                continue
            j = int(iou.argmax())
            err = (r["boxes"][i] - g["boxes"][j]).abs().max()
            assert err <= box_px, (i, r["boxes"][i], g["boxes"][j])
            assert abs(float(r["scores"][i] - g["scores"][j])) <= 0.02
            a, b = r["masks"][i, 0] >= 0.5, g["masks"][j, 0] >= 0.5
            if a.sum() >= 100:
                mask_iou = (a & b).sum() / (a | b).sum()
                assert mask_iou >= 0.95, (i, float(mask_iou))
            matched += 1
    assert total >= 8 and matched >= min_matched * total, (matched, total)


def coco_ap(dataset, outputs, targets) -> dict[str, float]:
    results = []
    for out, t in zip(outputs, targets):
        results += detections_to_coco(out, int(t["image_id"]), dataset.contiguous_to_cat_id)
    ids = [int(t["image_id"]) for t in targets]
    cats = list(dataset.contiguous_to_cat_id.values())
    return {kind: coco_evaluate(dataset.coco, results, kind, ids, cats)["stats"]["AP"] for kind in ("bbox", "segm")}


# ------------------------------------------------------------------------------------------ inference
def test_bf16_detections_match_fp32(trained):
    _, model, images, _ = trained
    assert_detections_match(infer(model, images, False), infer(model, images, True))


def test_bf16_ap_within_0_01_of_fp32(trained):
    dataset, model, images, targets = trained
    ap32 = coco_ap(dataset, infer(model, images, False), targets)
    ap16 = coco_ap(dataset, infer(model, images, True), targets)
    assert ap32["bbox"] > 0.1 and ap32["segm"] > 0.1  # a detector, not noise
    for kind in ap32:
        assert abs(ap32[kind] - ap16[kind]) <= 0.01, (kind, ap32, ap16)


def test_fast_inference_path_matches_fp32(trained):
    """BatchNorm folded, channels-last and bf16 together (what the benchmark times) against plain fp32."""
    _, model, images, _ = trained
    fast = fold_batchnorm(model).to(memory_format=torch.channels_last)
    assert_detections_match(infer(model, images, False), infer(fast, images, True))


def test_bf16_proposals_match_fp32(trained):
    """The RPN's proposals (before the heads refine them): the top ones are the same boxes."""
    _, model, images, _ = trained
    with torch.no_grad():
        p32 = model.probe(images)["proposals"]
        with bf16():
            p16 = model.probe(images)["proposals"]
    for a, b in zip(p32, p16):
        assert b["boxes"].dtype == b["scores"].dtype == torch.float32
        top = a["boxes"][:20]
        iou = box_iou(top, b["boxes"])
        best, j = iou.max(1)
        assert (best > 0.98).float().mean() >= 0.9
        ok = best > 0.98
        assert (top[ok] - b["boxes"][j[ok]]).abs().max() <= 1.0


def test_precision_critical_outputs_are_fp32_under_autocast(trained):
    """Objectness, RPN deltas, class scores and box deltas come out fp32; the features do not (the point)."""
    _, model, images, _ = trained
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = output
        return hook

    handles = [model.rpn.head.register_forward_hook(keep("rpn")),
               model.roi_heads.box_head.register_forward_hook(keep("box")),
               model.fpn.register_forward_hook(keep("fpn"))]
    try:
        infer(model, images, True)
    finally:
        for h in handles:
            h.remove()
    logits, deltas = seen["rpn"]
    assert all(t.dtype == torch.float32 for t in logits + deltas)
    assert all(t.dtype == torch.float32 for t in seen["box"])
    assert seen["fpn"]["p3"].dtype == torch.bfloat16  # the convolutions do run in bf16


@pytest.mark.parametrize("paste", [paste_masks, paste_masks_torchvision])
def test_mask_pasting_is_fp32_under_autocast(paste):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(7, 1, 28, 28, generator=g)
    xy = torch.rand(7, 2, generator=g) * 60
    boxes = torch.cat((xy, xy + 5 + torch.rand(7, 2, generator=g) * 40), 1)
    ref = paste(masks, boxes, (70, 90))
    with bf16():
        got = paste(masks, boxes, (70, 90))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- training
def _losses_and_grads(model, images, targets, autocast: bool, proposals: dict):
    """Losses, gradients and the model after one training forward/backward on a copy of `model`. The RPN's
    proposals are the first run's in both runs (`proposals` holds them), so that both sample the same RoIs:
    otherwise a proposal that moves by a fraction of a pixel changes which 32 RoIs are drawn, and the head
    losses differ by sampling noise (tens of percent here), not by precision."""
    model = copy.deepcopy(model)
    model.train()
    select = model.rpn.select_proposals

    def same_proposals(*args, **kwargs):
        if "fixed" not in proposals:
            proposals["fixed"] = select(*args, **kwargs)
        return proposals["fixed"]

    model.rpn.select_proposals = same_proposals
    torch.manual_seed(1)  # the same anchor and RoI samples in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(images[:2], targets[:2])
    assert all(v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    losses = {k: v.detach() for k, v in losses.items()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads, model


def test_bf16_training_losses_and_gradients_match_fp32(trained):
    _, model, images, targets = trained
    proposals: dict = {}
    l32, g32, m32 = _losses_and_grads(model, images, targets, False, proposals)
    l16, g16, m16 = _losses_and_grads(model, images, targets, True, proposals)
    assert set(l16) == set(l32) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    for k in l32:
        assert abs(l16[k] - l32[k]) <= 0.03 * abs(l32[k]) + 2e-3, (k, l32[k], l16[k])
    assert set(g16) == set(g32)
    for name in g32:  # every parameter's gradient points the same way (weights stay fp32: grads are fp32)
        assert g16[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))
    # BatchNorm statistics (tiny.yaml trains BatchNorm) are updated in fp32 from the bf16 activations
    for (name, b32), (_, b16) in zip(m32.named_buffers(), m16.named_buffers()):
        if name.endswith(("running_mean", "running_var")):
            assert b16.dtype == torch.float32
            torch.testing.assert_close(b16, b32, atol=2e-3, rtol=2e-2, msg=name)


def test_bf16_fine_tuning_keeps_learning(trained):
    """Twenty more steps under bf16 autocast lower the training loss, about as far as twenty in fp32 do."""
    _, model, images, targets = trained
    ends = {}
    for autocast in (False, True):
        m = copy.deepcopy(model)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            history = _fit(m, images, targets, steps=20)
        ends[autocast] = sum(history[-6:]) / 6
        assert ends[autocast] < sum(history[:6]) / 6, history
    assert ends[True] <= 1.2 * ends[False], ends  # not worse than fp32 (the sampled RoIs make both noisy)


# ------------------------------------------------------------------------------------- BatchNorm folding
def test_fold_batchnorm_of_trained_batchnorm_is_exact(trained):
    """tiny.yaml trains nn.BatchNorm2d; in eval mode its statistics are constants and fold into the convs."""
    _, model, images, _ = trained
    folded = fold_batchnorm(model)
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0  # the original is left alone
    ref, got = infer(model, images, False), infer(folded, images, False)
    for r, g in zip(ref, got):
        assert len(r["boxes"]) == len(g["boxes"])
        torch.testing.assert_close(g["boxes"], r["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], r["scores"], atol=1e-4, rtol=0)


def test_fold_frozen_batchnorm_is_exact():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["model.backbone.norm=frozen_bn", "model.backbone.freeze_at=2"])
    bottom_up = build_model(cfg).bottom_up
    for m in bottom_up.modules():  # non-trivial statistics and affine parameters
        if hasattr(m, "running_var"):
            for buf, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.5, 0.5),
                                ("running_var", 0.5, 2.0)):
                getattr(m, buf).uniform_(lo, hi)
    bottom_up.eval()
    folded = fold_batchnorm(bottom_up)
    assert count_batchnorms(folded) == 0 and count_batchnorms(bottom_up) == 20  # ResNet-18: 20 BatchNorms
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref, got = bottom_up(x), folded(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4 * float(ref[k].abs().max()), rtol=0)


def test_fold_batchnorm_refuses_batch_statistics():
    torch.manual_seed(0)
    model = build_model(load_config("configs/tiny.yaml"))  # norm: bn
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(model)
