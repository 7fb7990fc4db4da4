"""What every dataset format shares: list files, the 2-D training-slice Dataset, lazy test volumes.

A format (synapse.py, acdc.py, nifti.py) only has to say where its slices and volumes are; the
classes here load them on access, check them and turn them into tensors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import AUGMENTATIONS, item_rng, random_augment, resize_pair, transunet_augment
from .volumes import DataError, VolumeCase, check_finite, check_labels, load_npz_pair

__all__ = ["read_list_file", "find_list_file", "SliceSource", "NpzSlices", "SliceDataset",
           "LazyVolumes", "SegmentationData"]


def find_list_file(root: Path, names: Sequence[str], subdirs: Sequence[str]) -> Optional[Path]:
    """The first ``root/<subdir>/<name>`` that exists (subdir '' is root itself), else None."""
    for sub in subdirs:
        for name in names:
            candidate = root / sub / name if sub else root / name
            if candidate.is_file():
                return candidate
    return None


def read_list_file(path: Path) -> List[str]:
    """Non-blank stripped lines of a split list; DataError if there are none."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list file ({exc})") from exc
    names = [line for line in lines if line]
    if not names:
        raise DataError(f"{path}: list file is empty")
    return names


class SliceSource:
    """Where training slices come from: ``len``, ``name(i)`` and ``load(i) -> (image, label)`` 2-D."""

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where item ``index`` is on disk (file, and slice where a file holds many), for messages."""
        return self.name(index)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class NpzSlices(SliceSource):
    """One .npz file per 2-D slice (Synapse train_npz, ACDC train/valid)."""

    def __init__(self, paths: Sequence[Path], num_classes: int, image_keys=("image", "img")):
        self.paths = [Path(p) for p in paths]
        self.num_classes = num_classes
        self.image_keys = tuple(image_keys)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index].name[: -len(".npz")] if self.paths[index].name.endswith(".npz") \
            else self.paths[index].name

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        path = self.paths[index]
        image, label = load_npz_pair(path, self.image_keys)
        if image.ndim != 2:
            raise DataError(f"{path}: a training slice must be 2-D, got shape {image.shape}")
        if not np.issubdtype(image.dtype, np.number):
            raise DataError(f"{path}: image has non-numeric dtype {image.dtype}")
        return check_finite(image.astype(np.float32), path), check_labels(label, self.num_classes, path)


class SliceDataset(Dataset):
    """2-D slices as ``{"image": (1, size, size) float32, "label": (size, size) int64, "case": str,
    "source": str}`` (``source``: the file, and slice, the item was read from).

    With ``augment``, each item's random transform is drawn from ``item_rng(seed, epoch, index)``.
    The training loop should call ``set_epoch(epoch)`` before each epoch (before creating the
    DataLoader iterator; with ``persistent_workers=True`` the workers keep their own copy and do
    not see it).  If ``set_epoch`` is never called, a per-process draw counter stands in for the
    epoch, so epochs still differ and a single-process run stays reproducible.
    """

    def __init__(self, source: SliceSource, size: int, augment: bool = False,
                 rotate_deg: Optional[float] = None, seed: int = 0, style: str = "paper"):
        if int(size) <= 0:
            raise ValueError(f"slice size must be positive, got {size}")
        if style not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {style!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.source = source
        self.style = style
        self.size = int(size)
        self.augment = bool(augment)
        self.rotate_deg = rotate_deg
        self.seed = int(seed)
        self.epoch: Optional[int] = None
        self._draws = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.source):
            raise IndexError(index)
        image, label = self.source.load(index)
        if self.augment:
            if self.epoch is None:
                self._draws += 1
                rng = item_rng(self.seed, 1_000_000 + self._draws, index)
            else:
                rng = item_rng(self.seed, self.epoch, index)
            if self.style == "transunet":
                image, label = transunet_augment(image, label, rng)
            else:
                image, label = random_augment(image, label, rng, self.rotate_deg)
        image, label = resize_pair(image, label, self.size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "case": self.source.name(index),
            "source": self.source.describe(index),
        }


class LazyVolumes(Sequence):
    """A list of test cases that loads each one when indexed (and keeps nothing)."""

    def __init__(self, names: Sequence[str], loader: Callable[[int], VolumeCase]):
        self.names = list(names)
        self._loader = loader

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._loader(index)

    def __repr__(self) -> str:
        return f"LazyVolumes({len(self)} cases)"


class SegmentationData:
    """A dataset on disk: its classes, its training/validation slices and its test volumes.

    Subclasses set ``fmt``, ``root``, ``num_classes``, ``class_names`` and ``intensity``
    (the :func:`normalize_intensity` mode already applied to what they return), and implement
    ``_train_source``, ``_val_source`` and ``test_volumes``.

    ``raw_intensity`` is the normalisation that turns a raw scan into what the model sees: the
    loader's own mode where it normalises (NIfTI), the preprocessing the files already had where
    it is known (TransUNet's Synapse files: the CT window), None where unknown.  Checkpoints store
    it so ``predict`` can handle raw scans.
    """

    fmt: str = ""
    intensity: str = "none"

    @property
    def raw_intensity(self) -> Optional[str]:
        return None if self.intensity == "none" else self.intensity

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found")

    num_classes: int
    class_names: List[str]

    def _train_source(self) -> SliceSource:
        raise NotImplementedError

    def _val_source(self) -> Optional[SliceSource]:
        return None

    def train_slices(self, size: int, augment: bool = True, rotate_deg: Optional[float] = None,
                     seed: int = 0, style: str = "paper") -> SliceDataset:
        """Training slices; ``style`` "paper" (flips, rot90, optional ``rotate_deg``) or "transunet"."""
        return SliceDataset(self._train_source(), size, augment, rotate_deg, seed, style)

    def val_slices(self, size: int) -> Optional[SliceDataset]:
        source = self._val_source()
        return None if source is None else SliceDataset(source, size, augment=False)

    def test_volumes(self) -> Sequence[VolumeCase]:
        raise NotImplementedError

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """Apply this dataset's intensity normalisation to a raw image (e.g. one from read_volume)."""
        from .volumes import normalize_intensity

        return normalize_intensity(image, self.intensity)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, num_classes={self.num_classes}, "
                f"class_names={self.class_names})")


