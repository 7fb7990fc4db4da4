"""Reading and writing single files: 2-D slices and 3-D volumes in the formats the loaders use.

Array convention everywhere in dlkunet: volumes are ``(D, H, W)`` = (slices, rows, columns) and
spacing is ``(z, y, x)`` in millimetres, matching the TransUNet ``.npy.h5`` test volumes.

NIfTI stores voxels as ``(x, y, z)`` (i, j, k indices of the affine).  ``read_volume`` transposes
with ``(2, 1, 0)`` to get ``(D, H, W)`` and ``write_volume`` applies the same transpose (it is its
own inverse), so a prediction written back lines up voxel-for-voxel with the source image and
carries the source affine unchanged.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DataError", "VolumeCase", "read_volume", "write_volume", "volume_format",
    "load_npz_pair", "check_labels", "check_finite", "normalize_intensity",
]


class DataError(ValueError):
    """Bad dataset input; the message names the file and what is wrong with it."""


class VolumeCase(NamedTuple):
    name: str
    image: np.ndarray                   # float32 (D, H, W)
    label: Optional[np.ndarray]         # int64 (D, H, W) or None (unlabelled case)
    spacing: Optional[tuple]            # (z, y, x) mm, None where the format has none
    affine: Optional[np.ndarray]        # 4x4 voxel (x, y, z) -> world, NIfTI only
    path: str
    # The array's shape as stored in the file (a 2-D slice, or NIfTI's (x, y, z[, 1...]) order), so
    # write_volume gives a prediction back in its input's shape; None: the (D, H, W) shape itself.
    source_shape: Optional[tuple] = None
    header: Any = None                  # the NIfTI header (qform / sform codes, zooms), NIfTI only


_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def volume_format(path) -> str:
    """'nifti' | 'h5' | 'npz' from the file name; DataError for anything else."""
    name = str(path).lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".h5", ".hdf5")):
        return "h5"
    if name.endswith(".npz"):
        return "npz"
    raise DataError(f"{path}: unsupported file type (expected .nii, .nii.gz, .npy.h5/.h5 or .npz)")


def case_name(path) -> str:
    """File name without its (possibly double) extension: case0001.npy.h5 -> case0001."""
    name = Path(path).name
    for suffix in (".npy.h5", ".nii.gz", ".nii", ".h5", ".hdf5", ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _require_file(path) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")


def check_finite(image: np.ndarray, path, what: str = "image") -> np.ndarray:
    """``image`` unchanged if every value is finite; else DataError naming the file and the first bad voxel.

    A single NaN would otherwise spread: the cubic resize smears it over the whole slice, the
    network's BatchNorm over the whole batch, and training goes on writing NaN weights.
    """
    image = np.asarray(image)
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        bad = ~np.isfinite(image)
        where = np.argwhere(bad)[0]
        names = ("slice", "row", "column") if image.ndim == 3 else ("row", "column")
        place = ", ".join(f"{n} {int(i)}" for n, i in zip(names[-len(where):], where))
        slices = ""
        if image.ndim == 3:
            affected = np.flatnonzero(bad.any(axis=(1, 2)))
            slices = f" in {len(affected)} slice(s) ({', '.join(map(str, affected[:5]))}" \
                     f"{', ...' if len(affected) > 5 else ''})"
        raise DataError(f"{path}: {what} holds {int(bad.sum())} non-finite value(s) (NaN or inf){slices}, "
                        f"the first at {place}; fix or mask them before use")
    return image


def check_labels(label: np.ndarray, num_classes: Optional[int], path) -> np.ndarray:
    """Labels as int64, after checking they are whole numbers in [0, num_classes).

    TransUNet's Synapse files store labels as float32, so integral floats are accepted.
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise DataError(f"{path}: label array holds non-integer values")
    elif label.dtype.kind not in "iub":
        raise DataError(f"{path}: label array has non-numeric dtype {label.dtype}")
    label = label.astype(np.int64)
    if label.size:
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            rng = f"[0, {num_classes - 1}]" if num_classes is not None else "non-negative"
            raise DataError(f"{path}: label values {lo}..{hi} outside the class range {rng}")
    return label


