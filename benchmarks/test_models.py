"""Model-level benchmarks: DLKUNet-S / -M / -L inference and training steps, float32.

``infer``  ``model.eval()`` forward under ``torch.no_grad()``; images/s = batch / median time.
``train``  one optimisation step: zero_grad, forward, cross-entropy against random labels, backward,
           SGD (momentum 0.9) step, ``model.train()``.
``onnxruntime`` / ``openvino`` rows (inference only, CPU): the model exported once per case and run in
that runtime (baselines.py).
Peak memory is torch.cuda.max_memory_allocated on GPUs (model, optimizer state and rotated inputs
included) and the process's peak RSS on CPUs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import baselines
import floors
import harness
import shapes

NUM_CLASSES = 9  # the model's default (Synapse: 8 organs + background)


@pytest.mark.parametrize("mode", shapes.MODEL_MODES)
def test_model(benchmark, bench, model_case, mode, backend):
    bench.require(backend)
    if backend in baselines.BOUNDS:
        pytest.skip("the pointwise-only bound belongs to dwconv_bn_act")
    if backend in baselines.RUNTIMES and mode == "train":
        pytest.skip("the deployment runtimes run inference only")
    if backend == "compile":
        why = shapes.wants_compile(bench.size, model_case.index, None, model=True)
        if why:
            pytest.skip(why)
    c, device = model_case, bench.device
    train = mode == "train"
    net, fn = baselines.model(backend, c.variant, c.base_width, device, bench.size.compile_backend,
                              shape=(c.batch, 1, c.image, c.image))
    net.train(train)
    fmt = baselines.memory_format(backend)

    def make():
        x = torch.randn(c.batch, 1, c.image, c.image, device=device).contiguous(memory_format=fmt)
        labels = torch.randint(0, NUM_CLASSES, (c.batch, c.image, c.image), device=device)
        return x, labels

    set_bytes = c.batch * c.image * c.image * (4 + 8)
    rotation = bench.rotation(make, set_bytes)
    model_floor = floors.model_bytes(net, rotation.sets[0][0], train)
    if train:
        opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

        def target(x, labels):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(fn(x), labels).backward()
            opt.step()
        nbytes = model_floor["train_step"]
    else:
        def target(x, labels):
            with torch.no_grad():
                fn(x)
        nbytes = model_floor["fwd"]
    row = dict(kind="model", op=f"DLKUNet-{c.variant}", backend=backend, mode=mode,
               **{"pass": "step" if train else "fwd"}, dtype="float32", shape=c.shape(),
               params=sum(p.numel() for p in net.parameters()))
    bench.measure(benchmark, target, rotation, row, nbytes)
    row["images_per_s"] = c.batch / (row["median_ms"] * 1e-3)
    benchmark.extra_info["images_per_s"] = row["images_per_s"]
    bench.record.save()
    harness.synchronize(device)
