"""ACDC cardiac MRI as Swin-Unet and MT-UNet use it.

::

    root/train/case_001_sliceED_0.npz      keys img (H, W), label (H, W)
    root/valid/case_019_sliceED_0.npz      keys img (H, W), label (H, W)
    root/test/case_002_volume_ED.npz       keys img (D, H, W), label (D, H, W)
    root/lists_ACDC/train.txt, valid.txt, test.txt   file names, one per line

The list files are also found in ``root/lists/lists_ACDC``, ``root/lists`` or ``root``; names
may omit ``.npz``.  A split without a list file uses every ``.npz`` in its folder, sorted.
Images are already normalised by the common preprocessing.  Labels 1..3: RV, Myo, LV.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .base import (NpzSlices, LazyVolumes, SegmentationData, existing, find_list_file,
                   load_listed_volume, read_list_file)
from .volumes import DataError, VolumeCase, case_name

ACDC_CLASSES = ["RV", "Myo", "LV"]
LIST_DIRS = ("lists_ACDC", "lists/lists_ACDC", "lists", "")
SPLITS = {"train": ("train.txt",), "valid": ("valid.txt", "val.txt"), "test": ("test.txt",)}


def looks_like_acdc(root: Path) -> bool:
    if any(find_list_file(root, ["train.txt"], (d,)) for d in ("lists_ACDC", "lists/lists_ACDC")):
        return True
    return (root / "train").is_dir() and any((root / "train").glob("*.npz")) or \
        (root / "test").is_dir() and any((root / "test").glob("*_volume_*.npz"))


class ACDCData(SegmentationData):
    fmt = "acdc"
    intensity = "none"

    def __init__(self, root):
        super().__init__(root)
        self.num_classes, self.class_names = len(ACDC_CLASSES) + 1, list(ACDC_CLASSES)
        self.lists: Dict[str, Optional[Path]] = {
            split: find_list_file(self.root, names, LIST_DIRS) for split, names in SPLITS.items()}
        if not any(self.lists.values()) and not any(any((self.root / split).glob("*.npz")) for split in SPLITS):
            raise DataError(f"{self.root}: not an ACDC folder (no train/, valid/ or test/ .npz files, "
                            f"no lists_ACDC/)")
        self._paths: Dict[str, Optional[List[Path]]] = {}

    @property
    def paths(self) -> Dict[str, Optional[List[Path]]]:
        """Every split's files, each split checked when first used (evaluation reads only test/)."""
        return {split: self._split(split) for split in SPLITS}

    def _split(self, split: str) -> Optional[List[Path]]:
        if split not in self._paths:
            self._paths[split] = self._split_paths(split)
        return self._paths[split]

    def _split_paths(self, split: str) -> Optional[List[Path]]:
        folder, listing = self.root / split, self.lists[split]
        if listing is None:
            return sorted(folder.glob("*.npz")) or None
        names = read_list_file(listing)
        paths = [folder / (n if n.endswith(".npz") else n + ".npz") for n in names]
        return existing(paths, f"{split} split", listing)

    def _train_source(self) -> NpzSlices:
        if not self._split("train"):
            raise DataError(f"{self.root / 'train'}: no training slices")
        return NpzSlices(self._split("train"), self.num_classes, image_keys=("img", "image"))

    def _val_source(self) -> Optional[NpzSlices]:
        paths = self._split("valid")
        return NpzSlices(paths, self.num_classes, image_keys=("img", "image")) if paths else None

    def test_volumes(self) -> Sequence[VolumeCase]:
        paths = self._split("test") or []
        return LazyVolumes([case_name(p) for p in paths], partial(load_listed_volume, paths, self.num_classes))
