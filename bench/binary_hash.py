"""Benchmark of effkern's binary-hash additive attention (EcoFormer / ShiftAddViT) against flash attention.

    python bench/binary_hash.py [--quick] [--out DIR] [--csv PATH]   (or: python -m effkern bench binary_hash)

Shapes: B = 64, H = 6 (DeiT-S) and 12 (DeiT-B), head dim d = 64, N in {197, 785, 3136, 12544}
(224 px / patch 16, 448 / 16, 224 / 4 and 448 / 4: the token counts of ViT stages and PVT-style
high-resolution stages); bf16; both forms ("ecoformer", {-1, +1} codes; "shiftadd", {0, 1}
codes); nbits 16, and 32 and 64 at one shape (H = 12, N = 3136). The KSH hash has m = 64
anchors (unit vectors) per head, mu the mean kernel value, proj Gaussian [H, nbits, m].

Two ops, for every config and every non-reference backend (cuda, triton), one row per baseline:

* ``binary_attention``: the attention alone on packed codes (q codes, k codes int32
  [B, H, N, ceil(nbits / 32)], v bf16). *kernel µs* = the backend primitive
  (``OPS["binary_attention"].impls[backend].fn``); *op µs* = ``effkern.ops.binary_attention(...,
  validate=False)`` under ``effkern.backend(backend)``.
* ``hash_attention``: the fused inference path from q, k, v: ``ksh_hash`` of q and of k, ``pack_bits``
  of both, ``binary_attention``. *kernel µs* = the backend's three primitives in a row (ksh_hash x2,
  pack_bits x2, binary_attention); *op µs* = the same chain of public ops (validate=False).

Baselines, on the same q, k, v (or codes): ``SDPA flash`` = ``F.scaled_dot_product_attention(q, k,
v)`` under ``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (softmax attention, not
the same function: the speed reference a model would otherwise use), and ``torch linear ref`` =
the torch backend's primitives of the same linear form (the same computation; for
binary_attention on the same codes, for hash_attention the whole torch chain).

Bytes (GB/s) are the memory-bandwidth floor: binary_attention reads q codes, k codes and v and
writes out once each; hash_attention reads q, k, v (and the hash parameters) and writes out once.

Targets (reported PASS / MISS, never asserted): hash_attention vs SDPA flash >= 1x at N = 785,
>= 3x at N = 3136 and >= 10x at N = 12544, on *op µs* (the public op chain, the honest
end-to-end time; the CSV's ``speedup`` column has the kernel-µs ratio too); binary_attention
>= 70% of the measured copy bandwidth at its floor bytes (kernel µs, on its SDPA row). Other rows
report the ratio with no target.

Correctness (checked once per backend before timing, against the torch backend): the attention
output within the bf16 tolerance (rtol 1.6e-2, plus 1e-3 of max |out|); for hash_attention the
hash projections y within float32 tolerance (1e-3 relative, 1e-4 of max |y|), code bits equal
except where |y_ref| < 1e-4 max |y| (a sign decided by rounding), and the output compared in the
(batch, head) slices whose codes agree (a flipped bit changes its whole slice's KV).

Results are appended to ``bench/results/binary_hash.csv`` (rows carry family=binary_hash);
``binary_hash.md`` / ``.png`` beside it are regenerated; ``--out DIR`` copies them to DIR.

Without CUDA nothing is timed: a correctness self-check runs every backend usable on the CPU
(torch; triton only under ``TRITON_INTERPRET=1``) against the torch backend on small versions of
the shapes (batch 2, at most 2 heads, N <= 197), runs each baseline once and exits non-zero if
anything mismatches or fails. A backend whose module cannot be imported yet is reported as
unavailable (N/A), not as a failure.
"""

from __future__ import annotations

import itertools
import math
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` and `effkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import effkern  # noqa: E402
from effkern._dispatch import BACKENDS, OPS  # noqa: E402
from effkern.ops import binary_hash as bh  # noqa: E402

from bench import common, runner  # noqa: E402

