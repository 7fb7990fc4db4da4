"""Overlay PNGs of predictions and training curves (matplotlib is an optional dependency)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or dlkunet[plots])") from None
    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _colors(num_classes: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N)[:3] for i in range(num_classes)])


def blend(image: np.ndarray, label: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """RGB (H, W, 3) of a grey slice with coloured labels (background untouched)."""
    lo, hi = float(np.min(image)), float(np.max(image))
    grey = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    colors = _colors(max(num_classes, int(label.max()) + 1))
    mask = label > 0
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colors[label[mask] - 1]
    return np.clip(rgb, 0, 1)


def busiest_slice(volume: np.ndarray) -> int:
    """The slice index with the most foreground voxels (the middle one if all are empty)."""
    counts = (volume > 0).reshape(volume.shape[0], -1).sum(1)
    return int(np.argmax(counts)) if counts.max() > 0 else volume.shape[0] // 2


def save_case_overlay(image: np.ndarray, pred: np.ndarray, path, label: Optional[np.ndarray] = None,
                      slices: Optional[Sequence[int]] = None, class_names: Sequence[str] = ()) -> Path:
    """A PNG with, per chosen slice, the image, the ground truth (if given) and the prediction."""
    plt = _pyplot()
    if image.ndim == 2:
        image, pred = image[None], pred[None]
        label = None if label is None else label[None]
    if slices is None:
        slices = [busiest_slice(label if label is not None else pred)]
    depth = image.shape[0]
    bad = [s for s in slices if not 0 <= s < depth]
    if bad:
        raise ValueError(f"slice indices {bad} outside the volume's 0..{depth - 1}")
    num_classes = max(len(class_names) + 1, int(pred.max()) + 1,
                      int(label.max()) + 1 if label is not None else 0)
    cols = 3 if label is not None else 2
    fig, axes = plt.subplots(len(slices), cols, figsize=(3.2 * cols, 3.2 * len(slices)), squeeze=False)
    for row, s in enumerate(slices):
        panels = [("image", np.repeat(_norm(image[s])[..., None], 3, axis=2))]
        if label is not None:
            panels.append(("ground truth", blend(image[s], label[s], num_classes)))
        panels.append(("prediction", blend(image[s], pred[s], num_classes)))
        for col, (title, rgb) in enumerate(panels):
            axes[row, col].imshow(rgb, interpolation="nearest")
            axes[row, col].set_title(f"{title} (slice {s})", fontsize=9)
            axes[row, col].axis("off")
    if class_names:
        colors = _colors(num_classes)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in range(len(class_names))]
        fig.legend(handles, list(class_names), loc="lower center", ncol=min(4, len(class_names)), fontsize=8)
        fig.subplots_adjust(bottom=0.08 + 0.03 * math.ceil(len(class_names) / 4))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _norm(image: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(image)), float(np.max(image))
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def plot_training_curves(csv_path, png_path) -> Path:
    """Training loss (and validation DSC, when logged) per epoch from a training ``log.csv``."""
    plt = _pyplot()
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{csv_path} has no epochs logged")
    epochs = [int(r["epoch"]) for r in rows]
    loss = [float(r["train_loss"]) for r in rows]
    val = [float(r.get("val_mean_dsc") or "nan") for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, loss, label="training loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any(not math.isnan(v) for v in val):
        ax2 = ax.twinx()
        ax2.plot(epochs, val, label="validation mean DSC", color="tab:red", marker=".")
        ax2.set_ylabel("DSC")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
