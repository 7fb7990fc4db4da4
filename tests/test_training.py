"""Training loop, exact resume, checkpoints (atomic writes, weights_only, RNG, safetensors)."""
from __future__ import annotations

import csv
import json
import random
import sys

import numpy as np
import pytest
import torch

from dlkunet.checkpointing import (CheckpointError, atomic_save, atomic_write, get_rng_state, load_checkpoint,
                                   load_model, make_checkpoint, save_safetensors, set_rng_state)
from dlkunet.data.synthetic import make_synthetic
from dlkunet.models import build_model
from dlkunet.plots import have_matplotlib as plots_available
from dlkunet.training import (PAPER_GAMMA, TrainConfig, TrainingError, cpu_cost_hint, make_config,
                              resolve_precision, step_lr_factor, train)

TINY = dict(variant="S", base_width=8, image_size=32, batch_size=4, device="cpu", progress=False,
            tensorboard=False, seed=7)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"), num_train=2, num_test=1, size=32, depth=4, seed=3)


def _run(data, out, **kw):
    cfg = TrainConfig(data=str(data), output=str(out), **{**TINY, **kw})
    return cfg, train(cfg)


def test_resume_is_exact(tiny_data, tmp_path):
    # The dynamic loss depends on the epoch, the lr on the scheduler, Adam on its moments and the
    # batches on the shuffling and augmentation of each epoch: all must survive the restart.
    _run(tiny_data, tmp_path / "straight", epochs=2, loss="dynamic", lr_step=1, lr_gamma=0.5)
    _, first = _run(tiny_data, tmp_path / "split", epochs=2, loss="dynamic", lr_step=1, lr_gamma=0.5,
                    stop_after=1)
    assert first["epochs_done"] == 1 and not first["finished"]
    cfg = make_config(resume=tmp_path / "split" / "last.pt", output=str(tmp_path / "split"))
    assert cfg.epochs == 2 and cfg.loss == "dynamic" and cfg.stop_after is None  # settings come from the file
    second = train(cfg, resume=tmp_path / "split" / "last.pt")
    assert second["epochs_done"] == 2 and second["finished"]

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2
    with open(tmp_path / "split" / "log.csv", newline="") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2]


def test_resume_changes_nothing_if_run_differs(tiny_data, tmp_path):
    # Guard against a vacuous resume test: another seed must give other weights.
    _run(tiny_data, tmp_path / "a", epochs=1)
    _run(tiny_data, tmp_path / "b", epochs=1, seed=8)
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in "ab")
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_checkpoint_contents_and_rebuild(tiny_data, tmp_path):
    _, result = _run(tiny_data, tmp_path, epochs=1, safetensors=True)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)  # plain containers and tensors only
    assert raw["epoch"] == 1 and raw["model_config"]["base_width"] == 8
    assert raw["data"]["num_classes"] == 5 and raw["data"]["image_size"] == 32
    assert result["best_metric_name"] == "train_loss"  # the synthetic set has no validation split
    if plots_available():
        assert (tmp_path / "curves.png").stat().st_size > 0
    model, _ = load_model(tmp_path / "best.pt")
    x = torch.rand(2, 1, 32, 32)
    trained = build_model("S", num_classes=5, base_width=8)
    trained.load_state_dict(raw["model"])
    trained.eval()
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    if (tmp_path / "best.safetensors").exists():
        model2, ckpt2 = load_model(tmp_path / "best.safetensors")
        assert ckpt2["data"]["num_classes"] == 5
        with torch.no_grad():
            assert torch.equal(model2(x), trained(x))
    else:
        pytest.importorskip("safetensors")  # installed but not written: that is a failure below
        pytest.fail("safetensors is installed but best.safetensors was not written")


def test_tensorboard_missing_is_reported_once(tiny_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with caplog.at_level("INFO", logger="dlkunet"):
        _run(tiny_data, tmp_path, epochs=2, tensorboard=True)
    assert caplog.text.count("tensorboard is not installed") == 1
    # Issue 18 item 6: the epoch lines and the early time estimate go through logging.
    assert "epoch 2/2  loss" in caplog.text
    assert "per epoch (2 steps)" in caplog.text and "for the 2 epoch(s) of this run" in caplog.text
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["train_loss"]) > 0


