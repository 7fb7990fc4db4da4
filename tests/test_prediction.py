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


@pytest.fixture
def synapse_checkpoint(tmp_path):
    """What training on TransUNet's Synapse files stores: no loader normalisation, CT-windowed data."""
    torch.manual_seed(0)
    model = build_model("S", num_classes=3, base_width=4)
    path = tmp_path / "synapse.pt"
    atomic_save(make_checkpoint(model, {"fmt": "synapse", "num_classes": 3, "image_size": 32, "intensity": "none",
                                        "raw_intensity": "ct", "input_range": [0.0, 1.0]}, variant="S"), path)
    return path


def _raw_ct(tmp_path):
    hu = np.random.default_rng(3).uniform(-1000, 1000, (40, 36, 4)).astype(np.float32)  # (x, y, z)
    src = tmp_path / "in" / "ct.nii.gz"
    src.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(src))
    return src


def test_raw_ct_against_a_synapse_model_is_windowed_with_a_warning(synapse_checkpoint, tmp_path, caplog):
    # Issue 17, defect 4: HU values of +-1000 went in as they were, exit 0, no warning.
    from dlkunet.checkpointing import load_model
    from dlkunet.data.volumes import normalize_intensity
    from dlkunet.evaluation import predict_volume

    src = _raw_ct(tmp_path)
    with caplog.at_level("WARNING", logger="dlkunet"):
        written = predict(synapse_checkpoint, src, tmp_path / "out", device="cpu", progress=False)
    assert "look raw" in caplog.text and "applying the 'ct' normalisation" in caplog.text and str(src) in caplog.text
    model, _ = load_model(synapse_checkpoint)
    case = read_volume(src)
    expected = predict_volume(model, normalize_intensity(case.image, "ct"), 32)
    np.testing.assert_array_equal(read_volume(written[0]).image.astype(np.int64), expected)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dlkunet"):
        predict(synapse_checkpoint, src, tmp_path / "out2", device="cpu", intensity="none", progress=False)
    assert caplog.text == ""  # an explicit choice is the user's


def test_raw_input_without_a_recorded_normalisation_is_warned_about(checkpoint, tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "acdc.pt"
    atomic_save(make_checkpoint(build_model("S", num_classes=3, base_width=4),
                                {"num_classes": 3, "image_size": 32, "intensity": "none"}), path)
    src = _raw_ct(tmp_path)
    with caplog.at_level("WARNING", logger="dlkunet"):
        predict(path, src, tmp_path / "out", device="cpu", progress=False)
    assert "look raw" in caplog.text and "--intensity ct" in caplog.text
    caplog.clear()
    image = np.random.default_rng(1).random((2, 32, 32)).astype(np.float32)  # in the training range
    write_volume(tmp_path / "ok" / "v.npz", np.zeros(image.shape, np.int64),
                 VolumeCase("v", image, None, None, None, "v.npz"))
    with caplog.at_level("WARNING", logger="dlkunet"):
        predict(path, tmp_path / "ok", tmp_path / "out3", device="cpu", progress=False)
    assert caplog.text == ""


def test_nan_in_a_predict_input_is_an_error_naming_file_and_slice(checkpoint, tmp_path):
    # Issue 17, defect 2: the cubic resize spread 4 NaN voxels over the slice, scored as background.
    image = np.random.default_rng(4).random((3, 20, 20)).astype(np.float32)
    image[1, 2:4, 5:7] = np.nan
    path = tmp_path / "in" / "v.npz"
    path.parent.mkdir()
    np.savez(path, image=image)
    with pytest.raises(DataError, match=r"v.npz: image holds 4 non-finite value.*slice 1, row 2, column 5"):
        predict(checkpoint, path, tmp_path / "out", device="cpu", intensity="none", progress=False)
    assert not (tmp_path / "out").exists()


def test_2d_npz_comes_back_2d(checkpoint, tmp_path):
    # Issue 17, defect 9: a 2-D .npz came back with shape (1, 64, 64).
    path = tmp_path / "in" / "slice.npz"
    path.parent.mkdir()
    np.savez(path, image=np.random.default_rng(5).random((24, 20)).astype(np.float32))
    out = predict(checkpoint, path, tmp_path / "out", device="cpu", intensity="none", progress=False)[0]
    with np.load(out) as data:
        assert data["label"].shape == (24, 20) and data["image"].shape == (24, 20)


def test_inputs_are_checked_before_the_model_loads(tmp_path, capsys):
    # Issue 17, defect 10: predict loaded the model before checking its input, and showed a bar.
    with pytest.raises(DataError, match="input not found"):
        predict(tmp_path / "no-such-model.pt", tmp_path / "no-such-input", tmp_path / "out", device="cpu")
    assert "predict" not in capsys.readouterr().err
