"""Benchmark of effkern's integer-only ViT ops (I-ViT) on DeiT/ViT-S and -B shapes.

    python bench/integer.py [--quick] [--out DIR] [--csv PATH]     (or: python -m effkern bench integer)

For every config (a dataclass over ``itertools.product`` of shapes and dtypes) and every
non-reference backend of the op (cuda, triton), one row per baseline:

    op, shape, in dtype, backend, correct (bit-exact vs the torch reference, checked once before
    timing), kernel µs, op µs, baseline, baseline µs, speedup = baseline / kernel, GB/s and its
    fraction of the measured copy bandwidth, TOPS and its fraction of the measured bf16 matmul
    ceiling (GEMMs), target and PASS / MISS.

*kernel µs* times the backend implementation alone, with the integer constants (x0, m, e,
bias_int) precomputed as a model would cache them; *op µs* times the public ``effkern.ops`` call
under ``effkern.backend(...)`` (argument checks, constants and any host synchronisation
included). Times are medians of ``triton.testing.do_bench``; inputs rotate among sets totalling
>= 256 MiB (> L2); data is random, never zeros. The copy and bf16 matmul ceilings are measured at
the start of the same run.

Baselines, on the same shapes: ``torch.softmax``, ``F.gelu`` and ``F.layer_norm`` (with affine
weight/bias) in bf16; for requantize the eager bf16 ``round(x * s).clamp(-128, 127).to(int8)``
(several kernels, and not bit-equivalent to the dyadic integer requantisation); for int8_linear
``torch._int_mm`` (int32 output, no epilogue; needs M > 16 and K, N multiples of 8) and
``F.linear`` in bf16 with bias.

Targets (reported, never asserted): row/elementwise kernels at batch 64 reach >= 80% of the
measured copy bandwidth and >= 1.2x the torch bf16 op; int8_linear with its requantising epilogue
fused is at least as fast as ``torch._int_mm``.

Results are appended to ``bench/results/integer.csv`` (or ``--csv``) with the GPU name,
torch/triton/CUDA versions, git commit (``$EFFKERN_COMMIT`` when there is no git) and UTC date;
``integer.md`` and ``integer.png`` beside it are regenerated from the CSV (bench/report.py);
``--out DIR`` also copies the three files to DIR.

Without CUDA nothing is timed: a correctness self-check runs every backend usable on the CPU (the
torch reference; triton only under ``TRITON_INTERPRET=1``) against the reference on small
versions of the same shapes, and exits non-zero if anything mismatches or fails.
"""

from __future__ import annotations

import itertools
import math
import sys
import traceback
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` and `effkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import effkern  # noqa: E402
from effkern import BackendNotSupported  # noqa: E402
from effkern._dispatch import OPS  # noqa: E402
from effkern.ops import integer as intops  # noqa: E402

from bench import common, report, runner  # noqa: E402

# What bench/runner.py, which runs the benchmark and the self-check, needs to know of this family.
NAME = "integer"
TITLE = "integer benchmark"
QUICK_HELP = "smoke run: batch 64, ViT-B shapes, short timing"
FAMILY_COLUMNS: dict = {}  # no "family" column: bench/report.py renders such rows with INTEGER_TEXT
REPORT_TEXT = report.INTEGER_TEXT
REPORT_SAMPLE = {"op": "int_softmax", "shape": "1x6x197x197", "in_dtype": "int8", "out_dtype": "int8",
                 "backend": "triton", "correct": True, "kernel_us": 10.0, "baseline": "torch.softmax bf16",
                 "baseline_us": 15.0, "gbps": 100.0, "bw_frac": 0.05, "copy_gbps": 2000.0,
                 "matmul_tflops": 700.0, "target": "", "status": "-"}
SELF_CHECK_TEXT = {"dtype": "in", "summary": "{n_ok} backend checks bit-exact, {failures} failed"}

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

TOKENS = 197  # 224 px / patch 16: 14 * 14 + cls
SEQ_LENS = (197, 785)  # attention rows at 224 px and 448 px (28 * 28 + 1)
MODELS = (("ViT-S", 384, 6), ("ViT-B", 768, 12))  # name, width, heads
BATCHES = (1, 64)
LINEAR_KN = (  # (in_features K, out_features N): qkv, proj, fc1, fc2
    ("ViT-S", 384, 1152), ("ViT-S", 384, 384), ("ViT-S", 384, 1536), ("ViT-S", 1536, 384),
    ("ViT-B", 768, 2304), ("ViT-B", 768, 768), ("ViT-B", 768, 3072), ("ViT-B", 3072, 768),
)
OPS_BENCHED = ("int_softmax", "int_gelu", "int_layernorm", "requantize", "int8_linear")
TARGET_BATCH = 64  # the row/elementwise targets apply to "large inputs": batch 64
BW_TARGET, ROW_SPEEDUP_TARGET, GEMM_SPEEDUP_TARGET = 0.80, 1.2, 1.0

