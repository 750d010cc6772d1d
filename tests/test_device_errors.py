"""A device the machine does not have, or a name that is no device, is one line on stderr (`error: ...`, naming
the valid choices) and exit status 2 from every entry point, before any work: no traceback. CUDA is hidden
(torch.cuda.is_available -> False) so that the tests mean the same on a machine with a GPU."""
from __future__ import annotations

import pytest
import torch

import evaluate
import infer
import train
import visualize
from maskrcnn import bench
from maskrcnn.engine.device import DeviceError, select_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _one_line_exit_2(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _checkpoint_file(tmp_path):
    path = tmp_path / "model.pth"  # never opened: the device is checked first
    path.write_bytes(b"not read")
    return str(path)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_evaluate_cuda_without_gpu(no_cuda, tmp_path, capsys, device):
    line = _one_line_exit_2(capsys, evaluate.main, ["--checkpoint", _checkpoint_file(tmp_path), "--device", device,
                                                    "--out", str(tmp_path / "out")])
    assert f"device {device}" in line and "no CUDA device" in line and "auto or cpu" in line
    assert not (tmp_path / "out").exists()


def test_evaluate_unknown_device_names_the_choices(tmp_path, capsys):
    line = _one_line_exit_2(capsys, evaluate.main, ["--checkpoint", _checkpoint_file(tmp_path), "--device", "gpu"])
    assert "'gpu'" in line and "auto, cpu, cuda or cuda:N" in line


def test_infer_cuda_without_gpu(no_cuda, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    line = _one_line_exit_2(capsys, infer.main, ["--checkpoint", _checkpoint_file(tmp_path), "--input", str(image),
                                                 "--device", "cuda", "--out", str(tmp_path / "out")])
    assert "no CUDA device" in line and "auto or cpu" in line
    assert not (tmp_path / "out").exists()


def test_train_cuda_without_gpu(no_cuda, tmp_path, capsys):
    line = _one_line_exit_2(capsys, train.main, ["--config", "configs/tiny.yaml", "--name", "r", "--no-progress",
                                                 "--set", "train.device=cuda", f"train.output_dir={tmp_path}"])
    assert "no CUDA device" in line and "auto or cpu" in line
    assert not (tmp_path / "r").exists()  # no run directory for a run that cannot start


def test_train_unknown_device(tmp_path, capsys):
    line = _one_line_exit_2(capsys, train.main, ["--config", "configs/tiny.yaml", "--name", "r", "--no-progress",
                                                 "--set", "train.device=gpu0", f"train.output_dir={tmp_path}"])
    assert "auto, cpu, cuda or cuda:N" in line


@pytest.mark.parametrize("what", ["dataset", "anchors", "report"])
def test_visualize_cuda_without_gpu(no_cuda, tmp_path, capsys, what):
    line = _one_line_exit_2(capsys, visualize.main, [what, "--device", "cuda", "--out", str(tmp_path / "vis")])
    assert "no CUDA device" in line and "auto or cpu" in line


def test_visualize_unknown_device(tmp_path, capsys):
    line = _one_line_exit_2(capsys, visualize.main, ["dataset", "--device", "nvidia", "--out", str(tmp_path)])
    assert "'nvidia'" in line and "auto, cpu, cuda or cuda:N" in line


def test_select_device(no_cuda):
    assert select_device("auto") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "", "mps:0:1"):
        with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
            select_device(bad)
    with pytest.raises(DeviceError, match="no CUDA device"):
        select_device("cuda:0")


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_bench_device_errors(no_cuda, capsys, device):
    line = _one_line_exit_2(capsys, bench.main, ["--device", device, "--quick"])
    assert ("no CUDA device" in line) if device == "cuda" else ("auto, cpu, cuda or cuda:N" in line)


def test_bench_unknown_recompute_stage(capsys):
    line = _one_line_exit_2(capsys, bench.main, ["--recompute", "layer2,res3", "--quick"])
    assert "unknown stage(s) ['res3']" in line and "layer1" in line


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_bench_profile_device_errors(no_cuda, capsys, device):
    from maskrcnn import bench_profile

    line = _one_line_exit_2(capsys, bench_profile.main, ["--device", device, "--depth", "18"])
    assert ("no CUDA device" in line) if device == "cuda" else ("auto, cpu, cuda or cuda:N" in line)
