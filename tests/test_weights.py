"""Tests for loading torchvision's weight files from torch.hub's cache (model.backbone.fetch_torchvision_weights):
a file there may have been placed by hand, so it is hash-checked against its name and unpickled weights-only."""
from __future__ import annotations

import contextlib
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from maskrcnn.model.backbone import WeightsUnavailable, fetch_torchvision_weights, load_pretrained

R18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code run by loading the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.running_var": torch.rand(4) + 0.5}


def _fetch():
    return fetch_torchvision_weights(R18, "ImageNet weights for ResNet-18", ", or set model.backbone.weights=none")


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_file_that_would_run_code_is_refused_unrun(offline_hub, tmp_path, container):
    marker = tmp_path / "code-ran"
    src = tmp_path / "evil.pth"
    payload = {"conv1.weight": torch.zeros(1), "x": _WritesMarker(marker)}
    if container == "torch.save":
        torch.save(payload, src)
    else:
        src.write_bytes(pickle.dumps(payload, protocol=2))
    evidence = tmp_path / "evil-copy.pth"
    evidence.write_bytes(src.read_bytes())
    filename = offline_hub.place_file(R18, src)  # its name's hash matches: only the unpickling can stop it

    with pytest.raises(WeightsUnavailable) as info:
        _fetch()
    msg = str(info.value)
    assert "\n" not in msg and filename in msg and "not a plain state dict" in msg
    assert not marker.exists()
    # The payload is real: unpickled the way torch.hub does it (weights_only=False), it runs (a bare pickle
    # is then rejected as not a torch file, after its first object was unpickled).
    with contextlib.suppress(RuntimeError):
        torch.load(evidence, weights_only=False)
    assert marker.exists()


def test_hash_mismatch_is_refused(offline_hub):
    filename = offline_hub.place(R18, _state())
    path = offline_hub.checkpoints / filename
    other = _state()
    other["conv1.weight"][0, 0, 0, 0] += 1.0
    torch.save(other, path)  # same name, other bytes: a truncated download or the wrong file
    expected = filename.rsplit("-", 1)[1].split(".")[0]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()[: len(expected)]
    assert actual != expected
    with pytest.raises(WeightsUnavailable) as info:
        _fetch()
    msg = str(info.value)
    assert "\n" not in msg
    assert filename in msg and expected in msg and actual in msg and "delete it" in msg


@pytest.mark.parametrize("zipfile", [True, False])  # torchvision's older files predate the zip format
def test_valid_state_dict_with_its_hash_loads(offline_hub, zipfile):
    state = _state()
    filename = offline_hub.place(R18, state, _use_new_zipfile_serialization=zipfile)
    loaded, name = _fetch()
    assert name == filename
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v)


def test_not_a_dict_of_tensors_is_refused(offline_hub):
    filename = offline_hub.place(R18, {"conv1.weight": torch.zeros(1), "epoch": 3})  # weights-only, not weights
    with pytest.raises(WeightsUnavailable, match="not a plain state dict") as info:
        _fetch()
    assert "\n" not in str(info.value) and filename in str(info.value)


def test_offline_without_file_is_one_line(offline_hub, r18_net):
    """Offline with no file in the cache: one line naming the file, that it could not be downloaded, where to
    place it, and how to train without it; nothing is left in the cache and the network is unchanged."""
    filename = R18.url.rsplit("/", 1)[-1]
    before = {k: v.clone() for k, v in r18_net.state_dict().items()}
    with pytest.raises(WeightsUnavailable) as info:
        load_pretrained(r18_net, "imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert filename in msg and str(offline_hub.checkpoints / filename) in msg and "could not be downloaded" in msg
    assert "model.backbone.weights=none" in msg
    assert not (offline_hub.checkpoints / filename).exists()
    assert all(torch.equal(v, before[k]) for k, v in r18_net.state_dict().items())


def test_missing_file_is_downloaded_into_the_cache_with_its_hash(offline_hub, monkeypatch, tmp_path):
    """Online: torch.hub's downloader is asked for the URL, the cache path and the name's hash prefix; what it
    wrote there is then loaded like any cached file."""
    state = _state()
    filename = offline_hub.place(R18, state)
    served = tmp_path / "served.pth"
    (offline_hub.checkpoints / filename).rename(served)  # on the "server", not in the cache
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(served.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    loaded, _ = _fetch()
    assert calls == [(R18.url, str(offline_hub.checkpoints / filename), filename.split("-")[1].split(".")[0])]
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
    _fetch()  # cached now: no second download
    assert len(calls) == 1


@pytest.fixture
def r18_net():
    from maskrcnn.model.backbone import ResNetBottomUp
    return ResNetBottomUp(depth=18, norm="frozen_bn", freeze_at=2)


def test_local_backbone_weights_file_is_loaded_weights_only(tmp_path, r18_net):
    """model.backbone.weights=<path>: a state dict, or a checkpoint holding one under "model", loads; a file
    that would run code, or one that is not weights, is refused with one line naming it, and nothing runs."""
    state = {k: v + 1 for k, v in r18_net.state_dict().items()}
    for i, saved in enumerate([state, {"model": state, "iteration": 3}]):
        path = tmp_path / f"ok{i}.pth"
        torch.save(saved, path)
        assert load_pretrained(r18_net, str(path)) == str(path)
        assert torch.equal(r18_net.state_dict()["conv1.weight"], state["conv1.weight"])
    marker = tmp_path / "code-ran"
    (tmp_path / "notes.pth").write_text("not weights\n")
    for name, payload, problem in [
            ("evil.pth", {"conv1.weight": torch.zeros(1), "x": _WritesMarker(marker)}, "not a plain state dict"),
            ("list.pth", [torch.zeros(1)], "not a plain state dict"),
            ("notes.pth", None, "not a PyTorch weights file")]:
        if payload is not None:
            torch.save(payload, tmp_path / name)
        with pytest.raises(WeightsUnavailable, match=problem) as info:
            load_pretrained(r18_net, str(tmp_path / name))
        msg = str(info.value)
        assert "\n" not in msg and name in msg and "model.backbone.weights" in msg
    assert not marker.exists()
