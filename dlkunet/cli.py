"""``dlkunet train | evaluate | predict | demo | export | info`` (also ``python -m dlkunet``).

Expected failures (missing data, bad checkpoints, mismatched classes, bad values) print one
``dlkunet: error: ...`` line and exit with status 2; ``--traceback`` shows the full stack.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _slices(text: str) -> List[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slice indices, got {text!r}") from None


class _LazySubcommands(argparse._SubParsersAction):
    """Sub-commands whose arguments are added only when that sub-command is chosen, so that
    ``dlkunet --help`` (and every other sub-command) never imports what one sub-command's defaults
    need: the training defaults live beside torch code, and importing torch takes seconds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fillers = {}

    def add_lazy_parser(self, name: str, fill, **kwargs) -> argparse.ArgumentParser:
        """``add_parser`` whose arguments ``fill(parser)`` adds when ``name`` is parsed."""
        parser = self.add_parser(name, **kwargs)
        self._fillers[name] = (fill, parser)
        return parser

    def __call__(self, parser, namespace, values, option_string=None):
        fill = self._fillers.pop(values[0], None)
        if fill is not None:
            fill[0](fill[1])
        super().__call__(parser, namespace, values, option_string)


def _add_train(sub) -> None:
    # defaults are written into each help text; they are read (importing torch) only for `train`
    sub.add_lazy_parser("train", _train_arguments, help="train a DLKUNet",
                        description="Train on Synapse / ACDC / a NIfTI folder, or (without --data) on the "
                                    "built-in synthetic set.  Flags override the preset; the defaults shown "
                                    "are the paper's settings (see dlkunet.training for the choices).  "
                                    "Multi-GPU: torchrun --nproc_per_node N -m dlkunet train ...")


