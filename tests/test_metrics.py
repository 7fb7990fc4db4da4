"""DSC / HD95: hand-worked cases, every empty-mask case of both protocols, and medpy agreement."""
import math

import numpy as np
import pytest
from scipy import ndimage

from dlkunet.metrics import case_metrics, dice, hd95, surface_distances

# medpy is a test dependency (pyproject [test]): the oracle for TransUNet's metric definitions.
from medpy.metric import binary as medpy_binary


def line(n, *runs):
    mask = np.zeros(n, bool)
    for start, stop in runs:
        mask[start:stop] = True
    return mask


class TestHandWorked:
    def test_dice_half_overlap(self):
        a = np.zeros((4, 4), bool)
        a[0, 0:4] = True
        b = np.zeros((4, 4), bool)
        b[0, 2:4] = True
        b[1, 0:2] = True
        assert dice(a, b) == pytest.approx(2 * 2 / 8)

    def test_dice_identical_and_disjoint(self):
        a = line(8, (1, 4))
        assert dice(a, a) == 1.0
        assert dice(a, line(8, (5, 7))) == 0.0

    def test_hd95_two_points(self):
        a, b = line(10, (0, 1)), line(10, (3, 4))
        assert hd95(a, b) == pytest.approx(3.0)

    def test_hd95_interpolated_percentile(self):
        # gt run 3..6: its surface (mask XOR erosion) is {3, 6}.  pred {0}.
        # pred->gt: [3]; gt->pred: [3, 6]; pooled [3, 3, 6]: 95th pct = 3 + 0.9 * 3 = 5.7.
        pred, gt = line(10, (0, 1)), line(10, (3, 7))
        d_pred, d_gt = surface_distances(pred, gt)
        assert sorted(d_pred) == [3.0] and sorted(d_gt) == [3.0, 6.0]
        assert hd95(pred, gt) == pytest.approx(5.7)

    def test_surface_excludes_interior_in_2d(self):
        # 5x5 square: surface is the 16-voxel ring; the pooled distances to itself are all 0.
        sq = np.zeros((7, 7), bool)
        sq[1:6, 1:6] = True
        d1, d2 = surface_distances(sq, sq)
        assert len(d1) == len(d2) == 16 and not d1.any()

    def test_mask_at_image_border_is_surface(self):
        # The image edge counts as outside (erosion border value 0): a full row is all surface.
        full = np.ones((1, 6), bool)
        d1, _ = surface_distances(full, full)
        assert len(d1) == 6

    def test_spacing_mm_vs_transunet(self):
        a = np.zeros((3, 3, 8), bool)
        a[1, 1, 0] = True
        b = np.zeros((3, 3, 8), bool)
        b[1, 1, 3] = True
        assert hd95(a, b, spacing=(5.0, 1.0, 2.0), protocol="mm") == pytest.approx(6.0)
        # TransUNet reports voxel units: the spacing is ignored.
        assert hd95(a, b, spacing=(5.0, 1.0, 2.0), protocol="transunet") == pytest.approx(3.0)

    def test_anisotropic_diagonal_distance(self):
        a = np.zeros((2, 2), bool)
        a[0, 0] = True
        b = np.zeros((2, 2), bool)
        b[1, 1] = True
        assert hd95(a, b, spacing=(3.0, 4.0), protocol="mm") == pytest.approx(5.0)


