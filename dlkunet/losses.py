"""Losses of the paper's section 4.4: Dice, cross-entropy, and the three weightings of them.

Every combined loss is eq. (10), ``Loss = alpha * DiceLoss + beta * CELoss``: alpha weighs the
Dice term, beta the cross-entropy term.

* ``"ordinary"`` (eq. 7): ``DiceLoss + CELoss``, i.e. (alpha, beta) = (1, 1).  The paper writes
  the plain sum; TransUNet and MT-UNet train with 0.5 * CE + 0.5 * Dice.  We follow the paper;
  pass ``alpha=0.5, beta=0.5`` for TransUNet's weighting (only the scale differs, which with
  Adam matters little).
* ``"phase"`` (eq. 11): (0.6, 0.4) for epochs 1..200, (0.7, 0.3) for epochs 201..400.  The
  boundary is ``boundary`` (default 200).  For a run shorter than the paper's 400 epochs the
  default boundary scales with it, ``round(epochs * 200 / 400)`` (half-way), so both phases
  happen; for 400 epochs or more it stays 200, as in the paper.
* ``"dynamic"`` (eqs. 12, 13), with s(x) = 1 / (1 + exp(-k (x - x0))) and x the epoch::

      alpha = A + (1 - A) (1 - s(x))        A = 0.3
      beta  = 1 + (B - 1) (1 - s(x))        B = 0.7

  So training starts Dice-heavy, (alpha, beta) ~ (1, B), and ends CE-heavy, ~ (A, 1).  The paper
  gives x0 = 0.5 * epochs and no value for the slope k; the default k = 10 / epochs makes the
  switch span the run (s goes from 0.7% at epoch 0 to 99.3% at the last epoch).

Epochs are 1-based, as in eq. (11): the first epoch is 1.  A 0-based loop passes ``epoch + 1``.

``DiceLoss`` is TransUNet's: softmax probabilities, per class over the whole batch
``1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps)`` with eps = 1e-5, averaged over all
classes, background included.  For one-hot g, sum(g^2) = |G|; with soft p, sum(p^2) is TransUNet's
choice for eq. (8)'s |P|.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiceLoss", "CombinedLoss", "OrdinaryLoss", "PhaseLoss", "DynamicLoss", "build_loss",
           "LOSSES"]


def _check(logits: Tensor, target: Tensor, num_classes: int) -> None:
    if logits.dim() < 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (N, {num_classes}, ...), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)} (expected (N, ...) without the class axis)")


class DiceLoss(nn.Module):
    """Mean over classes of 1 - soft Dice, on softmax(logits) (TransUNet's DiceLoss, eq. 8)."""

    def __init__(self, num_classes: int, smooth: float = 1e-5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check(logits, target, self.num_classes)
        probs = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target.long(), self.num_classes).movedim(-1, 1).to(probs.dtype)
        dims = [0] + list(range(2, probs.dim()))
        intersect = (probs * onehot).sum(dims)
        denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
        dice = (2 * intersect + self.smooth) / (denom + self.smooth)
        return (1 - dice).mean()


class CombinedLoss:
    """``alpha(epoch) * Dice + beta(epoch) * CE`` (eq. 10); subclasses define ``weights``."""

    name = "combined"

    def __init__(self, num_classes: int, epochs: int):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.num_classes = num_classes
        self.epochs = int(epochs)
        self.dice = DiceLoss(num_classes)

    def weights(self, epoch: int) -> Tuple[float, float]:
        raise NotImplementedError

    def _check_epoch(self, epoch: int) -> None:
        if epoch < 1:
            raise ValueError(f"epoch is 1-based (paper eq. 11), got {epoch}")

    def __call__(self, logits: Tensor, target: Tensor, epoch: int) -> Tuple[Tensor, Dict[str, float]]:
        alpha, beta = self.weights(epoch)
        dice = self.dice(logits, target)
        ce = F.cross_entropy(logits.float(), target.long())
        loss = alpha * dice + beta * ce
        return loss, {"ce": float(ce.detach()), "dice": float(dice.detach()), "alpha": alpha, "beta": beta}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, epochs={self.epochs})"


class OrdinaryLoss(CombinedLoss):
    """Eq. (7): Dice + CE with fixed weights (default 1, 1)."""

    name = "ordinary"

    def __init__(self, num_classes: int, epochs: int, alpha: float = 1.0, beta: float = 1.0):
        super().__init__(num_classes, epochs)
        self.alpha, self.beta = float(alpha), float(beta)

    def weights(self, epoch: int) -> Tuple[float, float]:
        self._check_epoch(epoch)
        return self.alpha, self.beta


class PhaseLoss(CombinedLoss):
    """Eq. (11): (0.6, 0.4) up to ``boundary``, then (0.7, 0.3)."""

    name = "phase"

    def __init__(self, num_classes: int, epochs: int, boundary: Optional[int] = None,
                 early: Tuple[float, float] = (0.6, 0.4), late: Tuple[float, float] = (0.7, 0.3)):
        super().__init__(num_classes, epochs)
        if boundary is None:
            boundary = 200 if self.epochs >= 400 else max(1, round(self.epochs * 200 / 400))
        self.boundary = int(boundary)
        self.early = tuple(float(w) for w in early)
        self.late = tuple(float(w) for w in late)

    def weights(self, epoch: int) -> Tuple[float, float]:
        self._check_epoch(epoch)
        return self.early if epoch <= self.boundary else self.late


class DynamicLoss(CombinedLoss):
    """Eqs. (12), (13): a logistic switch from Dice-heavy to CE-heavy around epoch x0."""

    name = "dynamic"

    def __init__(self, num_classes: int, epochs: int, A: float = 0.3, B: float = 0.7,
                 k: Optional[float] = None, x0: Optional[float] = None):
        super().__init__(num_classes, epochs)
        self.A, self.B = float(A), float(B)
        self.k = 10.0 / self.epochs if k is None else float(k)
        self.x0 = 0.5 * self.epochs if x0 is None else float(x0)

    def weights(self, epoch: int) -> Tuple[float, float]:
        self._check_epoch(epoch)
        t = -self.k * (epoch - self.x0)
        # 1 - 1/(1+e^t) written stably for large |t|.
        keep = 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))
        return self.A + (1 - self.A) * keep, 1 + (self.B - 1) * keep


LOSSES = {"ordinary": OrdinaryLoss, "phase": PhaseLoss, "dynamic": DynamicLoss}


def build_loss(name: str, num_classes: int, epochs: int, **kw) -> CombinedLoss:
    """``"ordinary"`` | ``"phase"`` | ``"dynamic"``; extra keywords go to the class (see module doc)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (expected one of {sorted(LOSSES)})")
    return LOSSES[name](num_classes, epochs, **kw)
