"""Training DLKUNet on 2D slices: one loop for CPU, one GPU and ``torchrun`` (DDP, NCCL or gloo).

Paper settings (section 4.3) and the presets built from them (``PRESETS``):

- Adam, lr 1e-3, weight decay 1e-5, input 224x224, random flips and 90-degree rotations.
- "reducing the learning rate by 90% every 20 epochs" *and* "after 200 epochs the learning rate
  was adjusted to 1e-5" cannot both hold (a factor 0.1 per 20 epochs reaches 1e-5 at epoch 40).
  The presets decay every 20 epochs by ``10**-0.2`` (about 0.63) with a floor of 1e-5, which
  reaches 1e-5 exactly at epoch 200, where the phase-based loss switches weights (eq. 11).
  ``--lr-gamma 0.1`` gives the literal "90%" reading.
- 400 epochs: eq. (11) defines the phase-based weights over epochs [1, 400].
- batch size 24: the paper gives none; 24 is what TransUNet and Swin-Unet, whose data split and
  protocol the paper follows, use.
- loss: phase-based for Synapse, dynamic for ACDC (the paper's finding in section 4.4).

``--schedule authors`` (presets ``authors-synapse`` / ``authors-acdc``) follows the authors'
released scripts instead, where they differ from the paper (``SCHEDULES``): ``Train_Synapse.py``
and ``Train_ACDC.py`` step the lr with ``StepLR(step_size=20, gamma=0.9)`` (no floor), default to
300 epochs at batch 12, and train with a fixed-weight CE + Dice (``CeDiceLoss``: weights [1, 1]
for Synapse, the Ordinary loss of eq. 7; [0.4 CE, 0.6 Dice] and no weight decay for ACDC); their
``DataLoader_Synapse.py`` augments with TransUNet's ``RandomGenerator`` (rot90 + flip, or else a
rotation in [-20, 20) degrees).  Their argparse default lr, 1e-5, is not taken: the paper states
1e-3 and the launch command is not published (``--lr 1e-5`` follows the script).

The "best" checkpoint is chosen by the validation set's mean DSC when the data set has one
(ACDC does; Synapse does with a ``val.txt`` list); otherwise (Synapse has only train and test
cases, and the test cases must not steer training) by the lowest mean training loss of an epoch.

Resuming is exact: the checkpoint holds model, optimizer, scheduler, GradScaler and RNG states,
and every epoch's shuffling (``DistributedSampler`` seeded by ``seed`` and ``set_epoch``) and
augmentation randomness (RNGs reseeded from seed, epoch and rank) depend only on the seed and
the epoch, so an interrupted run continues as if it had never stopped, for any world size.

A run is four steps (:func:`_setup`, :func:`_train_epoch`, :func:`validate`,
:func:`_save_checkpoint`).  It writes ``<output>/config.json`` (the resolved settings) first,
reports through ``logging`` (logger ``dlkunet.training``), says after the first steps what an
epoch and the run will take, and stops at the first non-finite loss, naming the step and the
batch's files, before anything of that epoch is saved.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .checkpointing import (CheckpointError, atomic_save, atomic_write, get_rng_state, load_checkpoint,
                            make_checkpoint, save_safetensors, set_rng_state)

log = logging.getLogger(__name__)

PAPER_GAMMA = 10 ** -0.2


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or weights); the message says where and what is kept."""


@dataclass
class TrainConfig:
    data: Optional[str] = None          # None: the built-in synthetic set, generated under output/
    fmt: str = "auto"                   # auto | synapse | acdc | nifti
    output: str = "runs/dlkunet"
    variant: str = "S"
    base_width: int = 96
    image_size: int = 224
    epochs: int = 400
    batch_size: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-5
    schedule: str = "paper"             # paper: lr_gamma per lr_step epochs, floored at min_lr | authors: StepLR
    lr_step: int = 20
    lr_gamma: float = PAPER_GAMMA
    min_lr: float = 1e-5
    loss: str = "phase"                 # ordinary | phase | dynamic
    loss_weights: Optional[List[float]] = None  # (alpha Dice, beta CE) of the ordinary loss; None: (1, 1)
    augmentation: str = "paper"         # paper (flips, rot90) | transunet (rot90 + flip, or a +-20 degree rotation)
    seed: int = 1234
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    workers: int = -1                   # -1: 0 on CPU, up to 8 per GPU process
    augment: bool = True
    val_every: int = 1
    stop_after: Optional[int] = None    # stop after this many epochs in this run (resume later)
    sync_bn: bool = False               # DDP: BatchNorm statistics over the whole process group
    progress: bool = True
    tensorboard: bool = True
    safetensors: bool = True
    synthetic_train: Optional[int] = None  # synthetic-set sizes (None: make_synthetic's defaults)
    synthetic_test: Optional[int] = None
    synthetic_size: Optional[int] = None


