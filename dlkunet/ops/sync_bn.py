"""BatchNorm statistics over a whole DDP process group for ``dwconv_bn_act`` (``dlkunet train --sync-bn``).

With DDP each process normalises with the statistics of its own share of the batch; with
synchronisation every process uses those of the whole (global) batch, as ``nn.SyncBatchNorm``
does.  ``nn.SyncBatchNorm`` cannot serve here: the fused operator reads BatchNorm's tensors rather
than calling the module, and PyTorch's synchronised kernels run on GPUs only.  So, while a process
group is set (:func:`set_process_group`, which the trainer calls), ``dlkunet.ops.dwconv_bn_act``
sends training-mode calls to :func:`dwconv_bn_act` below, whatever the backend:

* ``z = pointwise(depthwise(x))`` with PyTorch's convolutions (autograd handles their backward);
* :class:`SyncBatchNormFunction`: forward all-reduces the per-channel sum of z and the element
  count, then the sum of squared deviations from that global mean (two passes, as a single
  process computes the variance, rather than sum-of-squares minus squared mean, which loses
  digits in float32); backward all-reduces the two per-channel sums ``sum(dy)`` and
  ``sum(dy * xhat)``, exactly as ``nn.SyncBatchNorm``'s backward;
* ReLU, and the running statistics updated with the global mean and unbiased variance.

So the synchronised path runs the reference composition (not a fused kernel): correct on any
device, at the reference's speed.  Inference and single-process training are untouched.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import reference

_group: Any = None
_enabled = False

__all__ = ["set_process_group", "active", "dwconv_bn_act", "SyncBatchNormFunction"]


def set_process_group(group: Any = None, enabled: bool = True) -> None:
    """Synchronise the fused BatchNorm over ``group`` (None: the default group); ``enabled=False`` stops."""
    global _group, _enabled
    _group, _enabled = group, bool(enabled)


def active() -> bool:
    """Whether training-mode ``dwconv_bn_act`` calls synchronise now (a group of more than one process)."""
    return _enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size(_group) > 1


def _all_reduce(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_group)
    return tensor


class SyncBatchNormFunction(torch.autograd.Function):
    """``(z - mean) * rsqrt(var + eps) * gamma + beta`` with mean and var over every process's z."""

    @staticmethod
    def forward(ctx, z: Tensor, gamma: Tensor, beta: Tensor, eps: float):
        acc = torch.promote_types(z.dtype, torch.float32)
        zf = z.to(acc)
        local = torch.cat([zf.sum((0, 2, 3)), zf.new_tensor([z.shape[0] * z.shape[2] * z.shape[3]])])
        total = _all_reduce(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = zf - mean.view(1, -1, 1, 1)
        var = _all_reduce((centred * centred).sum((0, 2, 3))) / count
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(1, -1, 1, 1)
        y = xhat * gamma.to(acc).view(1, -1, 1, 1) + beta.to(acc).view(1, -1, 1, 1)
        ctx.save_for_backward(xhat, invstd, gamma)
        ctx.count, ctx.z_dtype = count, z.dtype
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(z.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_y: Tensor, _mean, _var, _count):
        xhat, invstd, gamma = ctx.saved_tensors
        g = grad_y.to(xhat.dtype)
        # This process's parameter gradients; DDP averages them over the processes as for any weight.
        grad_beta = g.sum((0, 2, 3))
        grad_gamma = (g * xhat).sum((0, 2, 3))
        # The batch statistics depend on every process's z: their two sums come from all of them.
        sums = _all_reduce(torch.cat([grad_beta, grad_gamma]))
        channels = grad_beta.numel()
        mean_dy = (sums[:channels] / ctx.count).view(1, -1, 1, 1)
        mean_dy_xhat = (sums[channels:] / ctx.count).view(1, -1, 1, 1)
        grad_z = (gamma.to(g.dtype) * invstd).view(1, -1, 1, 1) * (g - mean_dy - xhat * mean_dy_xhat)
        return grad_z.to(ctx.z_dtype), grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype), None


def dwconv_bn_act(x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor, gamma: Tensor, beta: Tensor,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                  relu: bool) -> Tensor:
    """Training-mode ``dwconv_bn_act`` with the statistics of the whole process group."""
    z = F.conv2d(reference.depthwise_conv(x, w_dw, b_dw), w_pw, b_pw)
    y, mean, var, count = SyncBatchNormFunction.apply(z, gamma, beta, eps)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            n = float(count)
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum * n / max(n - 1, 1))
    return F.relu(y) if relu else y


def convert_sync_batchnorm(module: torch.nn.Module, group: Any = None) -> torch.nn.Module:
    """Synchronise ``module``'s BatchNorm over ``group``: the fused operators through this module,
    any BatchNorm layer that runs its own forward through ``nn.SyncBatchNorm``.

    DLKUNet's BatchNorm2d modules only hold the tensors ``dwconv_bn_act`` reads (their forward
    never runs), so they stay as they are; a model that also calls BatchNorm layers itself gets
    those converted.
    """
    from ..models.blocks import DWConvBNAct

    set_process_group(group)
    held = {id(m.bn) for m in module.modules() if isinstance(m, DWConvBNAct)}
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and id(child) not in held:
            setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child, group))
        elif not isinstance(child, DWConvBNAct):
            convert_sync_batchnorm(child, group)
    return module
