"""Augmentation: the paper's rot90/flip at p = 0.5, alignment of image and label, reproducibility."""
import numpy as np
import pytest
import torch

from dlkunet.data.base import SliceDataset, SliceSource
from dlkunet.data.transforms import item_rng, random_augment, resize_pair


def asymmetric_pair(h=6, w=6):
    image = np.arange(h * w, dtype=np.float32).reshape(h, w)
    return image, (image.astype(np.int64) % 5)


def all_variants(image):
    """The 8 images reachable by rot90 and flips (the dihedral group of the square)."""
    out = []
    for k in range(4):
        r = np.rot90(image, k)
        out += [r, np.flip(r, 0)]
    return out


def classify(result, image):
    for i, v in enumerate(all_variants(image)):
        if np.array_equal(result, v):
            return i
    raise AssertionError("augmented image is not a rot90/flip of the input")


def test_rot_flip_statistics():
    image, label = asymmetric_pair()
    identity = 0
    seen = set()
    n = 2000
    for i in range(n):
        out_image, out_label = random_augment(image, label, item_rng(0, 0, i))
        seen.add(classify(out_image, image))
        # The label went through the same transform as the image.
        assert np.array_equal(out_label, out_image.astype(np.int64) % 5)
        identity += np.array_equal(out_image, image)
    assert seen == set(range(8))
    # Identity: the rotation is a no-op (not drawn, 1/2, or drawn with k = 0, 1/2 * 1/4) and no
    # flip is drawn (1/2): 5/8 * 1/2 = 5/16.
    assert identity / n == pytest.approx(5 / 16, abs=0.04)


def test_flip_probability_is_half():
    # A flip reverses the orientation (the reflection class of the dihedral group), rot90 never does.
    image, label = asymmetric_pair()
    reflections = {1, 3, 5, 7}
    hits = sum(classify(random_augment(image, label, item_rng(1, 0, i))[0], image) in reflections
               for i in range(2000))
    assert hits / 2000 == pytest.approx(0.5, abs=0.04)


def test_small_rotation_keeps_labels_discrete():
    image = np.zeros((21, 21), np.float32)
    image[5:16, 8:13] = 1.0
    label = image.astype(np.int64) * 3
    rotated_any = False
    for i in range(20):
        out_image, out_label = random_augment(image, label, item_rng(2, 0, i), rotate_deg=30)
        assert set(np.unique(out_label)) <= {0, 3}
        rotated_any |= out_image.shape == image.shape and not any(
            np.array_equal(out_image, v) for v in all_variants(image))
    assert rotated_any


def test_resize_pair():
    image, label = asymmetric_pair(6, 4)
    out_image, out_label = resize_pair(image, label, 12)
    assert out_image.shape == out_label.shape == (12, 12)
    assert set(np.unique(out_label)) <= set(np.unique(label))   # nearest neighbour: no new labels
    same_image, same_label = resize_pair(image[:4], label[:4], 4)
    assert same_image is not None and np.array_equal(same_image, image[:4])


class Squares(SliceSource):
    def __init__(self, n=6):
        self.n = n

    def __len__(self):
        return self.n

    def name(self, index):
        return f"s{index}"

    def load(self, index):
        image, label = asymmetric_pair(8, 8)
        return image + index, label


def test_dataset_reproducible_per_seed_epoch_index():
    a = SliceDataset(Squares(), 8, augment=True, seed=3)
    b = SliceDataset(Squares(), 8, augment=True, seed=3)
    for epoch in (1, 2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        # Reading in a different order (as another worker split would) gives the same items.
        first = [a[i]["image"] for i in range(6)]
        second = [b[i]["image"] for i in reversed(range(6))][::-1]
        assert all(torch.equal(x, y) for x, y in zip(first, second))
    a.set_epoch(1)
    b.set_epoch(2)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(6))
    c = SliceDataset(Squares(), 8, augment=True, seed=4)
    c.set_epoch(1)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(6))


def test_dataset_without_set_epoch_still_varies():
    ds = SliceDataset(Squares(1), 8, augment=True, seed=0)
    draws = {tuple(ds[0]["image"].flatten()[:8].tolist()) for _ in range(30)}
    assert len(draws) > 1


def test_no_augment_is_identity():
    ds = SliceDataset(Squares(), 8, augment=False)
    image, label = Squares().load(2)
    item = ds[2]
    assert torch.equal(item["image"][0], torch.from_numpy(image))
    assert torch.equal(item["label"], torch.from_numpy(label))
    with pytest.raises(IndexError):
        ds[6]


def test_transunet_augment_branches_and_alignment():
    # TransUNet's RandomGenerator: rot90+flip (p 0.5) or else a rotation (p 0.25 overall), never both.
    from scipy import ndimage

    from dlkunet.data.transforms import transunet_augment

    image, label = asymmetric_pair(9, 9)
    variants = all_variants(image)
    kinds = {"none": 0, "dihedral": 0, "rotated": 0}
    for i in range(400):
        out_image, out_label = transunet_augment(image, label, item_rng(5, 0, i))
        np.testing.assert_array_equal(out_label, out_image.astype(np.int64) % 5)  # nearest for both
        if np.array_equal(out_image, image):
            kinds["none"] += 1
        elif any(np.array_equal(out_image, v) for v in variants):
            kinds["dihedral"] += 1
        else:
            angles = [a for a in range(-20, 20)
                      if np.array_equal(out_image, ndimage.rotate(image, a, order=0, reshape=False))]
            assert angles, f"draw {i} is neither a dihedral variant nor a rotation in [-20, 20)"
            kinds["rotated"] += 1
    # Expected 50 / 100+ / 100-: rot90 k=0 then a flip is a dihedral variant, so "none" also
    # collects the draws of the rotation branch's angle 0 and of neither branch (p 0.25).
    assert 60 <= kinds["rotated"] <= 140 and 160 <= kinds["dihedral"] <= 240, kinds


def test_slice_dataset_transunet_style(tmp_path):
    class One(SliceSource):
        def __len__(self):
            return 1

        def name(self, index):
            return "one"

        def load(self, index):
            return asymmetric_pair(8, 8)

    with pytest.raises(ValueError, match="unknown augmentation"):
        SliceDataset(One(), 8, augment=True, style="mixup")
    data = SliceDataset(One(), 8, augment=True, seed=3, style="transunet")
    data.set_epoch(0)
    image, label = asymmetric_pair(8, 8)
    from dlkunet.data.transforms import transunet_augment
    expected, _ = transunet_augment(image, label, item_rng(3, 0, 0))
    np.testing.assert_array_equal(data[0]["image"][0].numpy(), expected)
