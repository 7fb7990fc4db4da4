"""Every kind of bad input raises DataError naming the file and the problem."""
import json

import h5py
import numpy as np
import pytest

from dlkunet.data import DataError, open_dataset, read_volume


def raises(match, path):
    """pytest.raises for DataError whose message names ``path`` and matches ``match``."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            assert str(path) in str(self.info.value), f"{path} not named in: {self.info.value}"
            return result
    return _Check()


def test_error_is_value_error():
    assert issubclass(DataError, ValueError)


class TestMissingFile:
    def test_listed_slice_missing(self, synapse_dir):
        root, _ = synapse_dir
        missing = root / "train_npz" / "case0005_slice001.npz"
        missing.unlink()
        data = open_dataset(root)
        with raises("file not found.*listed in", missing):
            data.train_slices(16)  # every listed slice is checked before the first epoch

    def test_missing_training_slice_does_not_stop_evaluation(self, synapse_dir):
        # Issue 17, defect 5: evaluation reads only the test volumes.
        root, arrays = synapse_dir
        (root / "train_npz" / "case0005_slice001.npz").unlink()
        cases = open_dataset(root).test_volumes()
        assert len(cases) == 1 and np.array_equal(cases[0].image, arrays["case0001"][0])

    def test_listed_volume_missing(self, synapse_dir):
        root, _ = synapse_dir
        (root / "lists/lists_Synapse/test_vol.txt").write_text("case0001\ncase0099\n")
        with raises("test volume file not found", root / "test_vol_h5" / "case0099.npy.h5"):
            open_dataset(root)

    def test_acdc_listed_missing(self, acdc_dir):
        root, _ = acdc_dir
        (root / "valid" / "case_019_sliceED_0.npz").unlink()
        data = open_dataset(root)
        assert len(data.test_volumes()) == 2  # the test split does not need the others
        with raises("not found", root / "valid" / "case_019_sliceED_0.npz"):
            data.val_slices(16)

    def test_nifti_label_missing(self, nifti_dir):
        root, _ = nifti_dir
        (root / "labelsTr" / "case_0002.nii.gz").unlink()
        with raises("label file not found", root / "labelsTr" / "case_0002.nii.gz"):
            open_dataset(root)

    def test_read_volume_missing(self, tmp_path):
        with raises("file not found", tmp_path / "nothing.npy.h5"):
            read_volume(tmp_path / "nothing.npy.h5")


class TestWrongKey:
    def test_synapse_slice_without_image(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "train_npz" / "case0005_slice000.npz"
        np.savez(path, data=np.zeros((4, 4)), label=np.zeros((4, 4)))
        with raises("no image array.*'image'", path):
            open_dataset(root).train_slices(8)[0]

    def test_slice_without_label(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "train_npz" / "case0005_slice000.npz"
        np.savez(path, image=np.zeros((4, 4)), mask=np.zeros((4, 4)))
        with raises("no 'label' array", path):
            open_dataset(root).train_slices(8)[0]

    def test_h5_without_image(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "test_vol_h5" / "case0001.npy.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("volume", data=np.zeros((2, 4, 4)))
        with raises("no 'image' dataset", path):
            open_dataset(root).test_volumes()[0]

    def test_acdc_volume_wrong_key(self, acdc_dir):
        root, _ = acdc_dir
        path = root / "test" / "case_002_volume_ED.npz"
        np.savez(path, imgs=np.zeros((2, 4, 4)), label=np.zeros((2, 4, 4)))
        with raises("no image array", path):
            open_dataset(root).test_volumes()[0]


class TestLabelRange:
    def test_synapse_slice_label_9(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "train_npz" / "case0006_slice000.npz"
        label = np.zeros((24, 20), np.float32)
        label[3, 4] = 9
        np.savez(path, image=np.zeros((24, 20), np.float32), label=label)
        with raises(r"label values 0\.\.9 outside the class range \[0, 8\]", path):
            open_dataset(root).train_slices(8)[2]

    def test_negative_and_fractional(self, acdc_dir):
        root, _ = acdc_dir
        path = root / "train" / "case_001_sliceED_0.npz"
        np.savez(path, img=np.zeros((4, 4)), label=-np.ones((4, 4), np.int16))
        with raises("outside the class range", path):
            open_dataset(root).train_slices(8)[0]
        np.savez(path, img=np.zeros((4, 4)), label=np.full((4, 4), 0.5))
        with raises("non-integer", path):
            open_dataset(root).train_slices(8)[0]

    def test_volume_label_out_of_range(self, acdc_dir):
        root, _ = acdc_dir
        path = root / "test" / "case_002_volume_ES.npz"
        np.savez(path, img=np.zeros((2, 4, 4)), label=np.full((2, 4, 4), 4))
        with raises("outside the class range", path):
            open_dataset(root).test_volumes()[1]

    def test_nifti_label_out_of_range(self, tmp_path, writers):
        root = tmp_path / "nii"
        writers.nifti(root, highest=3)  # dataset.json declares labels 0..2
        data = open_dataset(root)
        with raises("outside the class range", root / "labelsTr"):
            data.train_slices(8)[0]

    def test_shape_mismatch(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "train_npz" / "case0005_slice000.npz"
        np.savez(path, image=np.zeros((4, 4)), label=np.zeros((4, 5)))
        with raises("shape", path):
            open_dataset(root).train_slices(8)[0]


class TestEmptyList:
    def test_synapse_train_list(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "lists/lists_Synapse/train.txt"
        path.write_text("\n  \n")
        with raises("list file is empty", path):
            open_dataset(root).train_slices(8)

    def test_acdc_test_list(self, acdc_dir):
        root, _ = acdc_dir
        path = root / "lists_ACDC" / "test.txt"
        path.write_text("")
        with raises("list file is empty", path):
            open_dataset(root).test_volumes()


class TestCorrupt:
    def test_npz(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "train_npz" / "case0005_slice000.npz"
        path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
        with raises("cannot read as .npz", path):
            open_dataset(root).train_slices(8)[0]

    def test_h5(self, synapse_dir):
        root, _ = synapse_dir
        path = root / "test_vol_h5" / "case0001.npy.h5"
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
        with raises("cannot read as HDF5", path):
            open_dataset(root).test_volumes()[0]

    def test_truncated_nifti(self, nifti_dir):
        root, _ = nifti_dir
        path = root / "imagesTs" / "case_0003_0000.nii.gz"
        path.write_bytes(path.read_bytes()[:100])
        with raises("cannot read as NIfTI", path):
            open_dataset(root).test_volumes()[0]

    def test_dataset_json(self, nifti_dir):
        root, _ = nifti_dir
        (root / "dataset.json").write_text("{ not json")
        with raises("cannot parse dataset.json", root / "dataset.json"):
            open_dataset(root)

    def test_dataset_json_label_gap(self, nifti_dir):
        root, _ = nifti_dir
        (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 2}}))
        with raises("without gaps", root / "dataset.json"):
            open_dataset(root)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "case.mha"
    path.write_bytes(b"")
    with raises("unsupported file type", path):
        read_volume(path)


def test_slice_not_2d(synapse_dir):
    root, _ = synapse_dir
    path = root / "train_npz" / "case0005_slice000.npz"
    np.savez(path, image=np.zeros((2, 4, 4)), label=np.zeros((2, 4, 4)))
    with raises("must be 2-D", path):
        open_dataset(root).train_slices(8)[0]


class TestNonFinite:
    """Issue 17, defects 1 and 2: a NaN in one image is an error naming the file and the slice."""

    def test_training_slice(self, synapse_dir):
        root, arrays = synapse_dir
        path = root / "train_npz" / "case0005_slice001.npz"
        image, label = arrays["case0005_slice001"]
        image = image.copy()
        image[3, 4] = np.nan
        np.savez(path, image=image, label=label)
        data = open_dataset(root).train_slices(8)
        data[0]  # the other slices still load
        with raises("1 non-finite value.*row 3, column 4", path):
            data[1]

    def test_test_volume(self, synapse_dir):
        root, arrays = synapse_dir
        path = root / "test_vol_h5" / "case0001.npy.h5"
        image, label = arrays["case0001"]
        image = image.copy()
        image[2, 5, 6:10] = np.nan
        image[0, 0, 0] = np.inf
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
        with raises(r"5 non-finite value.*in 2 slice\(s\) \(0, 2\).*slice 0, row 0, column 0", path):
            open_dataset(root).test_volumes()[0]

    def test_nifti_training_volume(self, nifti_dir):
        import nibabel as nib

        root, arrays = nifti_dir
        path = root / "imagesTr" / "case_0002_0000.nii.gz"
        image = arrays["case_0002"][0].copy()
        image[1, 2, 3] = np.nan  # (x, y, z): slice 3, row 2, column 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), path)
        with raises("non-finite.*slice 3, row 2, column 1", path):
            open_dataset(root).train_slices(8)[len(arrays["case_0001"][0][0, 0]) + 3]