def _train_arguments(p) -> None:
    from .training import PRESETS, SCHEDULES, TrainConfig

    d = TrainConfig()
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a data set's settings: the paper's (synapse, acdc) or the authors' released scripts' "
                        "(authors-synapse, authors-acdc)")
    p.add_argument("--schedule", choices=sorted(SCHEDULES),
                   help="paper: its lr decay to a 1e-5 floor, 400 epochs, batch 24; authors: their scripts' "
                        "StepLR(20, 0.9), 300 epochs, batch 12, Ordinary loss, TransUNet augmentation with "
                        f"+-20 degree rotations [{d.schedule}]")
    p.add_argument("--data", help="data set folder (default: the synthetic set, generated under --output)")
    p.add_argument("--format", dest="fmt", choices=["auto", "synapse", "acdc", "nifti"], help=f"[{d.fmt}]")
    p.add_argument("--output", "-o", help=f"run folder for checkpoints and logs [{d.output}]")
    p.add_argument("--variant", choices=["S", "M", "L", "s", "m", "l"], help=f"[{d.variant}]")
    p.add_argument("--base-width", type=_positive, help=f"C, the first level's width [{d.base_width}]")
    p.add_argument("--image-size", type=_positive, help=f"training slice size [{d.image_size}]")
    p.add_argument("--epochs", type=_positive, help=f"[{d.epochs}]")
    p.add_argument("--batch-size", type=_positive, help=f"per process [{d.batch_size}]")
    p.add_argument("--lr", type=float, help=f"[{d.lr}]")
    p.add_argument("--weight-decay", type=float, help=f"[{d.weight_decay}]")
    p.add_argument("--lr-step", type=_positive, help=f"epochs between lr decays [{d.lr_step}]")
    p.add_argument("--lr-gamma", type=float, help=f"lr factor per step [{d.lr_gamma:.4f}]")
    p.add_argument("--min-lr", type=float, help=f"lr floor [{d.min_lr}]")
    p.add_argument("--loss", choices=["ordinary", "phase", "dynamic"], help=f"[{d.loss}]")
    p.add_argument("--seed", type=int, help=f"[{d.seed}]")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 mixed precision on CUDA, fp32 on CPU [auto]")
    p.add_argument("--workers", type=int, help="data loader workers (-1: 0 on CPU, up to 8 per GPU) [-1]")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                   help="no random flips / rotations")
    p.add_argument("--val-every", type=_positive, help=f"epochs between validations [{d.val_every}]")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a checkpoint (alone: <output>/last.pt); its settings are the defaults")
    p.add_argument("--stop-after", type=_positive, help="stop after this many epochs of this run")
    p.add_argument("--sync-bn", dest="sync_bn", action="store_const", const=True,
                   help="with torchrun: BatchNorm statistics over all processes (as nn.SyncBatchNorm)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)
    p.add_argument("--no-safetensors", dest="safetensors", action="store_const", const=False,
                   help="do not also write best.safetensors")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from .console import log_to_stderr
    from .training import make_config, train

    log_to_stderr()
    keys = ("data", "fmt", "output", "variant", "base_width", "image_size", "epochs", "batch_size", "lr",
            "weight_decay", "schedule", "lr_step", "lr_gamma", "min_lr", "loss", "seed", "device", "precision",
            "workers", "augment", "val_every", "stop_after", "sync_bn", "tensorboard", "safetensors", "progress")
    overrides = {k: getattr(args, k) for k in keys}
    if overrides["variant"]:
        overrides["variant"] = overrides["variant"].upper()
    cfg = make_config(args.preset, args.resume, **overrides)
    result = train(cfg, resume=args.resume)
    if result["rank"] == 0:
        name, best = result["best_metric_name"], result["best_metric"]
        state = "finished" if result["finished"] else "stopped (resume with --resume)"
        written = [p for p in (result["best"], result["last"]) if p]  # only files that exist
        print(f"{state} after epoch {result['epochs_done']}/{cfg.epochs}; best {name} "
              f"{'n/a' if best is None else f'{best:.4f}'}; checkpoints: {', '.join(written) or 'none'}"
              + ("" if result["best"] else f" (no best checkpoint: no finite {name} yet)"))
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="volume-wise DSC / HD95 on a data set's test volumes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a .pt checkpoint (or .safetensors) written by dlkunet train")
    p.add_argument("--data", required=True, help="data set folder")
    p.add_argument("--format", dest="fmt", default="auto", choices=["auto", "synapse", "acdc", "nifti"])
    p.add_argument("--output", "-o", default="eval", help="folder for cases.csv, summary.json, table.md")
    p.add_argument("--hd95-protocol", default="transunet", choices=["transunet", "mm"],
                   help="transunet: voxel units, as the paper's tables; mm: physical spacing (every case must "
                        "record one: NIfTI, or a 'spacing' entry in .h5 / .npz)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=_positive, default=16, help="slices per forward pass")
    p.add_argument("--limit", type=_positive, help="evaluate only the first N cases")
    p.add_argument("--overlays", type=int, default=0, help="write overlay PNGs of the first N cases")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from .console import log_to_stderr
    from .evaluation import evaluate, markdown_table

    log_to_stderr()
    summary = evaluate(args.checkpoint, args.data, args.fmt, args.output, args.device, args.batch_size,
                       args.hd95_protocol, args.progress, args.precision, args.limit, args.overlays)
    print(markdown_table(summary, summary.get("method", "DLKUNet")))
    print(f"reports: {', '.join(summary['reports'].values())}")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment NIfTI / .npy.h5 / .npz volumes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("inputs", help="a volume file or a folder of them")
    p.add_argument("--output", "-o", required=True, help="folder for the label volumes (same names and format)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=_positive, default=16, help="slices per forward pass")
    p.add_argument("--intensity", default="auto", choices=["auto", "none", "ct", "percentile"],
                   help="input normalisation; auto: what the training data set used, with a warning (and, for "
                        "Synapse models, the CT window) for input that looks raw")
    p.add_argument("--overlay", action="store_true", help="write an overlay PNG per volume (busiest slice)")
    p.add_argument("--overlay-slices", type=_slices, help="comma-separated slice indices for the overlays")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_predict)


def _predict(args) -> int:
    from .console import log_to_stderr
    from .prediction import predict

    log_to_stderr()
    written = predict(args.checkpoint, args.inputs, args.output, args.device, args.batch_size, args.intensity,
                      args.overlay_slices, args.overlay, args.precision, args.progress)
    print(f"wrote {len(written)} label volume(s) to {args.output}")
    return 0


def _add_demo(sub) -> None:
    from .demo import DEMO

    p = sub.add_parser("demo", help="synthetic data -> train DLKUNet-S -> evaluate (minutes on a CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", "-o", default="dlkunet-demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=_positive, help=f"[{DEMO['epochs']}]")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from .console import log_to_stderr
    from .demo import run_demo

    log_to_stderr()
    summary = run_demo(args.output, seed=args.seed, device=args.device, progress=args.progress,
                       epochs=args.epochs)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=2))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as ONNX (for ONNX Runtime / OpenVINO)",
                       description="Export the model as its reference decomposition (standard ONNX ops) with "
                                   "dynamic batch, height and width, then check it in ONNX Runtime against "
                                   "PyTorch on a random input (needs dlkunet[onnx]).")
    p.add_argument("checkpoint", help="a .pt checkpoint (or .safetensors) written by dlkunet train")
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--image-size", type=_positive,
                   help="height and width traced with (any size runs later) [the checkpoint's, else 224]")
    p.add_argument("--opset", type=_positive, help="ONNX opset [the exporter's default]")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the ONNX Runtime comparison (e.g. where onnxruntime is not installed)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from .checkpointing import load_model
    from .export import export_onnx

    model, ckpt = load_model(args.checkpoint, "cpu")
    size = args.image_size or int((ckpt.get("data") or {}).get("image_size") or 224)
    result = export_onnx(model, args.output, image_size=size, opset=args.opset, check=args.check)
    print(f"wrote {result['path']} ({result['bytes'] / 2**20:.1f} MiB): input 'image' (N, "
          f"{result['input_shape'][1]}, H, W), output 'logits', N, H and W dynamic")
    if result["checked"]:
        print(f"ONNX Runtime vs PyTorch on a random {tuple(result['check_shape'])} input: max abs difference "
              f"{result['max_abs_diff']:.3g} (relative {result['rel_diff']:.3g})")
    return 0


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="compile the C++/CUDA kernels now, into the first-use cache",
                       description="Compile dlkunet._C (the cpu and cuda backends) against the running torch "
                                   "into the cache a first use would otherwise fill (DLKUNET_EXTENSIONS_DIR, "
                                   "default: torch's extensions folder), and print where it went.  Honours "
                                   "TORCH_CUDA_ARCH_LIST (default: the visible GPUs), MAX_JOBS and CXX; runs "
                                   "even with DLKUNET_JIT=0.")
    p.add_argument("--force", action="store_true",
                   help="compile again even when this build is cached (a failed one is always tried again)")
    p.set_defaults(func=_build)