NAME = "binary_hash"
TITLE = "binary-hash attention benchmark"
QUICK_HELP = "smoke run: B=64, H=6, N=785/3136/12544, nbits 16, ecoformer, both ops, short timing"
FAMILY_COLUMNS = {"family": NAME}
REPORT_SAMPLE = {**FAMILY_COLUMNS, "op": "hash_attention", "shape": "64x6x3136x64 b16 ecoformer",
                 "in_dtype": "bf16", "out_dtype": "bf16", "backend": "triton", "correct": True,
                 "kernel_us": 100.0, "op_us": 110.0, "baseline": "SDPA flash", "baseline_us": 400.0,
                 "gbps": 1000.0, "bw_frac": 0.4, "copy_gbps": 2500.0, "target": "op >=3x SDPA", "status": "PASS"}
SELF_CHECK_TEXT = {"dtype": "dtype", "summary": "{n_ok} backend checks passed, {n_na} unavailable, {failures} failed"}

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

MODELS = (("DeiT-S", 6), ("DeiT-B", 12))  # name, heads H
SEQ_LENS = (197, 785, 3136, 12544)
BATCH = 64
HEAD_DIM = 64
ANCHORS = 64  # KSH anchors m per head
NBITS = 16
EXTRA_NBITS = (32, 64)  # at EXTRA_SHAPE only
EXTRA_SHAPE = ("DeiT-B", 12, 3136)
SPEEDUP_TARGETS = {785: 1.0, 3136: 3.0, 12544: 10.0}  # hash_attention op µs vs SDPA flash
BW_TARGET = 0.70  # binary_attention: fraction of the copy bandwidth at the floor bytes
QUICK_HEADS, QUICK_SEQ = 6, (785, 3136, 12544)
SELF_CHECK_MAX_N = 197

BASELINES = {"binary_attention": ("SDPA flash", "torch linear ref"),
             "hash_attention": ("SDPA flash", "torch linear ref")}
PRIMITIVES = {"binary_attention": ("binary_attention",),
              "hash_attention": ("ksh_hash", "pack_bits", "binary_attention")}
OPS_BENCHED = tuple(BASELINES)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# rtol, atol of the output comparison by dtype; the atol also gets ATOL_OF_MAX x max |ref|
TOLERANCE = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-5), torch.float32: (1e-4, 1e-6),
             torch.float64: (1e-9, 1e-12)}
ATOL_OF_MAX = 1e-3
Y_RTOL, Y_ATOL_OF_MAX = 1e-3, 1e-4  # hash projections (float32)
Y_TIE = 1e-4  # |y_ref| below this fraction of max |y_ref|: its code bit may differ


@dataclass(frozen=True)
class Config:
    op: str
    model: str
    batch: int
    heads: int
    tokens: int
    nbits: int = NBITS
    form: str = "ecoformer"
    dtype: str = "bf16"

    @property
    def shape_str(self) -> str:
        return f"{self.batch}x{self.heads}x{self.tokens}x{HEAD_DIM} b{self.nbits} {self.form}"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.model}-{self.shape_str.replace(' ', '-')}-{self.dtype}"

    @property
    def in_dtype(self) -> str:
        return self.dtype

    def small(self) -> "Config":
        return replace(self, model="small", batch=2, heads=min(self.heads, 2),
                       tokens=min(self.tokens, SELF_CHECK_MAX_N))


def configs(quick: bool = False, ops: Sequence[str] | None = None) -> list[Config]:
    out: list[Config] = []
    for op in OPS_BENCHED:
        for form, (model, h), n in itertools.product(bh.FORMS, MODELS, SEQ_LENS):
            out.append(Config(op, model, BATCH, h, n, NBITS, form))
        for form, nb in itertools.product(bh.FORMS, EXTRA_NBITS):
            out.append(Config(op, EXTRA_SHAPE[0], BATCH, EXTRA_SHAPE[1], EXTRA_SHAPE[2], nb, form))
    if quick:
        out = [c for c in out if c.heads == QUICK_HEADS and c.tokens in QUICK_SEQ and c.nbits == NBITS
               and c.form == "ecoformer"]
    return runner.only_ops(out, ops, OPS_BENCHED)


