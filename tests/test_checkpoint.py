"""Checkpoints: weights-only loading (no code runs), the explicit upgrade of older checkpoints, atomic writes
that survive a full disk, the newest K kept, and run directories that are not silently reused."""
from __future__ import annotations

import errno
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from maskrcnn.config import Config, load_config
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.checkpoint import (CheckpointWriteError, load_checkpoint, model_from_checkpoint,
                                        save_checkpoint)

TINY = ["--config", "configs/tiny.yaml", "--stage", "rpn", "--no-progress"]


def _train(tmp_path, name, *sets, extra=()):
    return train.main(TINY + ["--name", name, *extra, "--set", f"train.output_dir={tmp_path}",
                              "train.eval_at_end=false", "train.precise_bn_iters=0", *sets])


def _one_line_exit(capsys, argv, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    _train(tmp, "r", "solver.max_iter=5", "train.checkpoint_period=1", "train.keep_checkpoints=2")
    return tmp / "r"


# ------------------------------------------------------------------------------------------ format
def test_checkpoint_is_weights_only_with_config_and_rng(run):
    raw = torch.load(run / "last_checkpoint.pth", map_location="cpu", weights_only=True)  # no code can run
    assert isinstance(raw["config"], str) and raw["format"] == ckpt.FORMAT
    assert set(raw["rng"]) == {"python", "numpy", "torch", "cuda", "noise"}
    assert set(raw["data"]) == {"epoch", "index", "seed", "batches_per_epoch"}
    assert raw["history"]["total_loss"].shape == (5,) and raw["iteration"] == 5 and raw["final"]
    state = load_checkpoint(run / "last_checkpoint.pth")
    assert isinstance(state["config"], Config) and state["config"] == load_config(run / "config.yaml")
    assert isinstance(state["class_names"], list) and state["class_names"][0] == "__background__"
    final = load_checkpoint(run / "model_final.pth")
    assert "optimizer" not in final and "rng" not in final and isinstance(final["config"], Config)
    model, cfg = model_from_checkpoint(run / "model_final.pth")
    assert cfg.stage == "rpn" and model.class_names == state["class_names"]


def test_fold_bn_gives_the_same_features_without_batchnorm(run, count_batchnorms):
    """evaluate.py and infer.py load with fold_bn=True: no BatchNorm left, the same FPN features."""
    plain, _ = model_from_checkpoint(run / "model_final.pth")
    folded, _ = model_from_checkpoint(run / "model_final.pth", fold_bn=True)
    assert count_batchnorms(plain) > 0 and count_batchnorms(folded) == 0
    images = [torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        a, b = plain.features(images)[2], folded.features(images)[2]
    for level in a:  # float rounding of another summation order (folded weights, channels-last kernels): seen up
        # to 1.2e-5 (one element of 40960); a fold that lost or doubled a BatchNorm is off by the features' own scale
        torch.testing.assert_close(b[level], a[level], rtol=1e-4, atol=1e-3 * a[level].abs().max().item())
    # test.channels_last: auto (the default) follows the CPU; true and false choose
    from maskrcnn.model.fuse import inference_channels_last

    weight = folded.bottom_up.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == inference_channels_last("auto", "cpu")
    for setting in ("true", "false"):
        chosen, _ = model_from_checkpoint(run / "model_final.pth", overrides=[f"test.channels_last={setting}"],
                                          fold_bn=True)
        weight = chosen.bottom_up.conv1.weight
        assert (weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()) == \
            (setting == "true")
    # test.winograd: auto follows the CPU (the features above were compared with it); true and false choose
    from maskrcnn.model.fuse import resolve_winograd
    from maskrcnn.model.winograd import WinogradConv2d

    def winograd_convs(model):
        return sum(isinstance(m, WinogradConv2d) for m in model.modules())

    assert (winograd_convs(folded) > 0) == resolve_winograd("auto", "cpu") and winograd_convs(plain) == 0
    for setting in ("true", "false"):
        chosen, _ = model_from_checkpoint(run / "model_final.pth", overrides=[f"test.winograd={setting}"], fold_bn=True)
        assert (winograd_convs(chosen) > 0) == (setting == "true")


@pytest.mark.parametrize("capability, expected", [("AVX2", True), ("AVX512", True), ("DEFAULT", False),
                                                  ("SVE256", False)])
@pytest.mark.parametrize("rule", ["inference_channels_last", "resolve_winograd"])
def test_channels_last_and_winograd_only_where_they_were_measured_to_gain(monkeypatch, capability, expected, rule):
    """test.channels_last and test.winograd / train.winograd: auto follows the CPU, never CUDA; true and false as
    given; any other value (e.g. the benchmark's "never") is an error, not "true"."""
    from maskrcnn.model import fuse

    resolve = getattr(fuse, rule)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve("auto", "cpu") is expected
    assert resolve("auto", "cuda") is False
    assert resolve(True, "cpu") is True and resolve(False, "cpu") is False
    with pytest.raises(ValueError, match="never"):
        resolve("never", "cpu")


def test_keeps_the_newest_k_and_last_is_the_newest(run):
    assert sorted(p.name for p in run.glob("model_*.pth")) == ["model_0000004.pth", "model_0000005.pth",
                                                               "model_final.pth"]
    assert load_checkpoint(run / "model_0000004.pth")["iteration"] == 4
    last, newest = run / "last_checkpoint.pth", run / "model_0000005.pth"
    assert last.read_bytes() == newest.read_bytes()
    assert not list(run.glob("*.tmp"))


def test_keep_zero_writes_only_last_checkpoint(tmp_path):
    _train(tmp_path, "k0", "solver.max_iter=2", "train.checkpoint_period=1", "train.keep_checkpoints=0")
    assert sorted(p.name for p in (tmp_path / "k0").glob("*.pth")) == ["last_checkpoint.pth", "model_final.pth"]


def test_save_refuses_what_would_need_code_to_load(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['config'\] \(maskrcnn.config.Config\)"):
        save_checkpoint({"model": {}, "config": Config()}, tmp_path / "x.pth")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- unsafe files
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Payload()}, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "not a weights-only checkpoint" in msg and "posix.system" in msg and "--trust" in msg
    assert "\n" not in msg and not (tmp_path / "pwned").exists()


def _old_style_checkpoint(run: Path, path: Path) -> dict:
    """A checkpoint as this project wrote them before: the Config object itself, pickled."""
    state = load_checkpoint(run / "model_final.pth")
    old = {"model": state["model"], "iteration": 5, "config": state["config"], "stage": "rpn",
           "class_names": tuple(state["class_names"])}
    torch.save(old, path)
    return state


def test_older_checkpoint_is_refused_then_upgraded_explicitly(run, tmp_path, capsys):
    path = tmp_path / "old.pth"
    state = _old_style_checkpoint(run, path)
    with pytest.raises(ValueError, match="maskrcnn.config.Config object") as e:
        load_checkpoint(path)
    assert f"python -m maskrcnn.engine.checkpoint upgrade {path} --trust" in str(e.value)
    # Through a command that uses the checkpoint: one line, exit 2.
    err = _one_line_exit(capsys, ["--name", "x", "--init", str(path)] + TINY + ["--set",
                                                                                 f"train.output_dir={tmp_path}"])
    assert "not a weights-only checkpoint" in err and "upgrade" in err

    with pytest.raises(SystemExit) as e:  # without --trust: refused, the file untouched
        ckpt.main(["upgrade", str(path)])
    assert e.value.code == 2 and "--trust" in capsys.readouterr().err
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    ckpt.main(["upgrade", str(path), "--trust"])
    out = capsys.readouterr()
    assert "could run code" in out.err and "weights-only checkpoint written" in out.out
    new = load_checkpoint(path)
    assert new["config"] == state["config"] and new["class_names"] == state["class_names"]
    assert all(torch.equal(new["model"][k], v) for k, v in state["model"].items())
    model, cfg = model_from_checkpoint(path)
    assert cfg.stage == "rpn"
    ckpt.main(["upgrade", str(path)])  # already safe: nothing to do, no --trust needed
    assert "nothing to do" in capsys.readouterr().out


def test_upgrade_command_line(run, tmp_path):
    path = tmp_path / "old.pth"
    _old_style_checkpoint(run, path)
    out = tmp_path / "new.pth"
    done = subprocess.run([sys.executable, "-m", "maskrcnn.engine.checkpoint", "upgrade", str(path), "--trust",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert isinstance(load_checkpoint(out)["config"], Config)
    with pytest.raises(ValueError, match="not a weights-only"):
        load_checkpoint(path)  # --out leaves the original as it was


def _not_a_checkpoint(run: Path, tmp_path: Path) -> dict[str, Path]:
    """Files that are no checkpoint: a real one cut short (a copy interrupted), random bytes, a text file."""
    real = (run / "model_final.pth").read_bytes()
    files = {"truncated": real[:len(real) // 2], "cut-early": real[:5000],
             "random": random.Random(0).randbytes(100_000), "text": b"model_final.pth\n"}
    for name, data in files.items():
        (tmp_path / f"{name}.pth").write_bytes(data)
    return {name: tmp_path / f"{name}.pth" for name in files}


def test_a_file_that_is_no_checkpoint_is_called_so(run, tmp_path, capsys):
    """Not 'holds Python objects ... upgrade --trust' (which cannot help): the file could not be read."""
    for name, path in _not_a_checkpoint(run, tmp_path).items():
        with pytest.raises(ckpt.UnreadableCheckpoint) as e:
            load_checkpoint(path)
        assert str(e.value) == f"{path} could not be read (not a PyTorch checkpoint file)", name
        with pytest.raises(SystemExit) as e:  # upgrade --trust: refused before anything is unpickled
            ckpt.main(["upgrade", str(path), "--trust"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == f"error: {path} could not be read (not a PyTorch checkpoint file)\n"


def test_evaluate_on_a_file_that_is_no_checkpoint_is_one_line(run, tmp_path, capsys):
    import evaluate
    for name, path in _not_a_checkpoint(run, tmp_path).items():
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(path), "--no-progress", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == f"error: {path} could not be read (not a PyTorch checkpoint file)\n", name


# ------------------------------------------------------------------------------------- disk full
def _disk_full_after(monkeypatch, ok_calls: int) -> list:
    """torch.save succeeds `ok_calls` times, then writes part of the file and raises ENOSPC."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= ok_calls:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_failed_write_keeps_previous_checkpoint_and_removes_tmp(tmp_path, monkeypatch):
    path = tmp_path / "last_checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 1}, path)
    before = path.read_bytes()
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    assert e.value.errno == errno.ENOSPC and "intact" in str(e.value)
    assert path.read_bytes() == before and load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint.pth"]


def test_disk_full_during_training_is_one_line_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = _disk_full_after(monkeypatch, 2)  # checkpoints at iterations 1 and 2, the one at 3 fails
    err = _one_line_exit(capsys, TINY + ["--name", "full-disk", "--set", f"train.output_dir={tmp_path}",
                                         "solver.max_iter=5", "train.checkpoint_period=1",
                                         "train.eval_at_end=false"])
    assert len(calls) == 3 and "No space left on device" in err and "intact" in err
    run = tmp_path / "full-disk"
    assert load_checkpoint(run / "last_checkpoint.pth")["iteration"] == 2
    assert not list(run.glob("*.tmp")) and not (run / "model_0000003.pth").exists()


# ------------------------------------------------------------------------------------ run directories
def test_run_directory_of_another_run_is_refused(tmp_path, capsys):
    _train(tmp_path, "taken", "solver.max_iter=1")
    run = tmp_path / "taken"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    err = _one_line_exit(capsys, TINY + ["--name", "taken", "--set", f"train.output_dir={tmp_path}"])
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # untouched
    err = _one_line_exit(capsys, ["--name", "taken", "--resume", "--overwrite", "--set",
                                  f"train.output_dir={tmp_path}"])
    assert "choose one" in err

    summary = _train(tmp_path, "taken", "solver.max_iter=2", extra=["--overwrite"])
    assert summary["iterations"] == 2 and "removed" in capsys.readouterr().out
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the old run's events are gone
    assert load_checkpoint(run / "last_checkpoint.pth")["iteration"] == 2


# ------------------------------------------------------------------------------------------ --init report
def test_init_report_says_per_module_loaded_partly_loaded_not_loaded_or_new():
    """An RPN-stage checkpoint of FPN width 32 into a full model of width 64: the backbone fits, the FPN not at
    all, the RPN head only in its 1x1 convolutions' biases, the RoI heads are new."""
    from maskrcnn.model.build import build_model

    rpn = build_model(load_config("configs/tiny.yaml", ["stage=rpn"]), load_weights=False)
    full = build_model(load_config("configs/tiny.yaml", ["stage=full", "model.fpn.out_channels=64"]),
                       load_weights=False)
    report = ckpt.partial_load(full, rpn.state_dict())
    assert report.modules() == {"bottom_up": ("loaded", ""), "fpn": ("not loaded (shape mismatch)", ""),
                                "rpn.head": ("partly loaded", "2 of 6 tensors; 4 shape mismatch"),
                                "roi_heads.box_head": ("new", ""), "roi_heads.mask_head": ("new", "")}
    lines = report.summary().splitlines()
    assert lines[1:5] == ["  loaded: bottom_up", "  partly loaded: rpn.head (2 of 6 tensors; 4 shape mismatch)",
                          "  not loaded (shape mismatch): fpn", "  new: roi_heads.box_head, roi_heads.mask_head"]
    assert lines[5].startswith("  shape mismatch: fpn.inner_blocks.0.weight (32, 64, 1, 1) -> (64, 64, 1, 1), ")
    assert lines[5].endswith(", ... (12 more)") and len(lines) == 6
