"""One rank of the two-process --sync-bn check (tests/test_sync_bn.py runs it under torchrun, gloo).

Every rank builds the same model, takes its half of one fixed batch and runs two SGD steps under
DDP, once per (backend, sync) setting; rank 0 saves the resulting state_dicts.  ``steps`` is also
used by the test for the single-process run on the whole batch.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlkunet.models import DLKUNetS
from dlkunet.ops import availability, sync_bn, use_backend

# (backend, sync); the C++ cpu backend only where it is built
SETTINGS = [("torch", True), ("torch", False)] + ([("cpu", True)] if availability("cpu", "cpu")[0] else [])
STEPS, LR = 2, 0.1


def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 12, 12, generator=gen)
    x[2:] = x[2:] * 3 + 1  # the two halves differ in distribution, so per-rank statistics differ
    return x, torch.randint(0, 3, (4, 12, 12), generator=gen)


def model():
    torch.manual_seed(0)
    return DLKUNetS(num_classes=3, base_width=4)


def steps(net, x, y, backend):
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for _ in range(STEPS):
        with use_backend(backend):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, y = batch()
    shard = slice(2 * rank, 2 * rank + 2)
    results = {}
    for backend, sync in SETTINGS:
        net = model()
        if sync:
            sync_bn.convert_sync_batchnorm(net)
        else:
            sync_bn.set_process_group(enabled=False)
        steps(torch.nn.parallel.DistributedDataParallel(net), x[shard], y[shard], backend)
        results[f"{backend}-{'sync' if sync else 'local'}"] = net.state_dict()
    sync_bn.set_process_group(enabled=False)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