def _build(args) -> int:
    from .ops import extension, jit_build

    plan = jit_build.make_plan()
    try:
        _, compiled = jit_build.build(plan, "`dlkunet build` asked for it", force=args.force, retry=True)
    except jit_build.BuildError as exc:
        if exc.tail:
            print(f"the compiler's last lines:\n{exc.tail}", file=sys.stderr)
        raise
    print(f"{'compiled' if compiled else 'already built (--force compiles again)'}: {plan.what} for torch "
          f"{plan.inputs['torch']}, in {plan.directory}")
    if extension.installed_extension()[0] is not None:
        print("note: the installed dlkunet._C is used first; processes use this build where the install has none")
    return 0


def _info(args) -> int:
    from .info import print_info

    print_info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dlkunet", description="DLKUNet: train, evaluate and run "
                                     "the lightweight large-kernel U-Net for medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"dlkunet {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--backend", choices=["auto", "torch", "triton", "cuda", "cpu"],
                        help="operator backend (default: DLKUNET_BACKEND or auto)")
    parser.register("action", "parsers", _LazySubcommands)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_demo(sub)
    _add_build(sub)
    _add_export(sub)
    info = sub.add_parser("info", help="versions, backends and parameter counts")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpointing import CheckpointError

    try:
        if args.backend:
            from .ops import set_backend
            set_backend(args.backend)
        return args.func(args)
    except KeyboardInterrupt:
        print("dlkunet: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        # DataError is a ValueError.  RuntimeError covers unavailable backends and CUDA errors.
        if args.traceback:
            raise
        print(f"dlkunet: error: {exc}", file=sys.stderr)
        return 2
