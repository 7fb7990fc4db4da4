"""Triton kernels for dlkunet's fused operators, installed as ``dlkunet.kernels``: the ``triton``
backend.  The four entry points follow the contract in ``dlkunet.ops.reference``.

Importing this module without Triton raises ImportError, which the backend registry reports as
"backend unavailable".  Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
(which must be set before this module is first imported).
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"the triton backend needs the 'triton' package ({exc}); "
                      "install it with `pip install triton` (Linux, NVIDIA GPU)") from exc

from .dwconv_bn_act import dwconv_bn_act_backward, dwconv_bn_act_forward
from .lka_gate import lka_gate_backward, lka_gate_forward

__all__ = ["dwconv_bn_act_forward", "dwconv_bn_act_backward", "lka_gate_forward", "lka_gate_backward"]