def run_order(cfgs: list[Config]) -> list[Config]:
    """The --quick set (the target shapes) first, so that a time budget cuts the rest."""
    first = set(configs(True))
    return [c for c in cfgs if c in first] + [c for c in cfgs if c not in first]


def self_check_configs(quick: bool = False, ops: Sequence[str] | None = None) -> list[Config]:
    """Small versions (batch 2, <= 2 heads, N capped at 197), deduplicated: per op and form
    nbits 16, 32 and 64 at N = 197, and nbits 16 at N = 37 (an odd tail); ``quick``: per op,
    nbits 16 in both forms and nbits 64 in the ecoformer form, N = 197."""
    seen, out = set(), []
    for c in configs(False, ops):
        s = c.small()
        key = (s.op, s.shape_str, s.dtype)
        if key not in seen:
            seen.add(key)
            out.append(s)
    if quick:  # the Triton interpreter is slow: nbits 16 in both forms, and 64 (two words) once
        return [c for c in out if c.nbits == NBITS or (c.nbits == max(EXTRA_NBITS) and c.form == bh.FORMS[0])]
    return out + [replace(c, tokens=37) for c in out if c.nbits == NBITS]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    cfg: Config
    sets: list[dict]
    kernel: Callable[[dict, dict], object]  # one kernel-level call on a set, given {primitive: fn}
    op: Callable[[dict], object]  # the public op(s), validate=False
    bytes: int
    out_dtype: str
    baselines: list[common.Baseline] = field(default_factory=list)
    baseline_checks: dict[str, Callable] = field(default_factory=dict)
    compare: Callable | None = None  # (got, ref) -> (ok, note)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _hash_params(h: int, m: int, nbits: int, d: int, device, gen) -> dict:
    anchors = torch.randn(h, m, d, device=device, generator=gen)
    anchors = anchors / anchors.norm(dim=-1, keepdim=True)
    # for unit x and anchors in d = 64, ||x - a||^2 ~ 2 and sigma ~ 2, so K ~ exp(-1/2): centre there
    mu = math.exp(-0.5) + 0.01 * torch.randn(h, m, device=device, generator=gen)
    proj = torch.randn(h, nbits, m, device=device, generator=gen)
    return {"anchors": anchors, "mu": mu, "proj": proj}


