"""Label volumes for new images: NIfTI, ``.npy.h5`` or ``.npz`` in, the same format and geometry out."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from tqdm.auto import tqdm

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


def predict(checkpoint, inputs, output, device: str = "auto", batch_size: int = 16,
            intensity: str = "auto", overlay_slices: Optional[Sequence[int]] = None, overlay: bool = False,
            precision: str = "fp32", progress: bool = True) -> List[Path]:
    """Predict every input volume and write ``<output>/<same file name>``; returns the written paths.

    ``intensity``: the normalisation applied to each image first; ``auto`` uses the one the
    training data set applied (stored in the checkpoint), ``none`` / ``ct`` / ``percentile`` force one.
    ``overlay`` / ``overlay_slices`` also write ``<output>/overlays/<case>.png`` (the busiest slice
    by default), which needs matplotlib.
    """
    from .checkpointing import load_model
    from .data import DataError, read_volume, write_volume
    from .data.volumes import normalize_intensity
    from .distributed import pick_device
    from .evaluation import predict_volume
    from .training import resolve_precision

    dev = pick_device(device)
    model, ckpt = load_model(checkpoint, dev)
    files = find_inputs(inputs)
    meta = ckpt.get("data") or {}
    size = int(meta.get("image_size") or 224)
    mode = meta.get("intensity", "none") if intensity == "auto" else intensity
    amp_dtype = resolve_precision(precision, dev)
    want_overlay = overlay or bool(overlay_slices)
    if want_overlay:
        from .plots import _pyplot
        _pyplot()  # fail before the work, not after it, when matplotlib is missing
    out = Path(output)
    written = []
    for path in tqdm(files, desc="predict", disable=not progress, dynamic_ncols=True):
        target = out / path.name
        if target.resolve() == path.resolve():
            raise DataError(f"output {target} would overwrite its input; choose another --output folder")
        case = read_volume(path)
        image = normalize_intensity(case.image, mode)
        pred = predict_volume(model, image, size, dev, batch_size, amp_dtype)
        written.append(write_volume(target, pred, like=case))
        if want_overlay:
            from .plots import save_case_overlay
            save_case_overlay(image, pred, out / "overlays" / f"{case.name}.png",
                              slices=list(overlay_slices) if overlay_slices else None,
                              class_names=meta.get("class_names") or ())
    return written
