import pytest

from dlkunet.ops import backends, reference


@pytest.fixture
def reference_kernels_as_fused_backend(monkeypatch):
    """Route the public operators through the torch.library custom ops (the path of every fused
    backend) with the reference formulas as the kernels, so the plumbing is tested everywhere."""
    monkeypatch.setitem(backends._probe_cache, "cpu", (reference, ""))
    monkeypatch.setattr("dlkunet.ops.resolve", lambda device_type, op, mode, shape=None: "cpu")
    yield
