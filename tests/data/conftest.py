"""Small datasets written in the real on-disk formats, for the loader tests."""
import json

import h5py
import nibabel as nib
import numpy as np
import pytest


def write_synapse(root, slices=(("case0005", 2), ("case0006", 1)), tests=("case0001",), shape=(24, 20),
                  depth=3, list_dir="lists/lists_Synapse", seed=0):
    """TransUNet layout; labels stored as float32, as TransUNet's files have them."""
    rng = np.random.default_rng(seed)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    names, arrays = [], {}
    for case, count in slices:
        for z in range(count):
            name = f"{case}_slice{z:03d}"
            image = rng.random(shape).astype(np.float32)
            label = rng.integers(0, 9, shape).astype(np.float32)
            np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
            names.append(name)
            arrays[name] = (image, label)
    for case in tests:
        image = rng.random((depth,) + shape).astype(np.float32)
        label = rng.integers(0, 9, (depth,) + shape).astype(np.float32)
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
        arrays[case] = (image, label)
    lists = root / list_dir if list_dir else root
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("\n".join(names) + "\n")
    (lists / "test_vol.txt").write_text("\n".join(tests) + "\n")
    return arrays


def write_acdc(root, shape=(16, 12), seed=0):
    """Swin-Unet / MT-UNet layout: train/ valid/ test/ .npz with keys img and label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    splits = {"train": ["case_001_sliceED_0.npz", "case_001_sliceED_1.npz", "case_001_sliceES_0.npz"],
              "valid": ["case_019_sliceED_0.npz"],
              "test": ["case_002_volume_ED.npz", "case_002_volume_ES.npz"]}
    for split, names in splits.items():
        (root / split).mkdir(parents=True)
        for name in names:
            full = shape if split != "test" else (4,) + shape
            img = rng.random(full).astype(np.float32)
            label = rng.integers(0, 4, full).astype(np.uint8)
            np.savez(root / split / name, img=img, label=label)
            arrays[name] = (img, label)
    (root / "lists_ACDC").mkdir()
    for split, names in splits.items():
        (root / "lists_ACDC" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return arrays


def skewed_affine():
    """Rotation about z, anisotropic zooms and a translation: nothing an axis swap could hide."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = [-100.0, 35.5, 12.0]
    return affine


def write_nifti(root, cases=("case_0001", "case_0002"), test_cases=("case_0003",), xyz=(10, 9, 5),
                labels_json=True, modality="CT", seed=0, highest=2):
    rng = np.random.default_rng(seed)
    arrays = {}
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, names in (("Tr", cases), ("Ts", test_cases)):
        for i, case in enumerate(names):
            shape = (xyz[0], xyz[1], xyz[2] + i)
            image = rng.uniform(-300, 400, shape).astype(np.float32)
            label = rng.integers(0, highest + 1, shape).astype(np.uint8)
            nib.save(nib.Nifti1Image(image, skewed_affine()), root / f"images{split}" / f"{case}_0000.nii.gz")
            nib.save(nib.Nifti1Image(label, skewed_affine()), root / f"labels{split}" / f"{case}.nii.gz")
            arrays[case] = (image, label)
    if labels_json:
        meta = {"channel_names": {"0": modality}, "labels": {"background": 0, "liver": 1, "tumour": 2}}
        (root / "dataset.json").write_text(json.dumps(meta))
    return arrays


@pytest.fixture
def synapse_dir(tmp_path):
    root = tmp_path / "Synapse"
    return root, write_synapse(root)


@pytest.fixture
def acdc_dir(tmp_path):
    root = tmp_path / "ACDC"
    return root, write_acdc(root)


@pytest.fixture
def nifti_dir(tmp_path):
    root = tmp_path / "Dataset001"
    return root, write_nifti(root)


@pytest.fixture
def writers():
    """The writer functions, for tests that need a variant of the standard layouts."""
    from types import SimpleNamespace

    return SimpleNamespace(synapse=write_synapse, acdc=write_acdc, nifti=write_nifti, affine=skewed_affine)
