"""Input checks of the public operators: every user-facing message about bad inputs is written here.

The operators (``dlkunet.ops``) call these before any kernel runs: first the contract every
backend shares (``check_input``, ``check_tensor``, ...), then, once the backend is known,
``check_backend`` for what that backend's kernels take.  The kernels themselves keep only internal
asserts (Triton) and ``DLK_CHECK``s that guard memory (C++), which a caller of ``dlkunet.ops``
never sees fire.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

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


def check_pointwise(op: str, name: str, w: Tensor, cin: int, x: Tensor) -> int:
    """A pointwise weight (Cout, Cin, 1, 1); returns Cout."""
    if not isinstance(w, Tensor) or w.dim() != 4 or tuple(w.shape[1:]) != (cin, 1, 1) or w.shape[0] < 1:
        got = _shape(w) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{op}: {name} must have shape (Cout, {cin}, 1, 1) for x with {cin} channels, got {got}")
    check_tensor(op, name, w, tuple(w.shape), x)
    return w.shape[0]


def check_transposed(op: str, name: str, w: Tensor, cin: int, x: Tensor) -> int:
    """A 2x2 transposed-convolution weight (Cin, Cout, 2, 2); returns Cout."""
    if not isinstance(w, Tensor) or w.dim() != 4 or w.shape[0] != cin or tuple(w.shape[2:]) != (2, 2) \
            or w.shape[1] < 1:
        got = _shape(w) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{op}: {name} must have shape ({cin}, Cout, 2, 2) (nn.ConvTranspose2d(kernel_size=2)) "
                         f"for an input with {cin} channels, got {got}")
    check_tensor(op, name, w, tuple(w.shape), x)
    return w.shape[1]


def check_skip(op: str, skip: Tensor, deep: Tensor) -> None:
    """The encoder's feature map joined to the upsampled ``deep``: same batch, device and dtype."""
    if not isinstance(skip, Tensor) or skip.dim() != 4:
        got = _shape(skip) if isinstance(skip, Tensor) else type(skip).__name__
        raise ValueError(f"{op}: skip must be 4-D (N, C, H, W), got {got}")
    if skip.shape[0] != deep.shape[0]:
        raise ValueError(f"{op}: skip has batch size {skip.shape[0]} but deep has {deep.shape[0]}")
    check_tensor(op, "skip", skip, tuple(skip.shape), deep)


def check_poolable(op: str, x: Tensor) -> None:
    """A 2x2 window needs a map of at least 2x2 (the model pads smaller ones before pooling)."""
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"{op}: x must be at least 2x2 to pool, got shape {tuple(x.shape)}")


def check_batch_statistics(op: str, x: Tensor) -> None:
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"{op}: training-mode batch statistics need more than one value per channel, "
                         f"got x of shape {tuple(x.shape)}")


def check_dilation(op: str, dilation) -> int:
    if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 1:
        raise ValueError(f"{op}: dilation must be a positive integer, got {dilation!r}")
    return int(dilation)


# ---------------------------------------------------------------------------------------------
# What each fused backend accepts beyond the operator contract.  These mirror the kernels' own
# limits; the kernels keep only internal asserts (Triton) and DLK_CHECKs (C++) that guard memory.

_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_DTYPES = {"triton": _HALF_AND_FLOAT, "cuda": _HALF_AND_FLOAT, "cpu": FLOAT_DTYPES}
CPU_MAX_KERNEL = 63          # csrc/cpu/common.h kMaxKernel: the on-stack tap list
MAX_DILATION = 64            # lka_gate in csrc/cpu and csrc/cuda
CUDA_MAX_BATCH = 65535       # grid z
CUDA_MAX_LKA_TILES = 65535   # lka_gate: spatial tiles of its depthwise stage (grid y)
CUDA_MAX_PIXELS = 2 ** 31 - 1 - 1024  # N*H*W in 32-bit pixel indices
CUDA_SHARED_BYTES = 48 * 1024         # without opting in to more
TRITON_MAX_NUMEL = 2 ** 30   # 32-bit offsets, with room for the widest intermediate


