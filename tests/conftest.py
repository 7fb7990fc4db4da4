"""Session-wide test settings.

Without a CUDA GPU the Triton kernels run under Triton's CPU interpreter; TRITON_INTERPRET must be
set before triton is first imported, which is why it is set here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The float32 budget (1e-5) is for IEEE float32: no TF32 in the references or baselines.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (GPU tests are skipped)"
    return [f"torch {torch.__version__}; CUDA GPU: {gpu}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture
def tf32_flag():
    """Sets torch.backends.cudnn.allow_tf32 for one test and restores it (conftest turns it off)."""
    prev = torch.backends.cudnn.allow_tf32
    yield lambda on: setattr(torch.backends.cudnn, "allow_tf32", on)
    torch.backends.cudnn.allow_tf32 = prev
