"""Heads chosen by name (model.roi_heads.box_head / mask_head, mapped to classes in build.py), and the RoIHead
interface for a head that samples the FPN maps itself: a toy mask head with no pooler that reads each level
bilinearly at the RoI's centre (grid_sample) trains and infers through RoIHeads and through the whole model."""
from __future__ import annotations

import contextlib
import math
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.config import load_config
from maskrcnn.model import build
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_head import BoxHead
from maskrcnn.model.mask_head import MaskHead
from maskrcnn.model.maskiou_head import MaskIoUHead
from maskrcnn.model.matcher import Matcher
from maskrcnn.model.poolers import MultiScaleRoIAlign
from maskrcnn.model.roi_heads import RoIHead, RoIHeads
from maskrcnn.model.sampler import BalancedSampler
from conftest import fixture_seed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
K, C = 3, 8
LEVELS, STRIDES = ["p2", "p3", "p4", "p5"], [4, 8, 16, 32]
PAD = (64, 96)


class CentrePointMaskHead(RoIHead):
    """A toy mask head that pools nothing: per RoI it samples every FPN level at the box centre (bilinear,
    grid_sample) and maps the concatenated C-vectors to S x S mask logits per class. Its RoIs, targets, loss and
    inference are the standard mask head's (the mask size is read from the logits)."""

    pooled = False
    wants_features = True

    def __init__(self, *, in_channels: int, num_classes: int, strides: dict[str, int], size: int = 7, **_):
        super().__init__()
        self.strides, self.size, self.num_classes = strides, size, num_classes
        self.aligned, self.soft_targets = True, False  # what MaskHead.targets reads
        self.predictor = nn.Linear(in_channels * len(strides), (num_classes + 1) * size * size)
        self.calls: list[tuple] = []  # what forward was given, for the test

    select, targets, losses = MaskHead.select, MaskHead.targets, MaskHead.losses
    inference_rois, inference = MaskHead.inference_rois, MaskHead.inference
    class_logits, attach_masks = MaskHead.class_logits, MaskHead.attach_masks

    def reset_predictor(self) -> None:
        self.predictor.reset_parameters()

    def forward(self, x, *, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        self.calls.append((x, sorted(features), [len(b) for b in boxes]))
        points = []
        for name, stride in self.strides.items():
            f = features[name]  # [N, C, H, W]
            size = torch.tensor([f.shape[-1], f.shape[-2]], dtype=f.dtype)
            per_image = []
            for i, b in enumerate(boxes):
                centre = (b[:, :2] + b[:, 2:]) / 2 / stride  # [Ri, 2] (x, y) in the level's cells
                grid = centre / size * 2 - 1  # grid_sample's [-1, 1], pixel centres at +0.5 (align_corners=False)
                sampled = F.grid_sample(f[i : i + 1], grid[None, :, None], align_corners=False)  # [1, C, Ri, 1]
                per_image.append(sampled[0, :, :, 0].t())
            points.append(torch.cat(per_image))  # [R, C]
        logits = self.predictor(torch.cat(points, 1))
        return logits.view(-1, self.num_classes + 1, self.size, self.size)


def box_head() -> BoxHead:
    return BoxHead(in_channels=C, resolution=7, fc_dim=16, num_classes=K, box_coder=BoxCoder(weights=(10, 10, 5, 5)),
                   score_thresh=0.0)


def heads_with(mask_head: RoIHead, mask_pooler=None) -> RoIHeads:
    return RoIHeads(in_features=LEVELS, box_pooler=MultiScaleRoIAlign(output_size=7, strides=STRIDES,
                                                                      sampling_ratio=0, aligned=True),
                    box_head=box_head(), matcher=Matcher(high_threshold=0.5, low_threshold=0.5),
                    sampler=BalancedSampler(batch_size_per_image=16, positive_fraction=0.5),
                    mask_pooler=mask_pooler, mask_head=mask_head)


def features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(1, C, PAD[0] // s, PAD[1] // s, generator=g) for n, s in zip(LEVELS, STRIDES)}


def a_target() -> dict:
    masks = torch.zeros(1, *PAD, dtype=torch.uint8)
    masks[0, 10:50, 20:60] = 1
    return {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2]), "masks": masks}


# --------------------------------------------------------------------------------------- heads by name
@pytest.mark.parametrize("name, cls", [("standard", MaskHead), ("maskiou", MaskIoUHead)])
def test_mask_head_is_chosen_by_name(name, cls):
    model = build.build_model(load_config(CONFIG, [f"model.roi_heads.mask_head={name}"]), load_weights=False)
    assert type(model.roi_heads.mask_head) is cls and type(model.roi_heads.box_head) is BoxHead


