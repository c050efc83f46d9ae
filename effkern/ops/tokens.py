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