_PAPER = dict(epochs=400, batch_size=24, image_size=224, lr=1e-3, weight_decay=1e-5, lr_step=20,
              lr_gamma=PAPER_GAMMA, min_lr=1e-5, base_width=96)
# What --schedule sets (explicit flags still override it).  "authors": see the module docstring.
SCHEDULES: Dict[str, Dict[str, Any]] = {
    "paper": dict(schedule="paper", epochs=400, batch_size=24, lr_step=20, lr_gamma=PAPER_GAMMA, min_lr=1e-5,
                  augmentation="paper"),
    "authors": dict(schedule="authors", epochs=300, batch_size=12, lr_step=20, lr_gamma=0.9, min_lr=0.0,
                    loss="ordinary", loss_weights=None, augmentation="transunet"),
}
PRESETS: Dict[str, Dict[str, Any]] = {
    "synapse": dict(_PAPER, fmt="synapse", loss="phase"),
    "acdc": dict(_PAPER, fmt="acdc", loss="dynamic"),
    "authors-synapse": dict(_PAPER, fmt="synapse", **SCHEDULES["authors"]),
    # Train_ACDC.py: CeDiceLoss(loss_weight=[0.4, 0.6]) = 0.4 CE + 0.6 Dice, Adam without weight decay.
    "authors-acdc": dict(_PAPER, fmt="acdc", **dict(SCHEDULES["authors"], loss_weights=[0.6, 0.4]),
                         weight_decay=0.0),
}
# Changing these between a run and its resumption would make the resumed run a different one.
_RESUME_SENSITIVE = ("variant", "base_width", "image_size", "epochs", "batch_size", "lr", "weight_decay",
                     "schedule", "lr_step", "lr_gamma", "min_lr", "loss", "loss_weights", "augmentation", "seed",
                     "augment", "sync_bn")


def resume_path(resume, output) -> Path:
    """``--resume`` alone (``"auto"``) means ``<output>/last.pt``; a directory means its last.pt."""
    path = Path(output) / "last.pt" if resume in (True, "auto") else Path(resume)
    return path / "last.pt" if path.is_dir() else path