def load_npz_pair(path, image_keys: Sequence[str] = ("image", "img"), label_key: str = "label",
                  need_label: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(image, label) from an .npz; the first of ``image_keys`` present is the image."""
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            image_key = next((k for k in image_keys if k in keys), None)
            if image_key is None:
                raise DataError(f"{path}: no image array (expected key {' or '.join(map(repr, image_keys))}; "
                                f"found {keys})")
            if need_label and label_key not in keys:
                raise DataError(f"{path}: no {label_key!r} array (found {keys})")
            image = np.asarray(data[image_key])
            label = np.asarray(data[label_key]) if label_key in keys else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from exc
    if label is not None and label.shape != image.shape:
        raise DataError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
    return image, label


def _load_h5_pair(path, need_label: bool):
    """(image, label or None, spacing or None) from TransUNet's .npy.h5 (spacing: ours only)."""
    import h5py

    _require_file(path)
    try:
        with h5py.File(path, "r") as data:
            keys = list(data.keys())
            if "image" not in keys:
                raise DataError(f"{path}: no 'image' dataset (found {keys})")
            if need_label and "label" not in keys:
                raise DataError(f"{path}: no 'label' dataset (found {keys})")
            image = np.asarray(data["image"][()])
            label = np.asarray(data["label"][()]) if "label" in keys else None
            spacing = np.asarray(data["spacing"][()]) if "spacing" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: cannot read as HDF5 ({type(exc).__name__}: {exc})") from exc
    if label is not None and label.shape != image.shape:
        raise DataError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
    return image, label, spacing


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ImportError("NIfTI support needs nibabel: pip install 'dlkunet[nifti]'") from exc
    return nibabel


def load_nifti(path) -> Tuple[np.ndarray, Tuple[float, float, float], np.ndarray]:
    """(array (D, H, W), spacing (z, y, x), affine) of a 3-D (or 2-D) NIfTI file."""
    data, spacing, affine, _ = _load_nifti(path)
    return data, spacing, affine


def _load_nifti(path):
    """load_nifti's values and the image's header (for write_volume to copy)."""
    nib = _nibabel()
    _require_file(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error ...)
        raise DataError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:  # a single slice (x, y): a volume of depth 1
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D NIfTI volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3]) + (1.0,) * max(0, 3 - len(img.header.get_zooms()))
    return (np.transpose(data, (2, 1, 0)), (zooms[2], zooms[1], zooms[0]), np.array(img.affine, dtype=np.float64),
            img.header)


def _npz_spacing(path) -> Optional[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["spacing"]) if "spacing" in data.files else None


def _check_spacing(spacing: np.ndarray, path) -> Tuple[float, float, float]:
    """The optional ``spacing`` entry write_volume adds to .h5/.npz: three positive numbers."""
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise DataError(f"{path}: 'spacing' must hold three positive numbers (z, y, x), got {spacing!r}")
    return tuple(float(v) for v in values)


def _as_3d(array: np.ndarray, path, what: str) -> np.ndarray:
    if array.ndim == 2:  # a single slice is a volume of depth 1
        array = array[None]
    if array.ndim != 3:
        raise DataError(f"{path}: {what} must be 2-D or 3-D, got shape {array.shape}")
    return array


def read_volume(path, label_path=None, num_classes: Optional[int] = None) -> VolumeCase:
    """One case from ``.nii``/``.nii.gz``, ``.npy.h5``/``.h5`` (image, label) or ``.npz`` (image|img, label).

    The label is optional in every format (None when absent).  For NIfTI the label lives in a
    separate file, ``label_path``; its shape must match the image's.  Spacing comes from the
    NIfTI header, or from a ``spacing`` entry in .h5/.npz files (TransUNet's and the ACDC files
    have none: spacing is then None).  Images are returned as float32 without intensity
    normalisation (see :func:`normalize_intensity`).
    """
    path = str(path)
    fmt = volume_format(path)
    spacing = affine = header = None
    if fmt == "nifti":
        image, spacing, affine, header = _load_nifti(path)
        source_shape = tuple(int(n) for n in header.get_data_shape())
        label = None
        if label_path is not None:
            label, _, _ = load_nifti(label_path)
            if label.shape != image.shape:
                raise DataError(f"{label_path}: label shape {label.shape} differs from image "
                                f"shape {image.shape} of {path}")
    elif fmt == "h5":
        image, label, spacing = _load_h5_pair(path, need_label=False)
        source_shape = tuple(np.shape(image))
    else:
        image, label = load_npz_pair(path, need_label=False)
        spacing = _npz_spacing(path)
        source_shape = tuple(np.shape(image))
    if fmt != "nifti" and spacing is not None:
        spacing = _check_spacing(spacing, path)
    image = _as_3d(np.asarray(image), path, "image")
    if not np.issubdtype(image.dtype, np.number):
        raise DataError(f"{path}: image has non-numeric dtype {image.dtype}")
    image = check_finite(np.ascontiguousarray(image, dtype=np.float32), path)
    if label is not None:
        label = check_labels(_as_3d(label, label_path or path, "label"), num_classes, label_path or path)
    return VolumeCase(case_name(path), image, label, spacing, affine, path, source_shape, header)


