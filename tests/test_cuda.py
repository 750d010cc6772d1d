"""The GPU path: one mixed-precision training step and inference on CUDA (skipped without a GPU), and the
channels-last memory format (train.channels_last), which also runs on CPU."""
from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.model.build import build_model
from maskrcnn.config import load_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _batch(device: torch.device, sizes=((128, 160), (144, 128)), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in sizes:
        images.append(torch.rand(3, h, w, generator=g).to(device))
        boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [50.0, 40.0, 120.0, 110.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 12:80, 10:70] = 1
        masks[1, 40:110, 50:120] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.tensor([1, 2]).to(device),
                        "masks": masks.to(device)})
    return images, targets


def _train_step(model, images, targets, device: torch.device, amp: bool) -> dict[str, float]:
    """As engine.Trainer does it: autocast fp16 forward, GradScaler backward and step."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        losses = model(images, targets)
    loss = sum(v.float() for v in losses.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return {k: v.item() for k, v in losses.items()}


def _tiny(impl: str = "ours"):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", [f"model.roi_heads.roi_align_impl={impl}"])
    return build_model(cfg)


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", ["ours", "torchvision"])
def test_cuda_amp_training_step_and_inference(channels_last, impl):
    device = torch.device("cuda")
    model = _tiny(impl).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, targets = _batch(device)
    losses = _train_step(model, images, targets, device, amp=True)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    assert all(math.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.float16):
        out = model(images)
    for det, img in zip(out, images):
        assert det["boxes"].device.type == "cuda"
        assert det["masks"].shape[-2:] == img.shape[-2:]
        assert torch.isfinite(det["boxes"]).all() and torch.isfinite(det["scores"]).all()
    torch.cuda.synchronize()


@cuda
def test_cuda_matches_cpu_in_fp32():
    """Same weights, same images: CUDA and CPU give the same detections (fp32, no autocast)."""
    model = _tiny().eval()
    images, _ = _batch(torch.device("cpu"))
    with torch.no_grad():
        cpu = model(images)
        gpu = model.to("cuda")([img.cuda() for img in images])
    for a, b in zip(cpu, gpu):
        assert a["boxes"].shape == b["boxes"].shape
        torch.testing.assert_close(b["boxes"].cpu(), a["boxes"], atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(b["scores"].cpu(), a["scores"], atol=1e-3, rtol=1e-3)


def test_channels_last_gives_the_same_model_on_cpu():
    """train.channels_last only changes the memory format: same detections, and a training step runs."""
    model = _tiny().eval()
    images, targets = _batch(torch.device("cpu"))
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        assert model.bottom_up.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        got = model(images)
    for a, b in zip(got, expected):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(a["masks"], b["masks"], atol=1e-4, rtol=1e-4)
    losses = _train_step(model, images, targets, torch.device("cpu"), amp=False)
    assert all(math.isfinite(v) for v in losses.values()), losses
