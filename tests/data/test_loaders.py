"""Each loader on small files written in its real format."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from dlkunet.data import DataError, VolumeCase, open_dataset
from dlkunet.data.volumes import normalize_intensity


def check_item(item, size):
    assert set(item) == {"image", "label", "case", "source"}
    assert item["image"].shape == (1, size, size) and item["image"].dtype == torch.float32
    assert item["label"].shape == (size, size) and item["label"].dtype == torch.int64


class TestSynapse:
    def test_open_and_classes(self, synapse_dir):
        root, _ = synapse_dir
        data = open_dataset(root)
        assert data.fmt == "synapse" and data.root == root
        assert data.num_classes == 9
        assert data.class_names == ["spleen", "right kidney", "left kidney", "gallbladder", "liver",
                                    "stomach", "aorta", "pancreas"]

    def test_train_slices_resized_like_transunet(self, synapse_dir):
        root, arrays = synapse_dir
        ds = open_dataset(root, "synapse").train_slices(16, augment=False)
        assert len(ds) == 3
        item = ds[1]
        check_item(item, 16)
        assert item["case"] == "case0005_slice001"
        image, label = arrays["case0005_slice001"]
        factors = (16 / 24, 16 / 20)
        np.testing.assert_allclose(item["image"][0].numpy(), ndimage.zoom(image, factors, order=3), atol=1e-6)
        np.testing.assert_array_equal(item["label"].numpy(), ndimage.zoom(label, factors, order=0))

    def test_test_volumes(self, synapse_dir):
        root, arrays = synapse_dir
        data = open_dataset(root)
        vols = data.test_volumes()
        assert len(vols) == 1
        case = vols[0]
        assert isinstance(case, VolumeCase) and case.name == "case0001"
        assert case.image.dtype == np.float32 and case.image.shape == (3, 24, 20)
        assert case.label.dtype == np.int64
        np.testing.assert_array_equal(case.label, arrays["case0001"][1].astype(np.int64))
        assert case.spacing is None and case.affine is None
        assert data.val_slices(16) is None

    def test_dataloader_batches(self, synapse_dir):
        root, _ = synapse_dir
        batch = next(iter(DataLoader(open_dataset(root).train_slices(8), batch_size=3)))
        assert batch["image"].shape == (3, 1, 8, 8) and batch["label"].shape == (3, 8, 8)
        assert len(batch["case"]) == 3

    @pytest.mark.parametrize("list_dir", ["", "lists", "lists_Synapse"])
    def test_list_locations(self, tmp_path, writers, list_dir):
        root = tmp_path / "syn"
        writers.synapse(root, list_dir=list_dir)
        assert len(open_dataset(root).train_slices(8)) == 3

    def test_list_names_with_extension_and_subset(self, synapse_dir):
        root, _ = synapse_dir
        (root / "lists/lists_Synapse/train.txt").write_text("case0006_slice000.npz\n\n")
        ds = open_dataset(root).train_slices(8)
        assert len(ds) == 1 and ds[0]["case"] == "case0006_slice000"

    def test_without_lists_uses_folder(self, synapse_dir):
        root, _ = synapse_dir
        for name in ("train.txt", "test_vol.txt"):
            (root / "lists/lists_Synapse" / name).unlink()
        data = open_dataset(root)
        assert len(data.train_slices(8)) == 3 and len(data.test_volumes()) == 1

    def test_dataset_json_overrides_classes(self, synapse_dir):
        root, _ = synapse_dir
        (root / "dataset.json").write_text(json.dumps({"labels": {str(i): f"c{i}" for i in range(10)}}))
        data = open_dataset(root)
        assert data.num_classes == 10 and data.class_names[0] == "c1"


class TestACDC:
    def test_open(self, acdc_dir):
        root, _ = acdc_dir
        data = open_dataset(root)
        assert data.fmt == "acdc" and data.num_classes == 4 and data.class_names == ["RV", "Myo", "LV"]

    def test_slices_and_volumes(self, acdc_dir):
        root, arrays = acdc_dir
        data = open_dataset(root, "acdc")
        train = data.train_slices(12, augment=False)
        assert len(train) == 3
        item = train[2]
        check_item(item, 12)
        assert item["case"] == "case_001_sliceES_0"
        img, label = arrays["case_001_sliceES_0.npz"]
        factors = (12 / 16, 12 / 12)
        np.testing.assert_allclose(item["image"][0].numpy(), ndimage.zoom(img, factors, order=3), atol=1e-6)
        np.testing.assert_array_equal(item["label"].numpy(), ndimage.zoom(label, factors, order=0))
        val = data.val_slices(12)
        assert val is not None and len(val) == 1 and val[0]["case"] == "case_019_sliceED_0"
        vols = data.test_volumes()
        assert [v.name for v in vols] == ["case_002_volume_ED", "case_002_volume_ES"]
        np.testing.assert_array_equal(vols[1].image, arrays["case_002_volume_ES.npz"][0])
        np.testing.assert_array_equal(vols[1].label, arrays["case_002_volume_ES.npz"][1])

    def test_val_slices_not_augmented(self, acdc_dir):
        root, _ = acdc_dir
        val = open_dataset(root).val_slices(16)
        first = val[0]["image"]
        val.set_epoch(5)
        assert torch.equal(val[0]["image"], first)


class TestNifti:
    def test_open_classes_and_intensity(self, nifti_dir):
        root, _ = nifti_dir
        data = open_dataset(root)
        assert data.fmt == "nifti"
        assert data.num_classes == 3 and data.class_names == ["liver", "tumour"]
        assert data.intensity == "ct"

    def test_training_slices_follow_dhw(self, nifti_dir):
        root, arrays = nifti_dir
        ds = open_dataset(root).train_slices(9, augment=False)
        # Depths 5 and 6: 11 axial slices in total.
        assert len(ds) == 11
        item = ds[5 + 2]  # second case, z = 2
        assert item["case"] == "case_0002_slice002"
        image, label = arrays["case_0002"]       # nibabel order (x, y, z)
        expected = normalize_intensity(image[:, :, 2].T, "ct")   # (H, W) = (y, x)
        zoom = (9 / 9, 9 / 10)
        np.testing.assert_allclose(item["image"][0].numpy(), ndimage.zoom(expected, zoom, order=3), atol=1e-5)
        np.testing.assert_array_equal(item["label"].numpy(), ndimage.zoom(label[:, :, 2].T, zoom, order=0))

    def test_test_volumes_keep_geometry(self, nifti_dir, writers):
        root, arrays = nifti_dir
        vols = open_dataset(root).test_volumes()
        assert len(vols) == 1
        case = vols[0]
        image, label = arrays["case_0003"]
        assert case.name == "case_0003"
        assert case.image.shape == (5, 9, 10)
        np.testing.assert_array_equal(case.label, np.transpose(label, (2, 1, 0)))
        np.testing.assert_allclose(case.image, normalize_intensity(np.transpose(image, (2, 1, 0)), "ct"))
        np.testing.assert_allclose(case.affine, writers.affine())
        assert case.spacing == pytest.approx((2.5, 0.7, 0.8))

    def test_classes_from_labels_without_json(self, tmp_path, writers):
        root = tmp_path / "plain"
        writers.nifti(root, labels_json=False, highest=4)
        data = open_dataset(root)
        assert data.num_classes == 5 and data.class_names == ["class1", "class2", "class3", "class4"]
        assert data.intensity == "percentile"

    def test_holdout_moves_last_training_cases(self, tmp_path, writers):
        root = tmp_path / "hold"
        writers.nifti(root, cases=("case_0001", "case_0002", "case_0003", "case_0004"), test_cases=())
        assert len(open_dataset(root).test_volumes()) == 0
        data = open_dataset(root, holdout=0.5)
        assert [v.name for v in data.test_volumes()] == ["case_0003", "case_0004"]
        assert data.test_volumes()[0].label is not None
        assert len(data.train_slices(8)) == 5 + 6   # depths of case_0001, case_0002
        with pytest.raises(ValueError, match="holdout"):
            open_dataset(root, holdout=1.0)

    def test_mri_channel_uses_percentile(self, tmp_path, writers):
        root = tmp_path / "mri"
        writers.nifti(root, modality="MRI")
        assert open_dataset(root).intensity == "percentile"


def test_unknown_layout_and_format(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="unrecognised dataset layout"):
        open_dataset(tmp_path / "something")
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown dataset format"):
        open_dataset(tmp_path / "something", fmt="brats")
    with pytest.raises(DataError, match="not a Synapse folder"):
        open_dataset(tmp_path / "something", fmt="synapse")


def test_worker_count_does_not_change_augmentation(synapse_dir):
    """Items depend on (seed, epoch, index) only: 0 or 2 workers give the same epoch."""
    root, _ = synapse_dir
    ds = open_dataset(root).train_slices(8, augment=True, seed=11)
    ds.set_epoch(3)
    single = [b["image"] for b in DataLoader(ds, batch_size=1, num_workers=0)]
    multi = [b["image"] for b in DataLoader(ds, batch_size=1, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(single, multi)) and len(single) == len(multi) == 3
    ds.set_epoch(4)
    assert any(not torch.equal(a, b["image"]) for a, b in zip(single, DataLoader(ds, batch_size=1)))