def test_resume_with_other_classes_is_an_error(tiny_data, tmp_path):
    _run(tiny_data, tmp_path / "run", epochs=1)
    other = make_synthetic(tmp_path / "other", num_train=1, num_test=0, size=32, depth=2, num_classes=3)
    cfg = TrainConfig(data=str(other), output=str(tmp_path / "run"), epochs=2, **{**TINY})
    with pytest.raises(CheckpointError, match="5 classes.*has 3"):
        train(cfg, resume=tmp_path / "run" / "last.pt")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from dlkunet.data import DataError

    with pytest.raises(DataError, match="not found"):
        _run(tmp_path / "nope", tmp_path / "run", epochs=1)


def test_step_lr_schedule():
    floor = 1e-5 / 1e-3
    assert step_lr_factor(0, 20, PAPER_GAMMA, floor) == 1.0
    assert step_lr_factor(19, 20, PAPER_GAMMA, floor) == 1.0
    assert step_lr_factor(20, 20, PAPER_GAMMA, floor) == pytest.approx(PAPER_GAMMA)
    assert step_lr_factor(180, 20, PAPER_GAMMA, floor) == pytest.approx(10 ** -1.8)
    assert step_lr_factor(200, 20, PAPER_GAMMA, floor) == pytest.approx(floor)  # 1e-5 at epoch 200
    assert step_lr_factor(399, 20, PAPER_GAMMA, floor) == pytest.approx(floor)
    assert step_lr_factor(40, 20, 0.1, floor) == pytest.approx(floor)  # the literal "90%" reading


def test_presets_and_overrides():
    cfg = make_config("synapse", batch_size=8)
    assert (cfg.epochs, cfg.batch_size, cfg.image_size, cfg.loss, cfg.fmt) == (400, 8, 224, "phase", "synapse")
    assert (cfg.lr, cfg.weight_decay, cfg.lr_step) == (1e-3, 1e-5, 20)
    assert make_config("acdc").loss == "dynamic"
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("brats")
    with pytest.raises(TypeError, match="unknown training options"):
        make_config(epoch=3)


def test_precision_choices():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path):
    path = tmp_path / "last.pt"
    model = build_model("S", num_classes=3, base_width=4)
    atomic_save(make_checkpoint(model, {"num_classes": 3}), path)
    before = path.read_bytes()

    def dies_halfway(tmp):
        with open(tmp, "wb") as handle:
            handle.write(before[: len(before) // 2])
        raise KeyboardInterrupt  # e.g. Ctrl-C, or the job's time limit, during the save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_halfway)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    load_model(path)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt is not a dlkunet checkpoint"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    atomic_save(make_checkpoint(build_model("S", num_classes=3, base_width=4)), truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="truncated, damaged or another format"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a dlkunet checkpoint"):
        load_checkpoint(foreign)
    broken = make_checkpoint(build_model("S", num_classes=3, base_width=4))
    broken["model_config"]["base_width"] = 8
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "broken.pt")


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached value in numpy's legacy state
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_safetensors_export_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    model = build_model("S", num_classes=3, base_width=4).eval()
    ckpt = make_checkpoint(model, {"num_classes": 3, "image_size": 32}, variant="S")
    save_safetensors(ckpt, tmp_path / "m.safetensors")
    rebuilt, meta = load_model(tmp_path / "m.safetensors")
    assert meta["data"]["image_size"] == 32
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


class Payload:
    """A class outside torch's weights-only allow-list, as a malicious checkpoint would carry."""


def test_unsafe_checkpoint_is_refused_in_our_words(tmp_path):
    # Issue 17, defect 7: PyTorch's error advises retrying with weights_only=False; we never do.
    path = tmp_path / "evil.pt"
    torch.save({"format": "dlkunet-checkpoint", "model": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "refused" in text and "never unpickles" in text and "test_training.Payload" in text
    assert "weights_only" not in text and len(text.splitlines()) == 1


@pytest.mark.parametrize("kind", ["nifti", "nifti_gz", "npz", "h5"])
def test_data_file_given_as_checkpoint(tmp_path, kind):
    # Issue 17, defect 9: a NIfTI passed as the checkpoint gave PyTorch's "Unsupported operand 31 ...
    # please file an issue" text.
    from dlkunet.data import VolumeCase, write_volume

    name = {"nifti": "x.nii", "nifti_gz": "x.nii.gz", "npz": "x.npz", "h5": "x.npy.h5"}[kind]
    like = VolumeCase("x", np.zeros((2, 4, 4), np.float32), None, None, None, name)
    path = write_volume(tmp_path / name, np.zeros((2, 4, 4), np.int64), like)
    with pytest.raises(CheckpointError, match=f"{name} is not a dlkunet checkpoint: it is ") as err:
        load_checkpoint(path)
    assert "issue" not in str(err.value) and len(str(err.value).splitlines()) == 1


def _fresh_data(tmp_path, **kw):
    return make_synthetic(tmp_path / "data", **{**dict(num_train=2, num_test=1, size=32, depth=4, seed=3), **kw})


def test_nan_in_a_training_image_stops_training_naming_the_file(tmp_path):
    # Issue 17, defect 1: exit 0, NaN weights in last.pt and a final line naming a best.pt never written.
    from dlkunet.cli import main
    from dlkunet.data import DataError

    data = _fresh_data(tmp_path)
    bad = data / "train_npz" / "case0002_slice001.npz"
    with np.load(bad) as arrays:
        image, label = arrays["image"].copy(), arrays["label"]
    image[7, 9] = np.nan
    np.savez(bad, image=image, label=label)
    with pytest.raises(DataError, match=r"case0002_slice001.npz: image holds 1 non-finite value.*row 7, column 9"):
        _run(data, tmp_path / "run", epochs=1)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "cli"), "--epochs", "1", "--base-width", "4",
                 "--image-size", "32", "--device", "cpu", "--no-progress", "--no-tensorboard"]) == 2


