"""Label volumes for new images: NIfTI, ``.npy.h5`` or ``.npz`` in, the same format and geometry out."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# Input whose robust range is this many times wider than, or this many widths away from, the
# range the model was trained on is taken for raw scanner units (CT in HU spans ~2000 against
# training input in [0, 1]; a z-scored MRI, ~10, is not flagged).
RAW_FACTOR = 20.0
SUFFIXES = (".nii.gz", ".nii", ".npy.h5", ".h5", ".hdf5", ".npz")


def find_inputs(source) -> List[Path]:
    """A file, or every supported file directly inside a folder (sorted)."""
    from .data import DataError

    source = Path(source)
    if not source.exists():
        raise DataError(f"input not found: {source}")
    if source.is_file():
        if not source.name.lower().endswith(SUFFIXES):
            raise DataError(f"{source}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise DataError(f"{source}: no .nii, .nii.gz, .npy.h5, .h5 or .npz files in this folder")
    return files


def raw_range(image: np.ndarray, input_range: Sequence[float]) -> Optional[Tuple[float, float]]:
    """The image's 0.5-99.5 percentile range if it looks raw next to ``input_range``, else None."""
    flat = np.asarray(image, dtype=np.float32).ravel()
    if flat.size == 0:
        return None
    sample = flat[:: max(1, flat.size // 1_000_000)]  # a strided sample: the range, not the exact quantiles
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    low, high = float(input_range[0]), float(input_range[1])
    width = max(high - low, 1e-6)
    if hi - lo > RAW_FACTOR * width or hi > high + RAW_FACTOR * width or lo < low - RAW_FACTOR * width:
        return lo, hi
    return None


def predict(checkpoint, inputs, output, device: str = "auto", batch_size: int = 16,
            intensity: str = "auto", overlay_slices: Optional[Sequence[int]] = None, overlay: bool = False,
            precision: str = "fp32", progress: bool = True) -> List[Path]:
    """Predict every input volume and write ``<output>/<same file name>``; returns the written paths.

    ``intensity``: the normalisation applied to each image first.  ``auto`` applies the one the
    training loader applied (stored in the checkpoint), then compares the image with the range of
    the model's training input (also stored): input that looks raw (e.g. CT in Hounsfield units
    against a model trained on [0, 1]) gets a warning, and the normalisation the training data had
    before it was stored (``raw_intensity``: the CT window for TransUNet's Synapse files), where
    the checkpoint records one.  ``none`` / ``ct`` / ``percentile`` force a mode, unchecked.
    ``overlay`` / ``overlay_slices`` also write ``<output>/overlays/<case>.png`` (the busiest slice
    by default), which needs matplotlib.
    """
    from .checkpointing import load_model
    from .data import DataError, read_volume, write_volume
    from .data.volumes import normalize_intensity
    from .distributed import pick_device
    from .evaluation import predict_volume
    from .training import resolve_precision

    # Inputs and outputs are checked before the model loads (and before a progress bar shows).
    files = find_inputs(inputs)
    out = Path(output)
    for path in files:
        if (out / path.name).resolve() == path.resolve():
            raise DataError(f"output {out / path.name} would overwrite its input; choose another --output folder")
    want_overlay = overlay or bool(overlay_slices)
    if want_overlay:
        from .plots import _pyplot
        _pyplot()  # fail before the work, not after it, when matplotlib is missing
    dev = pick_device(device)
    amp_dtype = resolve_precision(precision, dev)
    model, ckpt = load_model(checkpoint, dev)
    meta = ckpt.get("data") or {}
    size = int(meta.get("image_size") or 224)
    mode = meta.get("intensity", "none") if intensity == "auto" else intensity
    # Checkpoints before input_range was stored: every dlkunet loader feeds about [0, 1].
    input_range = meta.get("input_range") or (0.0, 1.0)
    written = []
    for path in tqdm(files, desc="predict", disable=not progress, dynamic_ncols=True):
        case = read_volume(path)
        image = normalize_intensity(case.image, mode)
        looks_raw = raw_range(image, input_range) if intensity == "auto" else None
        if looks_raw is not None:
            seen = f"{path}: intensities {looks_raw[0]:.4g}..{looks_raw[1]:.4g} look raw next to the " \
                   f"model's training input ({input_range[0]:.3g}..{input_range[1]:.3g})"
            fix = meta.get("raw_intensity")
            if fix and fix != mode:
                log.warning("%s; applying the '%s' normalisation its training data had (--intensity none "
                            "feeds them unchanged)", seen, fix)
                image = normalize_intensity(case.image, fix)
            else:
                log.warning("%s; the checkpoint does not record how its training data was normalised, so they "
                            "go in unchanged: pass --intensity ct (CT in Hounsfield units) or --intensity "
                            "percentile (other modalities)", seen)
        pred = predict_volume(model, image, size, dev, batch_size, amp_dtype)
        written.append(write_volume(out / path.name, pred, like=case))
        if want_overlay:
            from .plots import save_case_overlay
            save_case_overlay(image, pred, out / "overlays" / f"{case.name}.png",
                              slices=list(overlay_slices) if overlay_slices else None,
                              class_names=meta.get("class_names") or ())
    return written