def load_listed_volume(paths: Sequence[Path], num_classes: int, index: int) -> VolumeCase:
    """Loader for LazyVolumes over a list of single-file cases (picklable via functools.partial)."""
    from .volumes import read_volume

    return read_volume(paths[index], num_classes=num_classes)


def existing(paths: Sequence[Path], what: str, listed_in: Optional[Path]) -> List[Path]:
    """Check every listed file exists up front, so a typo fails at open, not mid-epoch."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        where = f" (listed in {listed_in})" if listed_in else ""
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: {what} file not found{where}{more}")
    return list(paths)


def read_dataset_json(path: Path) -> Optional[dict]:
    """The parsed dataset.json beside a dataset, None if absent; DataError if unreadable."""
    import json

    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot parse dataset.json ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: dataset.json must hold a JSON object")
    return meta


def labels_from_json(meta: dict, path: Path) -> Optional[Tuple[int, List[str]]]:
    """(num_classes, foreground names) from a dataset.json "labels" entry, or None without one.

    Accepts both nnU-Net conventions: v1 ``{"0": "background", "1": "liver"}`` and
    v2 ``{"background": 0, "liver": 1}``.  Labels must be 0..N-1 with no gaps.
    """
    labels = meta.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: 'labels' must be a non-empty object")
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):
            by_value = {int(k): str(v) for k, v in labels.items()}
        else:
            by_value = {}
            for name, value in labels.items():
                if isinstance(value, (list, tuple)):  # nnU-Net v2 region labels: not supported
                    raise DataError(f"{path}: region-based label {name!r} is not supported")
                by_value[int(value)] = str(name)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' values must be integers ({exc})") from exc
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise DataError(f"{path}: labels must be 0..N-1 without gaps, got {values}")
    return len(values), [by_value[v] for v in values[1:]]
