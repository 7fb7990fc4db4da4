"""Loss weights per epoch against eqs. 7, 11, 12, 13; Dice loss against a direct computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlkunet.losses import DiceLoss, DynamicLoss, PhaseLoss, build_loss


def direct_dice_loss(logits, target, num_classes, eps=1e-5):
    """TransUNet's Dice loss, written out with numpy class by class."""
    p = torch.softmax(logits.double(), 1).numpy()
    t = target.numpy()
    losses = []
    for c in range(num_classes):
        pc, gc = p[:, c], (t == c).astype(np.float64)
        losses.append(1 - (2 * (pc * gc).sum() + eps) / ((pc ** 2).sum() + (gc ** 2).sum() + eps))
    return float(np.mean(losses))


class TestDice:
    def test_matches_direct_computation(self):
        torch.manual_seed(0)
        for shape in [(2, 4, 6, 5), (3, 9, 8, 8), (1, 2, 7)]:
            logits = torch.randn(*shape) * 3
            target = torch.randint(0, shape[1], (shape[0],) + shape[2:])
            got = DiceLoss(shape[1])(logits, target)
            assert got.item() == pytest.approx(direct_dice_loss(logits, target, shape[1]), rel=1e-5)

    def test_perfect_prediction_and_absent_class(self):
        target = torch.tensor([[[0, 1], [1, 0]]])
        logits = F.one_hot(target, 3).movedim(-1, 1).float() * 50
        # Class 2 is absent in both: (0 + eps) / (0 + eps) = 1, so its loss is 0 too.
        assert DiceLoss(3)(logits, target).item() == pytest.approx(0.0, abs=1e-6)

    def test_gradient_and_shape_check(self):
        logits = torch.randn(2, 3, 4, 4, requires_grad=True)
        DiceLoss(3)(logits, torch.randint(0, 3, (2, 4, 4))).backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="logits"):
            DiceLoss(4)(logits, torch.randint(0, 3, (2, 4, 4)))
        with pytest.raises(ValueError, match="target shape"):
            DiceLoss(3)(logits, torch.randint(0, 3, (2, 4, 5)))


class TestWeights:
    def test_ordinary_is_eq7(self):
        loss = build_loss("ordinary", 4, 10)
        assert [loss.weights(e) for e in (1, 5, 10)] == [(1.0, 1.0)] * 3
        assert build_loss("ordinary", 4, 10, alpha=0.5, beta=0.5).weights(3) == (0.5, 0.5)

    def test_phase_eq11_at_400_epochs(self):
        loss = build_loss("phase", 9, 400)
        assert loss.weights(1) == (0.6, 0.4)
        assert loss.weights(200) == (0.6, 0.4)
        assert loss.weights(201) == (0.7, 0.3)
        assert loss.weights(400) == (0.7, 0.3)

    def test_phase_boundary_scaled_and_configurable(self):
        assert PhaseLoss(4, 100).boundary == 50
        assert PhaseLoss(4, 100).weights(50) == (0.6, 0.4)
        assert PhaseLoss(4, 100).weights(51) == (0.7, 0.3)
        assert PhaseLoss(4, 1000).boundary == 200
        assert PhaseLoss(4, 3).boundary == 2
        custom = PhaseLoss(4, 100, boundary=10)
        assert custom.weights(10) == (0.6, 0.4) and custom.weights(11) == (0.7, 0.3)

    @pytest.mark.parametrize("epochs,k,x0", [(150, None, None), (400, 0.05, 100.0), (20, 1.0, None)])
    def test_dynamic_eq12_eq13(self, epochs, k, x0):
        loss = DynamicLoss(4, epochs, k=k, x0=x0)
        k = 10.0 / epochs if k is None else k
        x0 = 0.5 * epochs if x0 is None else x0
        A, B = 0.3, 0.7
        for x in range(1, epochs + 1):
            s = 1 / (1 + math.exp(-k * (x - x0)))
            alpha = A + (1 - A) * (1 - s)
            beta = 1 + (B - 1) * (1 - s)
            got = loss.weights(x)
            assert got[0] == pytest.approx(alpha, abs=1e-12) and got[1] == pytest.approx(beta, abs=1e-12)

    def test_dynamic_limits_and_midpoint(self):
        loss = DynamicLoss(4, 100, k=5.0)
        assert loss.weights(1) == pytest.approx((1.0, 0.7), abs=1e-12)      # Dice-heavy start
        assert loss.weights(100) == pytest.approx((0.3, 1.0), abs=1e-12)    # CE-heavy end
        assert loss.weights(50) == pytest.approx((0.65, 0.85))
        assert DynamicLoss(4, 100, A=0.1, B=0.9, k=5.0).weights(100) == pytest.approx((0.1, 1.0))

    def test_epoch_is_one_based(self):
        for name in ("ordinary", "phase", "dynamic"):
            with pytest.raises(ValueError, match="1-based"):
                build_loss(name, 4, 10).weights(0)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="unknown loss"):
            build_loss("focal", 4, 10)


@pytest.mark.parametrize("name", ["ordinary", "phase", "dynamic"])
def test_call_combines_eq10(name):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    loss_fn = build_loss(name, 4, 40)
    for epoch in (1, 30):
        value, info = loss_fn(logits, target, epoch)
        alpha, beta = loss_fn.weights(epoch)
        ce = F.cross_entropy(logits, target).item()
        dice = direct_dice_loss(logits.detach(), target, 4)
        assert set(info) == {"ce", "dice", "alpha", "beta"}
        assert all(isinstance(v, float) for v in info.values())
        assert (info["alpha"], info["beta"]) == (alpha, beta)
        assert info["ce"] == pytest.approx(ce, rel=1e-5)
        assert info["dice"] == pytest.approx(dice, rel=1e-5)
        assert value.item() == pytest.approx(alpha * dice + beta * ce, rel=1e-5)
    value.backward()
    assert logits.grad.abs().sum() > 0