def build_case(cfg: Config, device, *, rotate: bool = True, seed: int = 0) -> Case:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + zlib.crc32(cfg.name.encode()))
    b, h, n, d, nb, form = cfg.batch, cfg.heads, cfg.tokens, HEAD_DIM, cfg.nbits, cfg.form
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()
    w = bh.num_words(nb)
    hp = _hash_params(h, ANCHORS, nb, d, device, gen)
    anchors, mu, proj = hp["anchors"], hp["mu"], hp["proj"]
    codes_bytes = b * h * n * w * 4
    hash_attn = cfg.op == "hash_attention"

    def make():
        s = {name: torch.randn(b, h, n, d, device=device, generator=gen).to(dt) for name in ("q", "k", "v")}
        if not hash_attn:
            with effkern.backend("torch"):
                s["qc"] = bh.pack_bits(bh.ksh_hash(s["q"], anchors, mu, proj, validate=False))
                s["kc"] = bh.pack_bits(bh.ksh_hash(s["k"], anchors, mu, proj, validate=False))
        return s

    set_bytes = 3 * b * h * n * d * es + (2 * codes_bytes if not hash_attn else 0)
    sets = [make() for _ in range(common.n_sets(set_bytes, rotate))]
    out_bytes = b * h * n * d * es
    if hash_attn:
        nbytes = 3 * b * h * n * d * es + out_bytes + sum(common.tensor_bytes(t) for t in hp.values())

        def kernel(s, f):
            yq = f["ksh_hash"](s["q"], anchors, mu, proj)
            yk = f["ksh_hash"](s["k"], anchors, mu, proj)
            qc, kc = f["pack_bits"](yq), f["pack_bits"](yk)
            return yq, yk, qc, kc, f["binary_attention"](s["v"], qc, kc, nb, form)

        def op(s):
            yq = bh.ksh_hash(s["q"], anchors, mu, proj, validate=False)
            yk = bh.ksh_hash(s["k"], anchors, mu, proj, validate=False)
            qc, kc = bh.pack_bits(yq), bh.pack_bits(yk)
            return yq, yk, qc, kc, bh.binary_attention(qc, kc, s["v"], nbits=nb, form=form, validate=False)

        ref_note = "torch linear ref: the torch backend's ksh_hash x2, pack_bits x2, binary_attention"
        compare = _compare_hash
    else:
        nbytes = 2 * codes_bytes + 2 * out_bytes

        def kernel(s, f):
            return f["binary_attention"](s["v"], s["qc"], s["kc"], nb, form)

        def op(s):
            return bh.binary_attention(s["qc"], s["kc"], s["v"], nbits=nb, form=form, validate=False)

        ref_note = "torch linear ref: the torch backend's binary_attention on the same codes"
        compare = _compare_out
    tfns = torch_fns(cfg.op)
    sdpa_bytes = 4 * b * h * n * d * es
    sdpa_note = ("SDPA flash: softmax attention (flash backend) on the same q, k, v; not the same function"
                 if device.type == "cuda" else "")
    return Case(
        cfg, sets, kernel=kernel, op=op, bytes=nbytes, out_dtype=cfg.dtype,
        baselines=[
            common.Baseline("SDPA flash", common.rotating(_sdpa, [(s["q"], s["k"], s["v"]) for s in sets]),
                            sdpa_bytes, flops=4 * b * h * n * n * d, note=sdpa_note),
            common.Baseline("torch linear ref", common.rotating(lambda s: kernel(s, tfns), [(s,) for s in sets]),
                            nbytes, note=ref_note),
        ],
        baseline_checks={"torch linear ref": compare},
        compare=compare,
    )


# --------------------------------------------------------------------------------------------
# Comparison with the torch backend
# --------------------------------------------------------------------------------------------


def _out_mismatch(name: str, got: Tensor, ref: Tensor) -> str:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    rt, at = TOLERANCE[ref.dtype]
    if ref.numel():
        at += ATOL_OF_MAX * float(ref.float().abs().max())
    bad = ~torch.isclose(got.float(), ref.float(), rtol=rt, atol=at, equal_nan=True)
    if not bool(bad.any()):
        return ""
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{name}: {int(bad.sum())} of {got.numel()} elements differ beyond tolerance; first at {first}: "
            f"{got[first].item()} vs {ref[first].item()}")


def _compare_out(got: Tensor, ref: Tensor) -> tuple[bool, str]:
    m = _out_mismatch("out", got, ref)
    return not m, m


