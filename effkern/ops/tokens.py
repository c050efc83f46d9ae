"""Sparse token ops for dynamic token pruning, idling and merging (DynamicViT, EViT, IdleViT,
ToMe): gather/scatter of token rows, top-k token selection, EViT's fused token, CLS attention
without the N x N map, DynamicViT's policy-masked softmax and ToMe's bipartite matching/merging.

Layout of this module:

1. *Backend primitives* (``gather_rows``, ``scatter_rows``, ...): the torch backend, written for
   clarity. The Triton backend (:mod:`effkern.triton.tokens`) and the CUDA backend (gather and
   scatter only, ``csrc/tokens``) implement the same functions with the same signatures, on
   contiguous inputs that the public op has already validated.
2. *Argument checks*: one function per op, run by the op and by its fake impl (the registry
   calls it), so the two can never disagree; value checks that need the data on the host
   (index ranges, finiteness, plan consistency) run only under ``validate=True``.
3. *Public ops*, each declared once with :func:`effkern._registry.define_op` (family
   ``"tokens"``): the backends (torch primitive, Triton ``"module:function"``, CUDA op), the
   argument the backend is chosen on, the typed implementation (its annotations give the
   ``effkern::<name>`` schema), the fake (exactly the real op's strides: every output is a
   fresh contiguous tensor), the autograd formula (backward passes are internal ops, declared
   with ``public=False``) and a typed public function with the docstring.
4. *Test cases* (``OP.cases(...)``): fixed samples, random valid calls and invalid calls, which
   tests/test_registry.py runs on every backend.

Index tensors are int64 or int32 ``[B, K]``. Index checks (range, and repeats where they are an
error) need the indices on the host: ``validate=True`` reads one flag back from the device per
call, a synchronisation. ``validate=False`` skips it; the kernels still never read or write out
of bounds (an out-of-range index gathers a zero row and scatters nowhere), but the result is then
the caller's responsibility. The default ``validate=None`` validates CPU tensors (free) and skips
the check on a GPU, so the hot path never synchronises; ``with effkern.validation():`` or
``EFFKERN_VALIDATE=1`` turns it on everywhere while debugging (:func:`effkern._common.validation_enabled`).

Scatter plans. Scatter-like kernels work per *output* row, so that each output row is written
once, by one program, deterministically: ``scatter_plan(idx, n)`` sorts the indices (stably) into
``order`` and CSR offsets ``starts`` [B, n + 1]; output row j of batch b receives
``y[b, order[b, starts[b, j]:starts[b, j + 1]]]`` in ascending k. Indices outside [0, n) fall in
no segment.
"""

from __future__ import annotations

# The public API (effkern.ops re-exports it).
__all__ = [
    "MergePlan", "bipartite_matching", "cls_attention", "fuse_tokens", "masked_softmax",
    "merge_tokens", "token_gather", "token_scatter", "topk_tokens", "unmerge_tokens",
]

import math
from typing import NamedTuple

import torch
from torch import Tensor

from effkern._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    NORM_EPS,
    TORCH_FLOAT_DTYPES,
    acc_dtype,
    check_choice,
    check_int,
    check_same_device,
    check_tensor,
    resolve_validate,
)
from effkern._registry import Invalid, Sample, cuda_kernel, define_op, torch_kernel, triton_kernel

FAMILY = "tokens"


# ============================================================================================
# 1. Backend primitives (torch backend)
# ============================================================================================


