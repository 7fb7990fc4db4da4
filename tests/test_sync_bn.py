"""--sync-bn: two gloo processes on CPU end with the weights one process gets from the whole batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sync_bn_worker as worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn") / "states.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(worker.__file__)), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _whole_batch(backend):
    net = worker.model()
    x, y = worker.batch()
    worker.steps(net, x, y, backend)
    return net.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sync_bn_matches_one_process_on_the_whole_batch(two_process_results, backend):
    if f"{backend}-sync" not in two_process_results:
        pytest.skip(f"the {backend} backend is not built here")
    expected = _whole_batch("torch")
    got = two_process_results[f"{backend}-sync"]
    for key, value in expected.items():
        # Two processes sum the same terms in another order (half-batch convolution gradients,
        # all-reduced statistics): float32 rounding, so PyTorch's float32 defaults (rtol 1.3e-6,
        # atol 1e-5) for values of order 1 after two SGD steps.
        torch.testing.assert_close(got[key], value, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.slow
def test_without_sync_each_process_keeps_its_own_statistics(two_process_results):
    # The check above is not vacuous: the two halves differ, so local statistics give other weights.
    expected = _whole_batch("torch")
    local = two_process_results["torch-local"]
    worst = max((local[k].float() - expected[k].float()).abs().max().item() for k in expected
                if expected[k].is_floating_point())
    assert worst > 1e-2, worst