class TestEmptyMasks:
    shape = (4, 5, 6)
    spacing = (2.0, 1.0, 0.5)
    diagonal = math.sqrt((3 * 2.0) ** 2 + (4 * 1.0) ** 2 + (5 * 0.5) ** 2)

    def masks(self):
        empty = np.zeros(self.shape, bool)
        full = empty.copy()
        full[1:3, 1:3, 1:4] = True
        return empty, full

    def test_transunet_rules(self):
        empty, full = self.masks()
        gt = np.where(full, 1, 0)
        # pred and gt non-empty: real values.
        assert case_metrics(gt, gt, 2) == [(1.0, 0.0)]
        # pred non-empty, gt empty: (1, 0), TransUNet's rule.
        assert case_metrics(gt, np.zeros_like(gt), 2) == [(1.0, 0.0)]
        # pred empty, gt non-empty: (0, 0).
        assert case_metrics(np.zeros_like(gt), gt, 2) == [(0.0, 0.0)]
        # both empty: (0, 0) as well.
        assert case_metrics(np.zeros_like(gt), np.zeros_like(gt), 2) == [(0.0, 0.0)]

    def test_mm_rules(self):
        empty, full = self.masks()
        gt = np.where(full, 1, 0)
        z = np.zeros_like(gt)
        kw = dict(spacing=self.spacing, protocol="mm")
        assert case_metrics(z, z, 2, **kw) == [(1.0, 0.0)]
        dsc, dist = case_metrics(z, gt, 2, **kw)[0]
        assert dsc == 0.0 and dist == pytest.approx(self.diagonal)
        dsc, dist = case_metrics(gt, z, 2, **kw)[0]
        assert dsc == 0.0 and dist == pytest.approx(self.diagonal)
        assert case_metrics(gt, gt, 2, **kw) == [(1.0, 0.0)]

    def test_hd95_function_empty(self):
        empty, full = self.masks()
        for pred, gt in ((empty, full), (full, empty), (empty, empty)):
            assert hd95(pred, gt) == 0.0
        assert hd95(empty, empty, self.spacing, "mm") == 0.0
        assert hd95(empty, full, self.spacing, "mm") == pytest.approx(self.diagonal)
        assert hd95(full, empty, self.spacing, "mm") == pytest.approx(self.diagonal)
        assert dice(empty, empty) == 0.0  # medpy's value (its division by zero -> 0)


def test_case_metrics_multiclass():
    gt = np.zeros((3, 8, 8), int)
    gt[:, 1:3, 1:3] = 1          # class 1: predicted exactly
    gt[:, 5:7, 5:7] = 2          # class 2: missed
    pred = np.zeros_like(gt)
    pred[:, 1:3, 1:3] = 1
    pred[0, 6, 1] = 3            # class 3: only in the prediction
    got = case_metrics(pred, gt, 5)
    assert got == [(1.0, 0.0), (0.0, 0.0), (1.0, 0.0), (0.0, 0.0)]
    mm = case_metrics(pred, gt, 5, spacing=(1, 1, 1), protocol="mm")
    diag = math.sqrt(2 ** 2 + 7 ** 2 + 7 ** 2)
    assert mm[0] == (1.0, 0.0)
    assert mm[1][0] == 0.0 and mm[1][1] == pytest.approx(diag)
    assert mm[2][0] == 0.0 and mm[2][1] == pytest.approx(diag)
    assert mm[3] == (1.0, 0.0)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="protocol"):
        hd95(np.ones(3), np.ones(3), protocol="nnunet")
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((2, 2)), np.ones((2, 2)), spacing=(0, 1), protocol="mm")


def _random_mask(rng, shape):
    seeds = rng.random(shape) < rng.uniform(0.005, 0.05)
    mask = ndimage.binary_dilation(seeds, iterations=int(rng.integers(0, 3)))
    if rng.random() < 0.3:  # masks touching the image border exercise the erosion edge rule
        mask[0] |= rng.random(shape[1:]) < 0.3
    return mask


@pytest.mark.parametrize("ndim", [2, 3])
def test_against_medpy(ndim):
    rng = np.random.default_rng(1234 + ndim)
    checked = 0
    for _ in range(40):
        shape = tuple(int(s) for s in rng.integers(6, 24, size=ndim))
        pred, gt = _random_mask(rng, shape), _random_mask(rng, shape)
        if not pred.any() or not gt.any():
            continue
        spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, size=ndim))
        assert dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-12)
        assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)
        assert hd95(pred, gt, spacing, "mm") == pytest.approx(
            medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-9)
        checked += 1
    assert checked >= 30


def test_case_metrics_against_transunet_recipe():
    """case_metrics == TransUNet's calculate_metric_percase built on medpy, class by class."""
    rng = np.random.default_rng(7)
    for _ in range(5):
        gt = rng.integers(0, 4, size=(6, 16, 16))
        gt = ndimage.median_filter(gt, size=3)
        pred = np.where(rng.random(gt.shape) < 0.1, rng.integers(0, 4, size=gt.shape), gt)
        pred[pred == 3] = 0 if rng.random() < 0.5 else 3  # sometimes a class goes missing
        expected = []
        for c in range(1, 4):
            p, g = pred == c, gt == c
            if p.sum() > 0 and g.sum() > 0:
                expected.append((medpy_binary.dc(p, g), medpy_binary.hd95(p, g)))
            elif p.sum() > 0:
                expected.append((1, 0))
            else:
                expected.append((0, 0))
        got = case_metrics(pred, gt, 4)
        assert np.allclose(got, expected, atol=1e-9)
