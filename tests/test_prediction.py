"""``predict``: label volumes in the input's format, shape and geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dlkunet.checkpointing import atomic_save, make_checkpoint
from dlkunet.data import DataError, VolumeCase, read_volume, write_volume
from dlkunet.models import build_model
from dlkunet.prediction import find_inputs, predict

nib = pytest.importorskip("nibabel")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("S", num_classes=3, base_width=4)
    path = tmp_path / "model.pt"
    atomic_save(make_checkpoint(model, {"num_classes": 3, "image_size": 32, "intensity": "percentile",
                                        "class_names": ["a", "b"]}, variant="S"), path)
    return path


def test_predict_keeps_nifti_affine_and_shape(checkpoint, tmp_path):
    affine = np.array([[0.0, -0.8, 0.0, 12.5], [0.7, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(100, 40, (45, 38, 6)).astype(np.float32)  # (x, y, z)
    src = tmp_path / "in" / "case7.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(src))
    written = predict(checkpoint, src, tmp_path / "out", device="cpu", batch_size=4, progress=False)
    assert written == [tmp_path / "out" / "case7.nii.gz"]
    out = nib.load(str(written[0]))
    assert out.shape == data.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    labels = np.asarray(out.dataobj)
    assert labels.dtype.kind in "iu" and labels.min() >= 0 and labels.max() <= 2


def test_predict_matches_slice_by_slice_model(checkpoint, tmp_path):
    # The written labels are the model's arg-max per slice, in the same voxel order as the input.
    from dlkunet.checkpointing import load_model
    from dlkunet.evaluation import predict_volume

    image = np.random.default_rng(1).random((5, 32, 32)).astype(np.float32)
    like = VolumeCase("v", image, None, (2.0, 0.9, 0.9), None, "v.npz")
    write_volume(tmp_path / "in" / "v.npz", np.zeros(image.shape, dtype=np.int64), like)
    predict(checkpoint, tmp_path / "in", tmp_path / "out", device="cpu", intensity="none", progress=False)
    got = read_volume(tmp_path / "out" / "v.npz")
    model, _ = load_model(checkpoint)
    assert np.array_equal(got.label, predict_volume(model, image, 32))
    assert np.array_equal(got.image, image)


def test_predict_h5_and_overlay(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    image = np.random.default_rng(2).random((3, 20, 24)).astype(np.float32)
    like = VolumeCase("h", image, None, None, None, "h.npy.h5")
    write_volume(tmp_path / "in" / "h.npy.h5", np.zeros(image.shape, dtype=np.int64), like)
    predict(checkpoint, tmp_path / "in" / "h.npy.h5", tmp_path / "out", device="cpu", overlay_slices=[0, 2],
            progress=False)
    assert read_volume(tmp_path / "out" / "h.npy.h5").label.shape == image.shape
    assert (tmp_path / "out" / "overlays" / "h.png").stat().st_size > 0


def test_predict_input_errors(checkpoint, tmp_path):
    with pytest.raises(DataError, match="not found"):
        find_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .nii"):
        find_inputs(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        find_inputs(tmp_path / "notes.txt")
    image = np.zeros((2, 16, 16), dtype=np.float32)
    write_volume(tmp_path / "same" / "a.npz", np.zeros(image.shape, dtype=np.int64),
                 VolumeCase("a", image, None, None, None, "a.npz"))
    with pytest.raises(DataError, match="overwrite"):
        predict(checkpoint, tmp_path / "same", tmp_path / "same", device="cpu", progress=False)
