"""Volume-wise evaluation as TransUNet's ``test_single_volume``, with paper-style tables.

Each slice of a test volume is resized to the training size with cubic interpolation (order 3),
predicted, arg-maxed and resized back with nearest neighbour (order 0); per-class DSC and HD95
come from ``dlkunet.metrics.case_metrics``.  Outputs: a per-case CSV, a summary JSON and a
markdown table laid out as the paper's Table 2 (Synapse) or Table 3 (ACDC).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

# Table 2's organ columns, in the paper's order, with the class names that fill them.
SYNAPSE_COLUMNS = [("Aor", ("aorta",)), ("Gal", ("gallbladder",)), ("Kid(L)", ("left kidney", "kidney(l)")),
                   ("Kid(R)", ("right kidney", "kidney(r)")), ("Liv", ("liver",)), ("Pan", ("pancreas",)),
                   ("Spl", ("spleen",)), ("Sto", ("stomach",))]
ACDC_COLUMNS = [("RV", ("rv", "right ventricle")), ("Myo", ("myo", "myocardium")),
                ("LV", ("lv", "left ventricle"))]


def resize_slice(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``scipy.ndimage.zoom`` to exactly ``shape`` (zoom's rounding can miss by one; crop/pad fixes it)."""
    if tuple(image.shape) == tuple(shape):
        return image
    out = ndimage.zoom(image, (shape[0] / image.shape[0], shape[1] / image.shape[1]), order=order)
    if out.shape != tuple(shape):
        fixed = np.zeros(shape, dtype=out.dtype)
        h, w = min(shape[0], out.shape[0]), min(shape[1], out.shape[1])
        fixed[:h, :w] = out[:h, :w]
        out = fixed
    return out


@torch.no_grad()
def predict_volume(model, image: np.ndarray, size: int, device="cpu", batch_size: int = 16,
                   amp_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Label volume (D, H, W) int64 for an image volume (D, H, W), slices batched."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"expected an image volume (D, H, W), got shape {image.shape}")
    device = torch.device(device)
    model.eval()
    depth, height, width = image.shape
    out = np.zeros(image.shape, dtype=np.int64)
    for start in range(0, depth, max(1, batch_size)):
        stop = min(depth, start + batch_size)
        batch = np.stack([resize_slice(image[i], (size, size), order=3) for i in range(start, stop)])
        x = torch.from_numpy(batch.astype(np.float32))[:, None].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        pred = logits.float().argmax(1).cpu().numpy()
        for j, i in enumerate(range(start, stop)):
            out[i] = resize_slice(pred[j], (height, width), order=0)
    return out


def table_layout(fmt: str, class_names: Sequence[str]):
    """("synapse" | "acdc" | "generic", [(column, class index)]) for the markdown table."""
    lowered = [n.lower() for n in class_names]
    for name, columns in (("synapse", SYNAPSE_COLUMNS), ("acdc", ACDC_COLUMNS)):
        if len(columns) != len(lowered):
            continue
        index = []
        for _, aliases in columns:
            hit = [i for i, n in enumerate(lowered) if n in aliases]
            if len(hit) != 1:
                break
            index.append(hit[0] + 1)
        else:
            return name, [(col, i) for (col, _), i in zip(columns, index)]
    return "generic", [(n, i + 1) for i, n in enumerate(class_names)]


def _fmt(value: float, scale: float = 1.0) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value * scale:.2f}"


def markdown_table(summary: Dict[str, Any], method: str = "DLKUNet") -> str:
    """The paper's Table 2 (DSC, HD95, organs) / Table 3 (DSC, RV, Myo, LV) layout; DSC in %."""
    layout, columns = table_layout(summary["fmt"], summary["class_names"])
    per_class = summary["per_class"]
    head = ["Method", "DSC"] + ([] if layout == "acdc" else ["HD95"]) + [c for c, _ in columns]
    row = [method, _fmt(summary["mean_dsc"], 100)]
    if layout != "acdc":
        row.append(_fmt(summary["mean_hd95"]))
    row += [_fmt(per_class[str(i)]["dsc"], 100) for _, i in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
             "| " + " | ".join(row) + " |"]
    note = f"DSC in %, HD95 in {hd95_unit(summary)} ({summary['num_cases']} cases, HD95 protocol " \
        f"{summary['hd95_protocol']})"
    return "\n".join(lines) + "\n\n" + note + "\n"