@pytest.mark.slow
def test_non_finite_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = _fresh_data(tmp_path)
    _run(data, tmp_path / "run", epochs=2, stop_after=1)
    good = (tmp_path / "run" / "last.pt").read_bytes()
    # Finite but absurd intensities (raw scanner units scaled wrongly) overflow float32 in the network.
    bad = data / "train_npz" / "case0001_slice002.npz"
    with np.load(bad) as arrays:
        label = arrays["label"]
    np.savez(bad, image=np.full((32, 32), 3e38, np.float32), label=label)
    cfg = TrainConfig(data=str(data), output=str(tmp_path / "run"), epochs=2, **TINY)
    with pytest.raises(TrainingError) as err:
        train(cfg, resume=tmp_path / "run" / "last.pt")
    text = str(err.value)
    assert "the loss is nan at epoch 2, step" in text and str(bad) in text
    assert f"{tmp_path / 'run' / 'last.pt'} (epoch 1) is the last good checkpoint" in text
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


@pytest.mark.slow
def test_config_json_is_written_at_start(tmp_path):
    data = _fresh_data(tmp_path)
    bad = data / "train_npz" / "case0002_slice003.npz"
    bad.write_bytes(b"not an npz")  # the run fails in its first epoch, after setup
    with pytest.raises(ValueError):
        _run(data, tmp_path / "run", epochs=3, loss="dynamic")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["epochs"] == 3 and saved["config"]["loss"] == "dynamic"
    assert saved["device"] == "cpu" and saved["world_size"] == 1 and saved["precision"] == "torch.float32"
    _run(_fresh_data(tmp_path / "good"), tmp_path / "run2", epochs=1)
    saved = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert saved["data"]["train_slices"] == 8 and saved["data"]["num_classes"] == 5 and saved["start_epoch"] == 0


@pytest.mark.slow
def test_best_is_only_reported_when_written_and_follows_validation_dsc(tmp_path):
    # Stopped before the first validation: no DSC yet, so no best.pt; the result (and the CLI's last
    # line) must not name it.
    data = _fresh_data(tmp_path)
    (data / "lists" / "lists_Synapse" / "val.txt").write_text("case0001_slice001\ncase0001_slice002\n")
    _, result = _run(data, tmp_path / "run", epochs=2, val_every=2, stop_after=1)
    assert result["best_metric_name"] == "val_mean_dsc" and result["best"] is None
    assert not (tmp_path / "run" / "best.pt").exists() and result["last"] == str(tmp_path / "run" / "last.pt")
    _, result = _run(data, tmp_path / "run2", epochs=1, schedule="authors", augmentation="transunet")
    assert result["best_metric_name"] == "val_mean_dsc" and result["best"] == str(tmp_path / "run2" / "best.pt")


