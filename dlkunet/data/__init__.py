"""Datasets: Synapse and ACDC (TransUNet layout), NIfTI folders, and a built-in synthetic set.

``open_dataset(root)`` recognises the layout and returns a :class:`SegmentationData` with
``num_classes`` (background included), ``class_names`` (foreground, in label order),
``train_slices(size)`` / ``val_slices(size)`` (torch Datasets of 2-D slices) and
``test_volumes()`` (a lazily loading sequence of :class:`VolumeCase`).  Single files are read and
written with :func:`read_volume` / :func:`write_volume`.  Bad input raises :class:`DataError`
naming the file.
"""
from __future__ import annotations

from pathlib import Path

from .acdc import ACDCData, looks_like_acdc
from .base import SegmentationData, SliceDataset, LazyVolumes
from .nifti import NiftiData, looks_like_nifti
from .synapse import SynapseData, looks_like_synapse
from .volumes import DataError, VolumeCase, normalize_intensity, read_volume, write_volume

__all__ = [
    "DataError", "VolumeCase", "SegmentationData", "SliceDataset", "LazyVolumes",
    "open_dataset", "read_volume", "write_volume", "normalize_intensity", "FORMATS",
]

FORMATS = {"synapse": SynapseData, "acdc": ACDCData, "nifti": NiftiData}


def detect_format(root) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if looks_like_synapse(root):
        return "synapse"
    if looks_like_nifti(root):
        return "nifti"
    if looks_like_acdc(root):
        return "acdc"
    raise DataError(f"{root}: unrecognised dataset layout (expected Synapse train_npz/ or "
                    f"test_vol_h5/, ACDC train/ valid/ test/ with lists_ACDC/, or NIfTI imagesTr/)")


def open_dataset(root, fmt: str = "auto", **options) -> SegmentationData:
    """Open a dataset folder; ``fmt`` is "auto" (detect by layout), "synapse", "acdc" or "nifti"."""
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r} (expected 'auto' or one of {sorted(FORMATS)})")
    return FORMATS[fmt](root, **options)
