"""The synthetic dataset: Synapse layout, determinism, and classes a network can separate."""
import numpy as np
import pytest

from dlkunet.data import open_dataset
from dlkunet.data.synthetic import ORGANS, make_synthetic, synthetic_case


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return make_synthetic(root, num_train=3, num_test=2, size=32, depth=8, num_classes=5, seed=0)


def test_layout_is_transunet(small):
    assert (small / "lists" / "lists_Synapse" / "train.txt").read_text().splitlines()[0] == "case0001_slice000"
    assert (small / "lists" / "lists_Synapse" / "test_vol.txt").read_text().split() == ["case0004", "case0005"]
    with np.load(small / "train_npz" / "case0002_slice003.npz") as f:
        assert set(f.files) == {"image", "label"} and f["image"].shape == (32, 32)
    data = open_dataset(small)
    assert data.fmt == "synapse" and data.num_classes == 5
    assert data.class_names == [o.name for o in ORGANS[:4]]
    assert len(data.train_slices(16)) == 24
    case = data.test_volumes()[1]
    assert case.name == "case0005" and case.image.shape == (8, 32, 32)


def test_all_classes_present_and_intensity_range(small):
    data = open_dataset(small)
    for case in data.test_volumes():
        assert set(np.unique(case.label)) == set(range(5))
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0


def test_deterministic_and_seeded(tmp_path):
    a = make_synthetic(tmp_path / "a", num_train=1, num_test=1, size=16, depth=4, seed=7)
    b = make_synthetic(tmp_path / "b", num_train=1, num_test=1, size=16, depth=4, seed=7)
    c = make_synthetic(tmp_path / "c", num_train=1, num_test=1, size=16, depth=4, seed=8)
    va, vb, vc = (open_dataset(r).test_volumes()[0] for r in (a, b, c))
    assert np.array_equal(va.image, vb.image) and np.array_equal(va.label, vb.label)
    assert not np.array_equal(va.image, vc.image)


def test_cases_vary_in_position_and_size():
    vols = [synthetic_case(np.random.default_rng([0, i]), 48, 12, 3)[1] for i in range(4)]
    sizes = [int((v == 1).sum()) for v in vols]
    centres = [tuple(np.argwhere(v == 1).mean(0).round(1)) for v in vols]
    assert len(set(sizes)) == 4 and len(set(centres)) == 4


def test_classes_separable_by_intensity():
    """Per-class mean intensities sit apart by several noise widths (the task is learnable)."""
    image, label = synthetic_case(np.random.default_rng(0), 64, 16, 9)
    body = image[label == 0] > 0.15   # soft tissue inside the body (outside is ~0.02)
    means = [float(image[label == 0][body].mean())] + \
        [float(image[label == c].mean()) for c in range(1, 9)]
    spread = max(float(image[label == c].std()) for c in range(1, 9))
    gaps = np.diff(np.sort(means))
    assert gaps.min() > 0.05 and spread < 0.1


def test_nine_classes_and_bad_arguments(tmp_path):
    root = make_synthetic(tmp_path / "nine", num_train=1, num_test=0, size=32, depth=6, num_classes=9)
    data = open_dataset(root)
    assert data.num_classes == 9 and len(data.test_volumes()) == 0
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(tmp_path / "x", num_classes=10)
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic(tmp_path / "x", num_train=0)