def scatter_plan(idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(order, starts)`` for scattering K rows into n rows: ``order`` [B, K] int64 lists the
    k's sorted by target row (stable, so ascending k within a row), ``starts`` [B, n + 1] int64
    the CSR offsets into it. Indices outside [0, n) belong to no segment."""
    b = idx.shape[0]
    sorted_idx, order = torch.sort(idx.to(torch.int64), dim=1, stable=True)
    bounds = torch.arange(n + 1, device=idx.device, dtype=torch.int64).expand(b, n + 1).contiguous()
    starts = torch.searchsorted(sorted_idx.contiguous(), bounds)
    return order, starts


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """out[b, k] = x[b, idx[b, k]] for x [B, N, C]; an out-of-range index gives a zero row."""
    b, n, c = x.shape
    if n == 0:  # nothing to gather from: every index is out of range
        return x.new_zeros(b, idx.shape[1], c)
    valid = (idx >= 0) & (idx < n)
    safe = torch.where(valid, idx, 0).to(torch.int64)
    out = torch.gather(x, 1, safe[:, :, None].expand(b, idx.shape[1], c))
    return out.masked_fill(~valid[:, :, None], 0)


def scatter_rows(x: Tensor, y: Tensor, idx: Tensor, order: Tensor, starts: Tensor, add: bool) -> Tensor:
    """Out-of-place row scatter of y [B, K, C] into x [B, N, C] (same dtype).

    add=False: row j is y[b, k] for the *last* k with idx[b, k] = j (repeats are rejected by
    the public op unless validate=False), else x[b, j]. add=True: x[b, j] + the sum of the y
    rows aimed at j, accumulated in float32 (float64 for float64) in ascending k and rounded
    once. ``order``/``starts`` come from :func:`scatter_plan` (the torch backend uses idx)."""
    b, n, c = x.shape
    k = y.shape[1]
    valid = (idx >= 0) & (idx < n)
    target = torch.where(valid, idx, n).to(torch.int64)  # row n: a trash row for invalid indices
    if add:
        acc = torch.cat([x.to(acc_dtype(x.dtype)), x.new_zeros(b, 1, c, dtype=acc_dtype(x.dtype))], 1)
        acc.scatter_add_(1, target[:, :, None].expand(b, k, c), y.to(acc.dtype))
        # a fresh contiguous tensor: the slice alone is a strided view of the trash-row buffer
        return acc[:, :n].to(x.dtype, memory_format=torch.contiguous_format, copy=True)
    counts = starts[:, 1:] - starts[:, :-1]
    last = order.gather(1, (starts[:, 1:] - 1).clamp(min=0)) if k else starts.new_zeros(b, n)
    from_y = y.gather(1, last[:, :, None].expand(b, n, c)) if k else x
    return torch.where((counts > 0)[:, :, None], from_y, x)


def weighted_sum_rows(x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
    """[B, 1, C]: sum over j of weights[b, idx[b, j]] * x[b, idx[b, j]], accumulated in float32
    (float64 for float64); an out-of-range index contributes nothing."""
    acc = acc_dtype(x.dtype)
    rows = gather_rows(x.to(acc), idx)
    w = gather_rows(weights.to(acc)[:, :, None], idx)
    return (rows * w).sum(1, keepdim=True).to(x.dtype)


def topk_rank(scores: Tensor, k: int, keep_cls: bool) -> tuple[Tensor, Tensor]:
    """(keep [B, k + keep_cls], drop [B, M - k]) int64; see :func:`topk_tokens`."""
    b = scores.shape[0]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    off = int(keep_cls)
    keep = order[:, :k] + off
    drop = order[:, k:].sort(dim=1).values + off
    if keep_cls:
        keep = torch.cat([keep.new_zeros(b, 1), keep], 1)
    return keep, drop


def cls_attention_fwd(q: Tensor, k: Tensor, scale: float, softmax: bool) -> Tensor:
    """[B, N] float32: the head-mean of softmax_n(scale * q . k_n) (or of the scaled logits)."""
    acc = acc_dtype(q.dtype)
    logits = torch.einsum("bhd,bhnd->bhn", q.to(acc), k.to(acc)) * scale
    p = torch.softmax(logits, dim=-1) if softmax else logits
    return p.mean(1).to(torch.float32 if acc == torch.float32 else acc)


def cls_attention_bwd(grad: Tensor, q: Tensor, k: Tensor, scale: float, softmax: bool) -> tuple[Tensor, Tensor]:
    """(dq, dk) for :func:`cls_attention_fwd`, recomputing the probabilities."""
    acc = acc_dtype(q.dtype)
    qf, kf = q.to(acc), k.to(acc)
    dlogits = grad.to(acc)[:, None, :].expand(-1, q.shape[1], -1) / q.shape[1]
    if softmax:
        p = torch.softmax(torch.einsum("bhd,bhnd->bhn", qf, kf) * scale, dim=-1)
        dlogits = p * (dlogits - (p * dlogits).sum(-1, keepdim=True))
    dq = torch.einsum("bhn,bhnd->bhd", dlogits, kf) * scale
    dk = dlogits[..., None] * qf[:, :, None, :] * scale
    return dq.to(q.dtype), dk.to(k.dtype)


def _masked_softmax_parts(logits: Tensor, policy: Tensor, eps: float):
    """The fp32 (fp64 for fp64) pieces DynamicViT's softmax_with_policy computes, with its two
    degenerate cases defined (see :func:`masked_softmax`): a row whose logits are all -inf is
    shifted by 0 instead of its max (no -inf - -inf), and a row without weight (sum A = 0) is
    the uniform 1/N. ``dead`` marks those rows."""
    acc = acc_dtype(logits.dtype)
    a = logits.to(acc)
    n = a.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    g = torch.where(eye, torch.ones((), dtype=acc, device=a.device), policy.to(acc)[:, None, None, :])
    m = a.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros((), dtype=acc, device=a.device), m)
    s = torch.exp(a - m)
    big_a = s * g
    sa = big_a.sum(-1, keepdim=True)
    dead = sa == 0
    z = sa + eps
    out = torch.where(dead, torch.full((), 1.0 / n, dtype=acc, device=a.device), (big_a + eps / n) / z)
    return a, eye, g, s, big_a, z, dead, out


def masked_softmax_fwd(logits: Tensor, policy: Tensor, eps: float) -> Tensor:
    """DynamicViT's softmax_with_policy on [B, H, N, N] logits, returned in the input dtype."""
    return _masked_softmax_parts(logits, policy, eps)[-1].to(logits.dtype)


def masked_softmax_bwd(grad: Tensor, logits: Tensor, policy: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(d logits, d policy). The row max is a function of the logits too (the eps terms make the
    output depend on it): its gradient goes to the first maximal key, as torch.max's does. A row
    without weight has zero logit gradients (A = 0 around it); its policy gradient is the eps
    formula's, and zero for eps = 0 (z = 0: the output jumps there)."""
    a, eye, g, s, big_a, z, dead, out = _masked_softmax_parts(logits, policy, eps)
    gr = grad.to(a.dtype)
    z = torch.where(z == 0, torch.full((), math.inf, dtype=z.dtype, device=z.device), z)
    d_big_a = (gr - (gr * out).sum(-1, keepdim=True)) / z  # dL/dA_j
    d_logits = d_big_a * big_a
    d_max = -d_logits.sum(-1, keepdim=True)  # dL/dm, m = rowmax(a)
    first_max = torch.nn.functional.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
    d_logits = d_logits + first_max * d_max
    d_policy = (d_big_a * s).masked_fill(eye, 0).sum((1, 2))
    return d_logits.to(logits.dtype), d_policy.to(policy.dtype)


# unit_rows scales each row by a power of two 2^-e (max |x| = f * 2^e, f in [0.5, 1)), with e
# clamped so that the scale stays a normal number of the accumulation dtype.
_SCALE_EXP_LIMIT = {torch.float32: 125, torch.float64: 1000}


def row_scale(m: Tensor) -> Tensor:
    """[..., 1]: 2^-e per row of m (float32 or float64), e the frexp exponent of the row's max |x|
    clamped to +-125 (+-1000 for float64); 1 for zero or empty rows. Multiplying by it is exact
    and brings the row's largest entry into [0.5, 1), so sums of squares cannot overflow."""
    lim = _SCALE_EXP_LIMIT[m.dtype]
    if m.shape[-1] == 0:
        return torch.ones(m.shape[:-1] + (1,), dtype=m.dtype, device=m.device)
    _, e = torch.frexp(m.abs().amax(-1, keepdim=True))
    e = (-e.to(torch.int64)).clamp(-lim, lim)
    if m.dtype == torch.float32:
        return ((e + 127) << 23).to(torch.int32).view(torch.float32)
    return ((e + 1023) << 52).view(torch.float64)


def unit_rows(m: Tensor) -> Tensor:
    """Rows of m (float32 or float64) divided by max(||row||, NORM_EPS), as F.normalize (a zero
    row stays zero), without overflow: the norm is taken of the row scaled by :func:`row_scale`,
    a power of two, so the result is that of the plain formula wherever it does not overflow."""
    r = row_scale(m)
    u = m * r
    return u / torch.maximum(u.norm(dim=-1, keepdim=True), NORM_EPS * r)


def tome_match(metric: Tensor, class_token: bool, distill_token: bool = False) -> tuple[Tensor, Tensor]:
    """ToMe's scores: rows of metric [B, N, C] L2-normalised (:func:`unit_rows`, in float32,
    float64 for float64); a = even rows, b = odd rows; returns (node_max [B, ceil(N/2)],
    node_idx int64) = max and first argmax over b of a . b, with the CLS row of a at -inf when
    class_token and the distillation token's column (b-row 0, token 1) at -inf when
    distill_token. Needs N >= 2; a finite metric gives finite scores (huge values included)."""
    m = unit_rows(metric.to(acc_dtype(metric.dtype)))
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    return node_max, node_idx


def segment_mean_rows(x: Tensor, size: Tensor | None, dest: Tensor, sources: Tensor,
                      starts: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted mean of x [B, N, C] over the rows mapped to each output row.

    ``dest`` [B, N]: output row of each input row; ``sources``/``starts``: the same map as CSR
    (input rows by output row; :func:`scatter_plan` of dest). Returns (out [B, M, C] in x's
    dtype, size_out [B, M] float32) with out[o] = sum s_r x_r / sum s_r and size_out[o] = sum s_r
    over the rows r of o, s = size (float32) or 1, accumulated in float32 (float64 for float64)."""
    b, n, c = x.shape
    m = starts.shape[1] - 1
    acc = acc_dtype(x.dtype)
    s = torch.ones(b, n, dtype=acc, device=x.device) if size is None else size.to(acc)
    target = torch.where((dest >= 0) & (dest < m), dest, m)  # row m: a trash row for bad entries
    num = torch.zeros(b, m + 1, c, dtype=acc, device=x.device)
    num.scatter_add_(1, target[:, :, None].expand(b, n, c), x.to(acc) * s[:, :, None])
    den = torch.zeros(b, m + 1, dtype=acc, device=x.device).scatter_add_(1, target, s)
    num, den = num[:, :m], den[:, :m].clone(memory_format=torch.contiguous_format)
    return (num / den[:, :, None]).to(x.dtype), den


def segment_mean_rows_bwd(grad_out: Tensor, grad_size: Tensor | None, x: Tensor, size: Tensor | None,
                          out: Tensor, size_out: Tensor, dest: Tensor) -> tuple[Tensor, Tensor | None]:
    """(dx [B, N, C] in x's dtype, dsize [B, N] float32 or None when size is None) for
    :func:`segment_mean_rows`: with o = dest[r], dx_r = s_r g_o / S_o and
    dsize_r = g_o . (x_r - out_o) / S_o + gS_o (out_o: the saved, rounded output)."""
    acc = acc_dtype(x.dtype)
    go = gather_rows(grad_out.to(acc), dest)
    so = size_out.to(acc).gather(1, dest)
    s = torch.ones_like(so) if size is None else size.to(acc)
    dx = (go * (s / so)[:, :, None]).to(x.dtype)
    if size is None:
        return dx, None
    oo = gather_rows(out.to(acc), dest)
    ds = (go * (x.to(acc) - oo)).sum(-1) / so
    if grad_size is not None:
        ds = ds + grad_size.to(acc).gather(1, dest)
    return dx, ds.to(size_out.dtype)


# ============================================================================================
# 2. Argument checks shared by the public ops
# ============================================================================================


def _check_batch(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` lives beside ``ref`` and has its batch size."""
    check_same_device(op, name, t, ref_name, ref)
    if t.shape[0] != ref.shape[0]:
        raise ValueError(f"{op}: {name} has batch size {t.shape[0]} but {ref_name} has {ref.shape[0]}")


def _check_index(op: str, idx, x: Tensor, name: str = "idx") -> None:
    check_tensor(op, name, idx, dims=(2,), dtypes=INDEX_DTYPES)
    _check_batch(op, name, idx, "x", x)


def _validate_index_values(op: str, idx: Tensor, n: int, name: str = "idx",
                           unique_counts: Tensor | None = None) -> None:
    """Range check of idx (and, given per-row hit counts, a repeat check): one host read."""
    if idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    # (no repeat check without tokens: then every index is out of range anyway)
    repeats = [] if unique_counts is None or unique_counts.numel() == 0 else [unique_counts.max() > 1]
    flags = torch.stack([lo < 0, hi >= n] + repeats)
    bad = flags.tolist()
    if bad[0] or bad[1]:
        raise IndexError(f"{op}: {name} must lie in [0, {n}) (the token dimension of x), "
                         f"got values in [{int(lo)}, {int(hi)}]")
    if len(bad) > 2 and bad[2]:
        raise ValueError(f"{op}: {name} repeats a token within a batch row, which reduce='replace' "
                         f"cannot resolve; use reduce='add' or unique indices")


def _refuse_bool(op: str, name: str, value) -> None:
    """torch.library turns a bool given for an int argument into 0 / 1 before the op sees it, so
    the public functions refuse bools themselves."""
    if isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be an integer, got {value!r}")


def _rows3d(x: Tensor) -> Tensor:
    """[B, N] -> [B, N, 1] view; [B, N, C] unchanged; contiguous."""
    return (x[:, :, None] if x.dim() == 2 else x).contiguous()


def _fresh(t: Tensor) -> Tensor:
    """A contiguous copy: custom op outputs must not alias inputs or each other."""
    return t.clone(memory_format=torch.contiguous_format)


# ============================================================================================
# 3. Public ops
# ============================================================================================

# --------------------------------------------------------------------------------------------
# token_gather
# --------------------------------------------------------------------------------------------


def _check_gather(x: Tensor, idx: Tensor, validate: bool | None) -> None:
    check_tensor("token_gather", "x", x, dims=(2, 3), dtypes=TORCH_FLOAT_DTYPES)
    _check_index("token_gather", idx, x)


TOKEN_GATHER = define_op(
    "token_gather", family=FAMILY, doc="out[b, k] = x[b, idx[b, k]]",
    check=_check_gather, dispatch_on="x",
    kernels=[
        torch_kernel(gather_rows, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens:gather_rows", dtypes=FLOAT_DTYPES),
        cuda_kernel("cuda_token_gather", dtypes=FLOAT_DTYPES),
    ],
)


@TOKEN_GATHER.impl
def _token_gather_op(x: Tensor, idx: Tensor, validate: bool | None) -> Tensor:
    if resolve_validate(validate, x):
        _validate_index_values("token_gather", idx, x.shape[1])
    out = TOKEN_GATHER.kernels(x=_rows3d(x), idx=idx.contiguous())
    return out.reshape(out.shape[:2]) if x.dim() == 2 else out


@TOKEN_GATHER.fake
def _(x, idx, validate):
    return x.new_empty((x.shape[0], idx.shape[1]) + tuple(x.shape[2:]))


def _token_gather_setup(ctx, inputs, output):
    x, idx, _ = inputs
    ctx.save_for_backward(idx)
    ctx.x_shape = x.shape


def _token_gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.x_shape)
    return torch.ops.effkern.token_scatter(zeros, grad, idx, "add", False), None, None


TOKEN_GATHER.autograd(_token_gather_backward, _token_gather_setup)


def token_gather(x: Tensor, idx: Tensor, *, validate: bool | None = None) -> Tensor:
    """Gather token rows: ``out[b, k] = x[b, idx[b, k]]``.

    Args:
        x: ``[B, N, C]`` or ``[B, N]``, float16/bfloat16/float32 (float64 on the torch backend).
        idx: ``[B, K]`` int64 or int32 token indices in [0, N); repeats allowed; K may be 0.
        validate: check idx's range on the host (one device sync on a GPU). With False, an
            out-of-range index yields a zero row (no out-of-bounds access). None (default): on
            CPU tensors, off on a GPU unless ``effkern.validation()`` / ``EFFKERN_VALIDATE=1``.

    Returns a new contiguous ``[B, K, C]`` (or ``[B, K]``) in x's dtype. Differentiable in x:
    the gradient is a scatter-add (repeated indices accumulate, in float32). Raises IndexError
    for indices out of range, ValueError/TypeError for bad shapes, devices or dtypes.
    """
    return torch.ops.effkern.token_gather(x, idx, validate)


# --------------------------------------------------------------------------------------------
# token_scatter
# --------------------------------------------------------------------------------------------

SCATTER_REDUCTIONS = ("replace", "add")


def _check_scatter(x: Tensor, y: Tensor, idx: Tensor, reduce: str, validate: bool | None) -> None:
    op = "token_scatter"
    check_tensor(op, "x", x, dims=(2, 3), dtypes=TORCH_FLOAT_DTYPES)
    check_tensor(op, "y", y, dims=(x.dim(),), dtypes=(x.dtype,))
    _check_batch(op, "y", y, "x", x)
    _check_index(op, idx, x)
    if y.shape[1] != idx.shape[1] or y.shape[2:] != x.shape[2:]:
        raise ValueError(f"{op}: y must have shape [B, K{', C' if x.dim() == 3 else ''}] = "
                         f"{(x.shape[0], idx.shape[1]) + tuple(x.shape[2:])} for idx of shape "
                         f"{tuple(idx.shape)} and x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_choice(op, "reduce", reduce, SCATTER_REDUCTIONS)


def _cuda_scatter(op, x, y, idx, order, starts, add):
    return op(x, y, order, starts, add)  # the CUDA op needs only the plan, not idx


TOKEN_SCATTER = define_op(
    "token_scatter", family=FAMILY, doc="rows idx of x replaced by / increased by y",
    check=_check_scatter, dispatch_on="x",
    kernels=[
        torch_kernel(scatter_rows, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens:scatter_rows", dtypes=FLOAT_DTYPES),
        cuda_kernel("cuda_token_scatter", dtypes=FLOAT_DTYPES, adapter=_cuda_scatter),
    ],
)


@TOKEN_SCATTER.impl
def _token_scatter_op(x: Tensor, y: Tensor, idx: Tensor, reduce: str, validate: bool | None) -> Tensor:
    order, starts = scatter_plan(idx, x.shape[1])
    if resolve_validate(validate, x):
        counts = None if reduce == "add" else starts[:, 1:] - starts[:, :-1]
        _validate_index_values("token_scatter", idx, x.shape[1], unique_counts=counts)
    out = TOKEN_SCATTER.kernels(x=_rows3d(x), y=_rows3d(y), idx=idx.contiguous(), order=order,
                                starts=starts, add=reduce == "add")
    return out.reshape(out.shape[:2]) if x.dim() == 2 else out


@TOKEN_SCATTER.fake
def _(x, y, idx, reduce, validate):
    return x.new_empty(x.shape)


def _token_scatter_setup(ctx, inputs, output):
    _, _, idx, reduce, _ = inputs
    ctx.save_for_backward(idx)
    ctx.reduce = reduce


def _token_scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    grad_y = torch.ops.effkern.token_gather(grad, idx, False)
    if ctx.reduce == "add":
        grad_x = grad
    else:  # replaced rows did not come from x
        grad_x = torch.ops.effkern.token_scatter(grad, torch.zeros_like(grad_y), idx, "replace", False)
    return grad_x, grad_y, None, None, None


TOKEN_SCATTER.autograd(_token_scatter_backward, _token_scatter_setup)


def token_scatter(x: Tensor, y: Tensor, idx: Tensor, *, reduce: str = "replace",
                  validate: bool | None = None) -> Tensor:
    """Out-of-place scatter of token rows: rows ``idx[b, k]`` of x replaced by (``"replace"``) or
    increased by (``"add"``) ``y[b, k]``; every other row passes through unchanged.

    Args:
        x: ``[B, N, C]`` or ``[B, N]``, float16/bfloat16/float32 (float64 on the torch backend).
        y: ``[B, K, C]`` (resp. ``[B, K]``), x's dtype.
        idx: ``[B, K]`` int64 or int32 indices in [0, N).
        reduce: ``"replace"`` (repeated indices are an error) or ``"add"`` (repeats accumulate;
            each output row is x plus its y rows summed in float32 in ascending k, rounded once).
        validate: check range (and, for replace, uniqueness) on the host: one device sync on a
            GPU. With False, out-of-range indices are ignored and for repeated indices in replace
            mode the last k wins. None (default): as :func:`token_gather`.

    Returns a new contiguous ``[B, N, C]`` tensor. Differentiable in x and y.
    """
    return torch.ops.effkern.token_scatter(x, y, idx, reduce, validate)


# --------------------------------------------------------------------------------------------
# topk_tokens
# --------------------------------------------------------------------------------------------

# The Triton kernel ranks by all-pairs comparison, O(M^2) per row: beyond a few thousand tokens
# a sort (the torch backend) is faster.
TRITON_TOPK_MAX_M = 4096


def _triton_topk_limit(scores: Tensor, k: int, keep_cls: bool) -> list[str]:
    m = scores.shape[1]
    return [f"M = {m} > {TRITON_TOPK_MAX_M}: the all-pairs ranking kernel is slower than a sort"] if m > TRITON_TOPK_MAX_M else []


def _check_topk(scores: Tensor, k: int, keep_cls: bool) -> None:
    check_tensor("topk_tokens", "scores", scores, dims=(2,), dtypes=TORCH_FLOAT_DTYPES)
    check_int("topk_tokens", "k", k, 0, scores.shape[1])


TOPK_TOKENS = define_op(
    "topk_tokens", family=FAMILY, doc="top-k token positions (stable, ties to the lower)",
    check=_check_topk, dispatch_on="scores",
    kernels=[
        torch_kernel(topk_rank, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens:topk_rank", dtypes=FLOAT_DTYPES, check=_triton_topk_limit),
    ],
)


@TOPK_TOKENS.impl
def _topk_tokens_op(scores: Tensor, k: int, keep_cls: bool) -> tuple[Tensor, Tensor]:
    return TOPK_TOKENS.kernels(scores=scores.contiguous(), k=k, keep_cls=keep_cls)


@TOPK_TOKENS.fake
def _(scores, k, keep_cls):
    b, m = scores.shape
    return (scores.new_empty((b, k + int(keep_cls)), dtype=torch.int64),
            scores.new_empty((b, m - k), dtype=torch.int64))


def topk_tokens(scores: Tensor, k: int, *, keep_cls: bool = True) -> tuple[Tensor, Tensor]:
    """Rank the M patch tokens of each batch row by score and split them into kept and dropped.

    Args:
        scores: ``[B, M]`` floating scores of the patch tokens (CLS excluded).
        k: how many to keep, an integer in [0, M] (a bool is refused, not read as 0 / 1).
        keep_cls: prepend the CLS token (position 0) to the kept list and offset every patch
            position by 1, so the indices address ``[B, 1 + M, C]`` token tensors.

    Returns ``(keep_idx [B, k + keep_cls], drop_idx [B, M - k])``, int64. keep_idx: CLS first
    (with keep_cls), then the k best positions in descending score order (DynamicViT/EViT's
    order); drop_idx: the remaining positions in ascending order. Ties go to the lower position
    and NaN ranks above +inf (torch.sort's stable order), so the result is deterministic.
    Not differentiable.
    """
    _refuse_bool("topk_tokens", "k", k)
    return torch.ops.effkern.topk_tokens(scores, k, keep_cls)


# --------------------------------------------------------------------------------------------
# fuse_tokens
# --------------------------------------------------------------------------------------------


def _check_fuse(x: Tensor, weights: Tensor, idx: Tensor, validate: bool | None) -> None:
    op = "fuse_tokens"
    check_tensor(op, "x", x, dims=(3,), dtypes=TORCH_FLOAT_DTYPES)
    check_tensor(op, "weights", weights, dims=(2,), dtypes=TORCH_FLOAT_DTYPES)
    _check_batch(op, "weights", weights, "x", x)
    if weights.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weights must be [B, N] = {tuple(x.shape[:2])}, got {tuple(weights.shape)}")
    _check_index(op, idx, x)


FUSE_TOKENS = define_op(
    "fuse_tokens", family=FAMILY, doc="EViT's fused token: sum_j w[idx_j] x[idx_j]",
    check=_check_fuse, dispatch_on="x",
    kernels=[
        torch_kernel(weighted_sum_rows, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens:weighted_sum_rows", dtypes=FLOAT_DTYPES),
    ],
)


@FUSE_TOKENS.impl
def _fuse_tokens_op(x: Tensor, weights: Tensor, idx: Tensor, validate: bool | None) -> Tensor:
    if resolve_validate(validate, x):
        _validate_index_values("fuse_tokens", idx, x.shape[1])
    return FUSE_TOKENS.kernels(x=x.contiguous(), weights=weights.contiguous(), idx=idx.contiguous())


@FUSE_TOKENS.fake
def _(x, weights, idx, validate):
    return x.new_empty((x.shape[0], 1, x.shape[2]))


def _fuse_tokens_setup(ctx, inputs, output):
    x, weights, idx, _ = inputs
    ctx.save_for_backward(x, weights, idx)


def _fuse_tokens_backward(ctx, grad):
    x, weights, idx = ctx.saved_tensors
    acc = acc_dtype(x.dtype)
    w_sel = torch.ops.effkern.token_gather(weights, idx, False).to(acc)  # [B, J]
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        rows = (grad.to(acc) * w_sel[:, :, None]).to(x.dtype)  # [B, J, C]
        grad_x = torch.ops.effkern.token_scatter(torch.zeros_like(x), rows, idx, "add", False)
    if ctx.needs_input_grad[1]:
        x_sel = torch.ops.effkern.token_gather(x, idx, False).to(acc)
        dots = (x_sel * grad.to(acc)).sum(-1).to(weights.dtype)  # [B, J]
        grad_w = torch.ops.effkern.token_scatter(torch.zeros_like(weights), dots, idx, "add", False)
    return grad_x, grad_w, None, None


FUSE_TOKENS.autograd(_fuse_tokens_backward, _fuse_tokens_setup)


def fuse_tokens(x: Tensor, weights: Tensor, idx: Tensor, *, validate: bool | None = None) -> Tensor:
    """EViT's fused token: ``sum_j weights[b, idx[b, j]] * x[b, idx[b, j]]``, not renormalised.

    Args:
        x: ``[B, N, C]`` tokens; weights: ``[B, N]`` per-token weights (e.g. CLS attention, in
            the same token positions as x); idx: ``[B, J]`` the tokens to fuse (J may be 0).
        validate: range-check idx on the host (one device sync on a GPU); None (default): as
            :func:`token_gather`.

    Returns ``[B, 1, C]`` in x's dtype, accumulated in float32. Differentiable in x and weights.
    """
    return torch.ops.effkern.fuse_tokens(x, weights, idx, validate)


# --------------------------------------------------------------------------------------------
# cls_attention
# --------------------------------------------------------------------------------------------


def _check_cls_attention(q: Tensor, k: Tensor, scale: float, softmax: bool) -> None:
    op = "cls_attention"
    check_tensor(op, "q", q, dims=(3,), dtypes=TORCH_FLOAT_DTYPES)
    check_tensor(op, "k", k, dims=(4,), dtypes=(q.dtype,))
    _check_batch(op, "k", k, "q", q)
    if k.shape[1] != q.shape[1] or k.shape[3] != q.shape[2] or k.shape[2] == 0:
        raise ValueError(f"{op}: q must be [B, H, d] and k [B, H, N, d] with N >= 1, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[2] == 0:
        raise ValueError(f"{op}: the head dim d must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale!r}")


CLS_ATTENTION = define_op(
    "cls_attention", family=FAMILY, doc="head-mean CLS attention over keys, no N x N map",
    check=_check_cls_attention, dispatch_on="q",
    kernels=[
        torch_kernel(cls_attention_fwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens_attention:cls_attention_fwd", dtypes=FLOAT_DTYPES),
    ],
)


@CLS_ATTENTION.impl
def _cls_attention_op(q: Tensor, k: Tensor, scale: float, softmax: bool) -> Tensor:
    return CLS_ATTENTION.kernels(q=q.contiguous(), k=k.contiguous(), scale=scale, softmax=softmax)


@CLS_ATTENTION.fake
def _(q, k, scale, softmax):
    return q.new_empty((k.shape[0], k.shape[2]), dtype=acc_dtype(q.dtype))


# The backward formulas call their kernels through custom ops too, so that torch.compile traces
# them with fake tensors instead of running a kernel on them.
CLS_ATTENTION_BACKWARD = define_op(
    "cls_attention_backward", family=FAMILY, doc="gradient of cls_attention", public=False,
    dispatch_on="grad",  # float32 for every input dtype but float64
    kernels=[
        torch_kernel(cls_attention_bwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens_attention:cls_attention_bwd", dtypes=(torch.float32,)),
    ],
)


@CLS_ATTENTION_BACKWARD.impl
def _cls_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, scale: float, softmax: bool) -> tuple[Tensor, Tensor]:
    return CLS_ATTENTION_BACKWARD.kernels(grad=grad.contiguous(), q=q.contiguous(), k=k.contiguous(),
                                          scale=scale, softmax=softmax)


@CLS_ATTENTION_BACKWARD.fake
def _(grad, q, k, scale, softmax):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _cls_attention_setup(ctx, inputs, output):
    q, k, scale, softmax = inputs
    ctx.save_for_backward(q, k)
    ctx.scale, ctx.softmax = scale, softmax


def _cls_attention_backward(ctx, grad):
    q, k = ctx.saved_tensors
    dq, dk = torch.ops.effkern.cls_attention_backward(grad, q, k, ctx.scale, ctx.softmax)
    return dq, dk, None, None


CLS_ATTENTION.autograd(_cls_attention_backward, _cls_attention_setup)


def cls_attention(q: Tensor, k: Tensor, *, scale: float | None = None, softmax: bool = True) -> Tensor:
    """The CLS token's attention to every token, averaged over heads (EViT's token score).

    Args:
        q: ``[B, H, d]`` the CLS query of each head; k: ``[B, H, N, d]`` all keys (CLS included);
            N >= 1 and d >= 1 (ValueError otherwise).
        scale: logit scale, default ``d ** -0.5``.
        softmax: True: ``mean_h softmax_n(scale * q_h . k_hn)`` (EViT); False: the head-mean of
            the raw scaled logits (IdleViT ranks by those).

    Returns ``[B, N]`` float32 (float64 for float64 inputs): computed in float32 from any
    input dtype, since bf16 scores would tie too often to rank. Never builds an N x N map.
    Differentiable in q and k.
    """
    if scale is None:
        d = q.shape[-1] if isinstance(q, Tensor) and q.dim() == 3 else 1
        scale = d ** -0.5 if d > 0 else 1.0  # d = 0: the op's check names the head dim
    return torch.ops.effkern.cls_attention(q, k, float(scale), softmax)


# --------------------------------------------------------------------------------------------
# masked_softmax
# --------------------------------------------------------------------------------------------

# The Triton forward numbers rows (B * H * N of them) in int32.
TRITON_MASKED_SOFTMAX_MAX_ROWS = 2**31 - 1 - 4096


def _triton_masked_softmax_rows(logits: Tensor, policy: Tensor, eps: float) -> list[str]:
    rows = logits.shape[0] * logits.shape[1] * logits.shape[2]
    return [f"{rows} rows exceed {TRITON_MASKED_SOFTMAX_MAX_ROWS}"] if rows > TRITON_MASKED_SOFTMAX_MAX_ROWS else []


def _check_masked_softmax(logits: Tensor, policy: Tensor, eps: float) -> None:
    op = "masked_softmax"
    check_tensor(op, "logits", logits, dims=(4,), dtypes=TORCH_FLOAT_DTYPES)
    check_tensor(op, "policy", policy, dims=(2,), dtypes=TORCH_FLOAT_DTYPES)
    _check_batch(op, "policy", policy, "logits", logits)
    b, _, n, n2 = logits.shape
    if n != n2 or n == 0:
        raise ValueError(f"{op}: logits must be [B, H, N, N] with N >= 1, got {tuple(logits.shape)}")
    if tuple(policy.shape) != (b, n):
        raise ValueError(f"{op}: policy must be [B, N] = {(b, n)}, got {tuple(policy.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps!r}")


MASKED_SOFTMAX = define_op(
    "masked_softmax", family=FAMILY, doc="DynamicViT's policy-masked softmax",
    check=_check_masked_softmax, dispatch_on="logits",
    kernels=[
        torch_kernel(masked_softmax_fwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens_attention:masked_softmax_fwd", dtypes=FLOAT_DTYPES, check=_triton_masked_softmax_rows),
    ],
)


@MASKED_SOFTMAX.impl
def _masked_softmax_op(logits: Tensor, policy: Tensor, eps: float) -> Tensor:
    return MASKED_SOFTMAX.kernels(logits=logits.contiguous(), policy=policy.to(acc_dtype(logits.dtype)).contiguous(),
                                  eps=eps)


@MASKED_SOFTMAX.fake
def _(logits, policy, eps):
    return logits.new_empty(logits.shape)


MASKED_SOFTMAX_BACKWARD = define_op(
    "masked_softmax_backward", family=FAMILY, doc="gradient of masked_softmax", public=False,
    dispatch_on="logits",
    kernels=[
        torch_kernel(masked_softmax_bwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens_attention:masked_softmax_bwd", dtypes=FLOAT_DTYPES),
    ],
)


@MASKED_SOFTMAX_BACKWARD.impl
def _masked_softmax_backward_op(grad: Tensor, logits: Tensor, policy: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return MASKED_SOFTMAX_BACKWARD.kernels(grad=grad.contiguous(), logits=logits.contiguous(),
                                           policy=policy.contiguous(), eps=eps)


@MASKED_SOFTMAX_BACKWARD.fake
def _(grad, logits, policy, eps):
    return logits.new_empty(logits.shape), policy.new_empty(policy.shape)


def _masked_softmax_setup(ctx, inputs, output):
    logits, policy, eps = inputs
    ctx.save_for_backward(logits, policy)
    ctx.eps = eps


def _masked_softmax_backward(ctx, grad):
    logits, policy = ctx.saved_tensors
    d_logits, d_policy = torch.ops.effkern.masked_softmax_backward(
        grad, logits, policy.to(acc_dtype(logits.dtype)), ctx.eps)
    return d_logits, d_policy.to(policy.dtype), None


MASKED_SOFTMAX.autograd(_masked_softmax_backward, _masked_softmax_setup)


def masked_softmax(logits: Tensor, policy: Tensor, *, eps: float = 1e-6) -> Tensor:
    """DynamicViT's training-time attention softmax with a token keep policy.

    Args:
        logits: ``[B, H, N, N]`` attention logits.
        policy: ``[B, N]`` (or DynamicViT's ``[B, N, 1]``) keep decisions in [0, 1]; key j is
            kept where policy is 1. Each query always keeps itself.
        eps: DynamicViT's stabiliser, finite and >= 0.

    With G[i, j] = policy[j] except G[i, i] = 1 and A = exp(a - rowmax(a)) * G (the max over
    all keys): ``out = (A + eps / N) / (sum_j A + eps)``, computed in float32 and returned in
    the logits' dtype. Differentiable in logits and policy (the row max's own gradient, which
    the eps terms make nonzero, goes to the first maximal key, as torch.max's does).

    Rows without weight. DynamicViT's formula returns NaN for a row whose logits are all -inf
    (-inf - -inf), and 0 / 0 for eps = 0 when every kept key of a row (the query itself
    included) has logit -inf. Here a row whose A sums to 0 (every kept key at -inf, or
    underflowing) is the uniform distribution 1/N on every backend: what the formula gives for
    any eps > 0 (up to rounding), made exact and extended to eps = 0. A row of all -inf logits
    is such a row. Its logit gradient is zero (A stays 0 around it); its policy gradient is the
    formula's for eps > 0, and zero for eps = 0 (where the output jumps).
    """
    if isinstance(policy, Tensor) and policy.dim() == 3 and policy.shape[-1] == 1:
        policy = policy[..., 0]
    return torch.ops.effkern.masked_softmax(logits, policy, float(eps))


# --------------------------------------------------------------------------------------------
# ToMe: bipartite_matching, merge_tokens, unmerge_tokens
# --------------------------------------------------------------------------------------------


class MergePlan(NamedTuple):
    """ToMe's merge decision for one layer, as index tensors (all int64, batch-first).

    ``unm_idx`` [B, ceil(N/2) - r], ``src_idx`` [B, r], ``dst_idx`` [B, r]: ToMe's own (a-row
    positions kept / merged, and the b-row each merged one goes to). ``dest`` [B, N]: the merged
    row of every input token (unmerge_tokens gathers with it); ``sources`` [B, N] and ``starts``
    [B, N - r + 1]: the same map as CSR (tokens listed by merged row), used by the kernels.
    With nothing to merge (r = 0) the plan is the identity: dest = arange(N).
    """

    unm_idx: Tensor
    src_idx: Tensor
    dst_idx: Tensor
    dest: Tensor
    sources: Tensor
    starts: Tensor

    @property
    def num_tokens(self) -> int:
        return self.dest.shape[1]

    @property
    def num_merged(self) -> int:
        return self.dest.shape[1] - (self.starts.shape[1] - 1)


def _effective_r(n: int, r: int, class_token: bool, distill_token: bool = False) -> int:
    """ToMe caps r so that at most half of the unprotected tokens are merged."""
    return max(0, min(r, (n - int(class_token) - int(distill_token)) // 2))


def _check_matching(metric: Tensor, r: int, class_token: bool, validate: bool | None = None,
                    distill_token: bool = False) -> None:
    check_tensor("bipartite_matching", "metric", metric, dims=(3,), dtypes=TORCH_FLOAT_DTYPES)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"bipartite_matching: r must be an integer >= 0, got {r!r}")
    if distill_token and not class_token:
        raise ValueError("bipartite_matching: distill_token needs class_token (the distillation token is token 1, "
                         "after the class token)")


def _merge_plan(node_max: Tensor, node_idx: Tensor, n: int, r: int, class_token: bool,
                distill_token: bool = False) -> tuple[Tensor, ...]:
    """The plan's six tensors from the matching scores (r >= 1 already capped). With
    distill_token the merged order is ToMe's: class token, distillation token, the other kept
    a-rows, the other b-rows."""
    b = node_max.shape[0]
    dev = node_max.device
    ta, tb = (n + 1) // 2, n // 2
    u = ta - r  # a-rows kept
    ar = torch.arange(n, device=dev).expand(b, n)
    if class_token:
        # The class token is never merged, whatever the scores (NaN included): only the other
        # a-rows are ranked, and it is put last; r <= ta - 1 leaves it unmerged.
        edge = torch.sort(node_max[:, 1:], dim=1, descending=True, stable=True).indices + 1
        edge = torch.cat([edge, edge.new_zeros(b, 1)], 1)
    else:
        edge = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    unm_idx, src_idx = edge[:, r:], edge[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    if class_token:  # keep the class token first
        unm_idx = unm_idx.sort(dim=1).values
    a_row, b_row = ar[:, :u], u + ar[:, :tb]  # merged row of the j-th kept a-row and of b-row m
    if distill_token:  # ToMe's cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]])
        a_row = a_row + (a_row >= 1).to(a_row.dtype)
        b_row = torch.where(b_row == u, 1, b_row)
    dest = torch.empty(b, n, dtype=torch.int64, device=dev)
    dest.scatter_(1, 2 * unm_idx, a_row)
    dest[:, 1::2] = b_row
    dest.scatter_(1, 2 * src_idx, b_row.gather(1, dst_idx))
    sources, starts = scatter_plan(dest, u + tb)
    # fresh tensors: the slices of `edge` share its storage, and custom op outputs must not alias
    return _fresh(unm_idx), _fresh(src_idx), dst_idx, dest, sources, starts


def _identity_plan(b: int, n: int, device) -> tuple[Tensor, ...]:
    """r = 0: every token stays; six fresh tensors (none aliasing another)."""
    ta = (n + 1) // 2

    def arange(m: int) -> Tensor:
        return torch.arange(m, device=device).repeat(b, 1)

    empty = torch.empty(b, 0, dtype=torch.int64, device=device)
    return arange(ta), empty, empty.clone(), arange(n), arange(n), arange(n + 1)


MATCH = define_op(
    "bipartite_matching", family=FAMILY, doc="ToMe bipartite soft matching",
    check=_check_matching, dispatch_on="metric",
    kernels=[
        torch_kernel(tome_match, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens_attention:tome_match", dtypes=FLOAT_DTYPES),
    ],
)


@MATCH.impl
def _bipartite_matching_op(metric: Tensor, r: int, class_token: bool, validate: bool | None = None,
                           distill_token: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, n, _ = metric.shape
    r = _effective_r(n, r, class_token, distill_token)
    if r == 0:
        return _identity_plan(b, n, metric.device)
    if resolve_validate(validate, metric) and not bool(torch.isfinite(metric).all()):
        raise ValueError("bipartite_matching: metric must be finite (it has NaN or infinite values); "
                         "huge finite values are fine, the rows are normalised")
    node_max, node_idx = MATCH.kernels(metric=metric.contiguous(), class_token=class_token, distill_token=distill_token)
    return _merge_plan(node_max, node_idx, n, r, class_token, distill_token)


@MATCH.fake
def _(metric, r, class_token, validate=None, distill_token=False):
    b, n, _ = metric.shape
    r = _effective_r(n, r, class_token, distill_token)
    ta = (n + 1) // 2

    def new(*shape):
        return metric.new_empty(shape, dtype=torch.int64)

    return new(b, ta - r), new(b, r), new(b, r), new(b, n), new(b, n), new(b, n - r + 1)


def bipartite_matching(metric: Tensor, r: int, *, class_token: bool = True, distill_token: bool = False,
                       validate: bool | None = None) -> MergePlan:
    """ToMe's bipartite soft matching: which r tokens to merge into which.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe: the head-mean of the keys).
        r: tokens to remove, an integer >= 0; capped at ``(N - class_token - distill_token) // 2``.
        class_token: protect token 0 (it is never merged, and it stays first).
        distill_token: protect token 1 too, a distillation token (DeiT; needs class_token): no
            token merges into it, and it stays second, as ToMe's ``distill_token``.
        validate: when there is something to merge, check that metric is finite (one device
            sync on a GPU); ValueError otherwise. None (default): as :func:`token_gather`. With False, a non-finite metric gives an unspecified
            (but well-formed) plan, the class token still unmerged.

    Semantics (ToMe's): rows L2-normalised (computed in float32; a zero row stays zero; huge
    finite values are normalised without overflow, by a power-of-two row scale first);
    a = even positions, b = odd positions; scores = a b^T; each a-row's best b (max, first
    argmax); a-rows sorted by that max, descending (stable: ties to the lower position); the
    first r are merged into their best b, the rest kept (re-sorted by position with
    class_token). Merged order: kept a-rows, then all b-rows. Returns a :class:`MergePlan`
    (not differentiable) for :func:`merge_tokens` and :func:`unmerge_tokens`; its tensors are
    fresh (none aliases metric or another).
    """
    _refuse_bool("bipartite_matching", "r", r)
    return MergePlan(*torch.ops.effkern.bipartite_matching(metric, r, class_token, validate, distill_token))


def _check_merge(x: Tensor, size: Tensor | None, dest: Tensor, sources: Tensor, starts: Tensor,
                 validate: bool | None = None) -> None:
    op = "merge_tokens"
    check_tensor(op, "x", x, dims=(3,), dtypes=TORCH_FLOAT_DTYPES)
    for name, t in (("plan.dest", dest), ("plan.sources", sources), ("plan.starts", starts)):
        check_tensor(op, name, t, dims=(2,), dtypes=(torch.int64,))
        _check_batch(op, name, t, "x", x)
    if dest.shape != x.shape[:2] or sources.shape != x.shape[:2] or not 1 <= starts.shape[1] <= x.shape[1] + 1:
        raise ValueError(f"{op}: the plan was made for {tuple(dest.shape)} tokens (sources "
                         f"{tuple(sources.shape)}, starts {tuple(starts.shape)}), x is {tuple(x.shape)}")
    if size is not None:
        check_tensor(op, "size", size, dims=(2,), dtypes=TORCH_FLOAT_DTYPES)
        check_same_device(op, "size", size, "x", x)
        if size.shape != x.shape[:2]:
            raise ValueError(f"{op}: size must be [B, N, 1] or [B, N] = {tuple(x.shape[:2])}, got {tuple(size.shape)}")


def _validate_plan(dest: Tensor, sources: Tensor, starts: Tensor, size: Tensor | None = None) -> None:
    """A plan is a partition of the N tokens into M non-empty merged rows, given twice: starts
    rises strictly from 0 to N, sources lists every token once, and dest[sources[k]] is the row
    whose segment holds k; sizes, when given, are finite and > 0. One host read of the flags."""
    b, n = dest.shape
    m = starts.shape[1] - 1
    if b == 0:
        return
    steps = starts[:, 1:] - starts[:, :-1]
    bad_starts = (starts[:, 0] != 0).any() | (starts[:, -1] != n).any() | (steps <= 0).any()
    src_ok = (sources >= 0) & (sources < n)
    safe_src = torch.where(src_ok, sources, 0)
    hits = torch.zeros(b, n, dtype=torch.int64, device=dest.device).scatter_add_(1, safe_src, src_ok.long())
    bad_sources = ~src_ok.all() | (hits != 1).any()
    bad_dest = ((dest < 0) | (dest >= m)).any()
    # segment of each position k of sources (meaningful only when starts and sources are sound)
    seg = torch.searchsorted(starts.contiguous(), torch.arange(n, device=dest.device).expand(b, n).contiguous(),
                             right=True) - 1
    bad_map = (dest.gather(1, safe_src) != seg).any()
    bad_size = dest.new_zeros((), dtype=torch.bool) if size is None else ~(torch.isfinite(size) & (size > 0)).all()
    flags = torch.stack([bad_starts, bad_sources, bad_dest, bad_map, bad_size.to(dest.device)]).tolist()
    if flags[0]:
        raise ValueError(f"merge_tokens: plan.starts must rise strictly from 0 to N = {n} in every batch row "
                         f"(each merged row gets at least one token)")
    if flags[1]:
        raise ValueError(f"merge_tokens: plan.sources must list every token in [0, {n}) exactly once per batch row")
    if flags[2]:
        raise ValueError(f"merge_tokens: plan.dest must lie in [0, {m}) (the merged rows)")
    if flags[3]:
        raise ValueError("merge_tokens: plan.dest disagrees with plan.sources / plan.starts "
                         "(dest[sources[k]] must be the merged row whose segment holds k)")
    if flags[4]:
        raise ValueError("merge_tokens: size must be finite and > 0 (token sizes)")


MERGE = define_op(
    "merge_tokens", family=FAMILY, doc="ToMe's size-weighted token merge",
    check=_check_merge, dispatch_on="x",
    kernels=[
        torch_kernel(segment_mean_rows, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens:segment_mean_rows", dtypes=FLOAT_DTYPES),
    ],
)


@MERGE.impl
def _merge_tokens_op(x: Tensor, size: Tensor | None, dest: Tensor, sources: Tensor,
                     starts: Tensor, validate: bool | None = None) -> tuple[Tensor, Tensor]:
    if resolve_validate(validate, x):
        _validate_plan(dest, sources, starts, size)
    size_acc = None if size is None else size.to(acc_dtype(x.dtype)).contiguous()
    return MERGE.kernels(x=x.contiguous(), size=size_acc, dest=dest.contiguous(), sources=sources.contiguous(),
                         starts=starts.contiguous())


@MERGE.fake
def _(x, size, dest, sources, starts, validate=None):
    m = starts.shape[1] - 1
    return x.new_empty((x.shape[0], m, x.shape[2])), x.new_empty((x.shape[0], m), dtype=acc_dtype(x.dtype))


MERGE_BACKWARD = define_op(
    "merge_tokens_backward", family=FAMILY, doc="gradient of merge_tokens", public=False,
    dispatch_on="x",
    kernels=[
        torch_kernel(segment_mean_rows_bwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("tokens:segment_mean_rows_bwd", dtypes=FLOAT_DTYPES),
    ],
)


@MERGE_BACKWARD.impl
def _merge_tokens_backward_op(grad_out: Tensor, grad_size: Tensor | None, x: Tensor, size: Tensor | None,
                              out: Tensor, size_out: Tensor, dest: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dsize); dsize is an empty tensor when size is None (custom ops return no None)."""
    dx, dsize = MERGE_BACKWARD.kernels(
        grad_out=grad_out.contiguous(), grad_size=None if grad_size is None else grad_size.contiguous(),
        x=x.contiguous(), size=size, out=out.contiguous(), size_out=size_out.contiguous(), dest=dest.contiguous())
    return dx, size_out.new_empty(0) if dsize is None else dsize


@MERGE_BACKWARD.fake
def _(grad_out, grad_size, x, size, out, size_out, dest):
    dsize = size_out.new_empty(0) if size is None else size_out.new_empty(dest.shape)
    return x.new_empty(x.shape), dsize


def _merge_tokens_setup(ctx, inputs, output):
    x, size, dest = inputs[:3]
    out, size_out = output
    ctx.has_size = size is not None
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(x, size, dest, out, size_out)


def _merge_tokens_backward(ctx, grad_out, grad_size):
    x, size, dest, out, size_out = ctx.saved_tensors
    size_acc = size.to(acc_dtype(x.dtype)).contiguous() if ctx.has_size else None
    dx, dsize = torch.ops.effkern.merge_tokens_backward(grad_out, grad_size, x, size_acc, out, size_out, dest)
    return (dx, dsize.to(size.dtype) if ctx.has_size else None) + (None,) * (ctx.num_inputs - 2)


MERGE.autograd(_merge_tokens_backward, _merge_tokens_setup)


def merge_tokens(plan: MergePlan, x: Tensor, size: Tensor | None = None, *,
                 validate: bool | None = None) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted merge along a :class:`MergePlan`.

    ``x' = merge(x * s, sum) / merge(s, sum)`` and ``s' = merge(s, sum)`` with s = size (1
    when None), accumulated in float32 and rounded once.

    Args:
        plan: from :func:`bipartite_matching` on the same B and N.
        x: ``[B, N, C]`` tokens; size: ``[B, N, 1]`` (ToMe's) or ``[B, N]`` positive token sizes.
        validate: check that the plan is a partition of the tokens (see below) and that the
            sizes are finite and > 0 (one device sync on a GPU). None (default): as
            :func:`token_gather`.
            Shapes and dtypes are always checked. With False a malformed plan gives unspecified
            values, but no backend reads out of bounds or loops longer than N steps.

    A valid plan: ``starts`` [B, M + 1] rises strictly from 0 to N, ``sources`` [B, N] lists
    every token once, and ``dest[b, sources[b, k]]`` is the merged row whose segment
    ``starts[b, o] <= k < starts[b, o + 1]`` holds k. A hand-edited plan that breaks this
    raises ValueError naming the plan tensor.

    Returns ``(x_merged [B, N - r, C], size_merged [B, N - r, 1])``, size_merged in size's dtype
    (x's when size is None). Differentiable in x and size.
    """
    size2 = size[..., 0] if isinstance(size, Tensor) and size.dim() == 3 and size.shape[-1] == 1 else size
    out, size_out = torch.ops.effkern.merge_tokens(x, size2, plan.dest, plan.sources, plan.starts, validate)
    return out, size_out.to(x.dtype if size is None else size.dtype)[:, :, None]


def unmerge_tokens(plan: MergePlan, x_merged: Tensor) -> Tensor:
    """Undo a merge for dense outputs: every input token gets its merged row,
    ``out[b, n] = x_merged[b, plan.dest[b, n]]`` -> ``[B, N, C]``. Differentiable."""
    m = plan.starts.shape[1] - 1
    if not isinstance(x_merged, Tensor) or x_merged.dim() != 3 or x_merged.shape[:2] != (plan.dest.shape[0], m):
        shape = tuple(x_merged.shape) if isinstance(x_merged, Tensor) else type(x_merged).__name__
        raise ValueError(f"unmerge_tokens: x_merged must be [B, N - r, C] with B, N - r = "
                         f"{(plan.dest.shape[0], m)}, got {shape}")
    return token_gather(x_merged, plan.dest, validate=False)


# ============================================================================================
# 4. Test cases (tests/test_registry.py runs them on every backend)
# ============================================================================================
#
# Small on purpose: they run on every backend under Triton's interpreter. Layouts a model
# produces are among them: timm's q/k/v are permuted views of one qkv buffer.


def _pick(gen: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _size(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _randn(gen: torch.Generator, shape, dtype=torch.float32, device="cpu") -> Tensor:
    return torch.randn(tuple(shape), generator=gen).to(dtype).to(device)


def _tokens(gen, b, n, c, dtype, device, layout="contiguous") -> Tensor:
    """[B, N, C] tokens: contiguous, or a permuted view ([B, C, N] transposed), or a slice of a
    wider buffer (timm's qkv: one of three tokens tensors packed along C)."""
    if layout == "permuted":
        return _randn(gen, (b, c, n), dtype, device).transpose(1, 2)
    if layout == "sliced":
        return _randn(gen, (b, n, 3, c), dtype, device)[:, :, 1]
    return _randn(gen, (b, n, c), dtype, device)


def _qkv(gen, b, h, n, d, dtype, device) -> tuple[Tensor, Tensor]:
    """timm's q (the CLS query, [B, H, d]) and k ([B, H, N, d]): views of one [B, N, 3, H, d]
    buffer, permuted as timm's Attention does."""
    qkv = _randn(gen, (b, n, 3, h, d), dtype, device).permute(2, 0, 3, 1, 4)
    return qkv[0][:, :, 0], qkv[1]


def _index(gen, b, k, n, device, dtype=torch.int64, unique=False) -> Tensor:
    if unique:
        rows = [torch.randperm(n, generator=gen)[:k] for _ in range(b)]
        idx = torch.stack(rows) if b else torch.zeros(0, k, dtype=torch.int64)
    else:
        idx = torch.randint(0, max(n, 1), (b, k), generator=gen)
    return idx.to(dtype).to(device)


# token_gather ------------------------------------------------------------------------------


def _gather_samples(gen, device):
    return [
        Sample((_tokens(gen, 3, 197, 5, torch.float32, device), _index(gen, 3, 64, 197, device, torch.int32), True),
               "197 tokens, int32 indices with repeats"),
        Sample((_tokens(gen, 2, 9, 8, torch.bfloat16, device, "permuted"), _index(gen, 2, 13, 9, device), True),
               "permuted bf16 tokens"),
        Sample((_randn(gen, (2, 62), torch.float16, device)[:, ::2], _index(gen, 2, 7, 31, device)[:, :7], True),
               "2-D strided scores"),
        Sample((_tokens(gen, 1, 1, 1, torch.float32, device), torch.zeros(1, 3, dtype=torch.int64, device=device), True),
               "one token gathered thrice"),
        Sample((_tokens(gen, 2, 5, 3, torch.float32, device), _index(gen, 2, 0, 5, device), True), "K = 0"),
        Sample((_tokens(gen, 0, 4, 3, torch.float32, device), _index(gen, 0, 2, 4, device), True), "empty batch"),
    ]


def _gather_random(gen, device):
    b, n, c, k = _size(gen, 1, 3), _size(gen, 1, 64), _size(gen, 1, 32), _size(gen, 0, 64)
    x = _tokens(gen, b, n, c, _pick(gen, FLOAT_DTYPES), device, _pick(gen, ("contiguous", "permuted", "sliced")))
    if _pick(gen, (False, True)):
        x = x[:, :, 0]
    return Sample((x, _index(gen, b, k, n, device, _pick(gen, INDEX_DTYPES)), _pick(gen, (True, False))))


def _gather_invalid(gen, device):
    x = _tokens(gen, 2, 5, 3, torch.float32, device)
    idx = _index(gen, 2, 2, 5, device)
    return [
        Invalid((x.to(torch.int32), idx, True), TypeError, "token_gather: x must have dtype"),
        Invalid((x, idx.float(), True), TypeError, "idx must have dtype int64 or int32, got float32"),
        Invalid((x, torch.tensor([[0, 5], [1, 2]], device=device), True), IndexError, r"idx must lie in \[0, 5\)"),
        Invalid((x, torch.tensor([[0, 1], [-1, 2]], device=device), True), IndexError, r"idx must lie in \[0, 5\)"),
        Invalid((x, _index(gen, 3, 2, 5, device), True), ValueError, "idx has batch size 3 but x has 2"),
        Invalid((x, idx[0], True), ValueError, "idx must be 2-D"),
        Invalid((x[None], idx, True), ValueError, "x must be 2-D or 3-D"),
    ]


TOKEN_GATHER.cases(samples=_gather_samples, random=_gather_random, invalid=_gather_invalid, exact=True,
                   grad_args=(0,))


# token_scatter -----------------------------------------------------------------------------


def _scatter_samples(gen, device):
    return [
        Sample((_tokens(gen, 2, 197, 6, torch.float32, device), _tokens(gen, 2, 138, 6, torch.float32, device),
                _index(gen, 2, 138, 197, device, unique=True), "replace", True), "replace 138 of 197 rows"),
        Sample((_tokens(gen, 3, 9, 7, torch.float32, device, "permuted"), _tokens(gen, 3, 40, 7, torch.float32, device),
                _index(gen, 3, 40, 9, device, torch.int32), "add", True), "add with many repeats, permuted x"),
        Sample((_tokens(gen, 2, 31, 5, torch.bfloat16, device, "sliced"), _tokens(gen, 2, 11, 5, torch.bfloat16, device),
                _index(gen, 2, 11, 31, device, unique=True), "add", True), "add into a bf16 slice"),
        Sample((_randn(gen, (2, 62), torch.float16, device)[:, ::2], _randn(gen, (2, 11), torch.float16, device),
                _index(gen, 2, 11, 31, device, unique=True), "replace", True), "2-D strided"),
        Sample((_tokens(gen, 2, 3, 4, torch.float32, device), _tokens(gen, 2, 0, 4, torch.float32, device),
                _index(gen, 2, 0, 3, device), "add", True), "K = 0"),
    ]


def _scatter_random(gen, device):
    b, n, c = _size(gen, 1, 3), _size(gen, 1, 48), _size(gen, 1, 32)
    reduce = _pick(gen, SCATTER_REDUCTIONS)
    k = _size(gen, 0, n if reduce == "replace" else 64)
    dtype = _pick(gen, FLOAT_DTYPES)
    x = _tokens(gen, b, n, c, dtype, device, _pick(gen, ("contiguous", "permuted", "sliced")))
    y = _tokens(gen, b, k, c, dtype, device, _pick(gen, ("contiguous", "permuted")))
    idx = _index(gen, b, k, n, device, _pick(gen, INDEX_DTYPES), unique=reduce == "replace")
    if _pick(gen, (False, True)):
        x, y = x[:, :, 0], y[:, :, 0]
    return Sample((x, y, idx, reduce, True))


def _scatter_invalid(gen, device):
    x = _tokens(gen, 2, 5, 3, torch.float32, device)
    y = _tokens(gen, 2, 2, 3, torch.float32, device)
    idx = _index(gen, 2, 2, 5, device, unique=True)
    return [
        Invalid((x, y, torch.tensor([[0, 3], [-1, 2]], device=device), "add", True), IndexError, r"idx must lie in \[0, 5\)"),
        Invalid((x, y, torch.tensor([[1, 1], [0, 2]], device=device), "replace", True), ValueError, "repeats a token"),
        Invalid((x, _tokens(gen, 2, 3, 3, torch.float32, device), idx, "add", True), ValueError, "y must have shape"),
        Invalid((x, y.double(), idx, "add", True), TypeError, "y must have dtype float32"),
        Invalid((x, y, idx, "max", True), ValueError, "reduce must be one of"),
        Invalid((x, y, idx.to(torch.int16), "add", True), TypeError, "int64 or int32, got int16"),
    ]


TOKEN_SCATTER.cases(samples=_scatter_samples, random=_scatter_random, invalid=_scatter_invalid, grad_args=(0, 1))


# topk_tokens -------------------------------------------------------------------------------


def _topk_samples(gen, device):
    ties = torch.tensor([[1.0, 3.0, -0.0, 3.0, 0.0, math.nan, -math.inf, 1.0, math.inf]], device=device)
    return [
        Sample((_randn(gen, (3, 196), torch.float32, device), 137, True), "196 patch tokens, keep 137"),
        Sample((_randn(gen, (2, 9), torch.float32, device).round().to(torch.bfloat16), 4, False), "bf16 ties"),
        Sample((ties, 5, True), "NaN, infinities, signed zeros, ties"),
        Sample((_randn(gen, (5, 3), torch.float16, device).T, 3, True), "transposed, k = M"),
        Sample((_randn(gen, (2, 1), torch.float32, device), 0, True), "k = 0"),
        Sample((_randn(gen, (0, 4), torch.float32, device), 2, True), "empty batch"),
    ]


def _topk_random(gen, device):
    b, m = _size(gen, 1, 3), _size(gen, 1, 64)
    scores = _randn(gen, (b, m), _pick(gen, FLOAT_DTYPES), device)
    if _pick(gen, (False, True)):  # few distinct values: many ties
        scores = scores.round()
    return Sample((scores, _size(gen, 0, m), _pick(gen, (True, False))))


def _topk_invalid(gen, device):
    s = _randn(gen, (2, 4), torch.float32, device)
    return [
        Invalid((s, 5, True), ValueError, r"topk_tokens: k must be an integer in \[0, 4\]"),
        Invalid((s, -1, True), ValueError, r"k must be an integer in \[0, 4\]"),
        Invalid((s.to(torch.int32), 2, True), TypeError, "scores must have dtype"),
        Invalid((s[None], 2, True), ValueError, "scores must be 2-D"),
    ]


TOPK_TOKENS.cases(samples=_topk_samples, random=_topk_random, invalid=_topk_invalid, exact=True)


# fuse_tokens -------------------------------------------------------------------------------


def _fuse_samples(gen, device):
    return [
        Sample((_tokens(gen, 2, 197, 6, torch.float32, device), torch.rand(2, 197, generator=gen).to(device),
                _index(gen, 2, 59, 197, device), True), "59 of 197 tokens"),
        Sample((_tokens(gen, 2, 9, 5, torch.bfloat16, device, "permuted"),
                torch.rand(2, 9, generator=gen).to(torch.bfloat16).to(device), _index(gen, 2, 4, 9, device, torch.int32), True),
               "permuted bf16"),
        Sample((_tokens(gen, 1, 3, 8, torch.float16, device, "sliced"), torch.rand(1, 3, generator=gen).to(torch.float16).to(device),
                _index(gen, 1, 0, 3, device), True), "J = 0"),
    ]


def _fuse_random(gen, device):
    b, n, c, j = _size(gen, 1, 3), _size(gen, 1, 64), _size(gen, 1, 32), _size(gen, 0, 64)
    dtype = _pick(gen, FLOAT_DTYPES)
    x = _tokens(gen, b, n, c, dtype, device, _pick(gen, ("contiguous", "permuted", "sliced")))
    w = torch.rand(b, n, generator=gen).to(dtype).to(device)
    return Sample((x, w, _index(gen, b, j, n, device, _pick(gen, INDEX_DTYPES)), True))


def _fuse_invalid(gen, device):
    x = _tokens(gen, 2, 9, 4, torch.float32, device)
    w = torch.rand(2, 9, device=device)
    idx = _index(gen, 2, 2, 9, device)
    return [
        Invalid((x, w[:, :8], idx, True), ValueError, "weights must be"),
        Invalid((x, w, torch.tensor([[7], [9]], device=device), True), IndexError, r"fuse_tokens: idx must lie in \[0, 9\)"),
        Invalid((x, w, idx.float(), True), TypeError, "idx must have dtype"),
        Invalid((x[:, :, 0], w, idx, True), ValueError, "x must be 3-D"),
    ]


FUSE_TOKENS.cases(samples=_fuse_samples, random=_fuse_random, invalid=_fuse_invalid, grad_args=(0, 1))


# cls_attention -----------------------------------------------------------------------------


def _cls_samples(gen, device):
    q, k = _qkv(gen, 2, 3, 197, 8, torch.float32, device)
    q16, k16 = _qkv(gen, 2, 3, 2, 17, torch.float16, device)
    q1, k1 = _qkv(gen, 1, 1, 1, 32, torch.bfloat16, device)
    return [
        Sample((q, k, 8**-0.5, True), "timm's permuted qkv views, 197 tokens"),
        Sample((q, k, 8**-0.5, False), "raw logits (IdleViT)"),
        Sample((q16, k16, 17**-0.5, True), "fp16, two keys, d = 17"),
        Sample((q1, k1, 32**-0.5, True), "one key"),
    ]


def _cls_random(gen, device):
    b, h, n, d = _size(gen, 1, 3), _size(gen, 1, 4), _size(gen, 1, 64), _size(gen, 1, 32)
    q, k = _qkv(gen, b, h, n, d, _pick(gen, FLOAT_DTYPES), device)
    if _pick(gen, (False, True)):
        q, k = q.contiguous(), k.contiguous()
    return Sample((q, k, d**-0.5 * _pick(gen, (1.0, 0.3, 3.0)), _pick(gen, (True, False))))


def _cls_invalid(gen, device):
    q, k = _randn(gen, (2, 3, 4), device=device), _randn(gen, (2, 3, 9, 4), device=device)
    return [
        Invalid((q[:, :, :0], k[..., :0], 1.0, True), ValueError, "cls_attention: the head dim d must be >= 1"),
        Invalid((q, k[:, :, :0], 0.5, True), ValueError, "N >= 1"),
        Invalid((q, k[..., :3], 0.5, True), ValueError, r"k \[B, H, N, d\]"),
        Invalid((q, k, math.inf, True), ValueError, "scale must be finite"),
        Invalid((q, k.double(), 0.5, True), TypeError, "k must have dtype float32"),
    ]


CLS_ATTENTION.cases(samples=_cls_samples, random=_cls_random, invalid=_cls_invalid, grad_args=(0, 1))


# masked_softmax ----------------------------------------------------------------------------


def _masked_softmax_samples(gen, device):
    hard = (torch.rand(2, 9, generator=gen) < 0.6).float()
    hard[0, 1:] = 0  # every key but the query itself dropped
    logits = _randn(gen, (2, 3, 9, 9), torch.float32, device) * 3
    masked = logits.clone()
    masked[0, 1, 4] = -math.inf  # a fully masked row: the uniform 1/N
    masked[1, 0, 2, :5] = -math.inf
    q, k = _qkv(gen, 2, 2, 17, 8, torch.float16, device)
    return [
        Sample((logits, hard.to(device), 1e-6), "hard policy, a row keeping only itself"),
        Sample((masked, torch.rand(2, 9, generator=gen).to(device), 0.0), "-inf rows and keys, eps = 0"),
        Sample((masked, hard.to(device), 1e-6), "-inf rows and keys"),
        Sample(((k @ k.transpose(-1, -2)).float(), torch.rand(2, 17, generator=gen).to(device), 0.5),
               "logits from permuted keys"),
        Sample((_randn(gen, (1, 1, 197, 197), torch.bfloat16, device).transpose(-1, -2),
                torch.rand(1, 197, generator=gen).to(device), 1e-6), "transposed bf16 logits, N = 197"),
        Sample((_randn(gen, (3, 2, 1, 1), torch.float32, device), torch.zeros(3, 1, device=device), 1e-6), "N = 1"),
    ]


def _masked_softmax_random(gen, device):
    b, h, n = _size(gen, 1, 2), _size(gen, 1, 3), _size(gen, 1, 33)
    logits = _randn(gen, (b, h, n, n), _pick(gen, FLOAT_DTYPES), device) * _pick(gen, (1.0, 3.0, 10.0))
    if _pick(gen, (False, True)):
        logits = logits.transpose(-1, -2)
    policy = torch.rand(b, n, generator=gen)
    if _pick(gen, (False, True)):
        policy = (policy < 0.5).float()
    return Sample((logits, policy.to(device), _pick(gen, (0.0, 1e-6, 0.5))))


def _masked_softmax_invalid(gen, device):
    logits, policy = _randn(gen, (2, 3, 9, 9), device=device), torch.rand(2, 9, device=device)
    return [
        Invalid((logits, policy[:, :8], 1e-6), ValueError, r"policy must be \[B, N\]"),
        Invalid((logits[..., :8], policy, 1e-6), ValueError, r"\[B, H, N, N\]"),
        Invalid((logits, policy, -1e-6), ValueError, "eps must be finite and >= 0"),
        Invalid((logits, policy, math.nan), ValueError, "eps must be finite and >= 0"),
        Invalid((logits.to(torch.int32), policy, 1e-6), TypeError, "logits must have dtype"),
        Invalid((logits, policy[:1], 1e-6), ValueError, "policy has batch size 1 but logits has 2"),
    ]


MASKED_SOFTMAX.cases(samples=_masked_softmax_samples, random=_masked_softmax_random, invalid=_masked_softmax_invalid,
                     grad_args=(0, 1))


# bipartite_matching, merge_tokens ----------------------------------------------------------


def _reference_plan(metric: Tensor, r: int, class_token: bool, distill_token: bool = False) -> MergePlan:
    """The plan from the torch reference, whatever backend is forced around the caller."""
    b, n, _ = metric.shape
    r = _effective_r(n, r, class_token, distill_token)
    if r == 0:
        return MergePlan(*_identity_plan(b, n, metric.device))
    return MergePlan(*_merge_plan(*tome_match(metric, class_token, distill_token), n, r, class_token, distill_token))


def _clear_matching(metric: Tensor, r: int, class_token: bool, gap: float = 1e-4, distill_token: bool = False) -> bool:
    """Is the plan of this metric decided by margins > gap (so that backends summing in another
    order agree on it)? The order of the merged a-rows, the cut to the kept ones (and, without
    class_token, the order of the kept ones) and each merged row's best b-row."""
    b, n, _ = metric.shape
    r = _effective_r(n, r, class_token, distill_token)
    if r == 0:
        return True
    m = unit_rows(metric.detach().to("cpu", torch.float64))
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        if scores.shape[2] < 2:
            return False  # every a-row's scores are -inf: no clear best
        scores = scores[:, :, 1:]
    node_max = scores.max(-1).values
    ranked = node_max.sort(-1, descending=True).values
    checked = ranked[:, : r + 1] if class_token else ranked
    steps = checked[:, :-1] - checked[:, 1:]
    if bool((steps[torch.isfinite(steps)] <= gap).any()):
        return False
    if scores.shape[2] < 2:
        return True
    top2 = scores.topk(2, dim=-1).values
    merged = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[:, :r]
    return bool(((top2[..., 0] - top2[..., 1]).gather(1, merged) > gap).all())


def _clear_metric(gen, b, n, c, r, class_token, dtype, device, layout="contiguous", scale=1.0,
                  distill_token=False) -> Tensor:
    """A random metric whose plan :func:`_clear_matching` calls clear (redrawn until it is)."""
    for _ in range(200):
        metric = _tokens(gen, b, n, c, torch.float32, "cpu", layout) * scale
        metric = metric.to(dtype)
        if _clear_matching(metric, r, class_token, distill_token=distill_token):
            return metric.to(device)
    raise RuntimeError(f"no clear metric drawn for {(b, n, c)}, r = {r}")


def _matching_samples(gen, device):
    return [
        Sample((_clear_metric(gen, 2, 197, 16, 16, True, torch.float32, device), 16, True, True), "197 tokens, r = 16"),
        Sample((_clear_metric(gen, 2, 33, 8, 8, False, torch.float32, device, "permuted"), 8, False, True),
               "permuted metric, no class token"),
        Sample((_clear_metric(gen, 1, 17, 24, 5, True, torch.float32, device, scale=1e30), 5, True, True),
               "huge finite values"),
        Sample((_clear_metric(gen, 2, 9, 12, 100, True, torch.float16, device, "sliced"), 100, True, True),
               "r above the cap, fp16 slice"),
        Sample((_randn(gen, (1, 9, 4), torch.float32, device), 0, True, True), "r = 0 at batch size 1"),
        Sample((_randn(gen, (1, 2, 4), torch.float32, device), 3, True, True), "N too small to merge"),
        Sample((_randn(gen, (1, 1, 4), torch.float32, device), 1, False, True), "one token"),
        Sample((_clear_metric(gen, 2, 198, 16, 16, True, torch.float32, device, distill_token=True), 16, True, True,
                True), "distillation token (DeiT), 198 tokens, r = 16"),
        Sample((_clear_metric(gen, 2, 11, 8, 100, True, torch.float16, device, "permuted", distill_token=True), 100,
                True, True, True), "distillation token, r above the cap"),
    ]


def _matching_random(gen, device):
    b, n, c = _size(gen, 1, 3), _size(gen, 1, 64), _size(gen, 4, 32)
    r, class_token = _size(gen, 0, n), _pick(gen, (True, False))
    distill_token = class_token and n >= 4 and _pick(gen, (False, True))
    dtype = _pick(gen, FLOAT_DTYPES)
    layout = _pick(gen, ("contiguous", "permuted", "sliced"))
    metric = _clear_metric(gen, b, n, c, r, class_token, dtype, device, layout, distill_token=distill_token)
    return Sample((metric, r, class_token, True, distill_token))


def _matching_invalid(gen, device):
    metric = _randn(gen, (2, 9, 4), device=device)
    nan, inf = metric.clone(), metric.clone()
    nan[1, 3, 2] = math.nan
    inf[0, 0, 0] = -math.inf
    return [
        Invalid((metric, -1, True, True), ValueError, "r must be an integer >= 0"),
        Invalid((metric, 2, False, True, True), ValueError, "distill_token needs class_token"),
        Invalid((nan, 2, True, True), ValueError, "bipartite_matching: metric must be finite"),
        Invalid((inf, 2, False, True), ValueError, "metric must be finite"),
        Invalid((metric[0], 2, True, True), ValueError, "metric must be 3-D"),
        Invalid((metric.to(torch.int32), 2, True, True), TypeError, "metric must have dtype"),
    ]


MATCH.cases(samples=_matching_samples, random=_matching_random, invalid=_matching_invalid, exact=True)


def _merge_args(plan: MergePlan, x: Tensor, size: Tensor | None) -> tuple:
    return (x, size, plan.dest, plan.sources, plan.starts, True)


def _merge_samples(gen, device):
    plan = _reference_plan(_randn(gen, (2, 197, 8), device=device), 40, True)
    small = _reference_plan(_randn(gen, (2, 9, 4), device=device), 3, False)
    return [
        Sample(_merge_args(plan, _tokens(gen, 2, 197, 24, torch.float32, device),
                           torch.randint(1, 5, (2, 197), generator=gen).float().to(device)), "197 tokens, r = 40, sizes"),
        Sample(_merge_args(small, _tokens(gen, 2, 9, 6, torch.bfloat16, device, "permuted"),
                           torch.randint(1, 3, (2, 9), generator=gen).to(torch.bfloat16).to(device)),
               "permuted bf16 tokens, bf16 sizes"),
        Sample(_merge_args(small, _tokens(gen, 2, 9, 5, torch.float16, device, "sliced"),
                           (torch.rand(2, 18, generator=gen) + 0.5).to(device)[:, ::2]), "fp16 slice, strided sizes"),
        Sample(_merge_args(_reference_plan(_randn(gen, (1, 3, 4), device=device), 0, True),
                           _tokens(gen, 1, 3, 4, torch.float32, device), torch.ones(1, 3, device=device)),
               "identity plan"),
    ]


def _merge_random(gen, device):
    b, n, c = _size(gen, 1, 3), _size(gen, 1, 64), _size(gen, 1, 32)
    plan = _reference_plan(_randn(gen, (b, n, 4), device=device), _size(gen, 0, n), _pick(gen, (True, False)))
    dtype = _pick(gen, FLOAT_DTYPES)
    x = _tokens(gen, b, n, c, dtype, device, _pick(gen, ("contiguous", "permuted", "sliced")))
    size = _pick(gen, (None, (torch.rand(b, n, generator=gen) * 4 + 0.5).to(dtype).to(device)))
    return Sample(_merge_args(plan, x, size))


def _merge_invalid(gen, device):
    plan = _reference_plan(_randn(gen, (2, 9, 4), device=device), 3, True)
    x = _tokens(gen, 2, 9, 4, torch.float32, device)
    huge = plan.starts.clone()
    huge[0, 1] = 2**40  # the hand-edited plan that made the Triton loop run for minutes
    falling = plan.starts.clone()
    falling[1, 2] = falling[1, 1] - 1
    outside = plan.sources.clone()
    outside[0, 0] = 9
    repeated = plan.sources.clone()
    repeated[1, 1] = repeated[1, 0]
    wrong_dest = plan.dest.clone()
    wrong_dest[0] = wrong_dest[0].flip(0)
    far_dest = plan.dest.clone()
    far_dest[1, 4] = -3
    return [
        Invalid((x, None, plan.dest, plan.sources, huge, True), ValueError, "plan.starts must rise strictly"),
        Invalid((x, None, plan.dest, plan.sources, falling, True), ValueError, "plan.starts must rise strictly"),
        Invalid((x, None, plan.dest, outside, plan.starts, True), ValueError, "plan.sources must list every token"),
        Invalid((x, None, plan.dest, repeated, plan.starts, True), ValueError, "plan.sources must list every token"),
        Invalid((x, None, far_dest, plan.sources, plan.starts, True), ValueError, r"plan.dest must lie in \[0, 6\)"),
        Invalid((x, None, wrong_dest, plan.sources, plan.starts, True), ValueError, "plan.dest disagrees"),
        Invalid((_tokens(gen, 2, 11, 4, torch.float32, device), None, plan.dest, plan.sources, plan.starts, True),
                ValueError, "plan was made for"),
        Invalid((x, torch.ones(2, 8, device=device), plan.dest, plan.sources, plan.starts, True), ValueError,
                "size must be"),
        Invalid((x, None, plan.dest.int(), plan.sources, plan.starts, True), TypeError, "plan.dest must have dtype int64"),
        Invalid((x, -torch.ones(2, 9, device=device), plan.dest, plan.sources, plan.starts, True), ValueError,
                "size must be finite and > 0"),
    ]


MERGE.cases(samples=_merge_samples, random=_merge_random, invalid=_merge_invalid, grad_args=(0, 1))
