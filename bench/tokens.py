"""Benchmark of effkern's sparse token ops (EViT, DynamicViT, IdleViT, ToMe) on DeiT-S/B and ViT-L shapes.

    python bench/tokens.py [--quick] [--out DIR] [--csv PATH]     (or: python -m effkern bench tokens)

Shapes: DeiT-S (C=384, H=6), DeiT-B (C=768, H=12) and ViT-L (C=1024, H=16), each with N = 197
tokens (224 px, patch 16) and N = 785 (448 px for DeiT; ViT-L/14 at 392 px); head dim 64;
batch 1, 64 and 256; bf16 (and fp32 for two gather configs). Kept tokens K = ceil(ratio * N)
with ratio 0.7 (0.49 and 0.343, EViT's later stages, added at batch 64 for N = 197).

For every config and every non-reference backend (cuda, triton), one row per baseline:

    op, shape, dtype, backend, correct (against the torch backend, checked once before timing:
    exact for the row copies of token_gather / token_scatter replace and for topk_tokens'
    indices, within a tolerance of the output dtype otherwise), kernel µs, op µs, baseline,
    baseline µs, speedup = baseline / kernel, GB/s and its fraction of the measured copy
    bandwidth, target and PASS / MISS.

*kernel µs* times the backend primitives alone (``effkern._dispatch.OPS[name].impls[backend].fn``,
inputs already contiguous): token_scatter with its scatter plan (``order``, ``starts``)
precomputed; masked_softmax.fwd_bwd as the forward then the backward primitive; tome_match_merge
as ToMe's matching scores (``bipartite_matching``'s primitive) then ``merge_tokens``' primitive
on a precomputed plan (the torch glue between them is not included). *op µs* times the public
``effkern.ops`` call under ``effkern.backend(...)`` with ``validate=False`` (``validate=True`` adds
one host synchronisation per call): for token_scatter it includes the scatter plan's sort and
searchsorted, for tome_match_merge the whole ``bipartite_matching`` + ``merge_tokens`` pipeline,
for masked_softmax.fwd_bwd the autograd forward and backward. Times are medians of
``triton.testing.do_bench``; inputs rotate among sets totalling >= 256 MiB (> L2); data is
random, never zeros. The copy and bf16 matmul ceilings are measured at the start of the run.

Bytes (GB/s) are the minimal traffic: token_gather reads and writes K rows (+ idx);
token_scatter replace reads the N - K rows of x that survive and the K rows of y and writes N
rows, add reads x and y and writes N rows (+ idx); cls_attention reads k once (+ q and the
[B, N] float32 output); masked_softmax reads the logits and writes the output (fwd+bwd: + reads
grad and logits, writes d logits); fuse_tokens reads the J fused rows and their weights;
topk_tokens reads the scores and writes the indices; tome_match_merge reads metric, x and size
and writes the merged x and size.

Baselines, on the same inputs: token_gather ``torch.gather(x, 1, idx[..., None].expand(-1, -1, C))``
and ``x[arange(B)[:, None], idx]``; token_scatter ``x.clone()`` then ``scatter_`` / ``scatter_add_``
or ``index_put_`` (accumulate=True for add); cls_attention EViT's eager transcription
(the full N x N attention probabilities, ``[:, :, 0, 1:].mean(1)``) and the cheaper eager
``softmax(q_cls k^T * scale).mean(1)``; masked_softmax DynamicViT's ``softmax_with_policy``
(:func:`dynamicvit_softmax_with_policy`; fwd+bwd through autograd); tome_match_merge ToMe's
``bipartite_soft_matching`` + ``merge_wavg`` (:func:`tome_eager`); fuse_tokens EViT's gather +
weighted sum; topk_tokens ``torch.topk`` (EViT's call; no dropped list) and the equivalent stable
``torch.sort``.

Targets (reported, never asserted): token_gather and token_scatter at batch >= 64: >= 85% of the
copy bandwidth and >= 1.3x each torch baseline (kernel µs); cls_attention at batch >= 64: >= 80%
of the copy bandwidth (k read once); masked_softmax (fwd, and fwd+bwd) and tome_match_merge at
B = 256, N = 197: >= 2x the eager transcription (tome_match_merge on op µs, the baseline being a
whole pipeline too: the ``op_speedup`` column). Other rows report the ratio with no target.

Results are appended to ``bench/results/tokens.csv`` (or ``--csv``; rows carry family=tokens, so
``bench/report.py`` renders them with this module's :data:`REPORT_TEXT`); ``tokens.md`` and
``tokens.png`` beside it are regenerated; ``--out DIR`` also copies the three files to DIR.

Without CUDA nothing is timed: a correctness self-check runs every backend usable on the CPU (the
torch reference; triton only under ``TRITON_INTERPRET=1``) against the torch backend on small
versions of the shapes (batch 2, at most 2 heads), runs each baseline once (checking the ones
that compute the same thing as the op), and exits non-zero if anything mismatches or fails. A
backend whose module cannot be imported yet is reported as unavailable, not as a failure.
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
from effkern.ops import tokens as tokops  # noqa: E402

from bench import common, runner  # noqa: E402

# What bench/runner.py, which runs the benchmark and the self-check, needs to know of this family.
NAME = "tokens"
TITLE = "token-op benchmark"
QUICK_HELP = "smoke run: DeiT-B, B=256, N=197, one config per op, short timing"
FAMILY_COLUMNS = {"family": NAME}  # bench/report.py renders these rows with REPORT_TEXT below
REPORT_SAMPLE = {**FAMILY_COLUMNS, "op": "token_gather", "shape": "64x197x768 k138", "in_dtype": "bf16",
                 "out_dtype": "bf16", "backend": "triton", "correct": True, "kernel_us": 10.0,
                 "baseline": "torch.gather", "baseline_us": 15.0, "gbps": 100.0, "bw_frac": 0.05,
                 "copy_gbps": 2000.0, "target": "", "status": "-"}
SELF_CHECK_TEXT = {"dtype": "dtype", "summary": "{n_ok} backend checks passed, {n_na} unavailable, {failures} failed"}

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

MODELS = (("DeiT-S", 384, 6), ("DeiT-B", 768, 12), ("ViT-L", 1024, 16))  # name, width C, heads H
SEQ_LENS = (197, 785)  # 224 px / patch 16; 448 px / 16 (DeiT) and 392 px / 14 (ViT-L/14)
HEAD_DIM = 64
BATCHES = (1, 64, 256)
RATIOS = (0.7, 0.49, 0.343)  # EViT's keep rate 0.7, cumulated over its three stages
TOME_R = {197: 16, 785: 64}  # ToMe's r for ViT-S/B at 224 px; about the same fraction at 785
EPS = 1e-6  # DynamicViT's softmax_with_policy eps
TARGET_BATCH, TARGET_N, BIG_BATCH = 64, 197, 256
COPY_BW_TARGET, COPY_SPEEDUP_TARGET, CLS_BW_TARGET, EAGER_SPEEDUP_TARGET = 0.85, 1.3, 0.80, 2.0
TIE = 1e-5  # ToMe scores closer than this may be ordered differently by another summation order

# The baselines of each benchmarked op (by the names used in the rows and in test_bench_tokens.py)
# and the backend primitives (OPS names) timed as its kernel.
BASELINES = {
    "token_gather": ("torch.gather", "x[arange, idx]"),
    "token_scatter.replace": ("clone+scatter_", "clone+index_put_"),
    "token_scatter.add": ("clone+scatter_add_", "clone+index_put_(acc)"),
    "cls_attention": ("eager softmax(q_cls k^T)", "EViT full attention"),
    "masked_softmax": ("eager DynamicViT",),
    "masked_softmax.fwd_bwd": ("eager DynamicViT fwd+bwd",),
    "tome_match_merge": ("eager ToMe",),
    "fuse_tokens": ("eager EViT fuse",),
    "topk_tokens": ("torch.sort stable", "torch.topk"),
}
PRIMITIVES = {
    "token_gather": ("token_gather",),
    "token_scatter.replace": ("token_scatter",),
    "token_scatter.add": ("token_scatter",),
    "cls_attention": ("cls_attention",),
    "masked_softmax": ("masked_softmax",),
    "masked_softmax.fwd_bwd": ("masked_softmax", "masked_softmax_backward"),
    "tome_match_merge": ("bipartite_matching", "merge_tokens"),
    "fuse_tokens": ("fuse_tokens",),
    "topk_tokens": ("topk_tokens",),
}
OPS_BENCHED = tuple(BASELINES)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# rtol, atol of the comparison with the torch backend, by output dtype (exact ops: torch.equal).
TOLERANCE = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-5), torch.float32: (1e-4, 1e-6),
             torch.float64: (1e-9, 1e-12)}


@dataclass(frozen=True)
class Config:
    """One benchmarked shape: B, N, C (model width), H heads of dim 64, keep ratio, ToMe r."""

    op: str
    model: str
    batch: int
    tokens: int
    channels: int = 0
    heads: int = 0
    ratio: float = 0.0
    dtype: str = "bf16"
    r: int = 0

    @property
    def kept(self) -> int:
        """gather/scatter: K = ceil(ratio * N); topk/fuse: patch tokens kept, ceil(ratio * (N - 1))."""
        n = self.tokens - 1 if self.op in ("topk_tokens", "fuse_tokens") else self.tokens
        return math.ceil(self.ratio * n - 1e-9)

    @property
    def shape_str(self) -> str:
        b, n, c, h = self.batch, self.tokens, self.channels, self.heads
        if self.op == "cls_attention":
            return f"{b}x{h}x{n}x{HEAD_DIM}"
        if self.op.startswith("masked_softmax"):
            return f"{b}x{h}x{n}x{n}"
        if self.op == "topk_tokens":
            return f"{b}x{n - 1} k{self.kept}"
        if self.op == "fuse_tokens":
            return f"{b}x{n}x{c} j{n - 1 - self.kept}"
        if self.op == "tome_match_merge":
            return f"{b}x{n}x{c} r{self.r}"
        return f"{b}x{n}x{c} k{self.kept}"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.model}-{self.shape_str.replace(' ', '-')}-{self.dtype}"

    @property
    def in_dtype(self) -> str:  # the rows' name for it (bench/runner.py)
        return self.dtype

    def small(self) -> "Config":
        """The self-check version: batch 2, at most 2 heads, the same N, C, ratio and r."""
        return replace(self, model="small", batch=2, heads=min(self.heads, 2))


def configs(quick: bool = False, ops: Sequence[str] | None = None) -> list[Config]:
    """The benchmark's configs in report order; ``quick`` keeps one config per op (DeiT-B,
    B = 256, N = 197: where the targets apply)."""
    names = {("ViT-L", 197): "ViT-L/16", ("ViT-L", 785): "ViT-L/14@392"}
    pairs = [(names.get((m, n), m if n == TARGET_N else f"{m}@448"), c, h, n) for n in SEQ_LENS for m, c, h in MODELS]
    out: list[Config] = []
    for (model, c, h, n), b in itertools.product(pairs, BATCHES):
        out.append(Config("token_gather", model, b, n, c, h, 0.7))
    for (model, c, h, n), ratio in itertools.product(pairs, RATIOS[1:]):
        if n == TARGET_N:
            out.append(Config("token_gather", model, TARGET_BATCH, n, c, h, ratio))
    for model, c, h, n in pairs[:2]:  # DeiT-S and DeiT-B at N = 197
        out.append(Config("token_gather", model, TARGET_BATCH, n, c, h, 0.7, "fp32"))
    for op in ("token_scatter.replace", "token_scatter.add"):
        out += [Config(op, m, b, n, c, h, 0.7) for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    big = (TARGET_BATCH, BIG_BATCH)
    out += [Config("cls_attention", m, b, n, c, h) for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    for op in ("masked_softmax", "masked_softmax.fwd_bwd"):
        out += [Config(op, m, b, n, c, h) for (m, c, h, n), b in itertools.product(pairs, big) if n == TARGET_N]
    out += [Config("tome_match_merge", m, b, n, c, h, r=TOME_R[n])
            for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    out += [Config("fuse_tokens", m, b, n, c, h, 0.7) for (m, c, h, n), b in itertools.product(pairs, big)]
    out += [Config("topk_tokens", "-", b, n, ratio=0.7, dtype="fp32") for n, b in itertools.product(SEQ_LENS, BATCHES)]
    if quick:
        out = [c for c in out if c.batch == BIG_BATCH and c.tokens == TARGET_N and c.model in ("DeiT-B", "-")
               and c.ratio in (0.0, 0.7) and c.dtype == ("fp32" if c.op == "topk_tokens" else "bf16")]
    return runner.only_ops(out, ops, OPS_BENCHED)


def run_order(cfgs: list[Config]) -> list[Config]:
    """The order to run the configs in: the --quick set (the target shapes) first, so that a
    time budget cuts the least informative ones; rows are saved in report order anyway."""
    first = set(configs(True))
    return [c for c in cfgs if c in first] + [c for c in cfgs if c not in first]


def self_check_configs(quick: bool = False, ops: Sequence[str] | None = None) -> list[Config]:
    """Small versions of the configs (batch 2, <= 2 heads), deduplicated: every width at N = 197
    and keep ratio 0.7 in bf16; N = 785, the other ratios and fp32 at the narrowest width only.
    ``quick``: N = 197 and the narrowest width only (one case per op and dtype)."""
    narrow = MODELS[0][1]
    seen, out = set(), []
    for c in configs(False, ops):
        s = c.small()
        key = (s.op, s.shape_str, s.dtype)
        main = s.tokens == TARGET_N and s.ratio in (0.0, 0.7)
        keep = (main and s.channels in (0, narrow)) if quick else (
            s.channels in (0, narrow) or (main and s.dtype == "bf16"))
        if keep and key not in seen:
            seen.add(key)
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------
# Eager baselines (transcriptions of the papers' code)
# --------------------------------------------------------------------------------------------


def dynamicvit_softmax_with_policy(attn: Tensor, policy: Tensor, eps: float = EPS) -> Tensor:
    """DynamicViT's ``Attention.softmax_with_policy`` (raoyongming/DynamicViT), policy [B, N, 1]."""
    b, n, _ = policy.size()
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def tome_eager(metric: Tensor, x: Tensor, size: Tensor, r: int, class_token: bool = True) -> tuple[Tensor, Tensor]:
    """ToMe's ``bipartite_soft_matching`` then ``merge_wavg`` (facebookresearch/ToMe, tome/merge.py)."""
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # unmerged tokens
        src_idx = edge_idx[..., :r, :]  # merged tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: Tensor, mode: str) -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def evit_cls_full(q_all: Tensor, k: Tensor, scale: float) -> Tensor:
    """EViT: the attention probabilities of every query, then the CLS row's mean over heads."""
    attn = ((q_all @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return attn[:, :, 0, 1:].mean(dim=1)


def eager_cls(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The cheapest eager form: only the CLS query's logits, softmax in float32, head mean."""
    logits = torch.matmul(q[:, :, None] * scale, k.transpose(-2, -1))[:, :, 0]
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(1)


def evit_fuse(x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
    """EViT's fused token: gather the inattentive rows and their attention, weighted sum."""
    rows = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return torch.sum(rows * torch.gather(weights, 1, idx)[..., None], dim=1, keepdim=True)


def sort_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """topk_tokens(scores, k, keep_cls=True) in eager torch: stable sort, CLS first, drop sorted."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep = torch.cat([order.new_zeros(order.shape[0], 1), order[:, :k] + 1], 1)
    return keep, order[:, k:].sort(dim=1).values + 1


# --------------------------------------------------------------------------------------------
# Cases: data, kernel and op calls, output comparison, bytes, baselines
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    cfg: Config
    sets: list[dict]  # rotated input sets
    kernel: Callable[[dict, dict], object]  # one kernel-level call on a set, given {primitive: fn}
    op: Callable[[dict], object]  # the public op on a set (validate=False)
    bytes: int
    out_dtype: str
    exact: bool = False  # compare with the torch backend exactly (else within TOLERANCE)
    baselines: list[common.Baseline] = field(default_factory=list)
    # name -> check(baseline output, torch op output) -> (ok, note), for baselines that compute
    # the same thing as the op (self-check only)
    baseline_checks: dict[str, Callable] = field(default_factory=dict)
    compare: Callable | None = None  # custom comparison (level, set, got, ref) -> (ok, note)
    match_kw: dict = field(default_factory=dict)  # extra tolerance options of _match


def build_case(cfg: Config, device, *, rotate: bool = True, seed: int = 0) -> Case:
    """Fresh random inputs for ``cfg`` on ``device`` (several rotated sets when ``rotate``)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + zlib.crc32(cfg.name.encode()))
    case = _BUILDERS[cfg.op.split(".")[0]](cfg, device, gen, rotate)
    assert tuple(b.name for b in case.baselines) == BASELINES[cfg.op], "BASELINES out of date"
    return case


def _perm(b: int, n: int, gen, device) -> Tensor:
    """[B, n] int64: a random permutation of range(n) per batch row."""
    return torch.rand(b, n, generator=gen, device=device).argsort(dim=1)


def _sets(make: Callable[[], dict], set_bytes: int, rotate: bool) -> list[dict]:
    return [make() for _ in range(common.n_sets(set_bytes, rotate))]


def _build_gather(cfg: Config, device, gen, rotate: bool) -> Case:
    b, n, c, k = cfg.batch, cfg.tokens, cfg.channels, cfg.kept
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()
    ar = torch.arange(b, device=device)[:, None]

    def make():
        x = torch.randn(b, n, c, dtype=dt, device=device, generator=gen)
        idx = _perm(b, n, gen, device)[:, :k].contiguous()
        return {"x": x, "idx": idx, "idx_x": idx[..., None].expand(b, k, c)}

    sets = _sets(make, b * n * c * es, rotate)
    nbytes = 2 * b * k * c * es + b * k * 8
    return Case(
        cfg, sets,
        kernel=lambda s, f: f["token_gather"](s["x"], s["idx"]),
        op=lambda s: effkern.ops.token_gather(s["x"], s["idx"], validate=False),
        bytes=nbytes, out_dtype=cfg.dtype, exact=True,
        baselines=[common.Baseline("torch.gather", common.rotating(torch.gather, [(s["x"], 1, s["idx_x"]) for s in sets]), nbytes),
                   common.Baseline("x[arange, idx]", common.rotating(lambda x, i: x[ar, i], [(s["x"], s["idx"]) for s in sets]),
                            nbytes)],
        baseline_checks={"torch.gather": _exact_check, "x[arange, idx]": _exact_check},
    )


def _build_scatter(cfg: Config, device, gen, rotate: bool) -> Case:
    b, n, c, k = cfg.batch, cfg.tokens, cfg.channels, cfg.kept
    add = cfg.op.endswith(".add")
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()
    ar = torch.arange(b, device=device)[:, None]

    def make():
        x = torch.randn(b, n, c, dtype=dt, device=device, generator=gen)
        y = torch.randn(b, k, c, dtype=dt, device=device, generator=gen)
        idx = _perm(b, n, gen, device)[:, :k].contiguous()
        order, starts = tokops.scatter_plan(idx, n)
        return {"x": x, "y": y, "idx": idx, "idx_x": idx[..., None].expand(b, k, c), "order": order, "starts": starts}

    sets = _sets(make, (n + k) * b * c * es, rotate)
    rows_read = n if add else n - k
    nbytes = (rows_read + k + n) * b * c * es + b * k * 8
    reduce = "add" if add else "replace"
    if add:
        b1 = ("clone+scatter_add_", lambda x, i, y: x.clone().scatter_add_(1, i, y))
    else:
        b1 = ("clone+scatter_", lambda x, i, y: x.clone().scatter_(1, i, y))
    b2 = (BASELINES[cfg.op][1], lambda x, i, y: x.clone().index_put_((ar, i), y, accumulate=add))
    exp_sets = [(s["x"], s["idx_x"], s["y"]) for s in sets]
    idx_sets = [(s["x"], s["idx"], s["y"]) for s in sets]
    check = _close_check if add else _exact_check
    return Case(
        cfg, sets,
        kernel=lambda s, f: f["token_scatter"](s["x"], s["y"], s["idx"], s["order"], s["starts"], add),
        op=lambda s: effkern.ops.token_scatter(s["x"], s["y"], s["idx"], reduce=reduce, validate=False),
        bytes=nbytes, out_dtype=cfg.dtype, exact=not add,
        baselines=[common.Baseline(b1[0], common.rotating(b1[1], exp_sets), nbytes),
                   common.Baseline(b2[0], common.rotating(b2[1], idx_sets), nbytes)],
        baseline_checks={b1[0]: check, b2[0]: check},
    )


def _build_cls(cfg: Config, device, gen, rotate: bool) -> Case:
    b, n, h, d = cfg.batch, cfg.tokens, cfg.heads, HEAD_DIM
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()
    scale = d ** -0.5

    def make():
        q_all = torch.randn(b, h, n, d, dtype=dt, device=device, generator=gen)
        k = torch.randn(b, h, n, d, dtype=dt, device=device, generator=gen)
        return {"q_all": q_all, "q": q_all[:, :, 0].contiguous(), "k": k}

    sets = _sets(make, 2 * b * h * n * d * es, rotate)
    nbytes = b * h * n * d * es + b * h * d * es + b * n * 4
    return Case(
        cfg, sets,
        kernel=lambda s, f: f["cls_attention"](s["q"], s["k"], scale, True),
        op=lambda s: effkern.ops.cls_attention(s["q"], s["k"], scale=scale),
        bytes=nbytes, out_dtype="fp32",
        baselines=[
            common.Baseline("eager softmax(q_cls k^T)", common.rotating(lambda q, k: eager_cls(q, k, scale),
                                                          [(s["q"], s["k"]) for s in sets]), nbytes),
            common.Baseline("EViT full attention", common.rotating(lambda q, k: evit_cls_full(q, k, scale),
                                                     [(s["q_all"], s["k"]) for s in sets]),
                     2 * b * h * n * d * es + b * (n - 1) * es,
                     note="EViT baseline: softmax(q k^T * scale) over all queries (the N x N map), "
                          "[:, :, 0, 1:].mean(1), in bf16"),
        ],
        baseline_checks={"eager softmax(q_cls k^T)": _loose_check,
                         "EViT full attention": lambda got, ref: _loose_check(got.float(), ref[:, 1:])},
    )


def _build_masked(cfg: Config, device, gen, rotate: bool) -> Case:
    b, n, h = cfg.batch, cfg.tokens, cfg.heads
    bwd = cfg.op.endswith(".fwd_bwd")
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()
    numel = b * h * n * n

    def make():
        logits = 3.0 * torch.randn(b, h, n, n, device=device, generator=gen)
        policy = (torch.rand(b, n, device=device, generator=gen) < 0.7).float()
        policy[:, 0] = 1.0  # the class token is always kept
        s = {"logits": logits.to(dt), "policy": policy}
        if bwd:
            s["grad"] = torch.randn(b, h, n, n, device=device, generator=gen).to(dt)
            s["logits_leaf"] = s["logits"].detach().clone().requires_grad_()
            s["policy_leaf"] = policy.clone().requires_grad_()
        return s

    sets = _sets(make, numel * es * (3 if bwd else 1), rotate)
    nbytes = numel * es * (5 if bwd else 2) + b * n * 4 * (2 if bwd else 1)
    if not bwd:
        return Case(
            cfg, sets,
            kernel=lambda s, f: f["masked_softmax"](s["logits"], s["policy"], EPS),
            op=lambda s: effkern.ops.masked_softmax(s["logits"], s["policy"], eps=EPS),
            bytes=nbytes, out_dtype=cfg.dtype,
            baselines=[common.Baseline("eager DynamicViT",
                                common.rotating(lambda a, p: dynamicvit_softmax_with_policy(a, p[..., None]),
                                          [(s["logits"], s["policy"]) for s in sets]), nbytes)],
            baseline_checks={"eager DynamicViT": _eager_softmax_check},
        )

    def kernel(s, f):
        out = f["masked_softmax"](s["logits"], s["policy"], EPS)
        return (out,) + tuple(f["masked_softmax_backward"](s["grad"], s["logits"], s["policy"], EPS))

    def op(s):
        out = effkern.ops.masked_softmax(s["logits_leaf"], s["policy_leaf"], eps=EPS)
        return (out.detach(),) + torch.autograd.grad(out, (s["logits_leaf"], s["policy_leaf"]), s["grad"])

    def eager(s):
        out = dynamicvit_softmax_with_policy(s["logits_leaf"], s["policy_leaf"][..., None])
        return (out.detach(),) + torch.autograd.grad(out, (s["logits_leaf"], s["policy_leaf"]), s["grad"])

    return Case(
        cfg, sets, kernel=kernel, op=op, bytes=nbytes, out_dtype=cfg.dtype,
        baselines=[common.Baseline("eager DynamicViT fwd+bwd", common.rotating(eager, [(s,) for s in sets]), nbytes,
                            note="masked_softmax fwd+bwd: kernel = forward then backward primitive; op and "
                                 "baseline = autograd forward + torch.autograd.grad for logits and policy")],
        baseline_checks={"eager DynamicViT fwd+bwd": lambda got, ref: _eager_softmax_check(got[0], ref[0])},
        match_kw={"atol_of_max": 1e-5},  # d policy: sums over H x N terms of both signs
    )


def _build_tome(cfg: Config, device, gen, rotate: bool) -> Case:
    b, n, c, r = cfg.batch, cfg.tokens, cfg.channels, cfg.r
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()

    def make():
        s = {"metric": torch.randn(b, n, HEAD_DIM, dtype=dt, device=device, generator=gen),
             "x": torch.randn(b, n, c, dtype=dt, device=device, generator=gen),
             "size": torch.randint(1, 5, (b, n, 1), device=device, generator=gen).to(dt)}
        with effkern.backend("torch"):
            s["plan"] = effkern.ops.bipartite_matching(s["metric"], r)
        s["size32"] = s["size"][..., 0].float()
        return s

    sets = _sets(make, b * n * (HEAD_DIM + c + 1) * es, rotate)
    m = n - tokops._effective_r(n, r, True)
    nbytes = b * n * (HEAD_DIM + c + 1) * es + b * m * (c + 1) * es

    def kernel(s, f):
        p = s["plan"]
        return tuple(f["bipartite_matching"](s["metric"], True)) + tuple(
            f["merge_tokens"](s["x"], s["size32"], p.dest, p.sources, p.starts))

    def op(s):
        plan = effkern.ops.bipartite_matching(s["metric"], r)
        return (plan,) + effkern.ops.merge_tokens(plan, s["x"], s["size"])

    return Case(
        cfg, sets, kernel=kernel, op=op, bytes=nbytes, out_dtype=cfg.dtype,
        baselines=[common.Baseline("eager ToMe", common.rotating(lambda mt, x, sz: tome_eager(mt, x, sz, r),
                                                    [(s["metric"], s["x"], s["size"]) for s in sets]), nbytes,
                            note="tome_match_merge: kernel = matching scores + merge primitives on a precomputed "
                                 "plan; op = bipartite_matching + merge_tokens (its target uses op µs)")],
        compare=_compare_tome,
    )


def _build_fuse(cfg: Config, device, gen, rotate: bool) -> Case:
    b, n, c, k = cfg.batch, cfg.tokens, cfg.channels, cfg.kept
    j = n - 1 - k
    dt = _DTYPES[cfg.dtype]
    es = torch.empty((), dtype=dt).element_size()

    def make():
        w = torch.softmax(torch.randn(b, n, device=device, generator=gen), dim=1)
        idx = (_perm(b, n - 1, gen, device)[:, k:].sort(dim=1).values + 1).contiguous()  # EViT's dropped tokens
        return {"x": torch.randn(b, n, c, dtype=dt, device=device, generator=gen), "w": w, "w_lp": w.to(dt), "idx": idx}

    sets = _sets(make, b * n * c * es, rotate)
    nbytes = b * j * (c * es + 4 + 8) + b * c * es
    return Case(
        cfg, sets,
        kernel=lambda s, f: f["fuse_tokens"](s["x"], s["w"], s["idx"]),
        op=lambda s: effkern.ops.fuse_tokens(s["x"], s["w"], s["idx"], validate=False),
        bytes=nbytes, out_dtype=cfg.dtype,
        baselines=[common.Baseline("eager EViT fuse", common.rotating(evit_fuse, [(s["x"], s["w_lp"], s["idx"]) for s in sets]),
                            b * j * (c * es + es + 8) + b * c * es,
                            note="fuse_tokens baseline: EViT's gather + weighted sum, weights in the model dtype")],
        baseline_checks={"eager EViT fuse": lambda got, ref: _close_check(got, ref, rtol=5e-2, atol_of_max=2e-2)},
    )


def _build_topk(cfg: Config, device, gen, rotate: bool) -> Case:
    b, m, k = cfg.batch, cfg.tokens - 1, cfg.kept
    sets = _sets(lambda: {"scores": torch.rand(b, m, device=device, generator=gen)}, b * m * 4, rotate)
    nbytes = b * m * 4 + b * (m + 1) * 8
    return Case(
        cfg, sets,
        kernel=lambda s, f: f["topk_tokens"](s["scores"], k, True),
        op=lambda s: effkern.ops.topk_tokens(s["scores"], k),
        bytes=nbytes, out_dtype="int64", exact=True,
        baselines=[common.Baseline("torch.sort stable", common.rotating(lambda x: sort_topk(x, k), [(s["scores"],) for s in sets]),
                            nbytes),
                   common.Baseline("torch.topk", common.rotating(lambda x: torch.topk(x, k, dim=1), [(s["scores"],) for s in sets]),
                            b * m * 4 + b * k * 12, note="torch.topk baseline: EViT's call, kept indices and values "
                                                         "only (no CLS, no dropped list)")],
        baseline_checks={"torch.sort stable": _exact_check},
    )


_BUILDERS = {"token_gather": _build_gather, "token_scatter": _build_scatter, "cls_attention": _build_cls,
             "masked_softmax": _build_masked, "tome_match_merge": _build_tome, "fuse_tokens": _build_fuse,
             "topk_tokens": _build_topk}


# --------------------------------------------------------------------------------------------
# Comparison with the torch backend
# --------------------------------------------------------------------------------------------


def _leaves(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    return [t for o in out for t in _leaves(o)]


def _mismatch(name: str, got: Tensor, ref: Tensor, exact: bool, rtol: float | None = None,
              atol_of_max: float = 0.0) -> str:
    """'' when got matches ref (exactly, or within the output dtype's tolerance; ``atol_of_max``
    adds that fraction of max |ref| to the absolute tolerance), else what differs."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    if exact or not ref.is_floating_point():
        bad = got != ref
    else:
        rt, at = TOLERANCE[ref.dtype]
        rt = rtol if rtol is not None else rt
        if atol_of_max and ref.numel():
            at = at + atol_of_max * float(ref.abs().max())
        bad = ~torch.isclose(got, ref, rtol=rt, atol=at, equal_nan=True)
    if not bool(bad.any()):
        return ""
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{name}: {int(bad.sum())} of {got.numel()} elements differ{'' if exact else ' beyond tolerance'}; "
            f"first at {first}: {got[first].item()} vs {ref[first].item()}")


def _match(got, ref, exact: bool, **kw) -> tuple[bool, str]:
    g, r = _leaves(got), _leaves(ref)
    if len(g) != len(r):
        return False, f"{len(g)} outputs, expected {len(r)}"
    notes = [m for i, (a, b) in enumerate(zip(g, r)) if (m := _mismatch(f"output {i}", a, b, exact, **kw))]
    return not notes, "; ".join(notes)


def _exact_check(got, ref) -> tuple[bool, str]:
    return _match(got, ref, True)


def _close_check(got, ref, **kw) -> tuple[bool, str]:
    return _match(got, ref, False, **kw)


def _loose_check(got, ref) -> tuple[bool, str]:
    """An eager bf16 computation against the op's float32 result: bf16 rounding of the inputs."""
    return _match(got.float(), ref, False, rtol=3e-2, atol_of_max=1e-2)


def _eager_softmax_check(got, ref) -> tuple[bool, str]:
    """DynamicViT's eager code subtracts the row max in bf16 (rounding a - max), then works in fp32."""
    return _match(got, ref, False, rtol=5e-2, atol_of_max=1e-3)


def _tome_near_ties(metric: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """([B, ceil(N/2)] a-rows whose two best b-scores are within TIE, [B] batch rows whose
    matching has any near-tie: an a-row's best two b's, or two of the r + 1 best a-rows)."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(tokops.NORM_EPS)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    scores[:, 0] = -math.inf
    top2 = scores.topk(min(2, scores.shape[-1]), dim=-1).values  # one b-row (N = 2, 3): no argmax tie
    arg_tie = ((top2[..., 0] - top2[..., -1]).abs() < TIE) & (top2.shape[-1] == 2)
    ranked = top2[..., 0].sort(dim=1, descending=True).values[:, : r + 1]
    rank_tie = ((ranked[:, :-1] - ranked[:, 1:]).abs() < TIE).any(1)
    return arg_tie, arg_tie.any(1) | rank_tie


def _compare_tome(level: str, s: dict, got, ref) -> tuple[bool, str]:
    """ToMe's plan is a discrete function of float scores: differences are accepted only in
    the batch rows where the reference scores have a near-tie (within TIE)."""
    r = s["plan"].num_merged
    arg_tie, row_tie = _tome_near_ties(s["metric"], r)
    if level == "kernel":  # (node_max, node_idx, merged x, merged size) on the reference plan
        notes = [m for m in (_mismatch("node_max", got[0], ref[0], False),
                             _mismatch("node_idx", got[1].masked_fill(arg_tie, 0), ref[1].masked_fill(arg_tie, 0),
                                       True),
                             _mismatch("merged x", got[2], ref[2], False),
                             _mismatch("merged size", got[3], ref[3], False)) if m]
        return not notes, "; ".join(notes)
    (gp, gx, gs), (rp, rx, rs) = got, ref
    for name, a, b in zip(tokops.MergePlan._fields, gp, rp):
        if a.shape != b.shape:
            return False, f"plan.{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    differ = torch.stack([(a != b).flatten(1).any(1) for a, b in zip(gp, rp)]).any(0)  # [B]
    unexplained = differ & ~row_tie
    if bool(unexplained.any()):
        i = int(unexplained.nonzero()[0])
        return False, f"plan differs in {int(unexplained.sum())} batch rows without a near-tie (first: row {i})"
    same = ~differ
    notes = [m for m in (_mismatch("merged x", gx[same], rx[same], False),
                         _mismatch("merged size", gs[same], rs[same], False)) if m]
    if bool(differ.any()):
        notes.append(f"(plan differs at near-ties in {int(differ.sum())} batch rows; not compared there)")
    return not any(not n.startswith("(") for n in notes), "; ".join(notes)


# --------------------------------------------------------------------------------------------
# Backends: availability, correctness
# --------------------------------------------------------------------------------------------


def registered_backends(op: str, include_reference: bool = False) -> list[str]:
    """Backends registered for every primitive of ``op``, in effkern's order (cuda, triton[, torch])."""
    prims = PRIMITIVES[op]
    return [b for b in BACKENDS if all(b in OPS[p].impls for p in prims) and (include_reference or b != "torch")]


def _kernel_args(case: Case, s: dict) -> dict[str, tuple]:
    """The arguments the case's kernel call passes to each primitive (for the availability
    checks), recorded with stand-ins that compute nothing (no primitive uses another's output)."""
    seen: dict[str, tuple] = {}

    def recorder(name):
        def rec(*args):
            seen.setdefault(name, args)
            return ()
        return rec

    case.kernel(s, {p: recorder(p) for p in PRIMITIVES[case.cfg.op]})
    return seen


def select(case: Case, backend: str):
    """({primitive: fn}, None) or (None, (status, reason)) with status N/A or ERROR."""
    return runner.select_primitives(sys.modules[__name__], case, backend, _kernel_args(case, case.sets[0]))


def torch_fns(op: str) -> dict:
    return {p: OPS[p].impls["torch"].fn for p in PRIMITIVES[op]}


def verify(case: Case, fns: dict, backend: str) -> tuple[bool, str]:
    """Run the backend once at kernel level and once through the public op and compare both
    with the torch backend (exactly or within tolerance, see Case). Raises if the backend raises."""
    s = case.sets[0]

    def compare(level, got, ref):
        return (case.compare(level, s, got, ref) if case.compare
                else _match(got, ref, case.exact, **case.match_kw))

    return runner.verify_levels(case, fns, backend, torch_fns(case.cfg.op), compare)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def target_for(cfg: Config, baseline: str) -> str:
    if cfg.op.startswith(("token_gather", "token_scatter")) and cfg.batch >= TARGET_BATCH:
        return f">={COPY_BW_TARGET:.0%} BW & >={COPY_SPEEDUP_TARGET:.1f}x"
    if cfg.op == "cls_attention" and cfg.batch >= TARGET_BATCH and baseline == BASELINES[cfg.op][0]:
        return f">={CLS_BW_TARGET:.0%} BW"
    if cfg.op.startswith("masked_softmax") and (cfg.batch, cfg.tokens) == (BIG_BATCH, TARGET_N):
        return f">={EAGER_SPEEDUP_TARGET:.0f}x eager"
    if cfg.op == "tome_match_merge" and (cfg.batch, cfg.tokens) == (BIG_BATCH, TARGET_N):
        return f"op >={EAGER_SPEEDUP_TARGET:.0f}x eager"
    return ""


def status_for(cfg: Config, target: str, correct: bool, speedup: float, op_speedup: float, bw_frac: float) -> str:
    if not correct:
        return "WRONG"
    if not target:
        return "-"
    if cfg.op == "cls_attention":
        return "-" if math.isnan(bw_frac) else "PASS" if bw_frac >= CLS_BW_TARGET else "MISS"
    sp = op_speedup if cfg.op == "tome_match_merge" else speedup
    if math.isnan(sp):  # the baseline could not run
        return "-"
    if cfg.op.startswith(("masked_softmax", "tome")):
        return "PASS" if sp >= EAGER_SPEEDUP_TARGET else "MISS"
    return "PASS" if bw_frac >= COPY_BW_TARGET and sp >= COPY_SPEEDUP_TARGET else "MISS"


# --------------------------------------------------------------------------------------------
# GPU benchmark (bench/runner.py runs the configs; this fills in the rows of one)
# --------------------------------------------------------------------------------------------


def backend_rows(case: Case, base: dict, baseline_t: dict[str, tuple[float, str]], ceilings: dict,
                 timing: tuple[float, float]) -> list[dict]:
    """The rows of one config, whose baselines are timed: every non-reference backend x every baseline."""
    return runner.primitive_backend_rows(sys.modules[__name__], case, base, baseline_t, ceilings, timing,
                                         status_for)


# --------------------------------------------------------------------------------------------
# CPU self-check (bench/runner.py checks the backends; this runs the baselines)
# --------------------------------------------------------------------------------------------


def check_baselines(case: Case) -> list[tuple[str, str, str]]:
    """(name, status, note) of each baseline run once, untimed; the ones that compute the same
    thing as the op are checked against the torch backend's output."""
    return runner.check_baselines_against_op(case, "untimed; not an exact equivalent of the op")


# --------------------------------------------------------------------------------------------
# Report text (bench/report.py renders rows with family=tokens with it)
# --------------------------------------------------------------------------------------------


def _target_lines(op: str) -> list[tuple[float, str]]:
    if op.startswith(("token_gather", "token_scatter")):
        return [(COPY_SPEEDUP_TARGET, f"target {COPY_SPEEDUP_TARGET:.1f}x (B >= {TARGET_BATCH})")]
    if op.startswith(("masked_softmax", "tome")):
        return [(EAGER_SPEEDUP_TARGET, f"target {EAGER_SPEEDUP_TARGET:.0f}x (B={BIG_BATCH}, N={TARGET_N}"
                                       f"{', op µs' if op.startswith('tome') else ''})")]
    return []


REPORT_TEXT = {
    "title": "Sparse token-op benchmark (generated)",
    "intro": (
        "Columns: *kernel µs* is the backend primitive alone (token_scatter with its scatter plan "
        "precomputed; tome_match_merge = matching scores + merge on a precomputed plan; "
        "masked_softmax.fwd_bwd = forward + backward primitive); *op µs* the public `effkern.ops` call "
        "with `validate=False` (token_scatter: includes the plan's sort + searchsorted; "
        "tome_match_merge: `bipartite_matching` + `merge_tokens`; fwd_bwd: autograd). Both are medians "
        "of `triton.testing.do_bench` (CUDA events, L2 flushed, inputs rotated over >= 256 MiB). "
        "*speedup* = baseline µs / kernel µs (the CSV's `op_speedup` = baseline µs / op µs). *GB/s* "
        "counts the minimal traffic (gather: K rows read + written; scatter replace: the surviving "
        "N - K rows of x and the K rows of y read, N rows written; scatter add: x and y read, N rows "
        "written; cls_attention: k read once); *% copy BW* is its fraction of the copy bandwidth "
        "measured in the same run. Shapes: B x N x C with K kept rows (k), J fused rows (j) or ToMe's "
        "r; cls_attention B x H x N x d; masked_softmax B x H x N x N.",
        "Targets: token_gather and token_scatter at B >= 64: >= 85% of copy bandwidth and >= 1.3x "
        "each torch baseline; cls_attention at B >= 64: >= 80% of copy bandwidth; masked_softmax (fwd "
        "and fwd+bwd) at B = 256, N = 197: >= 2x DynamicViT's eager `softmax_with_policy`; "
        "tome_match_merge at B = 256, N = 197: op µs >= 2x ToMe's eager `bipartite_soft_matching` + "
        "`merge_wavg`. Rows with target `-` report the ratio only.",
    ),
    "plot_title": "effkern token ops",
    "target_lines": _target_lines,
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(sys.modules[__name__], argv)  # this module is the family runner.main drives


if __name__ == "__main__":
    sys.exit(main())
