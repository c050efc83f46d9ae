"""Sparse token ops for dynamic token pruning, idling and merging (DynamicViT, EViT, IdleViT,
ToMe): gather/scatter of token rows, top-k token selection, EViT's fused token, CLS attention
without the N x N map, DynamicViT's policy-masked softmax and ToMe's bipartite matching/merging.

Layout of this module:

1. *Backend primitives* (``gather_rows``, ``scatter_rows``, ...): the torch backend, written for
   clarity. The Triton backend (:mod:`effkern.triton.tokens`) and the CUDA backend (gather and
   scatter only, ``csrc/tokens``) implement the same functions with the same signatures, on
   contiguous inputs that the public op has already validated.
2. *References* (``ref_*``): plain transcriptions of each public op's semantics, independent of
   the primitives; the tests' oracle.
3. *Public ops*: a typed function over a ``torch.library.custom_op`` (``effkern::<name>``) with
   a fake impl and, where differentiable, an autograd formula built from the same primitives.

Index tensors are int64 or int32 ``[B, K]``. Index checks (range, and repeats where they are an
error) need the indices on the host: ``validate=True`` (the default) reads one flag back from the
device per call, a synchronisation. ``validate=False`` skips it; the kernels still never read or
write out of bounds (an out-of-range index gathers a zero row and scatters nowhere), but the
result is then the caller's responsibility. effkern's own modules pass ``validate=False`` for
indices they produced themselves.

Scatter plans. Scatter-like kernels work per *output* row, so that each output row is written
once, by one program, deterministically: ``scatter_plan(idx, n)`` sorts the indices (stably) into
``order`` and CSR offsets ``starts`` [B, n + 1]; output row j of batch b receives
``y[b, order[b, starts[b, j]:starts[b, j + 1]]]`` in ascending k. Indices outside [0, n) fall in
no segment.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from effkern._dispatch import cuda_impl, op_dispatcher, triton_impl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch backend also runs float64, which gradcheck needs.
TORCH_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32)
NORM_EPS = 1e-12  # ToMe's metric normalisation guard (as F.normalize): zero rows stay zero


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for fp16/bf16/fp32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        acc = torch.cat([x.to(_acc_dtype(x.dtype)), x.new_zeros(b, 1, c, dtype=_acc_dtype(x.dtype))], 1)
        acc.scatter_add_(1, target[:, :, None].expand(b, k, c), y.to(acc.dtype))
        return acc[:, :n].to(x.dtype)
    counts = starts[:, 1:] - starts[:, :-1]
    last = order.gather(1, (starts[:, 1:] - 1).clamp(min=0)) if k else starts.new_zeros(b, n)
    from_y = y.gather(1, last[:, :, None].expand(b, n, c)) if k else x
    return torch.where((counts > 0)[:, :, None], from_y, x)


def weighted_sum_rows(x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
    """[B, 1, C]: sum over j of weights[b, idx[b, j]] * x[b, idx[b, j]], accumulated in float32
    (float64 for float64); an out-of-range index contributes nothing."""
    acc = _acc_dtype(x.dtype)
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
    acc = _acc_dtype(q.dtype)
    logits = torch.einsum("bhd,bhnd->bhn", q.to(acc), k.to(acc)) * scale
    p = torch.softmax(logits, dim=-1) if softmax else logits
    return p.mean(1).to(torch.float32 if acc == torch.float32 else acc)


def cls_attention_bwd(grad: Tensor, q: Tensor, k: Tensor, scale: float, softmax: bool) -> tuple[Tensor, Tensor]:
    """(dq, dk) for :func:`cls_attention_fwd`, recomputing the probabilities."""
    acc = _acc_dtype(q.dtype)
    qf, kf = q.to(acc), k.to(acc)
    dlogits = grad.to(acc)[:, None, :].expand(-1, q.shape[1], -1) / q.shape[1]
    if softmax:
        p = torch.softmax(torch.einsum("bhd,bhnd->bhn", qf, kf) * scale, dim=-1)
        dlogits = p * (dlogits - (p * dlogits).sum(-1, keepdim=True))
    dq = torch.einsum("bhn,bhnd->bhd", dlogits, kf) * scale
    dk = dlogits[..., None] * qf[:, :, None, :] * scale
    return dq.to(q.dtype), dk.to(k.dtype)


def _masked_softmax_parts(logits: Tensor, policy: Tensor, eps: float):
    """The fp32 (fp64 for fp64) pieces DynamicViT's softmax_with_policy computes."""
    acc = _acc_dtype(logits.dtype)
    a = logits.to(acc)
    n = a.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    g = torch.where(eye, torch.ones((), dtype=acc, device=a.device), policy.to(acc)[:, None, None, :])
    m = a.amax(-1, keepdim=True)
    s = torch.exp(a - m)
    big_a = s * g
    z = big_a.sum(-1, keepdim=True) + eps
    out = (big_a + eps / n) / z
    return a, eye, g, s, big_a, z, out


