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

The "best" checkpoint is chosen by the validation set's mean DSC when the data set has one
(ACDC does); otherwise (Synapse has only train and test cases, and the test cases must not steer
training) by the lowest mean training loss of an epoch.

Resuming is exact: the checkpoint holds model, optimizer, scheduler, GradScaler and RNG states,
and every epoch's shuffling (``DistributedSampler`` seeded by ``seed`` and ``set_epoch``) and
augmentation randomness (RNGs reseeded from seed, epoch and rank) depend only on the seed and
the epoch, so an interrupted run continues as if it had never stopped, for any world size.
"""
from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .checkpointing import (CheckpointError, atomic_save, get_rng_state, load_checkpoint, make_checkpoint,
                            save_safetensors, set_rng_state)

PAPER_GAMMA = 10 ** -0.2


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
    lr_step: int = 20
    lr_gamma: float = PAPER_GAMMA
    min_lr: float = 1e-5
    loss: str = "phase"                 # ordinary | phase | dynamic
    seed: int = 1234
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    workers: int = -1                   # -1: 0 on CPU, up to 8 per GPU process
    augment: bool = True
    val_every: int = 1
    stop_after: Optional[int] = None    # stop after this many epochs in this run (resume later)
    progress: bool = True
    tensorboard: bool = True
    safetensors: bool = True
    synthetic_train: Optional[int] = None  # synthetic-set sizes (None: make_synthetic's defaults)
    synthetic_test: Optional[int] = None
    synthetic_size: Optional[int] = None


_PAPER = dict(epochs=400, batch_size=24, image_size=224, lr=1e-3, weight_decay=1e-5, lr_step=20,
              lr_gamma=PAPER_GAMMA, min_lr=1e-5, base_width=96)
PRESETS: Dict[str, Dict[str, Any]] = {
    "synapse": dict(_PAPER, fmt="synapse", loss="phase"),
    "acdc": dict(_PAPER, fmt="acdc", loss="dynamic"),
}
# Changing these between a run and its resumption would make the resumed run a different one.
_RESUME_SENSITIVE = ("variant", "base_width", "image_size", "epochs", "batch_size", "lr", "weight_decay",
                     "lr_step", "lr_gamma", "min_lr", "loss", "seed", "augment")


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
    if resume:
        path = resume_path(resume, overrides.get("output") or values["output"])
        stored = load_checkpoint(path).get("train_config", {})
        values.update({k: v for k, v in stored.items() if k in values and k not in ("resume", "stop_after")})
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


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
            print(f"dlkunet: no --data given; generating the synthetic set in {root}", file=sys.stderr)
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
                print("dlkunet: tensorboard is not installed; logging to CSV only "
                      "(pip install tensorboard)", file=sys.stderr)

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
    info = distributed.setup(cfg.device)
    try:
        return _train(cfg, resume, info)
    finally:
        distributed.cleanup(info)


def _train(cfg: TrainConfig, resume, info: distributed.DistInfo) -> Dict[str, Any]:
    from .losses import build_loss
    from .models import build_model

    out = Path(cfg.output)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    device = info.device
    amp_dtype = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed + info.rank)

    dataset = _dataset(cfg, info)
    train_set = dataset.train_slices(cfg.image_size, augment=cfg.augment, seed=cfg.seed)
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
            print("dlkunet: warning: resuming with changed settings (the run will differ from an "
                  "uninterrupted one): " + ", ".join(f"{k} {stored[k]} -> {getattr(cfg, k)}" for k in changed),
                  file=sys.stderr)
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
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: step_lr_factor(e, cfg.lr_step, cfg.lr_gamma, cfg.min_lr / cfg.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = build_loss(cfg.loss, dataset.num_classes, cfg.epochs)

    start_epoch, best, history = 0, None, []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best = int(ckpt["epoch"]), ckpt.get("best_metric")
        set_rng_state(ckpt["rng"])
    metric_name = "val_mean_dsc" if val_set is not None else "train_loss"
    better = (lambda a, b: a > b) if val_set is not None else (lambda a, b: a < b)

    workers = cfg.workers if cfg.workers >= 0 else (0 if device.type == "cpu" else
                                                    min(8, max(1, (os.cpu_count() or 1) // info.world_size)))
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    logger = _Logger(out, info.is_main, cfg.tensorboard, start_epoch)
    data_meta = dict(fmt=dataset.fmt, num_classes=int(dataset.num_classes),
                     class_names=list(dataset.class_names), image_size=int(cfg.image_size),
                     intensity=str(getattr(dataset, "intensity", "none")))
    show = cfg.progress and info.is_main
    ran = 0
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            break
        started = time.time()
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):  # augmentation drawn from (seed, epoch, index)
            train_set.set_epoch(epoch)
        seed_everything(epoch_seed(cfg.seed, epoch, info.rank))
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                            pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, info.rank)))
        model.train()
        sums = torch.zeros(2, dtype=torch.float64)  # loss * n, n
        parts_sum: Dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False,
                   dynamic_ncols=True)
        for batch in bar:
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(image)
            loss, parts = loss_fn(logits.float(), label, epoch + 1)  # the losses count epochs from 1
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = image.shape[0]
            sums += torch.tensor([loss.item() * n, n], dtype=torch.float64)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value) * n
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        keys = sorted(parts_sum)
        totals = torch.tensor([sums[0].item(), sums[1].item()] + [parts_sum[k] for k in keys], dtype=torch.float64)
        distributed.all_reduce_sum(totals, info)
        count = max(totals[1].item(), 1.0)
        row: Dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": totals[0].item() / count}
        for i, key in enumerate(keys):  # the loss weights are logged under their own names, not as losses
            name = {"alpha": "alpha_dice", "beta": "beta_ce"}.get(key, f"loss_{key}")
            row[name] = totals[2 + i].item() / count
        validate_now = val_set is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
        row["val_mean_dsc"] = float("nan")
        if validate_now and info.is_main:
            row["val_mean_dsc"] = validate(core, val_set, dataset.num_classes, cfg.batch_size, device)
        row["seconds"] = time.time() - started
        ran += 1
        if info.is_main:
            value = row[metric_name]
            improved = not math.isnan(value) and (best is None or better(value, best))
            if improved:
                best = value
            state = make_checkpoint(
                core, data_meta, variant=cfg.variant.upper(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1,
                best_metric=best, best_metric_name=metric_name, train_config=asdict(cfg), rng=get_rng_state())
            atomic_save(state, out / "last.pt")
            if improved:
                atomic_save(state, out / "best.pt")
                if cfg.safetensors:
                    save_safetensors(state, out / "best.safetensors")
            logger.log(row)
            history.append(row)
            if show:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  lr {lr:.2e}"
                           + (f"  val DSC {row['val_mean_dsc']:.4f}" if validate_now else "")
                           + ("  (best)" if improved else "") + f"  {row['seconds']:.1f}s")
        distributed.barrier(info)
    logger.close()
    if info.is_main and history:
        _curves(logger.csv_path, out / "curves.png")
    last_epoch = start_epoch + ran
    return {"output": str(out), "epochs_done": last_epoch, "finished": last_epoch >= cfg.epochs,
            "best_metric": best, "best_metric_name": metric_name, "best": str(out / "best.pt"),
            "last": str(out / "last.pt"), "history": history, "rank": info.rank}