def _label_dtype(label: np.ndarray):
    return np.uint8 if label.size == 0 or (label.min() >= 0 and label.max() < 256) else np.int16


def write_volume(path, label_volume: np.ndarray, like: VolumeCase) -> Path:
    """Write a (D, H, W) label volume in the format of ``path``, with ``like``'s geometry.

    NIfTI: ``like``'s header (its qform / sform codes and zooms) and affine (or, without them, a
    diagonal affine from ``like.spacing``) and the inverse of ``read_volume``'s transpose.
    ``.npy.h5`` / ``.npz``: datasets ``image`` (like's image) and ``label`` (the given volume), plus
    ``spacing`` when ``like`` has one.  Arrays come back in ``like.source_shape`` (a 2-D input
    gives a 2-D output).
    """
    path = Path(path)
    fmt = volume_format(path)
    label = np.asarray(label_volume)
    if label.shape != like.image.shape:
        raise DataError(f"{path}: label volume shape {label.shape} differs from the reference "
                        f"image shape {like.image.shape} of {like.path}")
    if label.dtype.kind not in "iub":
        raise DataError(f"{path}: label volume must be integer, got {label.dtype}")
    label = label.astype(_label_dtype(label))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "nifti":
        nib = _nibabel()
        data = np.transpose(label, (2, 1, 0))
        if like.source_shape is not None and len(like.source_shape) != 3:
            data = data.reshape(like.source_shape)  # (x, y) or (x, y, z, 1): as the input was
        if like.header is not None and like.affine is not None:
            # The input's header keeps its qform / sform codes (e.g. 0 / 2) and zooms; only what
            # describes the voxel values changes (labels: integer, unscaled).
            header = like.header.copy()
            header.set_data_dtype(data.dtype)
            header.set_slope_inter(1.0, 0.0)
            header["cal_min"], header["cal_max"] = 0, 0
            img = nib.Nifti1Image(data, np.asarray(like.affine, dtype=np.float64), header=header)
        else:
            affine = like.affine
            if affine is None:
                z, y, x = like.spacing if like.spacing is not None else (1.0, 1.0, 1.0)
                affine = np.diag([x, y, z, 1.0])
            img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
            img.set_qform(img.affine, code=1)
            img.set_sform(img.affine, code=1)
        nib.save(img, str(path))
        return path
    image = like.image
    if like.source_shape is not None and tuple(like.source_shape) != image.shape:
        image, label = image.reshape(like.source_shape), label.reshape(like.source_shape)
    if fmt == "h5":
        import h5py

        with h5py.File(path, "w") as out:
            out.create_dataset("image", data=image, compression="gzip")
            out.create_dataset("label", data=label, compression="gzip")
            if like.spacing is not None:
                out.create_dataset("spacing", data=np.asarray(like.spacing, dtype=np.float64))
    else:
        extra = {} if like.spacing is None else {"spacing": np.asarray(like.spacing, dtype=np.float64)}
        np.savez_compressed(path, image=image, label=label, **extra)
    return path


# TransUNet's Synapse preprocessing: CT clipped to [-125, 275] HU, then scaled to [0, 1].
CT_WINDOW = (-125.0, 275.0)


def normalize_intensity(image: np.ndarray, mode: str = "percentile") -> np.ndarray:
    """Map raw intensities to about [0, 1], as the Synapse/ACDC files already are.

    ``"ct"``: TransUNet's window, clip to [-125, 275] HU and scale to [0, 1].
    ``"percentile"``: per volume, clip to the 0.5th..99.5th percentiles and scale to [0, 1]
    (MRI and other modalities without absolute units).  ``"none"``: unchanged.
    """
    image = np.asarray(image, dtype=np.float32)
    if mode == "none":
        return image
    if mode == "ct":
        lo, hi = CT_WINDOW
    elif mode == "percentile":
        if image.size == 0:
            return image
        lo, hi = (float(v) for v in np.percentile(image, (0.5, 99.5)))
    else:
        raise ValueError(f"unknown intensity normalisation {mode!r} (expected 'ct', 'percentile' or 'none')")
    if hi <= lo:
        return np.zeros_like(image)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)