# The baselines of each op, by the names used in the rows (and in bench/test_bench_integer.py).
BASELINES = {
    "int_softmax": ("torch.softmax bf16",),
    "int_gelu": ("F.gelu bf16",),
    "int_layernorm": ("F.layer_norm bf16",),
    "requantize": ("torch bf16 x*s round clamp",),
    "int8_linear": ("torch._int_mm", "F.linear bf16"),
}

_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}

# Scales of the synthetic inputs (the data is uniform over the dtype's range).
SOFTMAX_SCALE = {"int8": 0.08, "int16": 0.0005}  # logits within about +-10 and +-16
GELU_SCALE = 0.05  # +-6.4
SOFTMAX_N, GELU_N, LN_ITERS, OUT_BITS = 15, 23, 10, 8


@dataclass(frozen=True)
class Config:
    """One benchmarked shape. ``shape`` is the main input's shape (for int8_linear, x = [M, K]);
    ``n_out`` is int8_linear's N."""

    op: str
    model: str
    batch: int
    shape: tuple[int, ...]
    in_dtype: str
    n_out: int = 0

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def shape_str(self) -> str:
        s = "x".join(map(str, self.shape))
        return f"{s}x{self.n_out}" if self.op == "int8_linear" else s  # linear: MxKxN

    @property
    def name(self) -> str:
        return f"{self.op}-{self.model}-B{self.batch}-{self.shape_str}-{self.in_dtype}"

    def small(self, rows: int) -> "Config":
        """The same row length (and K, N) with at most ``rows`` rows, as a 2-D input."""
        return replace(self, shape=(min(rows, self.rows), self.cols))


def configs(quick: bool = False, ops: Sequence[str] | None = None) -> list[Config]:
    """The benchmark's configs; ``quick`` keeps batch 64 and one model per op for smoke runs."""
    batches = (TARGET_BATCH,) if quick else BATCHES
    models = MODELS[1:] if quick else MODELS
    out: list[Config] = []
    for (model, _, heads), seq, b, dt in itertools.product(models, SEQ_LENS, batches, ("int8", "int16")):
        out.append(Config("int_softmax", model, b, (b, heads, seq, seq), dt))
    for (model, dim, _), b in itertools.product(models, batches):
        out.append(Config("int_gelu", model, b, (b * TOKENS, 4 * dim), "int8"))
    for (model, dim, _), b in itertools.product(models, batches):
        out.append(Config("int_layernorm", model, b, (b * TOKENS, dim), "int8"))
    for b in batches:
        out.append(Config("requantize", "ViT-S", b, (b * TOKENS, 1536), "int32"))
    names = {m for m, _, _ in models}
    for (model, k, n), b in itertools.product(LINEAR_KN, batches):
        if model in names:
            out.append(Config("int8_linear", model, b, (b * TOKENS, k), "int8", n_out=n))
    return runner.only_ops(out, ops, OPS_BENCHED)


def run_order(cfgs: list[Config]) -> list[Config]:
    """The order to run the configs in: report order."""
    return cfgs


def self_check_configs(quick: bool = False, ops: Sequence[str] | None = None) -> list[Config]:
    """Small versions of the configs (same row lengths, few rows), deduplicated."""
    rows, lin_rows = (13, 33) if quick else (TOKENS, TOKENS)
    seen, out = set(), []
    for c in configs(False, ops):
        s = c.small(lin_rows if c.op == "int8_linear" else rows)
        key = (s.op, s.shape, s.in_dtype, s.n_out)
        if key not in seen:
            seen.add(key)
            out.append(replace(s, model="-", batch=0))
    if quick:  # one row length per op and dtype is enough for a smoke test
        keep, seen_q = [], set()
        for s in out:
            key = (s.op, s.in_dtype, s.cols if s.op != "int8_linear" else s.cols > 1000)
            if key not in seen_q:
                seen_q.add(key)
                keep.append(s)
        out = keep
    return out