def hd95_unit(summary: Dict[str, Any]) -> str:
    """"mm" only when every case's spacing was used, else "voxels" (summaries before "hd95_unit" too)."""
    return summary.get("hd95_unit") or ("mm" if summary.get("spacing_used") else "voxels")


def evaluate_model(model, cases, num_classes: int, class_names: Sequence[str], image_size: int,
                   fmt: str = "generic", device="cpu", batch_size: int = 16, hd95_protocol: str = "transunet",
                   progress: bool = True, amp_dtype=None, on_case=None) -> Dict[str, Any]:
    """Per-case and mean DSC / HD95 of ``model`` on labelled volumes (``VolumeCase``s)."""
    from .data import DataError
    from .metrics import case_metrics

    if model.num_classes != num_classes:
        raise ValueError(f"the model predicts {model.num_classes} classes but the data set has "
                         f"{num_classes} (background included)")
    use_spacing = hd95_protocol == "mm"
    rows: List[Dict[str, Any]] = []
    bar = tqdm(cases, desc="evaluate", disable=not progress, dynamic_ncols=True)
    for case in bar:
        if case.label is None:
            raise ValueError(f"test case {case.name} ({case.path}) has no label; evaluation needs labels")
        if use_spacing and case.spacing is None:
            # Distances in mm need the voxel size; 1 mm stand-ins would label voxels as mm.
            raise DataError(f"{case.path}: no voxel spacing stored (TransUNet's .npy.h5 and the ACDC .npz files "
                            f"have none), so HD95 cannot be given in mm; use --hd95-protocol transunet "
                            f"(voxels, as the paper's tables), or data that records its spacing (NIfTI, or a "
                            f"'spacing' entry in .h5 / .npz)")
        pred = predict_volume(model, case.image, image_size, device, batch_size, amp_dtype)
        metrics = case_metrics(pred, case.label, num_classes, spacing=case.spacing if use_spacing else None,
                               protocol=hd95_protocol)
        row: Dict[str, Any] = {"case": case.name}
        for c, (dsc, hd) in enumerate(metrics, start=1):
            row[f"dsc_{c}"], row[f"hd95_{c}"] = float(dsc), float(hd)
        row["mean_dsc"] = float(np.nanmean([m[0] for m in metrics]))
        row["mean_hd95"] = float(np.nanmean([m[1] for m in metrics]))
        rows.append(row)
        bar.set_postfix(dsc=f"{row['mean_dsc']:.3f}")
        if on_case is not None:
            on_case(case, pred)
    bar.close()
    if not rows:
        raise ValueError("no test volumes to evaluate")
    per_class = {}
    for c in range(1, num_classes):
        per_class[str(c)] = {"name": class_names[c - 1],
                             "dsc": _nanmean([r[f"dsc_{c}"] for r in rows]),
                             "hd95": _nanmean([r[f"hd95_{c}"] for r in rows])}
    return {
        "fmt": fmt, "class_names": list(class_names), "num_cases": len(rows), "hd95_protocol": hd95_protocol,
        # Every case had its spacing (a case without one is refused above), so the unit is what it says.
        "spacing_used": use_spacing, "hd95_unit": "mm" if use_spacing else "voxels",
        # TransUNet's averaging: per-class means over cases, then the mean over classes.
        "mean_dsc": _nanmean([v["dsc"] for v in per_class.values()]),
        "mean_hd95": _nanmean([v["hd95"] for v in per_class.values()]),
        "per_class": per_class, "cases": rows,
    }


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _json_safe(value):
    """NaN (a class absent from every case) as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_reports(summary: Dict[str, Any], out_dir, method: str = "DLKUNet") -> Dict[str, Path]:
    """``cases.csv`` (per case, per class), ``summary.json`` and ``table.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = summary["class_names"]
    columns = ["case"] + [f"{kind}_{n.replace(' ', '_')}" for n in names for kind in ("dsc", "hd95")] \
        + ["mean_dsc", "mean_hd95"]
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in summary["cases"]:
            values = [row["case"]]
            for c in range(1, len(names) + 1):
                values += [f"{row[f'dsc_{c}']:.6f}", f"{row[f'hd95_{c}']:.6f}"]
            writer.writerow(values + [f"{row['mean_dsc']:.6f}", f"{row['mean_hd95']:.6f}"])
    light = _json_safe({k: v for k, v in summary.items() if k != "cases"})
    with open(out / "summary.json", "w") as handle:
        json.dump(light, handle, indent=2, allow_nan=False)
    (out / "table.md").write_text(markdown_table(summary, method))
    return {"csv": out / "cases.csv", "json": out / "summary.json", "markdown": out / "table.md"}


