"""LatentNoise at each site (model.noise.site): after the bottom-up pathway, after the FPN, or on the pooled RoI
features; applied where configured and nowhere else, levels checked against the site when the model is built,
and every site trains, draws its features view and its TensorBoard picture."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from maskrcnn.config import load_config
from maskrcnn.model.build import build_model
from maskrcnn.model.mask_rcnn import NOISE_SITES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["model.transform.min_size_train=[64]", "model.transform.max_size_train=96",
         "model.transform.min_size_test=64", "model.transform.max_size_test=96"]


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 80, 100, generator=g), torch.rand(3, 90, 70, generator=g)]
    targets = []
    for h, w in ((80, 100), (90, 70)):
        boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 20.0, 65.0, 75.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def pair(site: str, *sets: str):
    """The same weights built twice: without noise and with it at `site`."""
    models = []
    for enabled in (False, True):
        torch.manual_seed(0)
        cfg = load_config(CONFIG, ["stage=full", *SMALL, f"model.noise.enabled={str(enabled).lower()}",
                                   f"model.noise.site={site}", "model.noise.seed=1", *sets])
        models.append(build_model(cfg).train())
    return models


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("site", NOISE_SITES)
def test_noise_is_applied_at_its_site_and_nowhere_else(site):
    clean, noisy = pair(site)
    images, targets = batch()
    torch.manual_seed(3)
    a = clean.probe(images, targets)
    torch.manual_seed(3)
    b = noisy.probe(images, targets)
    assert b["noise"]["site"] == site and b["noise"]["active"] and a["noise"]["active"] is False
    changed = [k for k in b["noise"]["before"] if not torch.equal(b["noise"]["before"][k], b["noise"]["after"][k])]
    assert same(a["bottom_up"], b["bottom_up"])  # upstream of every site
    if site == "bottom_up":
        assert changed == ["c5"] and noisy.noise.levels == ("c5",)  # the site's default: uniform_c5_per_position
        assert not torch.equal(a["noisy"]["c5"], b["noisy"]["c5"])
        assert all(torch.equal(a["noisy"][k], b["noisy"][k]) for k in ("c2", "c3", "c4"))
    else:
        assert same(a["noisy"], b["noisy"])  # nothing before the FPN
    if site == "fpn":
        assert sorted(changed) == ["p2", "p3", "p4", "p5", "p6"]  # default: every output of the site
        assert same(b["noise"]["before"], a["fpn"]) and same(b["noise"]["after"], b["fpn"])
    if site == "roi":
        assert sorted(changed) == ["box", "mask"] and same(a["fpn"], b["fpn"])  # the maps the RPN sees: clean
        assert same(a["noise"]["before"], b["noise"]["before"])  # the same RoIs pooled
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a["proposals"], b["proposals"]))
    assert not all(torch.equal(a["output"][k], b["output"][k]) for k in a["output"])  # the losses see it


def test_levels_are_checked_against_the_site():
    for site, levels, outputs in (("fpn", "[c5]", "p2, p3, p4, p5, p6"), ("roi", "[p5]", "box, mask"),
                                  ("bottom_up", "[p5]", "c2, c3, c4, c5")):
        cfg = load_config(CONFIG, [f"model.noise.site={site}", f"model.noise.levels={levels}"])
        with pytest.raises(ValueError, match=rf"model.noise.levels \[.*\] are not outputs of the {site} site.*"
                                             rf"\({outputs}\)"):
            build_model(cfg)
    cfg = load_config(CONFIG, ["model.noise.site=roi", "model.noise.levels=[mask]"])
    assert build_model(cfg).noise.levels == ("mask",)
    with pytest.raises(ValueError, match="model.noise.site: expected one of bottom_up, fpn, roi"):
        build_model(load_config(CONFIG, ["model.noise.site=rpn"]))
    with pytest.raises(ValueError, match="no outputs at the roi site in an rpn-stage model"):
        build_model(load_config(CONFIG, ["stage=rpn", "model.noise.site=roi", "model.noise.enabled=true"]))


@pytest.mark.parametrize("site", NOISE_SITES)
def test_every_site_trains_with_feature_noise(tmp_path, site):
    """train.py --feature-noise at each site: a few steps, finite losses, the site in the run's config, and the
    step's TensorBoard picture of the noise (vis_period)."""
    summary = train.main(["--config", CONFIG, "--stage", "full", "--feature-noise", "--name", site, "--no-progress",
                          "--set", f"train.output_dir={tmp_path}", *SMALL, f"model.noise.site={site}",
                          "solver.max_iter=3", "train.eval_at_end=false", "train.vis_period=3",
                          "train.precise_bn_iters=0"])
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["loss_end"].values())
    cfg = load_config(tmp_path / site / "config.yaml")
    assert cfg.model.noise.site == site and cfg.model.noise.enabled
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / site))
    acc.Reload()
    assert "vis/features" in acc.Tags()["images"]


def test_a_wrong_level_is_one_line_from_train_py(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", CONFIG, "--feature-noise", "--name", "bad", "--no-progress", "--set",
                    f"train.output_dir={tmp_path}", "model.noise.site=fpn", "model.noise.levels=[c5]"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.noise.levels ['c5'] are not outputs of the fpn site" in err
