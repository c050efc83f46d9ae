"""2:4 structured-sparse int8 GEMM (GPUSQ-ViT): int8 activations times int8 weights of which at
most two of every four consecutive input features are non-zero, the layout sparse tensor cores
(``mma.sp``) multiply at twice the dense rate.

The weight is stored compressed, as a :class:`Sparse24Weight`:

* ``values`` int8 ``[N, K/2]``: the two kept values of each group of four along K, in k order;
* ``meta`` uint8 ``[N, K/8]``: the two kept positions ``i0 < i1`` (in 0..3) of each group,
  packed by :func:`pack_meta` (read back by :func:`unpack_meta`). This is the layout the sparse
  tensor-core instruction reads: for ``mma.sp`` m16n8k64 s8 each lane's 32-bit metadata operand
  is four consecutive bytes of one row (kernels/sparse24/sparse24_gemm.cuh; the PTX ISA's
  mapping is emulated and tested in tests/sparse_mma_emulation.py), so the CUDA kernel loads it
  as stored;
* ``scale`` float32 ``[N]``: symmetric per-output-channel weight scale;
* ``in_features`` K, a multiple of 8 (whole meta bytes).

Op :func:`sparse24_int8_linear`: exact int32 accumulation, then either the int32 result (plus a
saturating int32 bias) or a float32 epilogue -- dequantise, bias, activation -- rounded to
bf16 / fp16 / fp32 or requantised to int8. The float order of the epilogue is part of the
contract (see the function's docstring): every backend follows it to the bit.
"""

from __future__ import annotations

# The public API (effkern.ops re-exports it).
__all__ = ["Sparse24Weight", "mask_2to4", "pack_meta", "prune_2to4", "sparse24_int8_linear", "unpack_meta"]

from dataclasses import dataclass

import torch
from torch import Tensor

from effkern._common import (
    INT32_MAX,
    MAX_INT8_LINEAR_K,
    TORCH_FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    dtype_name,
    validation_enabled,
)
from effkern._registry import (
    Invalid,
    Sample,
    cuda_kernel,
    define_op,
    torch_kernel,
    triton_kernel,
)

FAMILY = "sparse24"
OUT_DTYPES = (torch.int32, torch.int8, torch.bfloat16, torch.float16, torch.float32)
ACTIVATIONS = (None, "relu", "gelu")
GELU_C = 0.7071067811865476  # 1 / sqrt(2), rounded to float32 where it is used


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