def masked_softmax_fwd(logits: Tensor, policy: Tensor, eps: float) -> Tensor:
    """DynamicViT's softmax_with_policy on [B, H, N, N] logits, returned in the input dtype."""
    return _masked_softmax_parts(logits, policy, eps)[-1].to(logits.dtype)


def masked_softmax_bwd(grad: Tensor, logits: Tensor, policy: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(d logits, d policy). The row max is a function of the logits too (the eps terms make the
    output depend on it): its gradient goes to the first maximal key, as torch.max's does."""
    a, eye, g, s, big_a, z, out = _masked_softmax_parts(logits, policy, eps)
    gr = grad.to(a.dtype)
    d_big_a = (gr - (gr * out).sum(-1, keepdim=True)) / z  # dL/dA_j
    d_logits = d_big_a * big_a
    d_max = -d_logits.sum(-1, keepdim=True)  # dL/dm, m = rowmax(a)
    first_max = torch.nn.functional.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
    d_logits = d_logits + first_max * d_max
    d_policy = (d_big_a * s).masked_fill(eye, 0).sum((1, 2))
    return d_logits.to(logits.dtype), d_policy.to(policy.dtype)


def tome_match(metric: Tensor, class_token: bool) -> tuple[Tensor, Tensor]:
    """ToMe's scores: rows of metric [B, N, C] L2-normalised (in float32, float64 for float64);
    a = even rows, b = odd rows; returns (node_max [B, ceil(N/2)], node_idx int64) = max and
    first argmax over b of a . b, with the CLS row of a at -inf when class_token. Needs N >= 2."""
    m = metric.to(_acc_dtype(metric.dtype))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
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
    acc = _acc_dtype(x.dtype)
    s = torch.ones(b, n, dtype=acc, device=x.device) if size is None else size.to(acc)
    num = torch.zeros(b, m, c, dtype=acc, device=x.device)
    num.scatter_add_(1, dest[:, :, None].expand(b, n, c), x.to(acc) * s[:, :, None])
    den = torch.zeros(b, m, dtype=acc, device=x.device).scatter_add_(1, dest, s)
    return (num / den[:, :, None]).to(x.dtype), den.to(torch.float32 if acc == torch.float32 else acc)


def segment_mean_rows_bwd(grad_out: Tensor, grad_size: Tensor | None, x: Tensor, size: Tensor | None,
                          out: Tensor, size_out: Tensor, dest: Tensor) -> tuple[Tensor, Tensor | None]:
    """(dx [B, N, C] in x's dtype, dsize [B, N] float32 or None when size is None) for
    :func:`segment_mean_rows`: with o = dest[r], dx_r = s_r g_o / S_o and
    dsize_r = g_o . (x_r - out_o) / S_o + gS_o (out_o: the saved, rounded output)."""
    acc = _acc_dtype(x.dtype)
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


def _check_tensor(op: str, name: str, t, dims: tuple[int, ...], dtypes=TORCH_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {' or '.join(_dtype_name(d) for d in dtypes)}, "
                        f"got {_dtype_name(t.dtype)}")


def _check_same(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor, batch: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if batch and t.shape[0] != ref.shape[0]:
        raise ValueError(f"{op}: {name} has batch size {t.shape[0]} but {ref_name} has {ref.shape[0]}")


def _check_index(op: str, idx, x: Tensor, name: str = "idx") -> None:
    _check_tensor(op, name, idx, (2,), INDEX_DTYPES)
    _check_same(op, name, idx, "x", x)


def _validate_index_values(op: str, idx: Tensor, n: int, name: str = "idx",
                           unique_counts: Tensor | None = None) -> None:
    """Range check of idx (and, given per-row hit counts, a repeat check): one host read."""
    if idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    flags = torch.stack([lo < 0, hi >= n] + ([] if unique_counts is None else [unique_counts.max() > 1]))
    bad = flags.tolist()
    if bad[0] or bad[1]:
        raise IndexError(f"{op}: {name} must lie in [0, {n}) (the token dimension of x), "
                         f"got values in [{int(lo)}, {int(hi)}]")
    if len(bad) > 2 and bad[2]:
        raise ValueError(f"{op}: {name} repeats a token within a batch row, which reduce='replace' "
                         f"cannot resolve; use reduce='add' or unique indices")


def _rows3d(x: Tensor) -> Tensor:
    """[B, N] -> [B, N, 1] view; [B, N, C] unchanged; contiguous."""
    return (x[:, :, None] if x.dim() == 2 else x).contiguous()


# ============================================================================================
# 3. Public ops
# ============================================================================================

# --------------------------------------------------------------------------------------------
# token_gather
# --------------------------------------------------------------------------------------------

_gather_dispatch = op_dispatcher("token_gather", "out[b, k] = x[b, idx[b, k]]")
_gather_dispatch.register("torch", gather_rows, dtypes=TORCH_DTYPES)
_gather_dispatch.register("triton", triton_impl("tokens", "gather_rows"), dtypes=FLOAT_DTYPES)
_gather_dispatch.register("cuda", cuda_impl("cuda_token_gather"), dtypes=FLOAT_DTYPES)


def _check_gather(x: Tensor, idx: Tensor) -> None:
    _check_tensor("token_gather", "x", x, (2, 3))
    _check_index("token_gather", idx, x)


@torch.library.custom_op("effkern::token_gather", mutates_args=())
def _token_gather_op(x: Tensor, idx: Tensor, validate: bool) -> Tensor:
    _check_gather(x, idx)
    if validate:
        _validate_index_values("token_gather", idx, x.shape[1])
    out = _gather_dispatch(_rows3d(x), idx.contiguous())
    return out[:, :, 0] if x.dim() == 2 else out


@_token_gather_op.register_fake
def _(x, idx, validate):
    _check_gather(x, idx)
    return x.new_empty((x.shape[0], idx.shape[1]) + tuple(x.shape[2:]))


def _token_gather_setup(ctx, inputs, output):
    x, idx, _ = inputs
    ctx.save_for_backward(idx)
    ctx.x_shape = x.shape


def _token_gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.x_shape)
    return torch.ops.effkern.token_scatter(zeros, grad, idx, "add", False), None, None


_token_gather_op.register_autograd(_token_gather_backward, setup_context=_token_gather_setup)


def token_gather(x: Tensor, idx: Tensor, *, validate: bool = True) -> Tensor:
    """Gather token rows: ``out[b, k] = x[b, idx[b, k]]``.

    Args:
        x: ``[B, N, C]`` or ``[B, N]``, float16/bfloat16/float32 (float64 on the torch backend).
        idx: ``[B, K]`` int64 or int32 token indices in [0, N); repeats allowed; K may be 0.
        validate: check idx's range on the host (one device sync). With False, an out-of-range
            index yields a zero row (no out-of-bounds access).

    Returns ``[B, K, C]`` (or ``[B, K]``) in x's dtype. Differentiable in x: the gradient is a
    scatter-add (repeated indices accumulate, in float32). Raises IndexError for indices out of
    range, ValueError/TypeError for bad shapes, devices or dtypes.
    """
    return torch.ops.effkern.token_gather(x, idx, validate)


# --------------------------------------------------------------------------------------------
# token_scatter
# --------------------------------------------------------------------------------------------


def _cuda_scatter(x, y, idx, order, starts, add):
    return torch.ops.effkern.cuda_token_scatter(x, y, order, starts, add)


_cuda_scatter.__name__ = "torch.ops.effkern.cuda_token_scatter"
_scatter_dispatch = op_dispatcher("token_scatter", "rows idx of x replaced by / increased by y")
_scatter_dispatch.register("torch", scatter_rows, dtypes=TORCH_DTYPES)
_scatter_dispatch.register("triton", triton_impl("tokens", "scatter_rows"), dtypes=FLOAT_DTYPES)
_scatter_dispatch.register("cuda", _cuda_scatter, dtypes=FLOAT_DTYPES)
SCATTER_REDUCTIONS = ("replace", "add")


def _check_scatter(x: Tensor, y: Tensor, idx: Tensor, reduce: str) -> None:
    op = "token_scatter"
    _check_tensor(op, "x", x, (2, 3))
    _check_tensor(op, "y", y, (x.dim(),), (x.dtype,))
    _check_same(op, "y", y, "x", x)
    _check_index(op, idx, x)
    if y.shape[1] != idx.shape[1] or y.shape[2:] != x.shape[2:]:
        raise ValueError(f"{op}: y must have shape [B, K{', C' if x.dim() == 3 else ''}] = "
                         f"{(x.shape[0], idx.shape[1]) + tuple(x.shape[2:])} for idx of shape "
                         f"{tuple(idx.shape)} and x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if reduce not in SCATTER_REDUCTIONS:
        raise ValueError(f"{op}: reduce must be 'replace' or 'add', got {reduce!r}")


@torch.library.custom_op("effkern::token_scatter", mutates_args=())
def _token_scatter_op(x: Tensor, y: Tensor, idx: Tensor, reduce: str, validate: bool) -> Tensor:
    _check_scatter(x, y, idx, reduce)
    order, starts = scatter_plan(idx, x.shape[1])
    if validate:
        counts = None if reduce == "add" else starts[:, 1:] - starts[:, :-1]
        _validate_index_values("token_scatter", idx, x.shape[1], unique_counts=counts)
    out = _scatter_dispatch(_rows3d(x), _rows3d(y), idx.contiguous(), order, starts, reduce == "add")
    return out[:, :, 0] if x.dim() == 2 else out


@_token_scatter_op.register_fake
def _(x, y, idx, reduce, validate):
    _check_scatter(x, y, idx, reduce)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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


_token_scatter_op.register_autograd(_token_scatter_backward, setup_context=_token_scatter_setup)


def token_scatter(x: Tensor, y: Tensor, idx: Tensor, *, reduce: str = "replace",
                  validate: bool = True) -> Tensor:
    """Out-of-place scatter of token rows: rows ``idx[b, k]`` of x replaced by (``"replace"``) or
    increased by (``"add"``) ``y[b, k]``; every other row passes through unchanged.

    Args:
        x: ``[B, N, C]`` or ``[B, N]``, float16/bfloat16/float32 (float64 on the torch backend).
        y: ``[B, K, C]`` (resp. ``[B, K]``), x's dtype.
        idx: ``[B, K]`` int64 or int32 indices in [0, N).
        reduce: ``"replace"`` (repeated indices are an error) or ``"add"`` (repeats accumulate;
            each output row is x plus its y rows summed in float32 in ascending k, rounded once).
        validate: check range (and, for replace, uniqueness) on the host: one device sync.
            With False, out-of-range indices are ignored and for repeated indices in replace
            mode the last k wins.

    Returns a new ``[B, N, C]`` tensor. Differentiable in x and y.
    """
    return torch.ops.effkern.token_scatter(x, y, idx, reduce, validate)


# --------------------------------------------------------------------------------------------
# topk_tokens
# --------------------------------------------------------------------------------------------

_topk_dispatch = op_dispatcher("topk_tokens", "top-k token positions (stable, ties to the lower)")
_topk_dispatch.register("torch", topk_rank, dtypes=TORCH_DTYPES)
# The Triton kernel ranks by all-pairs comparison, O(M^2) per row: beyond a few thousand tokens
# a sort (the torch backend) is faster.
TRITON_TOPK_MAX_M = 4096


def _triton_topk_limit(scores: Tensor, k: int, keep_cls: bool) -> list[str]:
    m = scores.shape[1]
    return [f"M = {m} > {TRITON_TOPK_MAX_M}: the all-pairs ranking kernel is slower than a sort"] if m > TRITON_TOPK_MAX_M else []


_topk_dispatch.register("triton", triton_impl("tokens", "topk_rank"), dtypes=FLOAT_DTYPES,
                        check=_triton_topk_limit)


def _check_topk(scores: Tensor, k: int, keep_cls: bool) -> None:
    _check_tensor("topk_tokens", "scores", scores, (2,))
    m = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= m:
        raise ValueError(f"topk_tokens: k must be an integer in [0, {m}] (the number of scored "
                         f"tokens), got {k!r}")


@torch.library.custom_op("effkern::topk_tokens", mutates_args=())
def _topk_tokens_op(scores: Tensor, k: int, keep_cls: bool) -> tuple[Tensor, Tensor]:
    _check_topk(scores, k, keep_cls)
    return _topk_dispatch(scores.contiguous(), k, keep_cls)


@_topk_tokens_op.register_fake
def _(scores, k, keep_cls):
    _check_topk(scores, k, keep_cls)
    b, m = scores.shape
    return (scores.new_empty((b, k + int(keep_cls)), dtype=torch.int64),
            scores.new_empty((b, m - k), dtype=torch.int64))


def topk_tokens(scores: Tensor, k: int, *, keep_cls: bool = True) -> tuple[Tensor, Tensor]:
    """Rank the M patch tokens of each batch row by score and split them into kept and dropped.

    Args:
        scores: ``[B, M]`` floating scores of the patch tokens (CLS excluded).
        k: how many to keep, in [0, M].
        keep_cls: prepend the CLS token (position 0) to the kept list and offset every patch
            position by 1, so the indices address ``[B, 1 + M, C]`` token tensors.

    Returns ``(keep_idx [B, k + keep_cls], drop_idx [B, M - k])``, int64. keep_idx: CLS first
    (with keep_cls), then the k best positions in descending score order (DynamicViT/EViT's
    order); drop_idx: the remaining positions in ascending order. Ties go to the lower position
    and NaN ranks above +inf (torch.sort's stable order), so the result is deterministic.
    Not differentiable.
    """
    return torch.ops.effkern.topk_tokens(scores, k, keep_cls)


# --------------------------------------------------------------------------------------------
# fuse_tokens
# --------------------------------------------------------------------------------------------

_fuse_dispatch = op_dispatcher("fuse_tokens", "EViT's fused token: sum_j w[idx_j] x[idx_j]")
_fuse_dispatch.register("torch", weighted_sum_rows, dtypes=TORCH_DTYPES)
_fuse_dispatch.register("triton", triton_impl("tokens", "weighted_sum_rows"), dtypes=FLOAT_DTYPES)


def _check_fuse(x: Tensor, weights: Tensor, idx: Tensor) -> None:
    op = "fuse_tokens"
    _check_tensor(op, "x", x, (3,))
    _check_tensor(op, "weights", weights, (2,))
    _check_same(op, "weights", weights, "x", x)
    if weights.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weights must be [B, N] = {tuple(x.shape[:2])}, got {tuple(weights.shape)}")
    _check_index(op, idx, x)


@torch.library.custom_op("effkern::fuse_tokens", mutates_args=())
def _fuse_tokens_op(x: Tensor, weights: Tensor, idx: Tensor, validate: bool) -> Tensor:
    _check_fuse(x, weights, idx)
    if validate:
        _validate_index_values("fuse_tokens", idx, x.shape[1])
    return _fuse_dispatch(x.contiguous(), weights.contiguous(), idx.contiguous())


@_fuse_tokens_op.register_fake
def _(x, weights, idx, validate):
    _check_fuse(x, weights, idx)
    return x.new_empty((x.shape[0], 1, x.shape[2]))


def _fuse_tokens_setup(ctx, inputs, output):
    x, weights, idx, _ = inputs
    ctx.save_for_backward(x, weights, idx)


def _fuse_tokens_backward(ctx, grad):
    x, weights, idx = ctx.saved_tensors
    acc = _acc_dtype(x.dtype)
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


_fuse_tokens_op.register_autograd(_fuse_tokens_backward, setup_context=_fuse_tokens_setup)


def fuse_tokens(x: Tensor, weights: Tensor, idx: Tensor, *, validate: bool = True) -> Tensor:
    """EViT's fused token: ``sum_j weights[b, idx[b, j]] * x[b, idx[b, j]]``, not renormalised.

    Args:
        x: ``[B, N, C]`` tokens; weights: ``[B, N]`` per-token weights (e.g. CLS attention, in
            the same token positions as x); idx: ``[B, J]`` the tokens to fuse (J may be 0).
        validate: range-check idx on the host (one device sync).

    Returns ``[B, 1, C]`` in x's dtype, accumulated in float32. Differentiable in x and weights.
    """
    return torch.ops.effkern.fuse_tokens(x, weights, idx, validate)


# --------------------------------------------------------------------------------------------
# cls_attention
# --------------------------------------------------------------------------------------------

_cls_dispatch = op_dispatcher("cls_attention", "head-mean CLS attention over keys, no N x N map")
_cls_dispatch.register("torch", cls_attention_fwd, dtypes=TORCH_DTYPES)
_cls_dispatch.register("triton", triton_impl("token_attention", "cls_attention_fwd"), dtypes=FLOAT_DTYPES)
_cls_bwd_dispatch = op_dispatcher("cls_attention_backward", "gradient of cls_attention")
_cls_bwd_dispatch.register("torch", cls_attention_bwd, dtypes=TORCH_DTYPES)
_cls_bwd_dispatch.register("triton", triton_impl("token_attention", "cls_attention_bwd"),
                           dtypes=(torch.float32,))


def _check_cls_attention(q: Tensor, k: Tensor, scale: float) -> None:
    op = "cls_attention"
    _check_tensor(op, "q", q, (3,))
    _check_tensor(op, "k", k, (4,), (q.dtype,))
    _check_same(op, "k", k, "q", q)
    if k.shape[1] != q.shape[1] or k.shape[3] != q.shape[2] or k.shape[2] == 0:
        raise ValueError(f"{op}: q must be [B, H, d] and k [B, H, N, d] with N >= 1, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale!r}")


@torch.library.custom_op("effkern::cls_attention", mutates_args=())
def _cls_attention_op(q: Tensor, k: Tensor, scale: float, softmax: bool) -> Tensor:
    _check_cls_attention(q, k, scale)
    return _cls_dispatch(q.contiguous(), k.contiguous(), scale, softmax)


@_cls_attention_op.register_fake
def _(q, k, scale, softmax):
    _check_cls_attention(q, k, scale)
    return q.new_empty((k.shape[0], k.shape[2]), dtype=_acc_dtype(q.dtype))


def _cls_attention_setup(ctx, inputs, output):
    q, k, scale, softmax = inputs
    ctx.save_for_backward(q, k)
    ctx.scale, ctx.softmax = scale, softmax


# The backward formulas call their kernels through custom ops too, so that torch.compile traces
# them with fake tensors instead of running a kernel on them.
@torch.library.custom_op("effkern::cls_attention_backward", mutates_args=())
def _cls_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, scale: float, softmax: bool) -> tuple[Tensor, Tensor]:
    return _cls_bwd_dispatch(grad.contiguous(), q.contiguous(), k.contiguous(), scale, softmax)


@_cls_attention_backward_op.register_fake
def _(grad, q, k, scale, softmax):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def _cls_attention_backward(ctx, grad):
    q, k = ctx.saved_tensors
    dq, dk = torch.ops.effkern.cls_attention_backward(grad, q, k, ctx.scale, ctx.softmax)
    return dq, dk, None, None


_cls_attention_op.register_autograd(_cls_attention_backward, setup_context=_cls_attention_setup)


def cls_attention(q: Tensor, k: Tensor, *, scale: float | None = None, softmax: bool = True) -> Tensor:
    """The CLS token's attention to every token, averaged over heads (EViT's token score).

    Args:
        q: ``[B, H, d]`` the CLS query of each head; k: ``[B, H, N, d]`` all keys (CLS included).
        scale: logit scale, default ``d ** -0.5``.
        softmax: True: ``mean_h softmax_n(scale * q_h . k_hn)`` (EViT); False: the head-mean of
            the raw scaled logits (IdleViT ranks by those).

    Returns ``[B, N]`` float32 (float64 for float64 inputs): computed in float32 from any
    input dtype, since bf16 scores would tie too often to rank. Never builds an N x N map.
    Differentiable in q and k.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if isinstance(q, Tensor) and q.dim() == 3 else 1.0
    return torch.ops.effkern.cls_attention(q, k, float(scale), softmax)


# --------------------------------------------------------------------------------------------
# masked_softmax
# --------------------------------------------------------------------------------------------

_msoftmax_dispatch = op_dispatcher("masked_softmax", "DynamicViT's policy-masked softmax")
_msoftmax_dispatch.register("torch", masked_softmax_fwd, dtypes=TORCH_DTYPES)
# The Triton forward numbers rows (B * H * N of them) in int32.
TRITON_MASKED_SOFTMAX_MAX_ROWS = 2**31 - 1 - 4096


def _triton_masked_softmax_rows(logits: Tensor, policy: Tensor, eps: float) -> list[str]:
    rows = logits.shape[0] * logits.shape[1] * logits.shape[2]
    return [f"{rows} rows exceed {TRITON_MASKED_SOFTMAX_MAX_ROWS}"] if rows > TRITON_MASKED_SOFTMAX_MAX_ROWS else []


_msoftmax_dispatch.register("triton", triton_impl("token_attention", "masked_softmax_fwd"), dtypes=FLOAT_DTYPES,
                            check=_triton_masked_softmax_rows)
_msoftmax_bwd_dispatch = op_dispatcher("masked_softmax_backward", "gradient of masked_softmax")
_msoftmax_bwd_dispatch.register("torch", masked_softmax_bwd, dtypes=TORCH_DTYPES)
_msoftmax_bwd_dispatch.register("triton", triton_impl("token_attention", "masked_softmax_bwd"),
                                dtypes=FLOAT_DTYPES)


def _check_masked_softmax(logits: Tensor, policy: Tensor, eps: float) -> None:
    op = "masked_softmax"
    _check_tensor(op, "logits", logits, (4,))
    _check_tensor(op, "policy", policy, (2,))
    _check_same(op, "policy", policy, "logits", logits)
    b, _, n, n2 = logits.shape
    if n != n2 or n == 0:
        raise ValueError(f"{op}: logits must be [B, H, N, N] with N >= 1, got {tuple(logits.shape)}")
    if tuple(policy.shape) != (b, n):
        raise ValueError(f"{op}: policy must be [B, N] = {(b, n)}, got {tuple(policy.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps!r}")


@torch.library.custom_op("effkern::masked_softmax", mutates_args=())
def _masked_softmax_op(logits: Tensor, policy: Tensor, eps: float) -> Tensor:
    _check_masked_softmax(logits, policy, eps)
    return _msoftmax_dispatch(logits.contiguous(), policy.to(_acc_dtype(logits.dtype)).contiguous(), eps)


@_masked_softmax_op.register_fake
def _(logits, policy, eps):
    _check_masked_softmax(logits, policy, eps)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _masked_softmax_setup(ctx, inputs, output):
    logits, policy, eps = inputs
    ctx.save_for_backward(logits, policy)
    ctx.eps = eps


@torch.library.custom_op("effkern::masked_softmax_backward", mutates_args=())
def _masked_softmax_backward_op(grad: Tensor, logits: Tensor, policy: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _msoftmax_bwd_dispatch(grad.contiguous(), logits.contiguous(), policy.contiguous(), eps)


@_masked_softmax_backward_op.register_fake
def _(grad, logits, policy, eps):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(policy)


def _masked_softmax_backward(ctx, grad):
    logits, policy = ctx.saved_tensors
    d_logits, d_policy = torch.ops.effkern.masked_softmax_backward(
        grad, logits, policy.to(_acc_dtype(logits.dtype)), ctx.eps)
    return d_logits, d_policy.to(policy.dtype), None


_masked_softmax_op.register_autograd(_masked_softmax_backward, setup_context=_masked_softmax_setup)


def masked_softmax(logits: Tensor, policy: Tensor, *, eps: float = 1e-6) -> Tensor:
    """DynamicViT's training-time attention softmax with a token keep policy.

    Args:
        logits: ``[B, H, N, N]`` attention logits.
        policy: ``[B, N]`` (or DynamicViT's ``[B, N, 1]``) keep decisions in [0, 1]; key j is
            kept where policy is 1. Each query always keeps itself.
        eps: DynamicViT's stabiliser.

    With G[i, j] = policy[j] except G[i, i] = 1 and A = exp(a - rowmax(a)) * G (the max over
    all keys): ``out = (A + eps / N) / (sum_j A + eps)``, computed in float32 and returned in
    the logits' dtype. Differentiable in logits and policy (the row max's own gradient, which
    the eps terms make nonzero, goes to the first maximal key, as torch.max's does).
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


_match_dispatch = op_dispatcher("bipartite_matching", "ToMe bipartite soft matching")
_match_dispatch.register("torch", tome_match, dtypes=TORCH_DTYPES)
_match_dispatch.register("triton", triton_impl("token_attention", "tome_match"), dtypes=FLOAT_DTYPES)


def _effective_r(n: int, r: int, class_token: bool) -> int:
    """ToMe caps r so that at most half of the unprotected tokens are merged."""
    return max(0, min(r, (n - int(class_token)) // 2))


def _check_matching(metric: Tensor, r: int) -> None:
    _check_tensor("bipartite_matching", "metric", metric, (3,))
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"bipartite_matching: r must be an integer >= 0, got {r!r}")


@torch.library.custom_op("effkern::bipartite_matching", mutates_args=())
def _bipartite_matching_op(metric: Tensor, r: int, class_token: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_matching(metric, r)
    b, n, _ = metric.shape
    r = _effective_r(n, r, class_token)
    dev = metric.device
    ar = torch.arange(n, device=dev).expand(b, n)
    if r == 0:
        ta = (n + 1) // 2
        empty = torch.empty(b, 0, dtype=torch.int64, device=dev)
        return (ar[:, :ta].contiguous(), empty, empty.clone(), ar.contiguous(), ar.contiguous(),
                torch.arange(n + 1, device=dev).expand(b, n + 1).contiguous())
    node_max, node_idx = _match_dispatch(metric.contiguous(), class_token)
    ta, tb = (n + 1) // 2, n // 2
    u = ta - r  # a-rows kept
    edge = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    unm_idx, src_idx = edge[:, r:], edge[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    if class_token:  # keep the class token first
        unm_idx = unm_idx.sort(dim=1).values
    dest = torch.empty(b, n, dtype=torch.int64, device=dev)
    dest.scatter_(1, 2 * unm_idx, ar[:, :u])
    dest[:, 1::2] = u + ar[:, :tb]
    dest.scatter_(1, 2 * src_idx, u + dst_idx)
    sources, starts = scatter_plan(dest, u + tb)
    # clone: the slices of `edge` may share its storage, and custom op outputs must not alias
    return unm_idx.clone(), src_idx.clone(), dst_idx, dest, sources, starts


@_bipartite_matching_op.register_fake
def _(metric, r, class_token):
    _check_matching(metric, r)
    b, n, _ = metric.shape
    r = _effective_r(n, r, class_token)
    ta = (n + 1) // 2

    def new(*shape):
        return metric.new_empty(shape, dtype=torch.int64)

    return new(b, ta - r), new(b, r), new(b, r), new(b, n), new(b, n), new(b, n - r + 1)


def bipartite_matching(metric: Tensor, r: int, *, class_token: bool = True) -> MergePlan:
    """ToMe's bipartite soft matching: which r tokens to merge into which.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe: the head-mean of the keys).
        r: tokens to remove; capped at ``(N - class_token) // 2``.
        class_token: protect token 0 (its a-row scores -inf, and it stays first).

    Semantics (ToMe's): rows L2-normalised (computed in float32; a zero row stays zero);
    a = even positions, b = odd positions; scores = a b^T; each a-row's best b (max, first
    argmax); a-rows sorted by that max, descending (stable: ties to the lower position); the
    first r are merged into their best b, the rest kept (re-sorted by position with
    class_token). Merged order: kept a-rows, then all b-rows. Returns a :class:`MergePlan`
    (not differentiable) for :func:`merge_tokens` and :func:`unmerge_tokens`.
    """
    return MergePlan(*torch.ops.effkern.bipartite_matching(metric, r, class_token))


_merge_dispatch = op_dispatcher("merge_tokens", "ToMe's size-weighted token merge")
_merge_dispatch.register("torch", segment_mean_rows, dtypes=TORCH_DTYPES)
_merge_dispatch.register("triton", triton_impl("tokens", "segment_mean_rows"), dtypes=FLOAT_DTYPES)
_merge_bwd_dispatch = op_dispatcher("merge_tokens_backward", "gradient of merge_tokens")
_merge_bwd_dispatch.register("torch", segment_mean_rows_bwd, dtypes=TORCH_DTYPES)
_merge_bwd_dispatch.register("triton", triton_impl("tokens", "segment_mean_rows_bwd"), dtypes=FLOAT_DTYPES)


def _check_merge(x: Tensor, size: Tensor | None, dest: Tensor, sources: Tensor, starts: Tensor) -> None:
    op = "merge_tokens"
    _check_tensor(op, "x", x, (3,))
    for name, t in (("plan.dest", dest), ("plan.sources", sources), ("plan.starts", starts)):
        _check_tensor(op, name, t, (2,), (torch.int64,))
        _check_same(op, name, t, "x", x)
    if dest.shape != x.shape[:2] or sources.shape != x.shape[:2] or not 2 <= starts.shape[1] <= x.shape[1] + 1:
        raise ValueError(f"{op}: the plan was made for {tuple(dest.shape)} tokens, x is {tuple(x.shape)}")
    if size is not None:
        _check_tensor(op, "size", size, (2,))
        _check_same(op, "size", size, "x", x)
        if size.shape != x.shape[:2]:
            raise ValueError(f"{op}: size must be [B, N, 1] or [B, N] = {tuple(x.shape[:2])}, got {tuple(size.shape)}")


@torch.library.custom_op("effkern::merge_tokens", mutates_args=())
def _merge_tokens_op(x: Tensor, size: Tensor | None, dest: Tensor, sources: Tensor,
                     starts: Tensor) -> tuple[Tensor, Tensor]:
    _check_merge(x, size, dest, sources, starts)
    size32 = None if size is None else size.to(_acc_dtype(x.dtype)).contiguous()
    return _merge_dispatch(x.contiguous(), size32, dest.contiguous(), sources.contiguous(), starts.contiguous())


@_merge_tokens_op.register_fake
def _(x, size, dest, sources, starts):
    _check_merge(x, size, dest, sources, starts)
    m = starts.shape[1] - 1
    return x.new_empty((x.shape[0], m, x.shape[2])), x.new_empty((x.shape[0], m), dtype=_acc_dtype(x.dtype))


def _merge_tokens_setup(ctx, inputs, output):
    x, size, dest, _, _ = inputs
    out, size_out = output
    ctx.has_size = size is not None
    ctx.save_for_backward(x, size, dest, out, size_out)


@torch.library.custom_op("effkern::merge_tokens_backward", mutates_args=())
def _merge_tokens_backward_op(grad_out: Tensor, grad_size: Tensor | None, x: Tensor, size: Tensor | None,
                              out: Tensor, size_out: Tensor, dest: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dsize); dsize is an empty tensor when size is None (custom ops return no None)."""
    dx, dsize = _merge_bwd_dispatch(grad_out.contiguous(), None if grad_size is None else grad_size.contiguous(),
                                    x.contiguous(), size, out.contiguous(), size_out.contiguous(), dest.contiguous())
    return dx, size_out.new_empty(0) if dsize is None else dsize


@_merge_tokens_backward_op.register_fake
def _(grad_out, grad_size, x, size, out, size_out, dest):
    dsize = size_out.new_empty(0) if size is None else size_out.new_empty(dest.shape)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dsize


def _merge_tokens_backward(ctx, grad_out, grad_size):
    x, size, dest, out, size_out = ctx.saved_tensors
    size_acc = size.to(_acc_dtype(x.dtype)).contiguous() if ctx.has_size else None
    dx, dsize = torch.ops.effkern.merge_tokens_backward(grad_out, grad_size, x, size_acc, out, size_out, dest)
    return dx, (dsize.to(size.dtype) if ctx.has_size else None), None, None, None


_merge_tokens_op.register_autograd(_merge_tokens_backward, setup_context=_merge_tokens_setup)


def merge_tokens(plan: MergePlan, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted merge along a :class:`MergePlan`.

    ``x' = merge(x * s, sum) / merge(s, sum)`` and ``s' = merge(s, sum)`` with s = size (1
    when None), accumulated in float32 and rounded once.

    Args:
        plan: from :func:`bipartite_matching` on the same B and N.
        x: ``[B, N, C]`` tokens; size: ``[B, N, 1]`` (ToMe's) or ``[B, N]`` positive token sizes.

    Returns ``(x_merged [B, N - r, C], size_merged [B, N - r, 1])``, size_merged in size's dtype
    (x's when size is None). Differentiable in x and size.
    """
    size2 = size[..., 0] if isinstance(size, Tensor) and size.dim() == 3 and size.shape[-1] == 1 else size
    out, size_out = torch.ops.effkern.merge_tokens(x, size2, plan.dest, plan.sources, plan.starts)
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