def make_config(preset: Optional[str] = None, resume=None, **overrides) -> TrainConfig:
    """Defaults <- preset <- (when resuming) the checkpoint's own config <- explicit overrides."""
    values = asdict(TrainConfig())
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    schedule = overrides.get("schedule")
    if schedule is not None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        values.update(SCHEDULES[schedule])
    if resume:
        path = resume_path(resume, overrides.get("output") or values["output"])
        stored = load_checkpoint(path).get("train_config", {})
        values.update({k: v for k, v in stored.items() if k in values and k not in ("resume", "stop_after")})
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Settings that cannot work together, refused before anything runs."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    from .data.transforms import AUGMENTATIONS

    if cfg.augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {cfg.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if cfg.loss_weights is not None:
        if cfg.loss != "ordinary":
            raise ValueError(f"loss weights apply to the ordinary loss only; the {cfg.loss} loss sets its own")
        if len(cfg.loss_weights) != 2:
            raise ValueError(f"loss weights are two numbers (Dice, CE), got {cfg.loss_weights}")


def step_lr_factor(epoch: int, step: int, gamma: float, floor: float) -> float:
    """Multiplier of the base lr during 0-based ``epoch``: ``gamma**(epoch // step)``, floored."""
    return max(gamma ** (epoch // max(1, step)), floor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2 ** 31)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker's torch RNG from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32."""
    precision = (precision or "auto").lower()
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, fp16 or bf16")


def _dataset(cfg: TrainConfig, info: distributed.DistInfo):
    from .data import DataError, open_dataset

    if cfg.data is None:
        root = Path(cfg.output) / "synthetic-data"
        if info.is_main and not (root / ".complete").exists():
            from .data.synthetic import make_synthetic

            kw = {k: v for k, v in dict(num_train=cfg.synthetic_train, num_test=cfg.synthetic_test,
                                       size=cfg.synthetic_size).items() if v is not None}
            log.info("no --data given; generating the synthetic set in %s", root)
            make_synthetic(root, seed=cfg.seed, **kw)
            (root / ".complete").touch()
        distributed.barrier(info)
        return open_dataset(root, "auto")
    if not Path(cfg.data).exists():
        raise DataError(f"data directory not found: {cfg.data}")
    return open_dataset(cfg.data, cfg.fmt)


class _Logger:
    """CSV (always) and TensorBoard (if installed) on rank 0."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_epoch: int):
        self.csv_path = out / "log.csv"
        self.enabled, self.writer, self.columns = enabled, None, None
        if not enabled:
            return
        if resume_epoch > 0 and self.csv_path.exists():  # drop rows of epochs the checkpoint does not have
            with open(self.csv_path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= resume_epoch]
            self.columns = list(rows[0].keys()) if rows else None
            self._rewrite(rows)
        elif self.csv_path.exists():
            self.csv_path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to CSV only (pip install tensorboard)")

    def _rewrite(self, rows: List[Dict[str, Any]]) -> None:
        with open(self.csv_path, "w", newline="") as handle:
            if self.columns:
                writer = csv.DictWriter(handle, self.columns)
                writer.writeheader()
                writer.writerows(rows)

    def log(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.columns is None:
            self.columns = list(row.keys())
            self._rewrite([])
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _curves(csv_path: Path, png_path: Path) -> None:
    from .plots import have_matplotlib, plot_training_curves

    if have_matplotlib():  # optional: the CSV holds the same numbers
        plot_training_curves(csv_path, png_path)


@torch.no_grad()
def validate(model, dataset, num_classes: int, batch_size: int, device) -> float:
    """Mean over foreground classes of the DSC pooled over all validation slices."""
    was_training = model.training
    model.eval()
    inter = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pred = model(batch["image"].to(device)).argmax(1).cpu()
        label = batch["label"]
        for c in range(1, num_classes):
            p, g = pred == c, label == c
            inter[c] += (p & g).sum().item()
            total[c] += p.sum().item() + g.sum().item()
    model.train(was_training)
    present = total[1:] > 0
    if not present.any():
        return float("nan")
    return float((2 * inter[1:][present] / total[1:][present]).mean())


def train(cfg: TrainConfig, resume=None) -> Dict[str, Any]:
    """Train (or, with ``resume``, continue) and return a summary; see the module docstring."""
    check_config(cfg)
    info = distributed.setup(cfg.device)
    try:
        return _train(cfg, resume, info)
    finally:
        if cfg.sync_bn:
            from .ops import sync_bn
            sync_bn.set_process_group(enabled=False)
        distributed.cleanup(info)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cpu_cost_hint(cfg: TrainConfig, device: torch.device) -> Optional[str]:
    """A warning for the paper's full-size settings on a CPU (days of compute), with settings that fit."""
    if device.type != "cpu" or cfg.image_size < 224 or cfg.base_width < 96:
        return None
    from .demo import DEMO

    fits = " ".join(f"--{k.replace('_', '-')} {DEMO[k]}" for k in
                    ("image_size", "base_width", "batch_size", "epochs", "lr_step", "lr_gamma"))
    return (f"training on a CPU with the paper's full-size settings ({cfg.image_size}x{cfg.image_size}, "
            f"C={cfg.base_width}, batch {cfg.batch_size}, {cfg.epochs} epochs) takes days; the estimate follows "
            f"after the first steps.  Settings that fit a CPU (what `dlkunet demo` trains): {fits}")


@dataclass
class _Run:
    """What the steps of a run share: settings, data, model, optimiser state and bookkeeping."""

    cfg: TrainConfig
    info: distributed.DistInfo
    out: Path
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    dataset: Any
    train_set: Any
    val_set: Any
    model: torch.nn.Module          # what the optimizer steps (DDP-wrapped when distributed)
    core: torch.nn.Module           # the bare model, for validation and checkpoints
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Any
    sampler: DistributedSampler
    workers: int
    logger: "_Logger"
    data_meta: Dict[str, Any]
    start_epoch: int
    best: Optional[float]
    metric_name: str
    show: bool
    estimated: bool = False          # the time estimate is logged once per run

    def better(self, value: float, than: float) -> bool:
        return value > than if self.metric_name == "val_mean_dsc" else value < than


def _input_range(train_set, samples: int = 8) -> List[float]:
    """Min and max over evenly spaced training slices as the loader gives them (no augmentation)."""
    source = train_set.source
    picks = np.unique(np.linspace(0, len(source) - 1, min(samples, len(source))).round().astype(int))
    images = [source.load(int(i))[0] for i in picks]
    return [float(min(i.min() for i in images)), float(max(i.max() for i in images))]


def _write_config(cfg: TrainConfig, run_info: Dict[str, Any], out: Path) -> None:
    """``<output>/config.json``: the resolved settings of this run (as nnU-Net writes plans.json)."""
    from . import __version__

    record = {"config": asdict(cfg), **run_info, "dlkunet_version": __version__, "torch_version": torch.__version__,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))


def _setup(cfg: TrainConfig, resume, info: distributed.DistInfo) -> _Run:
    """Step 1: output folder, data, model (new or resumed), optimizer, schedule, loss, config.json."""
    from .losses import build_loss
    from .models import build_model

    out = Path(cfg.output)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    device = info.device
    amp_dtype = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed + info.rank)
    run_info = dict(resumed_from=str(resume_path(resume, cfg.output)) if resume else None, device=str(device),
                    world_size=info.world_size, precision=str(amp_dtype or torch.float32))
    if info.is_main:  # before anything can fail on the data; completed with the data's facts below
        _write_config(cfg, run_info, out)
    hint = cpu_cost_hint(cfg, device)
    if hint and info.is_main:
        log.warning(hint)

    dataset = _dataset(cfg, info)
    train_set = dataset.train_slices(cfg.image_size, augment=cfg.augment, seed=cfg.seed, style=cfg.augmentation)
    val_set = dataset.val_slices(cfg.image_size)
    if len(train_set) == 0:
        from .data import DataError
        raise DataError(f"no training slices found under {dataset.root}")

    ckpt = None
    if resume:
        path = resume_path(resume, cfg.output)
        ckpt = load_checkpoint(path)
        stored = ckpt.get("train_config", {})
        changed = [k for k in _RESUME_SENSITIVE if k in stored and stored[k] != getattr(cfg, k)]
        if changed and info.is_main:
            log.warning("resuming with changed settings (the run will differ from an uninterrupted one): %s",
                        ", ".join(f"{k} {stored[k]} -> {getattr(cfg, k)}" for k in changed))
        from .checkpointing import model_from_checkpoint
        model = model_from_checkpoint(ckpt).train()
        if model.num_classes != dataset.num_classes:
            raise CheckpointError(f"checkpoint {path} predicts {model.num_classes} classes but the data set "
                                  f"has {dataset.num_classes} (background included)")
    else:
        model = build_model(cfg.variant, in_channels=1, num_classes=dataset.num_classes,
                            base_width=cfg.base_width)
    model.to(device)
    core = model
    if info.distributed:
        if cfg.sync_bn:
            from .ops.sync_bn import convert_sync_batchnorm
            model = convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    elif cfg.sync_bn and info.is_main:
        log.info("--sync-bn has no effect in a single process (its batch is the whole batch)")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "authors":  # the authors' scripts: StepLR, no floor
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: step_lr_factor(e, cfg.lr_step, cfg.lr_gamma, cfg.min_lr / cfg.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_kw = {} if cfg.loss_weights is None else dict(alpha=cfg.loss_weights[0], beta=cfg.loss_weights[1])
    loss_fn = build_loss(cfg.loss, dataset.num_classes, cfg.epochs, **loss_kw)

    start_epoch, best = 0, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best = int(ckpt["epoch"]), ckpt.get("best_metric")
        set_rng_state(ckpt["rng"])
    metric_name = "val_mean_dsc" if val_set is not None else "train_loss"
    if val_set is None and cfg.schedule == "authors" and info.is_main:
        log.warning("%s has no validation split: best.pt follows the lowest training loss, not the validation "
                    "DSC (add a val.txt list of training slices to choose by DSC)", dataset.root)

    workers = cfg.workers if cfg.workers >= 0 else (0 if device.type == "cpu" else
                                                    min(8, max(1, (os.cpu_count() or 1) // info.world_size)))
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    data_meta = dict(fmt=dataset.fmt, num_classes=int(dataset.num_classes),
                     class_names=list(dataset.class_names), image_size=int(cfg.image_size),
                     intensity=str(getattr(dataset, "intensity", "none")),
                     raw_intensity=getattr(dataset, "raw_intensity", None),
                     # what predict compares new input with; only rank 0 writes checkpoints
                     input_range=_input_range(train_set) if info.is_main else None)
    if info.is_main:
        _write_config(cfg, dict(run_info, start_epoch=start_epoch, workers=workers,
                                data=dict(root=str(dataset.root), train_slices=len(train_set),
                                          val_slices=len(val_set) if val_set is not None else 0, **data_meta)),
                      out)
    logger = _Logger(out, info.is_main, cfg.tensorboard, start_epoch)
    return _Run(cfg, info, out, device, amp_dtype, dataset, train_set, val_set, model, core, optimizer, scheduler,
                scaler, loss_fn, sampler, workers, logger, data_meta, start_epoch, best, metric_name,
                show=cfg.progress and info.is_main)


def _all_finite(loss: torch.Tensor, info: distributed.DistInfo) -> bool:
    """Whether the loss is finite on every rank (all ranks must stop together, or DDP would hang)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    distributed.all_reduce_sum(bad, info)
    return bad.item() == 0


def _kept_checkpoint(run: _Run) -> str:
    last = run.out / "last.pt"
    if last.exists():
        try:
            epoch = load_checkpoint(last).get("epoch")
        except CheckpointError:
            epoch = "?"
        return f"{last} (epoch {epoch}) is the last good checkpoint and was left as it was"
    return "no checkpoint was written"


def _train_epoch(run: _Run, epoch: int) -> Dict[str, Any]:
    """Step 2: one pass over this rank's share of the training slices; the epoch's mean losses."""
    cfg, info, device = run.cfg, run.info, run.device
    run.sampler.set_epoch(epoch)
    if hasattr(run.train_set, "set_epoch"):  # augmentation drawn from (seed, epoch, index)
        run.train_set.set_epoch(epoch)
    seed_everything(epoch_seed(cfg.seed, epoch, info.rank))
    loader = DataLoader(run.train_set, batch_size=cfg.batch_size, sampler=run.sampler, num_workers=run.workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                        generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, info.rank)))
    run.model.train()
    sums = torch.zeros(2, dtype=torch.float64)  # loss * n, n
    parts_sum: Dict[str, float] = {}
    steps = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.show, leave=False, dynamic_ncols=True)
    step_started: List[float] = []
    for step, batch in enumerate(bar):
        step_started.append(time.perf_counter())
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            logits = run.model(image)
        loss, parts = run.loss_fn(logits.float(), label, epoch + 1)  # the losses count epochs from 1
        if not _all_finite(loss, info):
            bar.close()
            where = (f"the loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} of {steps}; the batch held "
                     f"{', '.join(batch['source'])}" if not math.isfinite(loss.item()) else
                     f"another process's loss is not finite at epoch {epoch + 1}, step {step + 1} of {steps}")
            raise TrainingError(f"training stopped: {where}; nothing of this epoch was saved: "
                                f"{_kept_checkpoint(run)}.  Check those images, or lower --lr ({cfg.lr:g})")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        n = image.shape[0]
        sums += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0.0) + float(value) * n
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if not run.estimated and (step + 1 == min(3, steps)):
            _log_estimate(run, epoch, steps, step_started + [time.perf_counter()])
    bar.close()
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    keys = sorted(parts_sum)
    totals = torch.tensor([sums[0].item(), sums[1].item()] + [parts_sum[k] for k in keys], dtype=torch.float64)
    distributed.all_reduce_sum(totals, info)
    count = max(totals[1].item(), 1.0)
    row: Dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": totals[0].item() / count}
    for i, key in enumerate(keys):  # the loss weights are logged under their own names, not as losses
        name = {"alpha": "alpha_dice", "beta": "beta_ce"}.get(key, f"loss_{key}")
        row[name] = totals[2 + i].item() / count
    return row


def _log_estimate(run: _Run, epoch: int, steps: int, marks: List[float]) -> None:
    """After the first steps: seconds per step (the first, with its warm-up, left out when others exist)."""
    run.estimated = True
    if not run.info.is_main:
        return
    gaps = np.diff(marks)
    per_step = float(np.mean(gaps[1:] if len(gaps) > 1 else gaps))
    per_epoch = per_step * steps
    remaining = run.cfg.epochs - epoch
    if run.cfg.stop_after is not None:
        remaining = min(remaining, run.cfg.stop_after)
    log.info("about %s per step, %s per epoch (%d steps), %s for the %d epoch(s) of this run (validation not "
             "included)", format_duration(per_step), format_duration(per_epoch), steps,
             format_duration(per_epoch * remaining), remaining)


def _check_weights(run: _Run, epoch: int) -> None:
    """Before a save: a step can leave non-finite weights without a non-finite loss (its last step)."""
    bad = [name for name, t in run.core.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingError(f"training stopped: after epoch {epoch + 1} the weights hold non-finite values "
                            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); nothing of this epoch "
                            f"was saved: {_kept_checkpoint(run)}.  Lower --lr ({run.cfg.lr:g})")


def _save_checkpoint(run: _Run, epoch: int, row: Dict[str, Any]) -> bool:
    """Step 4 (rank 0): last.pt always, best.pt (and .safetensors) when the epoch's metric improved."""
    value = row[run.metric_name]
    improved = not math.isnan(value) and (run.best is None or run.better(value, run.best))
    if improved:
        run.best = value
    cfg = run.cfg
    state = make_checkpoint(
        run.core, run.data_meta, variant=cfg.variant.upper(), optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(), epoch=epoch + 1,
        best_metric=run.best, best_metric_name=run.metric_name, train_config=asdict(cfg), rng=get_rng_state())
    atomic_save(state, run.out / "last.pt")
    if improved:
        atomic_save(state, run.out / "best.pt")
        if cfg.safetensors:
            save_safetensors(state, run.out / "best.safetensors")
    return improved


def _train(cfg: TrainConfig, resume, info: distributed.DistInfo) -> Dict[str, Any]:
    run = _setup(cfg, resume, info)
    history: List[Dict[str, Any]] = []
    ran = 0
    for epoch in range(run.start_epoch, cfg.epochs):
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            break
        started = time.time()
        row = _train_epoch(run, epoch)
        validate_now = run.val_set is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
        row["val_mean_dsc"] = float("nan")
        if validate_now and info.is_main:  # step 3
            row["val_mean_dsc"] = validate(run.core, run.val_set, run.dataset.num_classes, cfg.batch_size,
                                           run.device)
        row["seconds"] = time.time() - started
        ran += 1
        _check_weights(run, epoch)  # every rank (their weights are equal), so all stop together
        if info.is_main:
            improved = _save_checkpoint(run, epoch, row)
            run.logger.log(row)
            history.append(row)
            log.info("epoch %d/%d  loss %.4f  lr %.2e%s%s  %.1fs", epoch + 1, cfg.epochs, row["train_loss"],
                     row["lr"], f"  val DSC {row['val_mean_dsc']:.4f}" if validate_now else "",
                     "  (best)" if improved else "", row["seconds"])
        distributed.barrier(info)
    run.logger.close()
    if info.is_main and history:
        _curves(run.logger.csv_path, run.out / "curves.png")
    last_epoch = run.start_epoch + ran
    best_path, last_path = run.out / "best.pt", run.out / "last.pt"
    return {"output": str(run.out), "epochs_done": last_epoch, "finished": last_epoch >= cfg.epochs,
            "best_metric": run.best, "best_metric_name": run.metric_name,
            # Only files that exist: with no finite metric yet there is no best.pt.
            "best": str(best_path) if best_path.exists() else None,
            "last": str(last_path) if last_path.exists() else None, "history": history, "rank": info.rank}
