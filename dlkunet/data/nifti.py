"""A folder of NIfTI volumes laid out as nnU-Net users keep them.

::

    root/imagesTr/case_0001_0000.nii.gz    image (channel 0000; one channel only)
    root/labelsTr/case_0001.nii.gz         label, same grid
    root/imagesTs/..., root/labelsTs/...   optional test cases (labels optional)
    root/dataset.json                      optional: "labels" and "channel_names" / "modality"

Classes: from dataset.json ``labels`` (nnU-Net v1 or v2 style) when present, otherwise
``max label + 1`` over labelsTr (read once, on first use), with names ``class1``, ``class2``...

Intensities are normalised on load (raw NIfTI is in scanner units, unlike the preprocessed
Synapse/ACDC files): TransUNet's CT window when dataset.json names the channel ``CT``, else a
per-volume 0.5-99.5 percentile rescale; see :func:`dlkunet.data.volumes.normalize_intensity`.
Test volumes come back normalised too, with the source affine and spacing.

Test cases are imagesTs/ (with labelsTs/ where present).  Most nnU-Net folders have no test
labels; ``holdout`` (a fraction, default 0) then moves the last cases of imagesTr, in sorted
order, to the test set (``open_dataset(root, holdout=0.2)``).

Training slices are the axial (D) slices of every training volume.  Volumes are loaded whole and
kept in a small per-process LRU cache (``cache_volumes``), so a shuffled epoch over many large
gzipped volumes re-reads files; for big datasets, convert to slices first.
"""
from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .base import LazyVolumes, SegmentationData, SliceSource, labels_from_json, read_dataset_json
from .volumes import DataError, VolumeCase, _nibabel, check_labels, normalize_intensity, read_volume

CHANNEL = "_0000"


