"""What the benchmarks run: shapes, dtypes, modes and timing effort for each ``--bench-size``.

``full``  the spec's real shapes (GPU default): DLKUNet-L at batch 16 from 224x224, so Blocks see
          (C, H) = (96, 224), (192, 112), (384, 56), (768, 28), (1536, 14) and decoder Blocks 2C
          inputs; models S / M / L at batch 1, 8, 16.
``cpu``   the same channel counts at 64x64 and batch 2, a subset of levels; models at 48x48,
          batch 1 and 2 (CPU default; a few minutes on 2 idle cores).
``quick`` tiny shapes, one or two rounds: CI runs it so the suite never rots.  No timing claims.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

SIZES = ("full", "cpu", "quick")
DW_KERNEL = 3
LKA_KERNELS = (5, 7, 3)  # (k0, ks, dilation): the paper's default attention

# (mode, pass) combinations of dwconv_bn_act; the first two are inference and training as run.
DW_COMBOS = (("eval", "fwd"), ("train", "fwd+bwd"), ("train", "fwd"), ("eval", "fwd+bwd"))
LKA_COMBOS = (("-", "fwd"), ("-", "fwd+bwd"))
MODEL_MODES = ("infer", "train")


@dataclass(frozen=True)
class DWCase:
    index: int
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int = DW_KERNEL
    where: str = "enc"  # enc: a Block's C -> C conv; dec: a decoder Block's 2C -> C conv

    @property
    def id(self) -> str:
        return f"{self.where}-N{self.n}-{self.cin}to{self.cout}-{self.h}x{self.w}"

    def shape(self) -> dict:
        return dict(N=self.n, Cin=self.cin, Cout=self.cout, H=self.h, W=self.w, k=self.k)


@dataclass(frozen=True)
class LKACase:
    index: int
    n: int
    c: int
    h: int
    w: int
    kernels: Tuple[int, int, int] = LKA_KERNELS

    @property
    def id(self) -> str:
        return f"N{self.n}-C{self.c}-{self.h}x{self.w}"

    def shape(self) -> dict:
        k0, ks, d = self.kernels
        return dict(N=self.n, C=self.c, H=self.h, W=self.w, k0=k0, ks=ks, dilation=d)


@dataclass(frozen=True)
class ModelCase:
    index: int
    variant: str
    batch: int
    image: int
    base_width: int = 96

    @property
    def id(self) -> str:
        return f"{self.variant}-b{self.batch}-{self.image}px-C{self.base_width}"

    def shape(self) -> dict:
        return dict(variant=self.variant, N=self.batch, H=self.image, W=self.image, C=self.base_width)


@dataclass(frozen=True)
class Timing:
    """How hard to time one case: untimed warm-up rounds, then enough rounds for ``target_s``."""
    warmup_rounds: int
    target_s: float
    min_rounds: int
    max_rounds: int


@dataclass(frozen=True)
class Size:
    name: str
    batch: int
    image: int
    base_width: int
    levels: Tuple[int, ...]        # encoder levels whose Blocks are measured
    dec_levels: Tuple[int, ...]    # decoder levels (2C -> C first conv)
    model_variants: Tuple[str, ...]
    model_batches: Tuple[int, ...]
    model_image: int
    model_base_width: int
    timing: Timing
    # "inductor": real torch.compile; "aot_eager": dynamo + AOTAutograd without code generation
    # (exercises the path in CI without minutes of C++ compilation); None: no compile rows.
    compile_backend: Optional[str] = "inductor"
    # Which cases get a compile row (indices into the case lists); None = all.
    compile_op_cases: Optional[Tuple[int, ...]] = None
    compile_model_cases: Optional[Tuple[int, ...]] = None
    compile_combos: Optional[Tuple[Tuple[str, str], ...]] = None
    notes: str = field(default="")

    def widths(self):
        return [(self.base_width * 2 ** i, self.image // 2 ** i) for i in range(5)]


_FULL = Size("full", batch=16, image=224, base_width=96, levels=(0, 1, 2, 3, 4), dec_levels=(0, 1, 2, 3),
             model_variants=("S", "M", "L"), model_batches=(1, 8, 16), model_image=224, model_base_width=96,
             timing=Timing(warmup_rounds=2, target_s=0.15, min_rounds=5, max_rounds=25))
_CPU = Size("cpu", batch=2, image=64, base_width=96, levels=(0, 2, 4), dec_levels=(0,),
            model_variants=("S", "M", "L"), model_batches=(1, 2), model_image=48, model_base_width=96,
            timing=Timing(warmup_rounds=0, target_s=0.3, min_rounds=3, max_rounds=10),
            # inductor's C++ compile takes 15-50 s per graph on 2 cores: one shape per op only.
            compile_model_cases=(), compile_op_cases=(0,), compile_combos=DW_COMBOS[:2] + LKA_COMBOS,
            notes="torch.compile rows only at the first shape of each op; model compile only at full size")
_QUICK = Size("quick", batch=2, image=16, base_width=8, levels=(0,), dec_levels=(0,),
              model_variants=("S",), model_batches=(2,), model_image=16, model_base_width=8,
              timing=Timing(warmup_rounds=0, target_s=0.0, min_rounds=2, max_rounds=2),
              compile_backend="aot_eager", compile_op_cases=(0,), compile_model_cases=(0,),
              notes="smoke run: tiny shapes, 2 rounds, compile via aot_eager; no timing claims")
_BY_NAME = {s.name: s for s in (_FULL, _CPU, _QUICK)}


def get_size(name: str) -> Size:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown --bench-size {name!r}; choose one of {', '.join(SIZES)}") from None


def dwconv_cases(size: Size):
    widths = size.widths()
    cases = []
    for lv in size.levels:
        c, h = widths[lv]
        cases.append((c, c, h, "enc"))
    for lv in size.dec_levels:
        c, h = widths[lv]
        cases.append((2 * c, c, h, "dec"))
    return [DWCase(i, size.batch, cin, cout, h, h, where=where) for i, (cin, cout, h, where) in enumerate(cases)]


def lka_cases(size: Size):
    widths = size.widths()
    return [LKACase(i, size.batch, *((widths[lv][0], widths[lv][1], widths[lv][1])))
            for i, lv in enumerate(size.levels)]


def model_cases(size: Size):
    cases = [(v, b) for v in size.model_variants for b in size.model_batches]
    return [ModelCase(i, v, b, size.model_image, size.model_base_width) for i, (v, b) in enumerate(cases)]


def dtypes(device_type: str):
    """float32 everywhere; bfloat16 too on GPUs (on the CPU it is not a training dtype here)."""
    return (torch.float32, torch.bfloat16) if device_type == "cuda" else (torch.float32,)


def wants_compile(size: Size, case_index: Optional[int], combo: Optional[Tuple[str, str]], model: bool) -> str:
    """Empty if this case gets a torch.compile row at this size, else why not."""
    if size.compile_backend is None:
        return f"--bench-size {size.name} has no torch.compile rows"
    if model:
        if size.compile_model_cases is None or case_index in size.compile_model_cases:
            return ""
        if not size.compile_model_cases:
            return f"--bench-size {size.name}: whole-model torch.compile only at full size (minutes per model here)"
        return f"--bench-size {size.name} compiles only model cases {size.compile_model_cases} (compile time)"
    if size.compile_op_cases is not None and case_index not in size.compile_op_cases:
        return f"--bench-size {size.name} compiles only op cases {size.compile_op_cases} (compile time)"
    if size.compile_combos is not None and combo not in size.compile_combos:
        return f"--bench-size {size.name} compiles only {size.compile_combos}"
    return ""