def test_cli_last_line_names_only_existing_files(tmp_path, capsys):
    from dlkunet.cli import main

    data = _fresh_data(tmp_path)
    (data / "lists" / "lists_Synapse" / "val.txt").write_text("case0001_slice001\n")
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "run"), "--epochs", "2", "--stop-after", "1",
                 "--val-every", "2", "--base-width", "4", "--image-size", "32", "--device", "cpu", "--no-progress",
                 "--no-tensorboard"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "best.pt" not in last and str(tmp_path / "run" / "last.pt") in last and "no best checkpoint" in last


def test_cpu_full_size_hint():
    cfg = make_config("synapse")
    hint = cpu_cost_hint(cfg, torch.device("cpu"))
    assert "takes days" in hint and "--image-size 64 --base-width 16 --batch-size 8 --epochs 12" in hint
    assert cpu_cost_hint(cfg, torch.device("cuda")) is None
    assert cpu_cost_hint(TrainConfig(**{**TINY, "image_size": 224}), torch.device("cpu")) is None


def test_authors_schedule_and_presets():
    cfg = make_config(schedule="authors")
    assert (cfg.schedule, cfg.epochs, cfg.batch_size, cfg.lr_step, cfg.lr_gamma, cfg.loss, cfg.augmentation) == \
        ("authors", 300, 12, 20, 0.9, "ordinary", "transunet")
    assert cfg.lr == 1e-3 and cfg.loss_weights is None  # (1, 1): Train_Synapse.py's CeDiceLoss([1, 1])
    assert make_config(schedule="authors", epochs=5, batch_size=2).epochs == 5  # flags still win
    syn, acdc = make_config("authors-synapse"), make_config("authors-acdc")
    assert (syn.fmt, syn.schedule, syn.loss, syn.weight_decay) == ("synapse", "authors", "ordinary", 1e-5)
    assert (acdc.fmt, acdc.loss, acdc.loss_weights, acdc.weight_decay) == ("acdc", "ordinary", [0.6, 0.4], 0.0)
    assert make_config("synapse").schedule == "paper"
    with pytest.raises(ValueError, match="unknown schedule"):
        make_config(schedule="nnunet")
    with pytest.raises(ValueError, match="ordinary loss only"):
        make_config(loss="phase", loss_weights=[0.5, 0.5])


@pytest.mark.slow
def test_authors_schedule_steps_the_lr_like_steplr(tiny_data, tmp_path):
    _run(tiny_data, tmp_path, epochs=2, schedule="authors", lr_step=1, lr_gamma=0.9, loss="ordinary",
         augmentation="transunet", loss_weights=[0.6, 0.4])
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 9e-4], rel=1e-12)
    assert {float(r["alpha_dice"]) for r in rows} == {0.6} and {float(r["beta_ce"]) for r in rows} == {0.4}
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert set(ckpt["scheduler"]) >= {"step_size", "gamma"}  # torch's StepLR state


@pytest.mark.slow
def test_checkpoint_records_what_predict_needs_about_intensities(tmp_path):
    # TransUNet's Synapse files were CT-windowed to [0, 1]; the synthetic set is generated in [0, 1].
    data = _fresh_data(tmp_path)
    _run(data, tmp_path / "syn", epochs=1)
    meta = load_checkpoint(tmp_path / "syn" / "last.pt")["data"]
    assert meta["raw_intensity"] is None and 0.0 <= meta["input_range"][0] < meta["input_range"][1] <= 1.0
    spec = json.loads((data / "dataset.json").read_text())
    del spec["raw_intensity"]  # as TransUNet's own Synapse folder: no dataset.json entry
    (data / "dataset.json").write_text(json.dumps(spec))
    _run(data, tmp_path / "transunet", epochs=1)
    assert load_checkpoint(tmp_path / "transunet" / "last.pt")["data"]["raw_intensity"] == "ct"