def _groups_of_four(op: str, w: Tensor) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"{op}: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 0 or w.shape[-1] % 4:
        raise ValueError(f"{op}: the last dim of w (K) must be a multiple of 4, got shape {tuple(w.shape)}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)


def _kept_positions(g: Tensor) -> Tensor:
    """int64 ``[..., 2]``: the positions of the two largest |g| of each group (last dim of 4),
    ascending; ties go to the lower index. Ranked by pairwise comparison (no sort, whose tie
    order is not guaranteed): element i beats j when |g_i| > |g_j|, or equal and i < j."""
    if g.is_floating_point():
        a = torch.nan_to_num(g.abs(), nan=float("inf"))  # a NaN is kept (it shows), not silently dropped
    else:
        a = g.to(torch.int64).abs()  # |-128| overflows int8
    idx = torch.arange(4, device=g.device)
    ai, aj = a.unsqueeze(-1), a.unsqueeze(-2)  # [..., 4 (i), 1], [..., 1, 4 (j)]
    beats = (ai > aj) | ((ai == aj) & (idx[:, None] < idx[None, :]))
    rank = beats.sum(-1)  # how many of the other three each element beats
    keep = rank >= 2  # exactly two per group: ranks are a permutation of 0..3
    # ascending positions of the two kept ones: i0 is the first kept, i1 the last
    pos = torch.where(keep, idx, 4)
    i0 = pos.amin(-1)
    i1 = torch.where(keep, idx, -1).amax(-1)
    return torch.stack([i0, i1], dim=-1)


def mask_2to4(w: Tensor) -> Tensor:
    """bool, w's shape: True at the two largest |w| of each group of four consecutive elements
    along the last dim (ties: the lower index wins). K % 4 == 0."""
    g = _groups_of_four("mask_2to4", w)
    pos = _kept_positions(g)
    idx = torch.arange(4, device=w.device)
    mask = (idx == pos[..., :1]) | (idx == pos[..., 1:])
    return mask.reshape(w.shape)


def prune_2to4(w: Tensor) -> Tensor:
    """w with the two smallest |w| of each group of four along the last dim zeroed (see
    :func:`mask_2to4`); same dtype and shape."""
    _groups_of_four("prune_2to4", w)
    return torch.where(mask_2to4(w), w, torch.zeros_like(w))


# --------------------------------------------------------------------------------------------
# The meta layout: the only place that knows it
# --------------------------------------------------------------------------------------------


def pack_meta(positions: Tensor) -> Tensor:
    """uint8 ``[N, K/8]`` from the kept positions, int ``[N, K/4, 2]`` (i0 < i1 in 0..3 per
    group). Group c's nibble is ``i0 | (i1 << 2)``; byte j holds group 2j in its low nibble and
    group 2j + 1 in its high nibble: the layout mma.sp reads (module docstring). The Triton
    decoder effkern.triton.sparse24._meta_positions and the CUDA kernel read it too."""
    n, groups, _ = positions.shape
    p = positions.to(torch.int32)
    nib = (p[..., 0] | (p[..., 1] << 2)).reshape(n, groups // 2, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)


def unpack_meta(meta: Tensor) -> Tensor:
    """int64 ``[N, K/4, 2]``: the positions (i0, i1) of each group (the inverse of pack_meta)."""
    b = meta.to(torch.int64)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(meta.shape[0], -1)  # group 2j, 2j + 1
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def decompress_values(values: Tensor, meta: Tensor) -> Tensor:
    """Dense ``[N, K]`` (values' dtype) from values ``[N, K/2]`` and meta. Position p of group c
    takes value 2c if p == i0, else value 2c + 1 if p == i1, else 0 -- the rule every backend
    decodes with, so that even an invalid nibble (i0 == i1) decodes alike everywhere."""
    n = values.shape[0]
    pos = unpack_meta(meta)  # [N, G, 2]
    v = values.reshape(n, -1, 2)
    p = torch.arange(4, device=values.device)
    i0, i1 = pos[..., :1], pos[..., 1:]  # [N, G, 1]
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    dense = torch.where(p == i0, v[..., :1], torch.where(p == i1, v[..., 1:], zero))
    return dense.reshape(n, -1)


def _invalid_nibbles(meta: Tensor) -> Tensor:
    pos = unpack_meta(meta)
    return pos[..., 0] >= pos[..., 1]


# --------------------------------------------------------------------------------------------
# The weight
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sparse24Weight:
    """A 2:4-sparse int8 weight ``[out_features, in_features]`` with per-channel scales
    (module docstring). Build one with :meth:`from_float`, :meth:`from_linear` or
    :meth:`from_int8`; :meth:`decompress` gives the dense int8 weight back, exactly."""

    values: Tensor
    meta: Tensor
    scale: Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def decompress(self) -> Tensor:
        """int8 ``[N, K]``."""
        return decompress_values(self.values, self.meta)

    def dequantize(self) -> Tensor:
        """float32 ``[N, K]``: decompress() * scale[n]."""
        return self.decompress().to(torch.float32) * self.scale[:, None]

    def to(self, device) -> Sparse24Weight:
        return Sparse24Weight(self.values.to(device), self.meta.to(device), self.scale.to(device), self.in_features)

    @classmethod
    def _from_dense(cls, q: Tensor, scale: Tensor) -> Sparse24Weight:
        """Compress int8 ``q`` (2:4 already checked): positions of each group's nonzeros, padded
        with the lowest free positions when a group has fewer than two."""
        n, k = q.shape
        g = q.reshape(n, k // 4, 4)
        nz = g != 0
        idx = torch.arange(4, device=q.device)
        # Rank positions: nonzeros first, then zeros, each in index order; keep the first two.
        order = torch.where(nz, idx, idx + 4).sort(dim=-1).values[..., :2] % 4
        pos = order.sort(dim=-1).values  # i0 < i1
        values = torch.gather(g, -1, pos).reshape(n, k // 2)
        return cls(values.contiguous(), pack_meta(pos).contiguous(), scale.to(torch.float32).contiguous(), k)

    @classmethod
    def from_int8(cls, w_int8: Tensor, scale: Tensor) -> Sparse24Weight:
        """From a dense int8 ``[N, K]`` weight already 2:4 sparse (at most two nonzeros in every
        group of four along K; K % 8 == 0) and its float32 per-channel scale ``[N]``."""
        op = "Sparse24Weight.from_int8"
        check_tensor(op, "w_int8", w_int8, dims=(2,), dtypes=(torch.int8,))
        n, k = w_int8.shape
        if k % 8:
            raise ValueError(f"{op}: in_features (K={k}) must be a multiple of 8 (whole meta bytes)")
        check_tensor(op, "scale", scale, dims=(1,), dtypes=TORCH_FLOAT_DTYPES)
        if tuple(scale.shape) != (n,):
            raise ValueError(f"{op}: scale must have shape ({n},) (one per output channel), got {tuple(scale.shape)}")
        check_same_device(op, "scale", scale, "w_int8", w_int8)
        counts = (w_int8.reshape(n, k // 4, 4) != 0).sum(-1)
        bad = (counts > 2).nonzero()
        if bad.numel():
            row, group = (int(v) for v in bad[0])
            raise ValueError(f"{op}: w_int8 is not 2:4 sparse: row {row}, group {group} (k = {4 * group}..{4 * group + 3}) "
                             f"has {int(counts[row, group])} nonzeros (at most 2 of every 4 consecutive)")
        return cls._from_dense(w_int8, scale)

    @classmethod
    def from_float(cls, w: Tensor) -> Sparse24Weight:
        """prune_2to4(w), then symmetric per-channel int8: scale[n] = max|w_pruned[n]| / 127 (1 for
        an all-zero row), q = clamp(round_half_even(w_pruned / scale), -127, 127), in float32."""
        op = "Sparse24Weight.from_float"
        check_tensor(op, "w", w, dims=(2,), dtypes=TORCH_FLOAT_DTYPES)
        if w.shape[1] % 8:
            raise ValueError(f"{op}: in_features (K={w.shape[1]}) must be a multiple of 8 (whole meta bytes)")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{op}: w must be finite")
        wp = prune_2to4(w.detach()).to(torch.float32)
        amax = wp.abs().amax(dim=1) if wp.shape[1] else wp.new_zeros(wp.shape[0])
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.round(wp / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls._from_dense(q, scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Sparse24Weight:
        """:meth:`from_float` of ``linear.weight`` (the bias is the caller's: pass it to the op)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Sparse24Weight.from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls.from_float(linear.weight)


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


def _int64_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x [M, K] @ w[N, K]^T in exact int64 (never through floats). CUDA has no int64 matmul:
    there the products are summed in K chunks that keep the [M, N, chunk] block small."""
    x64, w64 = x.to(torch.int64), w.to(torch.int64)
    if x.device.type == "cpu":
        return x64 @ w64.T
    m, k = x.shape
    n = w.shape[0]
    acc = torch.zeros((m, n), dtype=torch.int64, device=x.device)
    chunk = max(1, min(k, 2**26 // max(1, m * n)))
    for k0 in range(0, k, chunk):
        acc += (x64[:, None, k0:k0 + chunk] * w64[None, :, k0:k0 + chunk]).sum(-1)
    return acc


def ref_sparse24_int8_linear_rows(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, bias: Tensor | None,
                                  x_scale: Tensor, inv_out: Tensor | None, in_features: int,
                                  out_dtype: torch.dtype, activation: str | None) -> Tensor:
    """Reference. x int8 [M, K] contiguous; x_scale float32 [M] (one per row); inv_out float32
    [1] or [N] (= 1 / out_scale, int8 output only). The epilogue of sparse24_int8_linear's
    docstring, step by step in float32."""
    acc = _int64_matmul(x, decompress_values(values, meta))
    if out_dtype == torch.int32:
        if bias is not None:
            acc = acc + bias.to(torch.int64)
        return acc.clamp(-(2**31), INT32_MAX).to(torch.int32)
    s = x_scale[:, None] * scale[None, :]  # float32 product, rounded once
    v = acc.to(torch.float32) * s
    if bias is not None:
        v = v + bias[None, :]
    if activation == "relu":
        v = torch.clamp_min(v, 0.0)
    elif activation == "gelu":
        v = 0.5 * v * (1 + torch.erf(v * GELU_C))
    if out_dtype == torch.int8:
        return torch.round(v * inv_out[None, :]).clamp(-128, 127).to(torch.int8)
    return v.to(out_dtype)


def _per_token_ok(x_scale: Tensor, x: Tensor) -> bool:
    lead = tuple(x.shape[:-1])
    if tuple(x_scale.shape) == lead:  # [M] for rows, [B, T] for [B, T, K]
        return True
    if x_scale.dim() != x.dim() or x_scale.shape[-1] != 1:
        return False
    return all(s in (1, d) for s, d in zip(x_scale.shape[:-1], lead))  # broadcastable [..., 1]


def _check_scale_arg(op: str, name: str, t: Tensor, x: Tensor) -> None:
    check_tensor(op, name, t, dtypes=(torch.float32,))
    if t.device.type != "cpu" and t.device != x.device:  # a CPU scale is moved (free for a host float)
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_sparse24_int8_linear(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, bias: Tensor | None,
                                x_scale: Tensor, out_scale: Tensor | None, in_features: int,
                                out_dtype: torch.dtype, activation: str | None) -> None:
    op = "sparse24_int8_linear"
    check_tensor(op, "x", x, dtypes=(torch.int8,))
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the features), got a 0-d tensor")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 8 or in_features % 8:
        raise ValueError(f"{op}: in_features must be a positive multiple of 8 (whole meta bytes), got {in_features!r}")
    k = in_features
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features but the weight has in_features={k}")
    if k > MAX_INT8_LINEAR_K:
        raise ValueError(f"{op}: in_features={k} exceeds {MAX_INT8_LINEAR_K}: int32 accumulation could overflow")
    check_tensor(op, "values", values, dims=(2,), dtypes=(torch.int8,))
    check_tensor(op, "meta", meta, dims=(2,), dtypes=(torch.uint8,))
    check_tensor(op, "scale", scale, dims=(1,), dtypes=(torch.float32,))
    n = values.shape[0]
    if (tuple(values.shape) != (n, k // 2) or tuple(meta.shape) != (n, k // 8) or tuple(scale.shape) != (n,)):
        raise ValueError(f"{op}: values {tuple(values.shape)}, meta {tuple(meta.shape)} and scale {tuple(scale.shape)} "
                         f"do not form a 2:4 weight of in_features={k} (values [N, {k // 2}], meta [N, {k // 8}], "
                         f"scale [N])")
    for name, t in (("values", values), ("meta", meta), ("scale", scale)):
        check_same_device(op, name, t, "x", x)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {', '.join(dtype_name(d) for d in OUT_DTYPES)}, "
                        f"got {out_dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None, 'relu' or 'gelu', got {activation!r}")
    _check_scale_arg(op, "x_scale", x_scale, x)
    if x_scale.numel() != 1 and not _per_token_ok(x_scale, x):
        raise ValueError(f"{op}: x_scale must be per tensor (one value) or per token with shape "
                         f"{tuple(x.shape[:-1])} or broadcastable {(*x.shape[:-1], 1)}, got {tuple(x_scale.shape)}")
    integer_out = out_dtype == torch.int32
    if bias is not None:
        want = torch.int32 if integer_out else torch.float32
        if not isinstance(bias, Tensor) or bias.dtype != want or tuple(bias.shape) != (n,):
            got = f"{dtype_name(bias.dtype)} {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{op}: bias must be {dtype_name(want)} with shape ({n},) for out_dtype "
                             f"{dtype_name(out_dtype)}, got {got}")
        check_same_device(op, "bias", bias, "x", x)
    if integer_out and activation is not None:
        raise ValueError(f"{op}: activation must be None for int32 output (the raw accumulator), got {activation!r}")
    if out_dtype == torch.int8:
        if out_scale is None:
            raise ValueError(f"{op}: out_scale is required for int8 output")
        _check_scale_arg(op, "out_scale", out_scale, x)
        if out_scale.numel() != 1 and tuple(out_scale.shape) != (n,):
            raise ValueError(f"{op}: out_scale must be per tensor (one value) or per channel with shape ({n},), "
                             f"got {tuple(out_scale.shape)}")
    elif out_scale is not None:
        raise ValueError(f"{op}: out_scale is only for int8 output; out_dtype is {dtype_name(out_dtype)}")


# The codes of kernels/sparse24/sparse24_gemm.cuh (OutKind, Activation) the CUDA op takes.
CUDA_OUT_KIND = {torch.int32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.float32: 4}
CUDA_ACTIVATION = {None: 0, "relu": 1, "gelu": 2}


def _cuda_limits(x: Tensor, values: Tensor, meta: Tensor, *args) -> list[str]:
    """What the sparse tensor-core kernel declines (the Triton kernel takes these): one MMA step
    is 64 along K, and its copies need 16-byte (x, values) and 8-byte (meta) alignment."""
    k = x.shape[-1]
    reasons = [f"K={k} is not a multiple of 64 (the sparse MMA's K step)"] if k % 64 else []
    if x.data_ptr() % 16 or values.data_ptr() % 16 or meta.data_ptr() % 8:
        reasons.append("x or values is not 16-byte aligned, or meta not 8-byte aligned")
    return reasons


def _cuda_adapter(op, x, values, meta, scale, bias, x_scale, inv_out, in_features, out_dtype, activation):
    return op(x, values, meta, scale, bias, x_scale, inv_out, in_features, CUDA_OUT_KIND[out_dtype],
              CUDA_ACTIVATION[activation])


SPARSE24_INT8_LINEAR = define_op(
    "sparse24_int8_linear", family=FAMILY,
    doc="int8 x 2:4-sparse int8 GEMM, int32 accumulation, fused dequantise / bias / activation / requantise",
    check=_check_sparse24_int8_linear, dispatch_on="x",
    kernels=[
        torch_kernel(ref_sparse24_int8_linear_rows, dtypes=(torch.int8,)),
        triton_kernel("sparse24:sparse24_int8_linear_rows", dtypes=(torch.int8,)),
        cuda_kernel("cuda_sparse24_int8_linear", dtypes=(torch.int8,), check=_cuda_limits, adapter=_cuda_adapter),
    ],
)


@SPARSE24_INT8_LINEAR.impl
def _sparse24_int8_linear_op(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, bias: Tensor | None,
                             x_scale: Tensor, out_scale: Tensor | None, in_features: int, out_dtype: torch.dtype,
                             activation: str | None) -> Tensor:
    if validation_enabled(x.device) and meta.numel():
        bad = _invalid_nibbles(meta).nonzero()
        if bad.numel():
            row, group = (int(v) for v in bad[0])
            raise ValueError(f"sparse24_int8_linear: meta is invalid: row {row}, group {group} does not hold two "
                             f"positions i0 < i1")
    n = values.shape[0]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    m = rows.shape[0]
    # One float32 scale per row, whatever form x_scale came in.
    xs = x_scale.to(x.device)
    if xs.numel() == 1:
        xs = xs.reshape(()).expand(m)
    elif xs.dim() == x.dim() and xs.shape[-1] == 1:
        xs = xs.expand(*x.shape[:-1], 1).reshape(m)
    else:
        xs = xs.reshape(m)
    inv = None
    if out_dtype == torch.int8:
        inv = (1.0 / out_scale.to(x.device)).reshape(-1)  # once, in float32 (IEEE division)
    y = SPARSE24_INT8_LINEAR.kernels(
        x=rows, values=values.contiguous(), meta=meta.contiguous(), scale=scale.contiguous(),
        bias=None if bias is None else bias.contiguous(), x_scale=xs.contiguous(), inv_out=inv,
        in_features=in_features, out_dtype=out_dtype, activation=activation)
    return y.reshape(*x.shape[:-1], n)


@SPARSE24_INT8_LINEAR.fake
def _(x, values, meta, scale, bias, x_scale, out_scale, in_features, out_dtype, activation):
    return x.new_empty((*x.shape[:-1], values.shape[0]), dtype=out_dtype)


def sparse24_int8_linear(x_int8: Tensor, w: Sparse24Weight, bias: Tensor | None = None, *, x_scale,
                         out_dtype: torch.dtype, out_scale=None, activation: str | None = None) -> Tensor:
    """int8 activations times a 2:4-sparse int8 weight (:class:`Sparse24Weight`).

    With Wq = w.decompress() (int8 ``[N, K]``) and x the rows ``[M, K]`` of ``x_int8``:

    1. ``acc[m, n] = sum_k x[m, k] * Wq[n, k]``, exact in int32 (K <= 2^17 - 1).
    2. ``out_dtype=torch.int32``: ``y = saturate_int32(acc + bias)`` (bias int32 ``[N]``); x_scale
       is validated but unused; activation and out_scale must be None.
    3. Otherwise, in float32 and in exactly this order (no fused multiply-add):

       * ``s = float32(x_scale[m] * w.scale[n])``
       * ``v = float32(acc) * s``
       * ``v = v + bias[n]`` (bias float32 ``[N]``)
       * activation: None; ``"relu"``: ``max(v, 0)``; ``"gelu"``:
         ``0.5 * v * (1 + erf(v * 0.7071067811865476))`` (evaluated left to right, constants in float32)
       * ``bfloat16`` / ``float16`` / ``float32``: v rounded to nearest even;
         ``int8``: ``clamp(rint(v * inv), -128, 127)`` with ``inv = float32(1 / out_scale)`` computed
         once in float32 (per tensor or per channel ``[N]``) and rint rounding half to even.

    Args:
        x_int8: int8 ``[..., K]``, any layout (the op takes its rows).
        w: the weight, on x's device.
        bias: optional; int32 ``[N]`` for int32 output, else float32 ``[N]``.
        x_scale: x's float32 scale: per tensor (a float, 0-d or 1-element tensor) or per token
            (``x.shape[:-1]``, or broadcastable ``[..., 1]``).
        out_dtype: int32, int8, bfloat16, float16 or float32.
        out_scale: int8 output only: float32, per tensor or per channel ``[N]``.
        activation: None, "relu" or "gelu" (not with int32 output).

    Where validation is on (CPU tensors by default, see :func:`effkern.validation`), every meta
    nibble is checked to hold two positions i0 < i1 (a host read).

    Returns ``[..., N]`` in out_dtype, contiguous.
    """
    op = "sparse24_int8_linear"
    if not isinstance(w, Sparse24Weight):
        raise TypeError(f"{op}: w must be a Sparse24Weight, got {type(w).__name__}")
    xs = _scale_tensor(op, "x_scale", x_scale)
    os_ = None if out_scale is None else _scale_tensor(op, "out_scale", out_scale)
    return torch.ops.effkern.sparse24_int8_linear(x_int8, w.values, w.meta, w.scale, bias, xs, os_, w.in_features,
                                                  out_dtype, activation)


def _scale_tensor(op: str, name: str, scale) -> Tensor:
    """A Python number becomes a float32 0-d tensor; tensors pass unchanged (the check wants float32)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(float(scale), dtype=torch.float32)
    if not isinstance(scale, Tensor):
        raise TypeError(f"{op}: {name} must be a float or a float32 tensor, got {type(scale).__name__}")
    return scale


# --------------------------------------------------------------------------------------------
# Test cases (tests/test_registry.py runs them on every backend)
# --------------------------------------------------------------------------------------------


def _int8(gen, shape, device) -> Tensor:
    return torch.randint(-128, 128, tuple(shape), generator=gen, dtype=torch.int32).to(torch.int8).to(device)


def _random_weight(gen, n: int, k: int, device, sparser: bool = True) -> Sparse24Weight:
    """Random int8 2:4 weights (full range, some groups with fewer than two nonzeros) and scales."""
    w = prune_2to4(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32))
    if sparser:
        w = torch.where(torch.rand(n, k, generator=gen) < 0.15, 0, w)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    return Sparse24Weight.from_int8(w.to(torch.int8), scale).to(device)


def _w_args(w: Sparse24Weight):
    return w.values, w.meta, w.scale


def _f32(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def _samples(gen, device):
    out = []
    cfgs = [
        # (x shape, x layout, N, out_dtype, bias, x_scale kind, out_scale kind, activation, note)
        ((3, 72), "contiguous", 24, torch.int8, True, "tensor", "tensor", None, "int8 out, M=3, K=72"),
        ((1, 8), "contiguous", 5, torch.int32, True, "tensor", None, None, "int32 out, M=1, K=8"),
        ((197, 200), "contiguous", 40, torch.bfloat16, True, "token", None, None, "bf16, M=197, K=200"),
        ((2, 5, 768), "contiguous", 33, torch.float16, True, "token1", None, "relu", "[B, T, K], fp16 relu"),
        ((7, 72), "transposed", 20, torch.int8, True, "token", "channel", "gelu", "transposed x, per-channel out"),
        ((6, 200), "strided", 17, torch.float32, False, "tensor", None, None, "non-contiguous x, fp32"),
        ((2, 72, 3), "permuted", 12, torch.int8, False, "token1", "tensor", "relu", "permuted [B, T, K]"),
        ((0, 8), "contiguous", 8, torch.int8, True, "tensor", "tensor", None, "empty batch"),
    ]
    for shape, layout, n, out_dtype, bias, xs_kind, os_kind, act, note in cfgs:
        if layout == "permuted":  # [B, K, T] stored, viewed as [B, T, K]
            x = _int8(gen, shape, device).transpose(1, 2)
        elif layout == "transposed":
            x = _int8(gen, shape[::-1], device).T
        elif layout == "strided":
            x = _int8(gen, (shape[0], 2 * shape[1]), device)[:, ::2]
        else:
            x = _int8(gen, shape, device)
        k = x.shape[-1]
        w = _random_weight(gen, n, k, device)
        lead = tuple(x.shape[:-1])
        xs = {"tensor": _f32(0.02),  # per tensor; per token as [M] / x.shape[:-1], or as [..., 1]
              "token": torch.rand(lead, generator=gen) * 0.05 + 1e-3,
              "token1": torch.rand((*lead, 1), generator=gen) * 0.05 + 1e-3}[xs_kind]
        xs = xs.to(device)
        if out_dtype == torch.int32:
            b = torch.randint(-2**20, 2**20, (n,), generator=gen, dtype=torch.int32).to(device) if bias else None
        else:
            b = (torch.randn(n, generator=gen) * 0.5).to(device) if bias else None
        o = {None: None, "tensor": _f32(0.05), "channel": torch.rand(n, generator=gen) * 0.1 + 0.01}[os_kind]
        out.append(Sample((x, *_w_args(w), b, xs, None if o is None else o.to(device), k, out_dtype, act), note))
    # saturating int32 bias
    w = _random_weight(gen, 9, 16, device)
    b = torch.tensor([INT32_MAX, -(2**31)] * 4 + [0], dtype=torch.int32).to(device)
    out.append(Sample((_int8(gen, (4, 16), device), *_w_args(w), b, _f32(1.0).to(device), None, 16, torch.int32, None),
                      "saturating int32 bias"))
    # a broadcast x_scale over the batch dim only: [B, 1, 1]
    w = _random_weight(gen, 10, 24, device)
    out.append(Sample((_int8(gen, (3, 4, 24), device), *_w_args(w), None, (torch.rand(3, 1, 1, generator=gen) * 0.1).to(device),
                       _f32(0.2).to(device), 24, torch.int8, "gelu"), "x_scale [B, 1, 1]"))
    return out


def _pick(gen, options):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _random(gen, device):
    m = int(torch.randint(1, 40, (1,), generator=gen))
    n = int(torch.randint(1, 40, (1,), generator=gen))
    k = 8 * int(torch.randint(1, 20, (1,), generator=gen))
    w = _random_weight(gen, n, k, device)
    out_dtype = _pick(gen, OUT_DTYPES)
    # No gelu: backends may differ in erf's last ulp (tests/test_sparse24.py checks gelu under
    # that allowance); the samples keep two int8 gelu calls, where it would take a tie to show.
    act = _pick(gen, (None, "relu"))
    act = None if out_dtype == torch.int32 else act
    if out_dtype == torch.int32:
        b = _pick(gen, (None, torch.randint(-2**24, 2**24, (n,), generator=gen, dtype=torch.int32).to(device)))
    else:
        b = _pick(gen, (None, torch.randn(n, generator=gen).to(device)))
    xs = _pick(gen, (_f32(0.01), torch.rand(m, generator=gen) * 0.05 + 1e-4)).to(device)
    o = None
    if out_dtype == torch.int8:
        o = _pick(gen, (_f32(0.1), torch.rand(n, generator=gen) * 0.2 + 0.01)).to(device)
    return Sample((_int8(gen, (m, k), device), *_w_args(w), b, xs, o, k, out_dtype, act))


def _invalid(gen, device):
    w = _random_weight(gen, 8, 16, device)
    x = _int8(gen, (2, 16), device)
    v, meta, s = _w_args(w)
    xs, o = _f32(0.1).to(device), _f32(0.5).to(device)
    bad_meta = meta.clone()
    bad_meta[3, 1] = 0x55  # i0 == i1 == 1
    op = "sparse24_int8_linear"
    return [
        Invalid((x.float(), v, meta, s, None, xs, o, 16, torch.int8, None), TypeError, f"{op}: x must have dtype int8"),
        Invalid((x, v.to(torch.int16), meta, s, None, xs, o, 16, torch.int8, None), TypeError, "values must have dtype int8"),
        Invalid((x, v, meta.to(torch.int8), s, None, xs, o, 16, torch.int8, None), TypeError, "meta must have dtype uint8"),
        Invalid((x, v, meta, s.double(), None, xs, o, 16, torch.int8, None), TypeError, "scale must have dtype float32"),
        Invalid((x[:, :8], v, meta, s, None, xs, o, 16, torch.int8, None), ValueError, "x has 8 input features"),
        Invalid((x, v[:, :4], meta, s, None, xs, o, 16, torch.int8, None), ValueError, "do not form a 2:4 weight"),
        Invalid((x[:, :12], v[:, :6], meta, s, None, xs, o, 12, torch.int8, None), ValueError, "multiple of 8"),
        Invalid((x, v, meta, s, None, xs.double(), o, 16, torch.int8, None), TypeError, "x_scale must have dtype float32"),
        Invalid((x, v, meta, s, None, torch.ones(3, device=device), o, 16, torch.int8, None), ValueError,
                "x_scale must be per tensor"),
        Invalid((x, v, meta, s, None, xs, None, 16, torch.int8, None), ValueError, "out_scale is required"),
        Invalid((x, v, meta, s, None, xs, o, 16, torch.float16, None), ValueError, "out_scale is only for int8"),
        Invalid((x, v, meta, s, None, xs, torch.ones(3), 16, torch.int8, None), ValueError, "out_scale must be per tensor"),
        Invalid((x, v, meta, s, None, xs, None, 16, torch.int32, "relu"), ValueError, "activation must be None for int32"),
        Invalid((x, v, meta, s, None, xs, None, 16, torch.float16, "tanh"), ValueError, "activation must be None, 'relu'"),
        Invalid((x, v, meta, s, None, xs, None, 16, torch.int16, None), TypeError, "out_dtype must be one of"),
        Invalid((x, v, meta, s, torch.zeros(8, device=device), xs, None, 16, torch.int32, None), ValueError,
                "bias must be int32"),
        Invalid((x, v, meta, s, torch.zeros(8, dtype=torch.int32, device=device), xs, o, 16, torch.int8, None),
                ValueError, "bias must be float32"),
        Invalid((x, v, bad_meta, s, None, xs, o, 16, torch.int8, None), ValueError, "row 3, group 2"),
        Invalid((x, v.to("meta"), meta, s, None, xs, o, 16, torch.int8, None), ValueError, "values is on meta"),
        Invalid((x, v, meta, s, None, xs.to("meta"), o, 16, torch.int8, None), ValueError, "x_scale is on meta"),
    ]


SPARSE24_INT8_LINEAR.cases(samples=_samples, random=_random, invalid=_invalid, exact=True)