def _compare_hash(got, ref) -> tuple[bool, str]:
    """(y_q, y_k, q codes, k codes, out): y within float32 tolerance, code bits equal except at
    near-zero y, out equal within tolerance in the (batch, head) slices whose codes all agree."""
    if not isinstance(got, (tuple, list)) or len(got) != 5:
        return False, f"expected (y_q, y_k, q_codes, k_codes, out), got {type(got).__name__}"
    notes, differ = [], None
    for name, g, r in (("y_q", got[0], ref[0]), ("y_k", got[1], ref[1])):
        scale = float(r.abs().max()) if r.numel() else 0.0
        if g.shape != r.shape or g.dtype != r.dtype:
            notes.append(f"{name}: got {tuple(g.shape)} {g.dtype}, expected {tuple(r.shape)} {r.dtype}")
            continue
        bad = ~torch.isclose(g, r, rtol=Y_RTOL, atol=Y_ATOL_OF_MAX * scale)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            notes.append(f"{name}: {int(bad.sum())} of {g.numel()} differ; first at {first}: "
                         f"{g[first].item()} vs {r[first].item()}")
    nb = ref[0].shape[-1]
    for name, gc, rc, y in (("q codes", got[2], ref[2], ref[0]), ("k codes", got[3], ref[3], ref[1])):
        if gc.shape != rc.shape or gc.dtype != rc.dtype:
            notes.append(f"{name}: got {tuple(gc.shape)} {gc.dtype}, expected {tuple(rc.shape)} {rc.dtype}")
            continue
        gb = bh.unpack_codes(gc, nb, False, torch.int8)
        rb = bh.unpack_codes(rc, nb, False, torch.int8)
        flips = gb != rb
        tie = y.abs() < Y_TIE * float(y.abs().max()) if y.numel() else torch.zeros_like(flips)
        if bool((flips & ~tie).any()):
            notes.append(f"{name}: {int((flips & ~tie).sum())} bits differ away from a near-zero y")
        if not torch.equal(gc, rc):
            d = flips.flatten(2).any(-1)  # [B, H]
            differ = d if differ is None else differ | d
    g, r = got[4], ref[4]
    if g.shape != r.shape:
        notes.append(f"out: got {tuple(g.shape)}, expected {tuple(r.shape)}")
    else:
        same = ~differ if differ is not None else torch.ones(r.shape[:2], dtype=torch.bool, device=r.device)
        m = _out_mismatch("out", g[same], r[same])
        if m:
            notes.append(m)
        if differ is not None and bool(differ.any()):
            notes.append(f"(codes differ at near-zero y in {int(differ.sum())} (batch, head) slices; out not "
                         "compared there)")
    return not any(not n.startswith("(") for n in notes), "; ".join(notes)


# --------------------------------------------------------------------------------------------
# Backends: availability, correctness
# --------------------------------------------------------------------------------------------


def registered_backends(op: str, include_reference: bool = False) -> list[str]:
    """Every effkern backend (cuda, triton[, torch]), registered for the op's primitives or not:
    one still being written shows as N/A (see :func:`select`), never disappears from the report."""
    return [b for b in BACKENDS if include_reference or b != "torch"]


def torch_fns(op: str) -> dict:
    return {p: OPS[p].impls["torch"].fn for p in PRIMITIVES[op]}


def _prim_args(case: Case) -> dict[str, tuple]:
    """The arguments each primitive gets in the kernel call (for the availability checks)."""
    s, cfg = case.sets[0], case.cfg
    if cfg.op == "binary_attention":
        return {"binary_attention": (s["v"], s["qc"], s["kc"], cfg.nbits, cfg.form)}
    seen: dict[str, tuple] = {}
    fns = torch_fns(cfg.op)

    def recorder(name):
        def rec(*args):
            seen.setdefault(name, args)
            return fns[name](*args)
        return rec

    case.kernel(s, {p: recorder(p) for p in PRIMITIVES[cfg.op]})
    return seen


def select(case: Case, backend: str):
    """({primitive: fn}, None) or (None, (status, reason)) with status N/A or ERROR."""
    try:
        recorded = _prim_args(case)
    except Exception as e:
        return None, ("ERROR", f"recording the primitive calls raised {common.short_exc(e)}")
    missing = [p for p in PRIMITIVES[case.cfg.op] if backend not in OPS[p].impls]
    if missing:
        return None, ("N/A", f"no {backend} implementation registered yet for {', '.join(missing)}")
    return runner.select_primitives(sys.modules[__name__], case, backend, recorded)


def verify(case: Case, fns: dict, backend: str) -> tuple[bool, str]:
    """The backend once at kernel level and once through the public op(s), each compared with
    the torch backend. Raises if the backend raises."""
    return runner.verify_levels(case, fns, backend, torch_fns(case.cfg.op),
                                lambda level, got, ref: case.compare(got, ref))


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def target_for(cfg: Config, baseline: str) -> str:
    if baseline != "SDPA flash":
        return ""
    if cfg.op == "hash_attention" and cfg.tokens in SPEEDUP_TARGETS:
        return f"op >={SPEEDUP_TARGETS[cfg.tokens]:.0f}x SDPA"
    if cfg.op == "binary_attention":
        return f">={BW_TARGET:.0%} BW"
    return ""