@pytest.mark.parametrize("key", ["mask_head", "box_head"])
def test_an_unknown_head_name_is_one_line_listing_the_known_ones(key, tmp_path, capsys):
    cfg = load_config(CONFIG, [f"model.roi_heads.{key}=pointrend"])
    known = ", ".join(build.MASK_HEADS if key == "mask_head" else build.BOX_HEADS)
    with pytest.raises(ValueError, match=f"model.roi_heads.{key}: unknown head 'pointrend' \\(known: {known}\\)"):
        build.build_model(cfg, load_weights=False)
    import train

    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(["--config", str(CONFIG), "--no-progress", "--set", f"train.output_dir={tmp_path}",
                    f"model.roi_heads.{key}=pointrend"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "unknown head 'pointrend'" in err, err


def test_a_pooled_head_needs_a_pooler():
    with pytest.raises(ValueError, match="mask head pools its RoIs"):
        heads_with(MaskHead(in_channels=C, conv_dim=8, num_convs=1, num_classes=K))


# ---------------------------------------------------------------------------- a head that samples the maps
HALVE_MAX_STEPS = 100  # seen: 22-23 steps (seeds 0-2 at 2 and 1 threads, and ATen scalar kernels; AVX2 CPU): 4x


@pytest.mark.trains
def test_a_head_that_samples_the_fpn_maps_trains_and_infers_through_roi_heads(margin):
    torch.manual_seed(fixture_seed())
    head = CentrePointMaskHead(in_channels=C, num_classes=K, strides=dict(zip(LEVELS, STRIDES)))
    heads = heads_with(head).train()
    feats, target = features(), a_target()
    proposals = [torch.tensor([[18.0, 12.0, 58.0, 52.0], [0.0, 0.0, 30.0, 20.0]])]
    opt = torch.optim.SGD(heads.parameters(), lr=0.5)
    first, halved_at = None, math.inf
    for step in range(HALVE_MAX_STEPS + 1):
        _, losses = heads(feats, proposals, [PAD], [target])
        first = losses["loss_mask"].item() if first is None else first
        if losses["loss_mask"].item() < 0.5 * first:
            halved_at = step
            break
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    x, names, counts = head.calls[0]
    assert x is None and names == LEVELS and sum(counts) >= 1  # no pooled features: the maps and its RoIs
    # it learns the mask from what it samples: trained until its mask loss halves, within HALVE_MAX_STEPS
    margin.check("SGD steps until the toy head's mask loss halves", halved_at, "<=", HALVE_MAX_STEPS)
    heads.eval()
    dets, _ = heads(feats, proposals, [PAD])
    assert len(dets[0]["boxes"]) > 0 and dets[0]["masks"].shape == (len(dets[0]["boxes"]), 1, 7, 7)
    with torch.no_grad():  # it reads the maps: other maps, other masks for the same boxes
        same = head(None, features=feats, boxes=[dets[0]["boxes"]])
        other = head(None, features=features(seed=1), boxes=[dets[0]["boxes"]])
    assert not torch.allclose(same, other)


def test_the_sample_is_bilinear_at_the_box_centre():
    """The toy's feature for a box centred on a cell centre of a level is that cell's vector."""
    head = CentrePointMaskHead(in_channels=C, num_classes=K, strides={"p3": 8})
    f = features()
    head.predictor = nn.Identity()  # the sampled vectors themselves
    head.num_classes, head.size = C - 1, 1  # viewed as [R, C, 1, 1]
    boxes = [torch.tensor([[24.0, 16.0, 32.0, 24.0], [24.0, 16.0, 36.0, 24.0]])]  # centres (28, 20), (30, 20) px
    out = head(None, features=f, boxes=boxes)[:, :, 0, 0]
    assert torch.allclose(out[0], f["p3"][0, :, 2, 3], atol=1e-6)  # cell (x 3, y 2)'s centre: that cell
    halfway = 0.75 * f["p3"][0, :, 2, 3] + 0.25 * f["p3"][0, :, 2, 4]  # a quarter cell to the right
    assert torch.allclose(out[1], halfway, atol=1e-6)


def test_a_head_that_samples_the_maps_runs_in_the_whole_model(monkeypatch):
    """Named in the config once it is in MASK_HEADS: build_model gives it the strides, no pooler, and the whole
    model computes its losses, their gradients reach it, and it infers."""
    monkeypatch.setitem(build.MASK_HEADS, "centre_point", CentrePointMaskHead)
    cfg = load_config(CONFIG, ["model.roi_heads.mask_head=centre_point"])
    torch.manual_seed(0)
    model = build.build_model(cfg, load_weights=False).train()
    assert model.roi_heads.mask_pooler is None
    assert model.roi_heads.mask_head.strides == dict(zip(LEVELS, STRIDES))
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model([image], [target])
    assert set(losses) >= {"loss_mask", "loss_cls"} and torch.isfinite(losses["loss_mask"])
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([image])[0]
    assert out["masks"].shape[-2:] == image.shape[-2:]