def cuda_lka_tile(k0: int, ks: int, dilation: int) -> Tuple[int, int]:
    """(rows, columns) of the cuda backend's depthwise-stage tile (csrc/cuda/common.cuh): 16 rows,
    64 columns for the specialised kernel sizes ((5, 7, 3), (3, 7, 3), (5, 5, 3)), 32 otherwise."""
    specialised = dilation == 3 and (k0, ks) in ((5, 7), (3, 7), (5, 5))
    return 16, 64 if specialised else 32


def cuda_lka_shared_bytes(k0: int, ks: int, dilation: int) -> int:
    """Shared memory of that stage's tile with its halos (lka_stage_smem_bytes)."""
    tile_h, tile_w = cuda_lka_tile(k0, ks, dilation)
    r0, r2 = k0 // 2, dilation * (ks // 2)
    ah, aw = tile_h + 2 * r2, tile_w + 2 * r2
    return 4 * ((ah + 2 * r0) * (aw + 2 * r0) + ah * aw)


def check_backend(op: str, backend: str, x: Tensor, kernels: Sequence[Tuple[str, int]] = (),
                  out_channels: Optional[int] = None, dilation: int = 1) -> None:
    """Whether ``backend``'s kernels take these inputs; a ValueError / TypeError that says what to
    change (or which backend takes them) when they do not.  ``kernels``: (weight name, k) pairs."""
    if backend == "torch":
        return
    dtypes = BACKEND_DTYPES[backend]
    if x.dtype not in dtypes:
        names = ", ".join(str(d)[6:] for d in dtypes)
        raise TypeError(f"{op}: the {backend} backend supports {names}, not {x.dtype}; "
                        "use the torch backend for other dtypes")
    n, c, h, w = x.shape
    cout = c if out_channels is None else out_channels
    if backend == "triton":
        if max(x.numel(), n * cout * h * w) >= TRITON_MAX_NUMEL:
            raise ValueError(f"{op}: tensors of 2**30 or more elements are not supported by the triton backend "
                             f"(x is {_shape(x)}, the output has {cout} channels)")
        return
    if op == "lka_gate" and dilation > MAX_DILATION:
        raise ValueError(f"{op}: the {backend} backend takes dilation up to {MAX_DILATION}, got {dilation}")
    if backend == "cpu":
        for name, k in kernels:
            if k > CPU_MAX_KERNEL:
                raise ValueError(f"{op}: the cpu backend takes kernel sizes up to {CPU_MAX_KERNEL}, "
                                 f"{name} has {k}")
        return
    if n > CUDA_MAX_BATCH:
        raise ValueError(f"{op}: batch size {n} exceeds the cuda backend's limit of {CUDA_MAX_BATCH}")
    if n * h * w > CUDA_MAX_PIXELS:
        raise ValueError(f"{op}: N*H*W = {n * h * w} is too large for the cuda backend's 32-bit pixel indices")
    if op == "lka_gate":
        (_, k0), (_, ks) = kernels
        tile_h, tile_w = cuda_lka_tile(k0, ks, dilation)
        tiles = -(-h // tile_h) * -(-w // tile_w)
        if tiles > CUDA_MAX_LKA_TILES:
            raise ValueError(f"{op}: a {h}x{w} image is {tiles} tiles of {tile_h}x{tile_w} for the cuda backend, "
                             f"more than its {CUDA_MAX_LKA_TILES}; use the torch or triton backend")
        smem = cuda_lka_shared_bytes(k0, ks, dilation)
        if smem > CUDA_SHARED_BYTES:
            raise ValueError(f"{op}: kernel sizes (k0, ks, dilation) = ({k0}, {ks}, {dilation}) need {smem} bytes "
                             f"of shared memory per tile in the cuda backend, more than its {CUDA_SHARED_BYTES}; "
                             "use the torch or triton backend")


def check_eps(op: str, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite non-negative number, got {eps!r}")