def status_for(cfg: Config, target: str, correct: bool, op_speedup: float, bw_frac: float) -> str:
    if not correct:
        return "WRONG"
    if not target:
        return "-"
    if cfg.op == "binary_attention":
        return "-" if math.isnan(bw_frac) else "PASS" if bw_frac >= BW_TARGET else "MISS"
    if math.isnan(op_speedup):
        return "-"
    return "PASS" if op_speedup >= SPEEDUP_TARGETS[cfg.tokens] else "MISS"


# --------------------------------------------------------------------------------------------
# GPU benchmark
# --------------------------------------------------------------------------------------------


def backend_rows(case: Case, base: dict, baseline_t: dict[str, tuple[float, str]], ceilings: dict,
                 timing: tuple[float, float]) -> list[dict]:
    def extra(bl, b_us):
        return dict(flops=bl.flops or "", tops=bl.flops / (b_us * 1e-6) / 1e12 if bl.flops else math.nan,
                    tops_frac=bl.flops / (b_us * 1e-6) / 1e12 / ceilings["matmul_tflops"] if bl.flops else math.nan)

    def status(cfg, target, correct, speedup, op_speedup, bw_frac):
        return status_for(cfg, target, correct, op_speedup, bw_frac)

    return runner.primitive_backend_rows(sys.modules[__name__], case, base, baseline_t, ceilings, timing,
                                         status, extra)


# --------------------------------------------------------------------------------------------
# CPU self-check
# --------------------------------------------------------------------------------------------


def check_baselines(case: Case) -> list[tuple[str, str, str]]:
    """Each baseline run once, untimed; the torch linear reference is checked against the torch
    backend's public op(s). SDPA's flash backend may not run on this device: reported N/A."""
    def na_on(bl, e):
        if bl.name == "SDPA flash" and "kernel" in str(e).lower():
            return f"flash SDPA not available here: {common.short_exc(e)}"
        return None

    return runner.check_baselines_against_op(
        case, "untimed; softmax attention, not the same function as the op", na_on)


# --------------------------------------------------------------------------------------------
# Report text
# --------------------------------------------------------------------------------------------


def _target_lines(op: str) -> list[tuple[float, str]]:
    if op == "hash_attention":
        return [(v, f"target {v:.0f}x (N={n}, op µs)") for n, v in SPEEDUP_TARGETS.items()]
    return []


REPORT_TEXT = {
    "title": "Binary-hash attention benchmark (generated)",
    "intro": (
        "Ops: *binary_attention* is the linear attention alone on packed codes (kernel µs = the backend "
        "primitive; op µs = `effkern.ops.binary_attention(..., validate=False)`); *hash_attention* is "
        "the inference path from q, k, v: `ksh_hash` of q and k, `pack_bits` of both, `binary_attention` "
        "(kernel µs = the backend's primitives in a row; op µs = the public ops, validate=False). Medians "
        "of `triton.testing.do_bench` (CUDA events, L2 flushed, inputs rotated over >= 256 MiB). Shapes "
        "B x H x N x d with the code length (b) and the form (ecoformer {-1, +1} / shiftadd {0, 1} "
        "codes); KSH with 64 anchors per head. Baselines: `SDPA flash` (softmax attention under "
        "`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, on the same q, k, v) and `torch linear ref` (the torch "
        "backend of the same linear form). *speedup* = baseline µs / kernel µs (the CSV's `op_speedup` = "
        "baseline µs / op µs). *GB/s* counts the floor: binary_attention reads q codes, k codes and v and "
        "writes out once; hash_attention reads q, k, v and writes out once; *% copy BW* is its fraction "
        "of the copy bandwidth measured in the same run.",
        "Targets: hash_attention vs SDPA flash on op µs: >= 1x at N = 785, >= 3x at N = 3136, >= 10x at "
        "N = 12544; binary_attention >= 70% of the copy bandwidth at its floor bytes (kernel µs, SDPA "
        "row). Rows with target `-` report the ratio only.",
    ),
    "plot_title": "effkern binary-hash attention",
    "target_lines": _target_lines,
}


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
