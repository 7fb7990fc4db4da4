"""Input checks shared by the public operators: clear Python errors before any kernel runs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def check_input(op: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{op}: x is empty (shape {_shape(x)}); N, C, H and W must all be >= 1")


def check_tensor(op: str, name: str, t: Tensor, shape: Sequence[int], x: Tensor,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        expected = "x".join(str(s) for s in shape)
        raise ValueError(f"{op}: {name} must have shape {expected} for x of shape {_shape(x)}, got {_shape(t)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    allowed = tuple(dtypes) if dtypes is not None else (x.dtype,)
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in dict.fromkeys(allowed))
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but must be {names} (x is {x.dtype})")


def check_depthwise(op: str, name: str, w: Tensor, channels: int, x: Tensor) -> int:
    """A depthwise weight (C, 1, k, k) with k odd; returns k."""
    if not isinstance(w, Tensor) or w.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-D depthwise weight (C, 1, k, k)")
    k = w.shape[-1]
    if w.shape[-2] != k:
        raise ValueError(f"{op}: {name} must have a square kernel, got {w.shape[-2]}x{k}")
    if k % 2 == 0:
        raise ValueError(f"{op}: {name} has an even kernel size {k}; only odd sizes keep H x W (k//2 padding)")
    if w.shape[0] != channels:
        raise ValueError(f"{op}: {name} has {w.shape[0]} channels but x has {channels} (channel mismatch)")
    check_tensor(op, name, w, (channels, 1, k, k), x)
    return k
