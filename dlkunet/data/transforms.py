"""Training-slice augmentation and resizing (paper section 4.3; TransUNet's RandomGenerator).

The paper: "random flipping and random 90 degree rotation, each applied with a probability of
50%".  So, independently: with p = 0.5 rotate by ``k * 90`` degrees with k uniform in {0, 1, 2, 3}
(as TransUNet draws it, so k = 0 is possible), and with p = 0.5 flip along a random axis.  An
optional small rotation by an angle uniform in [-rotate_deg, rotate_deg] (p = 0.5) is off unless
asked for; the paper does not use it.  Then the slice is resized to ``size x size`` with
``scipy.ndimage.zoom``: cubic spline (order 3) for the image, nearest (order 0) for the label.

Randomness: every draw comes from the ``numpy.random.Generator`` passed in.  The datasets make
one per item from ``(seed, epoch, index)`` (see :func:`item_rng`), so an augmented sample depends
only on those three numbers -- not on the worker that loads it, the number of workers or the
order of loading -- and a run is reproducible given its seed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["item_rng", "random_augment", "transunet_augment", "resize_pair", "AUGMENTATIONS"]

AUGMENTATIONS = ("paper", "transunet")


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item of one epoch: independent streams for every (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]))


def random_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   rotate_deg: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Random rot90 (p=0.5), random flip (p=0.5), optional small rotation (p=0.5); same for both arrays."""
    if rng.random() < 0.5:
        k = int(rng.integers(0, 4))
        image, label = np.rot90(image, k), np.rot90(label, k)
    if rng.random() < 0.5:
        axis = int(rng.integers(0, 2))
        image, label = np.flip(image, axis), np.flip(label, axis)
    if rotate_deg and rng.random() < 0.5:
        angle = float(rng.uniform(-rotate_deg, rotate_deg))
        # Linear for the image (cubic would overshoot at organ edges); nearest keeps labels whole.
        image = ndimage.rotate(image, angle, order=1, reshape=False, mode="constant", cval=0.0)
        label = ndimage.rotate(label, angle, order=0, reshape=False, mode="constant", cval=0)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def transunet_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """TransUNet's ``RandomGenerator``, which the DLKUNet authors' ``DataLoader_Synapse.py`` reuses.

    With p = 0.5 a random rot90 (k in 0..3) followed by a flip along a random axis; otherwise,
    with p = 0.5 (0.25 overall), a rotation by an integer angle drawn from [-20, 20) degrees
    (``np.random.randint(-20, 20)`` there), nearest-neighbour for the image as for the label
    (``order=0`` in both calls there), zero outside.  The two branches never combine.
    """
    if rng.random() > 0.5:
        k = int(rng.integers(0, 4))
        image, label = np.rot90(image, k), np.rot90(label, k)
        axis = int(rng.integers(0, 2))
        image, label = np.flip(image, axis), np.flip(label, axis)
    elif rng.random() > 0.5:
        angle = int(rng.integers(-20, 20))
        image = ndimage.rotate(image, angle, order=0, reshape=False, mode="constant", cval=0.0)
        label = ndimage.rotate(label, angle, order=0, reshape=False, mode="constant", cval=0)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def resize_pair(image: np.ndarray, label: Optional[np.ndarray], size: int
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize a 2-D slice (and its label) to ``size x size``; unchanged if already that size."""
    h, w = image.shape
    if (h, w) == (size, size):
        return image, label
    factors = (size / h, size / w)
    image = ndimage.zoom(image, factors, order=3)
    if label is not None:
        label = ndimage.zoom(label, factors, order=0)
    return image, label
