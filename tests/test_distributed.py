"""DDP through torchrun: two CPU processes with the gloo backend run the same training code."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import torch

from dlkunet import distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_process_is_not_distributed(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = distributed.setup("cpu")
    assert not info.distributed and info.is_main and info.world_size == 1
    t = torch.ones(2)
    assert torch.equal(distributed.all_reduce_sum(t, info), torch.ones(2))
    assert distributed.broadcast_object({"a": 1}, info) == {"a": 1}


def test_torchrun_two_cpu_processes(tmp_path):
    from dlkunet.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=2, num_test=1, size=24, depth=3, seed=1)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dlkunet", "train", "--data", str(data), "--output",
           str(out), "--epochs", "1", "--base-width", "4", "--image-size", "24", "--batch-size", "2",
           "--device", "cpu", "--no-progress", "--no-tensorboard"]
    # outside the checkout: from its root, '-m dlkunet' would run the source tree, not the install
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("finished after epoch 1/1") == 1  # rank 0 only reports
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    # 6 slices over 2 ranks with batch 2: each rank steps twice, so the weights did change.
    assert int(ckpt["model"]["stem.conv1.bn.num_batches_tracked"]) == 2