def evaluate(checkpoint, data=None, fmt: str = "auto", output="eval", device: str = "auto",
             batch_size: int = 16, hd95_protocol: str = "transunet", progress: bool = True,
             precision: str = "fp32", limit: Optional[int] = None, overlays: int = 0) -> Dict[str, Any]:
    """Evaluate a checkpoint on a data set's test volumes; writes the reports into ``output``."""
    from .checkpointing import CheckpointError, load_model
    from .data import DataError, open_dataset
    from .distributed import pick_device
    from .training import resolve_precision

    if hd95_protocol not in ("transunet", "mm"):
        raise ValueError(f"unknown HD95 protocol {hd95_protocol!r}; choose transunet or mm")
    # The inputs first: a wrong folder should not wait for a model to load.
    if data is None:
        raise DataError("no data set given (--data)")
    if not Path(data).exists():
        raise DataError(f"data directory not found: {data}")
    dataset = open_dataset(data, fmt)
    if len(dataset.test_volumes()) == 0:
        raise DataError(f"{data}: no test volumes found")
    dev = pick_device(device)
    model, ckpt = load_model(checkpoint, dev)
    meta = ckpt.get("data") or {}
    if model.num_classes != dataset.num_classes:
        raise CheckpointError(f"checkpoint {checkpoint} predicts {model.num_classes} classes but {data} has "
                              f"{dataset.num_classes} (background included); was it trained on another data set?")
    image_size = int(meta.get("image_size") or 224)
    cases = dataset.test_volumes()
    if limit is not None:
        cases = [cases[i] for i in range(min(limit, len(cases)))]
    if len(cases) == 0:
        raise DataError(f"{data}: no test volumes found")
    out = Path(output)
    shown = [0]

    def overlay(case, pred):
        if shown[0] >= overlays:
            return
        from .plots import save_case_overlay
        save_case_overlay(case.image, pred, out / "overlays" / f"{case.name}.png", label=case.label,
                          class_names=dataset.class_names)
        shown[0] += 1

    summary = evaluate_model(model, cases, dataset.num_classes, dataset.class_names, image_size,
                             fmt=dataset.fmt, device=dev, batch_size=batch_size, hd95_protocol=hd95_protocol,
                             progress=progress, amp_dtype=resolve_precision(precision, dev),
                             on_case=overlay if overlays else None)
    summary["checkpoint"] = str(checkpoint)
    summary["image_size"] = image_size
    summary["method"] = _method(ckpt)
    summary["reports"] = {k: str(v) for k, v in write_reports(summary, out, summary["method"]).items()}
    return summary


def _method(ckpt: Dict[str, Any]) -> str:
    variant = ckpt.get("variant")
    width = (ckpt.get("model_config") or {}).get("base_width")
    name = f"DLKUNet-{variant}" if variant else "DLKUNet"
    return f"{name} (C={width})" if width and width != 96 else name
