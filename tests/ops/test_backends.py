"""The backend registry: setting, context manager, environment variable, auto, and errors."""
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dlkunet import ops
from dlkunet.ops import backends, library


def test_set_get_and_context_manager_restore():
    before = ops.get_backend()
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
        assert ops.get_backend() == "torch"
    assert ops.get_backend() == before
    ops.set_backend("torch")
    try:
        assert ops.resolve("cpu", "lka_gate", "inference") == "torch"
    finally:
        ops.set_backend(before)


def test_unknown_backend_name_is_an_error():
    with pytest.raises(ValueError, match="unknown dlkunet backend 'cudnn'"):
        ops.set_backend("cudnn")


def test_explicit_backend_for_a_device_it_does_not_run_on_says_why(monkeypatch):
    monkeypatch.setattr(backends, "_state", {"setting": "cuda", "warned": set()})  # named where it could run
    if ops.availability("cuda", "cpu")[0]:
        pytest.fail("the cuda backend must not claim CPU tensors")
    with pytest.raises(ops.BackendUnavailableError, match="'cuda' is not available: .+"):
        ops.resolve("cpu", "lka_gate", "inference")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_backend_that_cannot_run_here_is_refused_when_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = ops.get_backend()
    for name in ("cuda", "triton"):
        with pytest.raises(ops.BackendUnavailableError, match=rf"'{name}' \(set_backend\) cannot run here: .+"):
            ops.set_backend(name)
        with pytest.raises(ops.BackendUnavailableError, match=rf"'{name}' \(use_backend\) cannot run here: .+"):
            with ops.use_backend(name):
                pytest.fail("the block must not run")
        assert ops.get_backend() == before


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (the [triton] extra)")
def test_triton_under_the_interpreter_is_accepted_when_named(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
        assert ops.availability("triton", "cpu") == (True, "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_backend_named_on_the_command_line_is_refused_before_the_command_runs(capsys):
    from dlkunet.cli import main

    assert main(["--backend", "cuda", "info"]) == 2
    err = capsys.readouterr()
    assert "dlkunet: error: dlkunet backend 'cuda' (set_backend) cannot run here: no CUDA GPU" in err.err
    assert "models" not in err.out, "info must not have run"
    assert ops.get_backend() != "cuda"


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    key = ("cpu", "dwconv_bn_act", "inference")
    monkeypatch.setitem(backends.AUTO_PREFERENCE, key, ("cuda",))  # never available for CPU tensors
    monkeypatch.setattr(backends, "_state", {"setting": "auto", "warned": set()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve(*key) == "torch"
        assert backends.resolve(*key) == "torch"
    messages = [str(w.message) for w in caught if "no fused backend" in str(w.message)]
    assert len(messages) == 1 and "cuda:" in messages[0]


def test_auto_table_covers_every_device_operator_and_mode():
    for device in ("cpu", "cuda"):
        for op in backends.OPERATORS:
            for mode in backends.MODES:
                assert backends.AUTO_PREFERENCE[(device, op, mode)], (device, op, mode)


@pytest.mark.skipif(not ops.availability("cpu", "cpu")[0], reason="cpu backend unavailable")
def test_auto_dispatches_by_whether_gradients_are_needed(monkeypatch):
    monkeypatch.setattr(backends, "_state", {"setting": "auto", "warned": set()})
    monkeypatch.setitem(backends.AUTO_PREFERENCE, ("cpu", "lka_gate", "inference"), ("cpu",))
    monkeypatch.setitem(backends.AUTO_PREFERENCE, ("cpu", "lka_gate", "training"), ("torch",))
    ran = []
    fused = library.lka_gate_forward
    monkeypatch.setattr(library, "lka_gate_forward", lambda *a: ran.append(a[-1]) or fused(*a))
    x = torch.randn(1, 4, 6, 6)
    weights = [torch.randn(4, 1, 5, 5), torch.randn(4), torch.randn(4, 1, 7, 7), torch.randn(4),
               torch.randn(4, 4, 1, 1), torch.randn(4)]
    ops.lka_gate(x, *weights)                                   # nothing needs a gradient
    assert ran == ["cpu"]
    ops.lka_gate(x.requires_grad_(), *weights)                  # training: the reference, not library
    with torch.no_grad():
        ops.lka_gate(x, *weights)                               # no_grad: inference again
    assert ran == ["cpu", "cpu"]


def test_environment_variable_sets_the_default(tmp_path):
    code = "import dlkunet.ops as o; print(o.get_backend())"  # run outside the checkout: the install
    env = dict(os.environ, DLKUNET_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                         check=True)
    assert out.stdout.strip() == "torch"
    env["DLKUNET_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "unknown dlkunet backend 'nonsense'" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_environment_variable_naming_a_backend_that_cannot_run_is_refused_at_import(tmp_path):
    code = "import dlkunet.ops as o; print(o.get_backend())"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DLKUNET_BACKEND"] = "cuda"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0, bad.stdout
    assert "dlkunet backend 'cuda' (DLKUNET_BACKEND) cannot run here: no CUDA GPU" in bad.stderr
    if importlib.util.find_spec("triton") is None:
        return  # triton is not installed: nothing more to check
    env.update(DLKUNET_BACKEND="triton", TRITON_INTERPRET="1")
    good = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert good.returncode == 0 and good.stdout.strip() == "triton", good.stderr


def test_every_backend_reports_availability_with_a_reason():
    for name in ops.BACKENDS:
        ok, why = ops.availability(name)
        assert isinstance(ok, bool)
        assert ok or why, f"{name} is unavailable but gives no reason"
    assert ops.availability("torch") == (True, "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_backends_are_unavailable_for_cuda_tensors_without_a_gpu():
    for name in ("triton", "cuda"):
        ok, why = ops.availability(name, "cuda")
        assert not ok and why


def test_ran_on_names_the_backend_each_operator_ran_on(monkeypatch):
    monkeypatch.setattr(backends, "_ran", {})
    assert backends.ran_on() == "no fused operator ran"
    x = torch.randn(1, 4, 6, 6)
    weights = [torch.randn(4, 1, 5, 5), torch.randn(4), torch.randn(4, 1, 7, 7), torch.randn(4),
               torch.randn(4, 4, 1, 1), torch.randn(4)]
    with ops.use_backend("torch"):
        ops.lka_gate(x, *weights)
    assert backends.ran_on() == "torch for lka_gate on cpu tensors"
    if ops.availability("cpu", "cpu")[0]:
        with ops.use_backend("cpu"):
            ops.lka_gate(x, *weights)
        assert backends.ran_on().startswith("cpu (dlkunet._C "), backends.ran_on()


def test_auto_on_cuda_takes_triton_only_where_the_measured_table_says_it_is_faster(monkeypatch):
    """auto's CUDA inference entries list triton first; the measured table decides per shape, and
    passing triton over for a shape is a choice, not a missing backend (no warning)."""
    key = ("cuda", "lka_gate", "inference")
    assert backends.AUTO_PREFERENCE[key][0] == "triton"
    monkeypatch.setattr(backends, "availability", lambda name, device=None, compile_now=True: (True, ""))
    monkeypatch.setattr(backends, "_state", {"setting": "auto", "warned": set()})
    asked = []

    def measured(op, shape):
        asked.append((op, shape))
        return shape[2] == 96  # "faster" at 96 channels only
    monkeypatch.setattr(backends, "_measured_faster", measured)
    shape96 = (torch.bfloat16, True, 96, 96, 224, 224, (5, 7))
    shape40 = (torch.bfloat16, True, 40, 40, 224, 224, (5, 7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve(*key, shape96) == "triton"
        assert backends.resolve(*key, shape40) == "torch"
    assert not [w for w in caught if "no fused backend" in str(w.message)]
    assert asked == [("lka_gate", shape96), ("lka_gate", shape40)]
    # training never asks the table: the backward kernels were not measured faster anywhere
    assert backends.resolve("cuda", "lka_gate", "training", shape96) == "torch"


def test_measured_faster_is_false_without_a_shape():
    assert backends._measured_faster("lka_gate", None) is False


def test_a_training_forward_never_asks_the_measured_table(monkeypatch):
    """dwconv_bn_act with batch statistics under no_grad is 'inference' to autograd, but the table
    times the eval forward only: auto must not take triton for it on that evidence."""
    from dlkunet.ops import library
    shapes = []
    monkeypatch.setattr(ops, "resolve", lambda device, op, mode, shape=None: shapes.append(shape) or "torch")
    monkeypatch.setattr(ops, "_shape", lambda x, fmt, cout, kernels: ("measured", cout, kernels))
    monkeypatch.setattr(library, "dwconv_bn_act_forward", None)  # never reached: resolve says torch
    x = torch.randn(2, 4, 6, 6)
    p = [torch.randn(4, 1, 3, 3), torch.randn(4), torch.randn(5, 4, 1, 1), torch.randn(5), torch.rand(5) + 0.5,
         torch.randn(5), torch.zeros(5), torch.ones(5)]
    with torch.no_grad():
        ops.dwconv_bn_act(x, *p, training=False)
        ops.dwconv_bn_act(x, *p, training=True)
    assert shapes == [("measured", 5, (3,)), None]