def looks_like_nifti(root: Path) -> bool:
    return (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir()


def _strip_nii(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pairs(images_dir: Path, labels_dir: Path, need_labels: bool) -> List[Tuple[str, Path, Optional[Path]]]:
    """(case, image path, label path or None) for every channel-0000 image of a folder."""
    if not images_dir.is_dir():
        return []
    files = sorted(p for p in images_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    others = [p for p in files if not _strip_nii(p.name).endswith(CHANNEL)]
    multi = [p for p in others if _strip_nii(p.name)[-5:-4] == "_" and _strip_nii(p.name)[-4:].isdigit()]
    if multi:
        raise DataError(f"{multi[0]}: multi-channel cases are not supported (only channel {CHANNEL})")
    if others:
        raise DataError(f"{others[0]}: image name must end in {CHANNEL}.nii.gz (nnU-Net naming)")
    pairs = []
    for image in files:
        case = _strip_nii(image.name)[: -len(CHANNEL)]
        label = next((labels_dir / (case + ext) for ext in (".nii.gz", ".nii")
                      if (labels_dir / (case + ext)).is_file()), None)
        if label is None and need_labels:
            raise DataError(f"{labels_dir / (case + '.nii.gz')}: label file not found for image {image}")
        pairs.append((case, image, label))
    return pairs


def _load_case(pairs, num_classes: Optional[int], intensity: str, index: int) -> VolumeCase:
    case, image_path, label_path = pairs[index]
    vol = read_volume(image_path, label_path=label_path, num_classes=num_classes)
    return vol._replace(name=case, image=normalize_intensity(vol.image, intensity))


class NiftiSlices(SliceSource):
    """Axial slices of labelled NIfTI volumes, with a small LRU cache of whole volumes."""

    def __init__(self, pairs, num_classes: int, intensity: str, depths: Sequence[int], cache_volumes: int = 4):
        self.pairs = list(pairs)
        self.num_classes = num_classes
        self.intensity = intensity
        self.starts = list(np.cumsum([0] + list(depths[:-1])))
        self.total = int(sum(depths))
        self.cache_volumes = max(1, int(cache_volumes))
        self._cache: "OrderedDict[int, VolumeCase]" = OrderedDict()

    def __len__(self) -> int:
        return self.total

    def _locate(self, index: int) -> Tuple[int, int]:
        case = bisect.bisect_right(self.starts, index) - 1
        return case, index - self.starts[case]

    def name(self, index: int) -> str:
        case, z = self._locate(index)
        return f"{self.pairs[case][0]}_slice{z:03d}"

    def describe(self, index: int) -> str:
        case, z = self._locate(index)
        return f"{self.pairs[case][1]} slice {z}"

    def _volume(self, case: int) -> VolumeCase:
        if case in self._cache:
            self._cache.move_to_end(case)
            return self._cache[case]
        vol = _load_case(self.pairs, self.num_classes, self.intensity, case)
        self._cache[case] = vol
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return vol

    def load(self, index: int):
        case, z = self._locate(index)
        vol = self._volume(case)
        if z >= vol.image.shape[0]:
            raise DataError(f"{vol.path}: volume has {vol.image.shape[0]} slices, header said more")
        return vol.image[z], vol.label[z]


class NiftiData(SegmentationData):
    fmt = "nifti"

    def __init__(self, root, cache_volumes: int = 4, holdout: float = 0.0):
        super().__init__(root)
        if not looks_like_nifti(self.root):
            raise DataError(f"{self.root}: not a NIfTI dataset folder (no imagesTr/ or imagesTs/)")
        self.cache_volumes = cache_volumes
        meta_path = self.root / "dataset.json"
        meta = read_dataset_json(meta_path) or {}
        self._labels = labels_from_json(meta, meta_path) if meta else None
        channels = meta.get("channel_names") or meta.get("modality") or {}
        first = str(next(iter(channels.values()), "")) if isinstance(channels, dict) else ""
        self.intensity = "ct" if first.strip().upper() == "CT" else "percentile"
        self.train_pairs = _pairs(self.root / "imagesTr", self.root / "labelsTr", need_labels=True)
        self.test_pairs = _pairs(self.root / "imagesTs", self.root / "labelsTs", need_labels=False)
        if not self.train_pairs and not self.test_pairs:
            raise DataError(f"{self.root}: no NIfTI images in imagesTr/ or imagesTs/")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        if holdout and not any(label for _, _, label in self.test_pairs):
            count = min(len(self.train_pairs) - 1, math.ceil(holdout * len(self.train_pairs)))
            if count < 1:
                raise DataError(f"{self.root / 'imagesTr'}: too few cases to hold out {holdout:.0%}")
            self.train_pairs, self.test_pairs = self.train_pairs[:-count], self.train_pairs[-count:]

    def _scan_labels(self) -> Tuple[int, List[str]]:
        nib = _nibabel()
        highest = 0
        for _, _, label_path in self.train_pairs + self.test_pairs:
            if label_path is None:
                continue
            try:
                data = np.asanyarray(nib.load(str(label_path)).dataobj)
            except Exception as exc:
                raise DataError(f"{label_path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
            highest = max(highest, int(check_labels(data, None, label_path).max(initial=0)))
        if highest == 0:
            raise DataError(f"{self.root}: no foreground labels in labelsTr/ and no dataset.json labels")
        return highest + 1, [f"class{i}" for i in range(1, highest + 1)]

    @property
    def num_classes(self) -> int:
        if self._labels is None:
            self._labels = self._scan_labels()
        return self._labels[0]

    @property
    def class_names(self) -> List[str]:
        if self._labels is None:
            self._labels = self._scan_labels()
        return self._labels[1]

    def _train_source(self) -> NiftiSlices:
        if not self.train_pairs:
            raise DataError(f"{self.root / 'imagesTr'}: no training volumes")
        nib = _nibabel()
        depths = []
        for _, image_path, _ in self.train_pairs:
            try:
                shape = nib.load(str(image_path)).shape
            except Exception as exc:
                raise DataError(f"{image_path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
            if len(shape) < 3:
                raise DataError(f"{image_path}: expected a 3-D NIfTI volume, got shape {shape}")
            depths.append(int(shape[2]))
        return NiftiSlices(self.train_pairs, self.num_classes, self.intensity, depths, self.cache_volumes)

    def test_volumes(self) -> Sequence[VolumeCase]:
        return LazyVolumes([case for case, _, _ in self.test_pairs],
                           partial(_load_case, self.test_pairs, self.num_classes, self.intensity))
