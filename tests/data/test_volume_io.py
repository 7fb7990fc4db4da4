"""read_volume / write_volume: orientation, geometry and round trips in every format."""
import h5py
import nibabel as nib
import numpy as np
import pytest

from dlkunet.data import DataError, VolumeCase, read_volume, write_volume
from dlkunet.data.volumes import normalize_intensity


def test_nifti_orientation_and_geometry(tmp_path, writers):
    data = np.zeros((6, 5, 4), np.float32)        # (x, y, z)
    data[1, 2, 3] = 7.0
    path = tmp_path / "img_0000.nii.gz"
    nib.save(nib.Nifti1Image(data, writers.affine()), path)
    case = read_volume(path)
    assert case.name == "img_0000"
    assert case.image.shape == (4, 5, 6) and case.image.dtype == np.float32
    assert case.image[3, 2, 1] == 7.0 and case.image.sum() == 7.0
    assert case.spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_allclose(case.affine, writers.affine())
    assert case.label is None


def test_nifti_round_trip_keeps_affine_and_shape(tmp_path, writers):
    rng = np.random.default_rng(0)
    src = tmp_path / "ct_0000.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((7, 6, 5)).astype(np.float32), writers.affine()), src)
    like = read_volume(src)
    pred = rng.integers(0, 9, like.image.shape)
    out = write_volume(tmp_path / "pred" / "ct.nii.gz", pred, like)
    back = read_volume(out)
    np.testing.assert_array_equal(back.image.astype(np.int64), pred)
    np.testing.assert_allclose(back.affine, like.affine, atol=1e-6)
    assert back.spacing == pytest.approx(like.spacing)
    # Seen by nibabel directly, the prediction sits on the source grid, voxel for voxel.
    raw = nib.load(str(out))
    assert raw.shape == nib.load(str(src)).shape
    np.testing.assert_array_equal(np.asanyarray(raw.dataobj), np.transpose(pred, (2, 1, 0)))
    np.testing.assert_allclose(raw.header.get_sform(), writers.affine(), atol=1e-6)
    np.testing.assert_allclose(raw.header.get_qform(), writers.affine(), atol=1e-5)


def test_nifti_label_pair(tmp_path, writers):
    img, lab = tmp_path / "a_0000.nii.gz", tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 2), np.float32), writers.affine()), img)
    nib.save(nib.Nifti1Image(np.full((3, 4, 2), 2, np.uint8), writers.affine()), lab)
    case = read_volume(img, label_path=lab)
    assert case.label.shape == (2, 4, 3) and case.label.dtype == np.int64 and (case.label == 2).all()
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 3), np.uint8), writers.affine()), lab)
    with pytest.raises(DataError, match="differs from image shape"):
        read_volume(img, label_path=lab)


def test_nifti_4d_rejected(tmp_path):
    path = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 2, 4), np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match="3-D"):
        read_volume(path)


def test_nifti_write_from_spacing_only(tmp_path):
    like = VolumeCase("x", np.zeros((2, 3, 4), np.float32), None, (3.0, 2.0, 0.5), None, "x.npz")
    back = read_volume(write_volume(tmp_path / "x.nii.gz", np.ones((2, 3, 4), np.int64), like))
    assert back.spacing == pytest.approx((3.0, 2.0, 0.5))
    np.testing.assert_allclose(back.affine, np.diag([0.5, 2.0, 3.0, 1.0]))


@pytest.mark.parametrize("name", ["case0001.npy.h5", "case0001.npz"])
def test_h5_npz_round_trip(tmp_path, name):
    rng = np.random.default_rng(1)
    like = VolumeCase("case0001", rng.random((3, 5, 4)).astype(np.float32),
                      rng.integers(0, 4, (3, 5, 4)), (2.5, 0.7, 0.7), None, "src")
    pred = rng.integers(0, 4, (3, 5, 4))
    back = read_volume(write_volume(tmp_path / name, pred, like))
    assert back.name == "case0001"
    np.testing.assert_array_equal(back.image, like.image)
    np.testing.assert_array_equal(back.label, pred)
    assert back.spacing == pytest.approx(like.spacing)
    # Files as TransUNet / ACDC write them carry no spacing.
    plain = like._replace(spacing=None)
    assert read_volume(write_volume(tmp_path / ("plain_" + name), pred, plain)).spacing is None


def test_bad_spacing_entry(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, image=np.zeros((2, 2, 2)), label=np.zeros((2, 2, 2)), spacing=np.array([1.0, -2.0, 1.0]))
    with pytest.raises(DataError, match="three positive numbers"):
        read_volume(path)


