"""The command line: help texts, exit codes and one-line errors for bad input."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from dlkunet.checkpointing import atomic_save, make_checkpoint
from dlkunet.cli import build_parser, main
from dlkunet.models import build_model


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["demo"], ["info"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: dlkunet" in capsys.readouterr().out


def test_train_help_names_the_paper_settings(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--loss", "--resume", "--lr-gamma", "--precision", "--base-width", "--image-size"):
        assert flag in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dlkunet", "--version"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # the install, not the checkout beside it
    assert done.returncode == 0 and done.stdout.startswith("dlkunet ")


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dlkunet: error: ")
    return err[-1]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert "data directory not found" in _error(
        ["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run"), "--epochs", "1"], capsys)
    # evaluate and predict check their data before the checkpoint (issue 17), so the data here is real.
    from dlkunet.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=1, num_test=1, size=16, depth=2, num_classes=3)
    assert "checkpoint not found" in _error(
        ["evaluate", str(tmp_path / "missing.pt"), "--data", str(data)], capsys)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "junk.pt is not a dlkunet checkpoint" in _error(
        ["predict", str(tmp_path / "junk.pt"), str(data / "test_vol_h5"), "--output", str(tmp_path / "o")], capsys)
    assert "fp16 needs CUDA" in _error(["train", "--device", "cpu", "--precision", "fp16", "--output",
                                        str(tmp_path / "r2"), "--data", str(tmp_path)], capsys)


def test_mismatched_classes_from_the_cli(tmp_path, capsys):
    from dlkunet.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=1, num_test=1, size=16, depth=2, num_classes=3)
    atomic_save(make_checkpoint(build_model("S", num_classes=5, base_width=4), {"image_size": 16}),
                tmp_path / "m.pt")
    message = _error(["evaluate", str(tmp_path / "m.pt"), "--data", str(data), "--output", str(tmp_path / "e"),
                      "--no-progress"], capsys)
    assert "5 classes" in message and "3" in message


def test_argument_validation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "positive" in capsys.readouterr().err


def test_info_runs(capsys):
    from dlkunet import ops

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    if ops.availability("cpu", "cpu")[0]:  # the thread count and the kernels the cpu backend runs here
        assert "CPU threads: torch" in out and "depthwise rows" in out and "pointwise GEMMs on" in out
    if importlib.util.find_spec("triton") is not None:  # the GPU models the shipped plan table covers
        assert "triton plans: measured on NVIDIA H200 (56 shapes) (tuned_plans.csv)" in out


def test_train_evaluate_predict_end_to_end(tmp_path, capsys):
    from dlkunet.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=1, num_test=1, size=24, depth=3)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), "--epochs", "2", "--stop-after", "1",
                 "--base-width", "4", "--image-size", "24", "--batch-size", "3", "--device", "cpu",
                 "--no-progress", "--no-tensorboard"]) == 0
    assert "resume with --resume" in capsys.readouterr().out
    assert main(["train", "--output", str(run), "--resume", "--no-progress"]) == 0
    assert "finished after epoch 2/2" in capsys.readouterr().out
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    assert main(["evaluate", str(run / "best.pt"), "--data", str(data), "--output", str(tmp_path / "e"),
                 "--no-progress"]) == 0
    assert "| Method | DSC | HD95 |" in capsys.readouterr().out
    assert main(["predict", str(run / "last.pt"), str(data / "test_vol_h5"), "--output", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "p").glob("*.npy.h5"))) == 1
