"""DSC and HD95 (paper eqs. 5, 6) under two protocols for the empty-mask and unit questions.

``protocol="transunet"`` reproduces the numbers papers in this line report (TransUNet, Swin-Unet,
DLKUNet all use TransUNet's ``calculate_metric_percase`` with medpy):

* DSC as medpy's ``binary.dc``: 2|A and B| / (|A| + |B|).
* HD95 as medpy's ``binary.hd95``: each mask's surface is the mask XOR its erosion by the
  connectivity-1 cross (the image border counts as outside); for every surface voxel of one mask
  the Euclidean distance to the nearest surface voxel of the other (an exact distance transform);
  the 95th percentile (linear interpolation) of both directions' distances pooled together.
  Distances are in voxels: TransUNet does not pass the spacing, and this protocol ignores it.
* Empty masks, TransUNet's rule: pred and gt non-empty -> (dc, hd95); pred non-empty and gt empty
  -> (1, 0) (sic); pred empty -> (0, 0), whether gt is empty or not.

``protocol="mm"`` is the same surface distance in millimetres (``spacing`` (z, y, x), default 1)
with the empty cases decided on their merits: both empty -> (1, 0); exactly one empty -> DSC 0
and HD95 = the diagonal of the image extent in mm, the largest distance two voxels of the image
can have, so a missed or hallucinated organ scores as badly as possible instead of 0.

Both use scipy only.  The distance transform runs on the bounding box of the two masks (plus a
one-voxel margin where the image allows), which gives the same distances as the full image.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["dice", "hd95", "surface_distances", "case_metrics", "PROTOCOLS"]

PROTOCOLS = ("transunet", "mm")


def _binary(mask) -> np.ndarray:
    return np.atleast_1d(np.asarray(mask).astype(bool))


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} and ground truth shape {gt.shape} differ")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (expected one of {PROTOCOLS})")


def dice(pred_mask, gt_mask) -> float:
    """2|A and B| / (|A| + |B|); 0 when both are empty (medpy's convention)."""
    pred, gt = _binary(pred_mask), _binary(gt_mask)
    _check_pair(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 2.0 * np.count_nonzero(pred & gt) / total if total else 0.0


def _spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing)}")
    return spacing


def _crop(pred: np.ndarray, gt: np.ndarray):
    """Both masks cut to their joint bounding box grown by one voxel (clipped to the image)."""
    coords = np.nonzero(pred | gt)
    box = tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, pred.shape))
    return pred[box], gt[box]


def _surface(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(pred_mask, gt_mask, spacing=None) -> Tuple[np.ndarray, np.ndarray]:
    """(pred surface -> gt surface, gt surface -> pred surface) distances; both masks non-empty."""
    pred, gt = _binary(pred_mask), _binary(gt_mask)
    _check_pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = _spacing(spacing, pred.ndim)
    # Cropping keeps results exact: every surface voxel lies inside the box, and the one-voxel
    # margin (or the image edge, where there is none) is outside both masks, as before.
    pred, gt = _crop(pred, gt)
    footprint = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_surface, gt_surface = _surface(pred, footprint), _surface(gt, footprint)
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[gt_surface]
    return to_gt, to_pred


def _diagonal(shape: Sequence[int], spacing: np.ndarray) -> float:
    return float(np.sqrt(np.sum(((np.asarray(shape) - 1) * spacing) ** 2)))


def hd95(pred_mask, gt_mask, spacing=None, protocol: str = "transunet") -> float:
    """95th percentile of the pooled symmetric surface distances (see module doc for empty masks).

    ``"transunet"``: voxel units (``spacing`` is ignored), 0 if either mask is empty.
    ``"mm"``: millimetres from ``spacing`` (z, y, x); both empty -> 0; one empty -> image diagonal.
    """
    _check_protocol(protocol)
    pred, gt = _binary(pred_mask), _binary(gt_mask)
    _check_pair(pred, gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if protocol == "transunet":
        if not (has_pred and has_gt):
            return 0.0
        spacing = None
    elif not (has_pred and has_gt):
        return 0.0 if has_pred == has_gt else _diagonal(pred.shape, _spacing(spacing, pred.ndim))
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.hstack((to_gt, to_pred)), 95))


def _per_class(pred: np.ndarray, gt: np.ndarray, spacing, protocol: str) -> Tuple[float, float]:
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if protocol == "transunet":
        if has_pred and has_gt:
            return dice(pred, gt), hd95(pred, gt, protocol="transunet")
        return (1.0, 0.0) if has_pred else (0.0, 0.0)
    if not has_pred and not has_gt:
        return 1.0, 0.0
    return dice(pred, gt), hd95(pred, gt, spacing, protocol="mm")


def case_metrics(pred_vol, gt_vol, num_classes: int, spacing=None,
                 protocol: str = "transunet") -> List[Tuple[float, float]]:
    """[(DSC, HD95) for class 1, ..., class num_classes - 1] of one case (label volumes)."""
    _check_protocol(protocol)
    pred, gt = np.asarray(pred_vol), np.asarray(gt_vol)
    _check_pair(pred, gt)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return [_per_class(pred == c, gt == c, spacing, protocol) for c in range(1, num_classes)]