def test_h5_as_transunet_writes_it(tmp_path):
    path = tmp_path / "case0002.npy.h5"
    label = np.zeros((2, 3, 3), np.float32)
    label[1, 1, 1] = 8
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.ones((2, 3, 3), np.float32))
        f.create_dataset("label", data=label)
    case = read_volume(path, num_classes=9)
    assert case.name == "case0002" and case.label[1, 1, 1] == 8 and case.label.dtype == np.int64
    with pytest.raises(DataError, match="outside the class range"):
        read_volume(path, num_classes=8)


def test_npz_img_key_and_2d(tmp_path):
    path = tmp_path / "slice.npz"
    np.savez(path, img=np.ones((4, 5)), label=np.zeros((4, 5), np.uint8))
    case = read_volume(path)
    assert case.image.shape == (1, 4, 5) and case.label.shape == (1, 4, 5)


def test_write_volume_checks(tmp_path):
    like = VolumeCase("x", np.zeros((2, 3, 4), np.float32), None, None, None, "x.npz")
    with pytest.raises(DataError, match="differs from the reference"):
        write_volume(tmp_path / "x.npz", np.zeros((2, 3, 5), np.int64), like)
    with pytest.raises(DataError, match="must be integer"):
        write_volume(tmp_path / "x.npz", np.zeros((2, 3, 4), np.float32), like)
    with pytest.raises(DataError, match="unsupported file type"):
        write_volume(tmp_path / "x.png", np.zeros((2, 3, 4), np.int64), like)


def test_normalize_intensity():
    ct = np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0])
    np.testing.assert_allclose(normalize_intensity(ct, "ct"), [0.0, 0.0, 0.5, 1.0, 1.0])
    mri = np.linspace(0.0, 1000.0, 1001)
    out = normalize_intensity(mri, "percentile")
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[500] == pytest.approx(0.5, abs=1e-6)
    assert (normalize_intensity(np.full(5, 3.0), "percentile") == 0).all()
    with pytest.raises(ValueError, match="unknown intensity"):
        normalize_intensity(ct, "zscore")


def test_nifti_output_keeps_the_header_codes(tmp_path, writers):
    # Issue 17, defect 8: qform/sform codes 0/2 used to come back as 1/1.
    img = nib.Nifti1Image(np.random.default_rng(0).random((5, 4, 3)).astype(np.float32), writers.affine())
    img.set_qform(None, code=0)
    img.set_sform(writers.affine(), code=2)
    src = tmp_path / "scan_0000.nii.gz"
    nib.save(img, src)
    like = read_volume(src)
    out = nib.load(str(write_volume(tmp_path / "out" / "scan.nii.gz", np.ones(like.image.shape, np.int64), like)))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 2)
    np.testing.assert_allclose(out.affine, nib.load(str(src)).affine, atol=1e-6)
    assert out.header.get_zooms() == pytest.approx(nib.load(str(src)).header.get_zooms())
    assert out.get_data_dtype().kind == "u" and np.asarray(out.dataobj).max() == 1  # unscaled labels


def test_nifti_output_of_a_ct_header_is_not_rescaled(tmp_path, writers):
    # A CT header's slope/intercept (e.g. -1024 offset) must not be applied to the labels written.
    img = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), writers.affine())
    img.header.set_slope_inter(1.0, -1024.0)
    src = tmp_path / "ct_0000.nii.gz"
    nib.save(img, src)
    like = read_volume(src)
    pred = np.full(like.image.shape, 3, np.int64)
    back = read_volume(write_volume(tmp_path / "o" / "ct.nii.gz", pred, like))
    np.testing.assert_array_equal(back.image, pred)


@pytest.mark.parametrize("suffix", [".npz", ".npy.h5"])
def test_2d_input_comes_back_2d(tmp_path, suffix):
    # Issue 17, defect 9: a (64, 64) slice came back as (1, 64, 64).
    image = np.random.default_rng(1).random((6, 7)).astype(np.float32)
    like = VolumeCase("s", image[None], None, None, None, "s" + suffix, source_shape=(6, 7))
    out = write_volume(tmp_path / ("s" + suffix), np.ones((1, 6, 7), np.int64), like)
    if suffix == ".npz":
        with np.load(out) as data:
            assert data["label"].shape == (6, 7) and data["image"].shape == (6, 7)
    else:
        with h5py.File(out, "r") as data:
            assert data["label"].shape == (6, 7) and data["image"].shape == (6, 7)
    np.savez(tmp_path / "in.npz", image=image)
    assert read_volume(tmp_path / "in.npz").source_shape == (6, 7)


def test_2d_and_singleton_4d_nifti_keep_their_shape(tmp_path):
    for shape in [(5, 4), (5, 4, 3, 1)]:
        src = tmp_path / f"v{len(shape)}_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), src)
        like = read_volume(src)
        out = write_volume(tmp_path / "o" / src.name, np.zeros(like.image.shape, np.int64), like)
        assert nib.load(str(out)).shape == shape
