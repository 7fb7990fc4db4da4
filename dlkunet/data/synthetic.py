"""A synthetic abdominal-CT-like dataset in the Synapse (TransUNet) layout: the default dataset.

Each case is a ``depth x size x size`` volume: an elliptic body of textured soft tissue holding
organ-shaped blobs (ellipsoids with a smooth random boundary deformation, a random in-plane tilt,
and per-case jitter of position and size).  Every organ has its own mean intensity and texture
strength, so a small network can tell them apart by appearance as well as by shape and place;
left/right position alone would not do, since training flips slices.  Then the volume is slightly
blurred (soft edges) and gets Gaussian noise.  Intensities are in [0, 1] like TransUNet's
preprocessed CT.

Organs are taken in this order, ``num_classes - 1`` of them (so the default 5 classes gives the
four large ones)::

    liver, spleen, right kidney, left kidney, stomach, aorta, gallbladder, pancreas

Written as ``train_npz/<case>_slice<NNN>.npz`` (image, label), ``test_vol_h5/<case>.npy.h5``
(image, label), ``lists/lists_Synapse/{train,test_vol}.txt`` and a ``dataset.json`` naming the
classes, which :class:`dlkunet.data.synapse.SynapseData` reads.  Generation is deterministic in
``seed``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, NamedTuple, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["make_synthetic", "synthetic_case", "ORGANS"]


class Organ(NamedTuple):
    name: str
    center: Tuple[float, float, float]   # (z in [0, 1] of depth, y, x in [-1, 1])
    radii: Tuple[float, float, float]    # (z, y, x) in the same units; z <= 0 means a full-depth tube
    intensity: float
    texture: float


# Intensities are spaced >= 0.1 apart and away from tissue (0.30) so each class is separable.
ORGANS = [
    Organ("liver", (0.50, -0.05, -0.40), (0.45, 0.42, 0.38), 0.55, 0.03),
    Organ("spleen", (0.45, 0.12, 0.55), (0.35, 0.25, 0.20), 0.75, 0.02),
    Organ("right kidney", (0.55, 0.33, -0.36), (0.32, 0.20, 0.15), 0.90, 0.02),
    Organ("left kidney", (0.55, 0.33, 0.32), (0.32, 0.20, 0.15), 0.15, 0.02),
    Organ("stomach", (0.35, -0.25, 0.22), (0.30, 0.24, 0.24), 0.42, 0.06),
    Organ("aorta", (0.50, 0.18, 0.02), (0.0, 0.09, 0.09), 1.00, 0.01),
    Organ("gallbladder", (0.60, -0.28, -0.15), (0.20, 0.12, 0.11), 0.05, 0.01),
    Organ("pancreas", (0.50, 0.02, 0.08), (0.16, 0.11, 0.32), 0.65, 0.05),
]
TISSUE, TISSUE_TEXTURE, OUTSIDE, NOISE = 0.30, 0.03, 0.02, 0.02


def _smooth_field(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def synthetic_case(rng: np.random.Generator, size: int, depth: int, num_classes: int
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8), both (depth, size, size)."""
    z, y, x = np.meshgrid(np.linspace(0.0, 1.0, depth), np.linspace(-1.0, 1.0, size),
                          np.linspace(-1.0, 1.0, size), indexing="ij")
    label = np.zeros((depth, size, size), np.uint8)
    body = (x / rng.uniform(0.80, 0.90)) ** 2 + (y / rng.uniform(0.62, 0.70)) ** 2 <= 1.0
    # Low-frequency field that bends organ boundaries; it varies with the case.
    wobble = _smooth_field(rng, label.shape, (max(depth / 6, 1.0), size / 10, size / 10))
    for cls, organ in enumerate(ORGANS[: num_classes - 1], start=1):
        cz, cy, cx = (c + rng.uniform(-0.06, 0.06) for c in organ.center)
        scale = rng.uniform(0.85, 1.15, size=3)
        rz, ry, rx = (r * s for r, s in zip(organ.radii, scale))
        angle = np.deg2rad(rng.uniform(-20, 20))
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        dist = (u / rx) ** 2 + (v / ry) ** 2
        if organ.radii[0] > 0:
            dist = dist + ((z - cz) / rz) ** 2
        inside = (dist <= 1.0 + 0.15 * wobble) & body
        label[inside] = cls
    mean = np.where(body, TISSUE, OUTSIDE).astype(np.float32)
    amplitude = np.where(body, TISSUE_TEXTURE, 0.0)
    for cls, organ in enumerate(ORGANS[: num_classes - 1], start=1):
        mean[label == cls] = organ.intensity
        amplitude[label == cls] = organ.texture
    texture = _smooth_field(rng, label.shape, (0.5, 1.2, 1.2))
    image = ndimage.gaussian_filter(mean, (0.0, 0.6, 0.6)) + amplitude * texture
    image = image + NOISE * rng.standard_normal(image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def make_synthetic(root, num_train: int = 8, num_test: int = 3, size: int = 64, depth: int = 24,
                   num_classes: int = 5, seed: int = 0) -> Path:
    """Write a synthetic Synapse-layout dataset under ``root`` and return ``root`` as a Path."""
    import h5py

    if not 2 <= num_classes <= len(ORGANS) + 1:
        raise ValueError(f"num_classes must be in 2..{len(ORGANS) + 1}, got {num_classes}")
    if num_train < 1 or num_test < 0 or size < 8 or depth < 1:
        raise ValueError(f"need num_train >= 1, num_test >= 0, size >= 8, depth >= 1 "
                         f"(got {num_train}, {num_test}, {size}, {depth})")
    root = Path(root)
    train_dir, test_dir, list_dir = root / "train_npz", root / "test_vol_h5", root / "lists" / "lists_Synapse"
    for folder in (train_dir, test_dir, list_dir):
        folder.mkdir(parents=True, exist_ok=True)
    train_names: List[str] = []
    test_names: List[str] = []
    for index in range(num_train + num_test):
        rng = np.random.default_rng([int(seed), index])
        image, label = synthetic_case(rng, size, depth, num_classes)
        case = f"case{index + 1:04d}"
        if index < num_train:
            for zi in range(depth):
                name = f"{case}_slice{zi:03d}"
                # TransUNet's files store labels as float32; keep that so readers handle it.
                np.savez(train_dir / f"{name}.npz", image=image[zi], label=label[zi].astype(np.float32))
                train_names.append(name)
        else:
            with h5py.File(test_dir / f"{case}.npy.h5", "w") as out:
                out.create_dataset("image", data=image)
                out.create_dataset("label", data=label.astype(np.float32))
            test_names.append(case)
    (list_dir / "train.txt").write_text("\n".join(train_names) + "\n")
    if test_names:  # an empty list file would be rejected as a mistake; no file means no test set
        (list_dir / "test_vol.txt").write_text("\n".join(test_names) + "\n")
    meta = {
        "name": "dlkunet-synthetic",
        "description": "synthetic abdominal-like phantoms (dlkunet.data.synthetic)",
        "labels": {"background": 0, **{o.name: i for i, o in enumerate(ORGANS[: num_classes - 1], 1)}},
        "raw_intensity": "none",  # generated in [0, 1]: there is no raw scale to normalise
        "seed": int(seed), "size": int(size), "depth": int(depth),
        "num_train": int(num_train), "num_test": int(num_test),
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