# --------------------------------------------------------------------------------------------
# Cases: data, the op's call, its backend arguments, bytes, baselines
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    cfg: Config
    sets: list[dict]  # rotated input sets (tensors and constants)
    x2d: Callable[[dict], Tensor]  # [rows, cols] view of the main input
    call: Callable[[dict, Tensor], Tensor]  # the public op on a set, main input replaced
    kernel_args: Callable[[dict], tuple]  # the arguments of OPS[op].impls[backend].fn
    out_cols: int
    out_dtype: str
    bytes: int  # minimal bytes moved by one call: inputs read once + outputs written once
    flops: int = 0  # integer multiply-adds x 2 (GEMMs only)
    baselines: list[common.Baseline] = field(default_factory=list)


def _randint(shape, dtype: torch.dtype, gen, device, lo: int | None = None, hi: int | None = None) -> Tensor:
    info = torch.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return torch.randint(lo, hi + 1, shape, dtype=dtype, device=device, generator=gen)


def build_case(cfg: Config, device, *, rotate: bool = True, seed: int = 0) -> Case:
    """Fresh random inputs for ``cfg`` on ``device`` (several rotated sets when ``rotate``)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + zlib.crc32(cfg.name.encode()))
    case = _BUILDERS[cfg.op](cfg, device, gen, rotate)
    assert tuple(b.name for b in case.baselines) == BASELINES[cfg.op], "BASELINES out of date"
    return case


def _build_softmax(cfg: Config, device, gen, rotate: bool) -> Case:
    dt = _DTYPES[cfg.in_dtype]
    numel = math.prod(cfg.shape)
    esize = torch.empty((), dtype=dt).element_size()
    scale = SOFTMAX_SCALE[cfg.in_dtype]
    x0 = intops.shift_exp_x0(torch.tensor(scale, dtype=torch.float32))
    n = common.n_sets(numel * esize, rotate)
    sets = [{"x": _randint(cfg.shape, dt, gen, device)} for _ in range(n)]
    bf = [((s["x"].float() * scale).to(torch.bfloat16),) for s in sets]
    return Case(
        cfg, sets,
        x2d=lambda s: s["x"].reshape(-1, cfg.cols),
        call=lambda s, x: effkern.ops.int_softmax(x, scale, out_bits=OUT_BITS, n=SOFTMAX_N)[0],
        kernel_args=lambda s: (s["x"].reshape(-1, cfg.cols), x0, SOFTMAX_N, OUT_BITS),
        out_cols=cfg.cols, out_dtype="int8", bytes=numel * (esize + 1),
        baselines=[common.Baseline("torch.softmax bf16", common.rotating(lambda x: torch.softmax(x, dim=-1), bf), numel * 4)],
    )


def _build_gelu(cfg: Config, device, gen, rotate: bool) -> Case:
    numel = math.prod(cfg.shape)
    scale = GELU_SCALE
    x0 = intops.shift_exp_x0(torch.tensor(scale, dtype=torch.float32).reshape(-1) * 1.702)
    n = common.n_sets(numel, rotate)
    sets = [{"x": _randint(cfg.shape, torch.int8, gen, device)} for _ in range(n)]
    bf = [((s["x"].float() * scale).to(torch.bfloat16),) for s in sets]
    return Case(
        cfg, sets,
        x2d=lambda s: s["x"].reshape(-1, cfg.cols),
        call=lambda s, x: effkern.ops.int_gelu(x, scale, out_bits=OUT_BITS, n=GELU_N)[0],
        kernel_args=lambda s: (s["x"].reshape(-1, cfg.cols), x0, GELU_N, OUT_BITS),
        out_cols=cfg.cols, out_dtype="int32", bytes=numel * (1 + 4),
        baselines=[common.Baseline("F.gelu bf16", common.rotating(F.gelu, bf), numel * 4)],
    )


def _build_layernorm(cfg: Config, device, gen, rotate: bool) -> Case:
    numel, c = math.prod(cfg.shape), cfg.cols
    weight = 1.0 + 0.1 * torch.randn(c, device=device, generator=gen)
    bias = 0.1 * torch.randn(c, device=device, generator=gen)
    bias_int, _ = intops.layernorm_constants(c, weight, bias)
    n = common.n_sets(numel, rotate)
    sets = [{"x": _randint(cfg.shape, torch.int8, gen, device)} for _ in range(n)]
    wb, bb = weight.to(torch.bfloat16), bias.to(torch.bfloat16)
    bf = [(s["x"].to(torch.bfloat16),) for s in sets]  # LayerNorm is scale-invariant
    return Case(
        cfg, sets,
        x2d=lambda s: s["x"].reshape(-1, c),
        call=lambda s, x: effkern.ops.int_layernorm(x, weight, bias, iters=LN_ITERS)[0],
        kernel_args=lambda s: (s["x"].reshape(-1, c), bias_int, LN_ITERS),
        out_cols=c, out_dtype="int32", bytes=numel * (1 + 4) + c * 4,
        baselines=[common.Baseline("F.layer_norm bf16", common.rotating(lambda x: F.layer_norm(x, (c,), wb, bb), bf),
                            numel * 4 + c * 4)],
    )


def _dyadic(in_scale: Tensor, out_scale: float, columns: int, device) -> tuple[Tensor, Tensor]:
    m, e = intops.dyadic_params(in_scale.reshape(-1), torch.tensor([out_scale], dtype=torch.float32))
    return m.expand(columns).contiguous().to(device), e.expand(columns).contiguous().to(device)


def _build_requantize(cfg: Config, device, gen, rotate: bool) -> Case:
    numel, c = math.prod(cfg.shape), cfg.cols
    cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=device)))
    in_scale = 2e-5 * (1.0 + torch.rand(c, generator=cpu_gen))  # per channel, float32 on the host
    out_scale = 0.05
    m, e = _dyadic(in_scale, out_scale, c, device)
    n = common.n_sets(numel * 4, rotate)
    sets = [{"x": _randint(cfg.shape, torch.int32, gen, device, -(2**17), 2**17)} for _ in range(n)]
    ratio = (in_scale / out_scale).to(device=device, dtype=torch.bfloat16)
    bf = [(s["x"].to(torch.bfloat16),) for s in sets]
    return Case(
        cfg, sets,
        x2d=lambda s: s["x"].reshape(-1, c),
        call=lambda s, x: effkern.ops.requantize(x, in_scale, out_scale, out_bits=OUT_BITS),
        kernel_args=lambda s: (s["x"].reshape(-1, c), m, e, OUT_BITS),
        out_cols=c, out_dtype="int8", bytes=numel * (4 + 1) + c * 16,
        baselines=[common.Baseline(
            "torch bf16 x*s round clamp",
            common.rotating(lambda x: torch.round(x * ratio).clamp_(-128, 127).to(torch.int8), bf),
            numel * (2 + 1) + c * 2,
            note="requantize baseline: eager torch on a bf16 copy of the input, round(x*s).clamp(-128,127)"
                 ".to(int8) (several kernels; not bit-equivalent to the dyadic requantisation)",
        )],
    )


def _build_linear(cfg: Config, device, gen, rotate: bool) -> Case:
    m_rows, k = cfg.shape
    n_out = cfg.n_out
    cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=device)))
    # acc has std ~ sqrt(K) * 74^2; this in_scale makes acc * in_scale ~ N(0, 1) per channel.
    in_scale = (1.0 / (math.sqrt(k) * 74.0**2)) * (1.0 + 0.25 * torch.rand(n_out, generator=cpu_gen))
    out_scale = 3.0 / 127  # int8 outputs with a std of about 45
    mm, ee = _dyadic(in_scale, out_scale, n_out, device)
    bias = _randint((n_out,), torch.int32, gen, device, -(2**14), 2**14)
    n = common.n_sets(m_rows * k + n_out * k, rotate)
    sets = [{"x": _randint((m_rows, k), torch.int8, gen, device), "w": _randint((n_out, k), torch.int8, gen, device)}
            for _ in range(n)]
    flops = 2 * m_rows * n_out * k
    baselines = []
    # torch._int_mm: int32 output, no bias or requantisation; cuBLASLt needs M > 16, K and N % 8 == 0.
    if k % 8 or n_out % 8:
        baselines.append(common.Baseline("torch._int_mm", None, na=f"K={k} and N={n_out} must be multiples of 8"))
    else:
        pad = 32 - m_rows if m_rows <= 16 else 0
        xs = [(torch.cat([s["x"], s["x"].new_zeros(pad, k)]) if pad else s["x"], s["w"].t()) for s in sets]
        notes = [f"_int_mm on M padded to {m_rows + pad}"] if pad else []
        try:  # the usual call: w.t() is a column-major [K, N] view (cuBLASLt's preferred TN layout)
            torch._int_mm(*xs[0])
            na = ""
        except RuntimeError as e:
            try:
                xs = [(x, w.contiguous()) for x, w in xs]
                torch._int_mm(*xs[0])
                na = ""
                notes.append(f"_int_mm rejected w.t() ({common.short_exc(e)}); timed with a row-major copy")
            except RuntimeError as e2:
                na = f"torch._int_mm failed: {common.short_exc(e2)}"
        baselines.append(common.Baseline("torch._int_mm", None if na else common.rotating(torch._int_mm, xs),
                                  (m_rows + pad) * k + n_out * k + 4 * (m_rows + pad) * n_out, flops,
                                  note="; ".join(notes), na=na))
    bb = bias.to(torch.bfloat16)
    bf = [(s["x"].to(torch.bfloat16), s["w"].to(torch.bfloat16)) for s in sets]
    baselines.append(common.Baseline("F.linear bf16", common.rotating(lambda x, w: F.linear(x, w, bb), bf),
                              2 * (m_rows * k + n_out * k + n_out + m_rows * n_out), flops))
    return Case(
        cfg, sets,
        x2d=lambda s: s["x"],
        call=lambda s, x: effkern.ops.int8_linear(x, s["w"], bias, in_scale=in_scale, out_scale=out_scale,
                                                  out_bits=OUT_BITS),
        kernel_args=lambda s: (s["x"], s["w"], bias, mm, ee, OUT_BITS),
        out_cols=n_out, out_dtype="int8",
        bytes=m_rows * k + n_out * k + 4 * n_out + 16 * n_out + m_rows * n_out, flops=flops,
        baselines=baselines,
    )


_BUILDERS = {"int_softmax": _build_softmax, "int_gelu": _build_gelu, "int_layernorm": _build_layernorm,
             "requantize": _build_requantize, "int8_linear": _build_linear}


# --------------------------------------------------------------------------------------------
# Backends: availability, correctness
# --------------------------------------------------------------------------------------------


def registered_backends(op: str, include_reference: bool = False) -> list[str]:
    """The op's registered backends in effkern's order (cuda, triton[, torch])."""
    impls = OPS[op].impls
    return [b for b in effkern._dispatch.BACKENDS if b in impls and (include_reference or b != "torch")]


def select(case: Case, backend: str):
    """(implementation, None) or (None, (status, reason)) with status N/A or ERROR."""
    args = case.kernel_args(case.sets[0])
    try:
        with effkern.backend(backend):
            return OPS[case.cfg.op].select(*args), None
    except BackendNotSupported as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        return None, ("N/A", " ".join(lines) or str(e))
    except Exception as e:  # a broken availability check is a failure, not "unavailable"
        return None, ("ERROR", f"availability check raised {type(e).__name__}: {e}")


def reference(case: Case, s: dict) -> Callable[[Tensor], Tensor]:
    """The public op on a block of rows, forced onto the torch reference backend."""
    def ref(x_rows: Tensor) -> Tensor:
        with effkern.backend("torch"):
            return case.call(s, x_rows)
    return ref


def verify(case: Case, impl, backend: str) -> tuple[bool, str]:
    """Run the backend once at kernel level and once through the public op, and compare both
    bit-exactly with the reference. Raises if the backend raises."""
    s = case.sets[0]
    out_kernel = impl.fn(*case.kernel_args(s))
    with effkern.backend(backend):
        out_op = case.call(s, s["x"])
    if case.cfg.op != "int8_linear" and tuple(out_op.shape) != tuple(s["x"].shape):
        return False, f"op output shape {tuple(out_op.shape)} != input shape {tuple(s['x'].shape)}"
    return common.compare_exact({"kernel": out_kernel, "op": out_op}, case.x2d(s), reference(case, s), case.out_cols)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def target_for(cfg: Config, baseline: str) -> str:
    if cfg.op == "int8_linear":
        return f">={GEMM_SPEEDUP_TARGET:.1f}x _int_mm" if baseline == "torch._int_mm" else ""
    if cfg.batch >= TARGET_BATCH:
        return f">={BW_TARGET:.0%} BW & >={ROW_SPEEDUP_TARGET:.1f}x"
    return ""


def status_for(cfg: Config, target: str, correct: bool, speedup: float, bw_frac: float) -> str:
    if not correct:
        return "WRONG"
    if not target:
        return "-"
    if math.isnan(speedup):  # the baseline could not run
        return "-"
    if cfg.op == "int8_linear":
        return "PASS" if speedup >= GEMM_SPEEDUP_TARGET else "MISS"
    return "PASS" if bw_frac >= BW_TARGET and speedup >= ROW_SPEEDUP_TARGET else "MISS"


# --------------------------------------------------------------------------------------------
# GPU benchmark (bench/runner.py runs the configs; this fills in the rows of one)
# --------------------------------------------------------------------------------------------


def _time(fn, timing) -> common.Timing:
    return common.do_bench_us(fn, *timing)


def backend_rows(case: Case, base: dict, baseline_t: dict[str, tuple[float, str]], ceilings: dict,
                 timing: tuple[float, float]) -> list[dict]:
    """The rows of one config, whose baselines are timed: every non-reference backend x every baseline."""
    cfg, nan = case.cfg, math.nan
    base.update(out_dtype=case.out_dtype, bytes=case.bytes, flops=case.flops or "", rot_sets=len(case.sets))
    rows = []
    for backend in registered_backends(cfg.op):
        impl, why = select(case, backend)
        correct, note, t_kernel, op_us = False, "", None, nan
        if impl is None:
            status, note = why
        else:
            status = ""
            try:
                correct, note = verify(case, impl, backend)
            except Exception as e:
                traceback.print_exc()
                status, note = "ERROR", f"{backend} raised {common.short_exc(e)}"
            if status != "ERROR":
                try:
                    args = common.Rotator([case.kernel_args(s) for s in case.sets])
                    fn = impl.fn
                    t_kernel = _time(lambda: fn(*args.next()), timing)
                except Exception as e:
                    traceback.print_exc()
                    status, note = "ERROR", f"timing raised {common.short_exc(e)}"
            if t_kernel is not None:
                sets = common.Rotator(case.sets)

                def op_once():
                    s = sets.next()
                    return case.call(s, s["x"])

                try:
                    with effkern.backend(backend):
                        op_us = _time(op_once, timing).median_us
                except Exception as e:
                    traceback.print_exc()
                    note = "; ".join(x for x in (note, f"timing the public op raised {common.short_exc(e)}") if x)
        k_us = t_kernel.median_us if t_kernel else nan
        gbps = case.bytes / (k_us * 1e-6) / 1e9 if t_kernel else nan
        tops = case.flops / (k_us * 1e-6) / 1e12 if (t_kernel and case.flops) else nan
        for bl in case.baselines if impl is not None else case.baselines[:1]:
            b_us, b_note = baseline_t[bl.name]
            speedup = b_us / k_us if t_kernel and not math.isnan(b_us) else nan
            target = target_for(cfg, bl.name)
            row_status = status or status_for(cfg, target, correct, speedup, gbps / ceilings["copy_gbps"])
            rows.append(dict(
                base, backend=backend, correct=correct if impl is not None and status != "ERROR" else "",
                kernel_us=k_us, kernel_p20_us=t_kernel.p20_us if t_kernel else nan,
                kernel_p80_us=t_kernel.p80_us if t_kernel else nan, op_us=op_us,
                baseline=bl.name, baseline_us=b_us, speedup=speedup,
                gbps=gbps, bw_frac=gbps / ceilings["copy_gbps"],
                baseline_gbps=bl.bytes / (b_us * 1e-6) / 1e9 if not math.isnan(b_us) else nan,
                tops=tops, tops_frac=tops / ceilings["matmul_tflops"] if case.flops else nan,
                target=target, status=row_status, note="; ".join(x for x in (note, b_note) if x),
            ))
    return rows


# --------------------------------------------------------------------------------------------
# CPU self-check (bench/runner.py checks the backends; this runs the baselines)
# --------------------------------------------------------------------------------------------


def check_baselines(case: Case) -> list[tuple[str, str, str]]:
    """(name, status, note) of each baseline run once, untimed; one that cannot run on the CPU
    (torch._int_mm) is reported, not counted as a failure."""
    out = []
    for bl in case.baselines:
        if bl.fn is None:
            out.append((bl.name, "N/A", bl.na))
            continue
        try:
            bl.fn()
            out.append((bl.name, "ran", "untimed"))
        except Exception as e:
            out.append((bl.name, "N/A on cpu", common.short_exc(e)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(sys.modules[__name__], argv)  # this module is the family runner.main drives


if __name__ == "__main__":
    sys.exit(main())
