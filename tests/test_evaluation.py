"""Volume-wise evaluation: resizing pipeline, report files and the paper-style tables."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from dlkunet.checkpointing import CheckpointError, atomic_save, make_checkpoint
from dlkunet.data.synthetic import make_synthetic
from dlkunet.evaluation import (evaluate, evaluate_model, markdown_table, predict_volume, resize_slice,
                                table_layout)
from dlkunet.models import build_model


class Threshold(nn.Module):
    """Predicts class 1 where the (resized) input exceeds 0.5: a model whose answer is known."""

    num_classes = 2

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


def test_resize_slice_exact_shapes():
    image = np.random.default_rng(0).random((37, 53)).astype(np.float32)
    for shape in ((224, 224), (31, 17), (37, 53)):
        assert resize_slice(image, shape, order=3).shape == shape
    labels = np.random.default_rng(1).integers(0, 4, (13, 29))
    back = resize_slice(resize_slice(labels, (64, 64), 0), (13, 29), 0)
    assert back.shape == (13, 29) and set(np.unique(back)) <= set(range(4))


def test_predict_volume_keeps_slices_in_place():
    # Each slice gets its own square; with batch 3 over 7 slices any mix-up of order shows.
    volume = np.zeros((7, 40, 48), dtype=np.float32)
    for i in range(7):
        volume[i, 4 * i:4 * i + 12, 5 * i:5 * i + 14] = 1.0
    pred = predict_volume(Threshold(), volume, size=64, batch_size=3)
    assert pred.shape == volume.shape and pred.dtype == np.int64
    for i in range(7):
        agree = (pred[i] == volume[i]).mean()
        assert agree > 0.97, (i, agree)


def test_table_layouts_follow_the_paper():
    synapse = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    layout, columns = table_layout("synapse", synapse)
    assert layout == "synapse"
    assert [c for c, _ in columns] == ["Aor", "Gal", "Kid(L)", "Kid(R)", "Liv", "Pan", "Spl", "Sto"]
    assert [i for _, i in columns] == [7, 4, 3, 2, 5, 8, 1, 6]  # class indices, background = 0
    layout, columns = table_layout("acdc", ["RV", "Myo", "LV"])
    assert layout == "acdc" and columns == [("RV", 1), ("Myo", 2), ("LV", 3)]
    assert table_layout("synapse", ["liver", "spleen"])[0] == "generic"


def test_markdown_tables():
    names = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    per_class = {str(i): {"name": n, "dsc": i / 10, "hd95": float(i)} for i, n in enumerate(names, 1)}
    summary = dict(fmt="synapse", class_names=names, per_class=per_class, mean_dsc=0.45, mean_hd95=4.5,
                   num_cases=2, hd95_protocol="transunet", spacing_used=False)
    lines = markdown_table(summary).splitlines()
    assert lines[0] == "| Method | DSC | HD95 | Aor | Gal | Kid(L) | Kid(R) | Liv | Pan | Spl | Sto |"
    assert lines[2] == "| DLKUNet | 45.00 | 4.50 | 70.00 | 40.00 | 30.00 | 20.00 | 50.00 | 80.00 | 10.00 | 60.00 |"
    acdc = dict(summary, fmt="acdc", class_names=["RV", "Myo", "LV"], mean_dsc=0.9,
                per_class={"1": {"dsc": 0.8, "hd95": 1.0}, "2": {"dsc": 0.9, "hd95": 1.0},
                           "3": {"dsc": 1.0, "hd95": 1.0}})
    lines = markdown_table(acdc).splitlines()
    assert lines[0] == "| Method | DSC | RV | Myo | LV |" and lines[2] == "| DLKUNet | 90.00 | 80.00 | 90.00 | 100.00 |"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), num_train=1, num_test=2, size=32, depth=4, seed=5)


def _checkpoint(path, num_classes=5, image_size=32):
    torch.manual_seed(0)
    model = build_model("S", num_classes=num_classes, base_width=4)
    atomic_save(make_checkpoint(model, {"num_classes": num_classes, "image_size": image_size}, variant="S"), path)
    return path


def test_evaluate_writes_reports(synthetic, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    summary = evaluate(ckpt, synthetic, output=tmp_path / "eval", device="cpu", progress=False)
    names = summary["class_names"]
    assert len(names) == 4 and summary["num_cases"] == 2
    with open(tmp_path / "eval" / "cases.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    expected = ["case"] + [f"{k}_{n.replace(' ', '_')}" for n in names for k in ("dsc", "hd95")] \
        + ["mean_dsc", "mean_hd95"]
    assert rows[0] == expected and len(rows) == 3
    assert all(0.0 <= float(v) <= 1.0 for v in rows[1][1:-1:2])  # the DSC columns
    def no_nan(token):
        raise AssertionError(f"summary.json is not strict JSON: {token}")

    saved = json.loads((tmp_path / "eval" / "summary.json").read_text(), parse_constant=no_nan)
    assert set(saved["per_class"]) == {"1", "2", "3", "4"} and saved["num_cases"] == 2
    assert saved["mean_dsc"] == pytest.approx(np.mean([v["dsc"] for v in saved["per_class"].values()]))
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[0] == "| Method | DSC | HD95 | " + " | ".join(names) + " |"


def test_evaluate_model_scores_a_perfect_model():
    from dlkunet.data import VolumeCase

    image = np.zeros((3, 30, 30), dtype=np.float32)
    image[:, 5:20, 8:25] = 1
    case = VolumeCase("c", image, image.astype(np.int64), (1.0, 1.0, 1.0), None, "c.npz")
    summary = evaluate_model(Threshold(), [case], 2, ["thing"], 64, progress=False)
    assert summary["mean_dsc"] > 0.97 and summary["per_class"]["1"]["name"] == "thing"


def test_evaluate_errors(synthetic, tmp_path):
    ckpt = _checkpoint(tmp_path / "m3.pt", num_classes=3)
    with pytest.raises(CheckpointError, match="3 classes.*has 5"):
        evaluate(ckpt, synthetic, output=tmp_path / "e", device="cpu", progress=False)
    with pytest.raises(ValueError, match="not found"):
        evaluate(_checkpoint(tmp_path / "m5.pt"), tmp_path / "nowhere", output=tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="HD95 protocol"):
        evaluate(ckpt, synthetic, hd95_protocol="inches")


def test_hd95_in_mm_needs_a_spacing_for_every_case(synthetic, tmp_path):
    # Issue 17, defect 3: --hd95-protocol mm on .npy.h5 files without spacing used 1 mm, yet the
    # table said "HD95 in mm" and summary.json "spacing_used: true".
    from dlkunet.data import DataError, VolumeCase

    ckpt = _checkpoint(tmp_path / "m.pt")
    with pytest.raises(DataError, match=r"case0002.npy.h5: no voxel spacing stored.*--hd95-protocol transunet"):
        evaluate(ckpt, synthetic, output=tmp_path / "e", device="cpu", progress=False, hd95_protocol="mm")
    assert not (tmp_path / "e" / "summary.json").exists()
    summary = evaluate(ckpt, synthetic, output=tmp_path / "v", device="cpu", progress=False)
    saved = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert saved["hd95_unit"] == "voxels" and saved["spacing_used"] is False
    assert "HD95 in voxels" in (tmp_path / "v" / "table.md").read_text()
    # With spacings the unit is mm, and says so.
    image = np.zeros((3, 30, 30), dtype=np.float32)
    image[:, 5:20, 8:25] = 1
    case = VolumeCase("c", image, image.astype(np.int64), (2.0, 0.8, 0.8), None, "c.npz")
    summary = evaluate_model(Threshold(), [case], 2, ["thing"], 64, progress=False, hd95_protocol="mm")
    assert summary["hd95_unit"] == "mm" and "HD95 in mm" in markdown_table(summary)


def test_evaluate_checks_the_data_before_loading_the_model(tmp_path):
    from dlkunet.data import DataError

    with pytest.raises(DataError, match="not found"):
        evaluate(tmp_path / "no-such-model.pt", tmp_path / "nowhere", output=tmp_path / "e", progress=False)
