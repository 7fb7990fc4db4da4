"""Synapse multi-organ CT in TransUNet's preprocessed layout.

::

    root/train_npz/case0005_slice000.npz     keys image (H, W) float in [0, 1], label (H, W)
    root/test_vol_h5/case0001.npy.h5         datasets image (D, H, W), label (D, H, W)
    root/lists/lists_Synapse/train.txt       one slice name per line, e.g. case0005_slice000
    root/lists/lists_Synapse/test_vol.txt    one case name per line, e.g. case0001

The list files are also found directly in ``root``, ``root/lists`` or ``root/lists_Synapse``
(TransUNet keeps them in its own repository, so users copy them in various places); names may
carry their extension or not.  Without a list file every ``.npz`` / ``.npy.h5`` of the folder is
used, in sorted order.  An optional ``root/dataset.json`` with a ``labels`` entry overrides the
Synapse classes (the synthetic set uses this).

Images are already CT-windowed to [0, 1] by TransUNet's preprocessing, so nothing is normalised;
``raw_intensity`` is "ct", which checkpoints record so ``predict`` can window raw CT the same way.
Labels 1..8: spleen, right kidney, left kidney, gallbladder, liver, stomach, aorta, pancreas.
TransUNet has no validation split; ``val_slices`` is None unless a ``val.txt`` list is present
(names of slices in ``train_npz``).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence

from .base import (NpzSlices, LazyVolumes, SegmentationData, existing, find_list_file,
                   labels_from_json, load_listed_volume, read_dataset_json, read_list_file)
from .volumes import DataError, VolumeCase, case_name

SYNAPSE_CLASSES = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach",
                   "aorta", "pancreas"]
LIST_DIRS = ("lists/lists_Synapse", "lists_Synapse", "lists", "")


def looks_like_synapse(root: Path) -> bool:
    return (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir()


def _strip(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if name.endswith(suffix) else name


class SynapseData(SegmentationData):
    fmt = "synapse"
    intensity = "none"

    def __init__(self, root):
        super().__init__(root)
        if not looks_like_synapse(self.root):
            raise DataError(f"{self.root}: not a Synapse folder (no train_npz/ or test_vol_h5/)")
        meta_path = self.root / "dataset.json"
        meta = read_dataset_json(meta_path)
        parsed = labels_from_json(meta, meta_path) if meta else None
        if parsed:
            self.num_classes, self.class_names = parsed
        else:
            self.num_classes, self.class_names = len(SYNAPSE_CLASSES) + 1, list(SYNAPSE_CLASSES)
        # TransUNet windowed the CT to [-125, 275] HU and scaled it to [0, 1]; a dataset.json may
        # say otherwise (the synthetic set: "none", its images are made in [0, 1]).
        raw = (meta or {}).get("raw_intensity", "ct")
        if raw not in ("ct", "percentile", "none"):
            raise DataError(f"{meta_path}: 'raw_intensity' must be ct, percentile or none, got {raw!r}")
        self._raw_intensity = None if raw == "none" else raw
        self.train_list = find_list_file(self.root, ["train.txt"], LIST_DIRS)
        self.val_list = find_list_file(self.root, ["val.txt", "valid.txt"], LIST_DIRS)
        self.test_list = find_list_file(self.root, ["test_vol.txt", "test.txt"], LIST_DIRS)
        self._has_train = self.train_list is not None or (self.root / "train_npz").is_dir()
        self._train_paths: Optional[List[Path]] = None
        # Listed files are checked when a split is first used (all of it, so a typo fails before the
        # first epoch rather than mid-epoch), and only then: evaluation reads no training slice.
        self._test_paths = self._volume_paths()

    @property
    def raw_intensity(self) -> Optional[str]:
        return self._raw_intensity

    def _slice_paths(self, listing: Optional[Path]) -> List[Path]:
        folder = self.root / "train_npz"
        if listing is None:
            paths = sorted(folder.glob("*.npz"))
            if not paths:
                raise DataError(f"{folder}: no training slices (.npz) and no train.txt list")
            return paths
        names = read_list_file(listing)
        return existing([folder / (_strip(n, ".npz") + ".npz") for n in names], "training slice", listing)

    def _volume_paths(self) -> List[Path]:
        folder = self.root / "test_vol_h5"
        if self.test_list is None:
            return sorted(folder.glob("*.npy.h5")) or sorted(folder.glob("*.h5"))
        names = read_list_file(self.test_list)
        return existing([folder / (_strip(_strip(n, ".h5"), ".npy") + ".npy.h5") for n in names],
                        "test volume", self.test_list)

    def _train_source(self) -> NpzSlices:
        if not self._has_train:
            raise DataError(f"{self.root}: no training data (no train_npz/ folder or train.txt list)")
        if self._train_paths is None:
            self._train_paths = self._slice_paths(self.train_list)
        return NpzSlices(self._train_paths, self.num_classes, image_keys=("image",))

    def _val_source(self) -> Optional[NpzSlices]:
        if self.val_list is None:
            return None
        return NpzSlices(self._slice_paths(self.val_list), self.num_classes, image_keys=("image",))

    def test_volumes(self) -> Sequence[VolumeCase]:
        paths = self._test_paths
        return LazyVolumes([case_name(p) for p in paths],
                           partial(load_listed_volume, paths, self.num_classes))
