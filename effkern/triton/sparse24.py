"""Triton backend of the 2:4-sparse int8 GEMM (effkern.ops.sparse24), bit for bit its torch
reference ``ref_sparse24_int8_linear_rows``.

Each program reads, per K step, the compressed weight of a [BLOCK_K, BLOCK_N] tile -- its kept
values (half the dense bytes) and its meta nibbles -- and decompresses it in registers into a
dense int8 tile: dense position p of group c takes value 2c when p == i0, value 2c + 1 when
p == i1, else 0 (one gathered, masked load; the neighbouring lanes of a group hit the same
bytes, so only the compressed bytes travel from memory). ``tl.dot(int8, int8) -> int32`` runs
it on the int8 tensor cores at the dense rate; mma.sp's 2x is the CUDA backend's
(kernels/sparse24/), which reads the same meta layout. Accumulation is exact, split-K included.

The epilogue is the op's float32 sequence, one rounding per step: ``s = x_scale[m] *
scale[n]``, ``v = float(acc) * s``, ``+ bias``, activation, then the output rounding. The
kernel is compiled with ``enable_fp_fusion=False`` so that ``v * s + bias`` is not contracted
into an FMA (one rounding instead of the reference's two). int8 rounds half to even by the
1.5 * 2^23 trick (exact for |v| < 2^22; larger values are clamped first), bfloat16 by integer
ops on the bits (Triton's interpreter truncates its fp32 -> bf16 cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import MAX_INT8_LINEAR_K
from effkern.triton.gemm import split_k_plan, split_k_reduce, tile_ids
from effkern.triton.integer import _check_columns, _check_int, _check_rows
from effkern.triton.requant import saturating_add_i32
from effkern.triton.tokens import _round_to

# out kinds and activations, as constexpr codes
_OUT_INT32, _OUT_INT8, _OUT_FLOAT = 0, 1, 2
_ACT = {None: 0, "relu": 1, "gelu": 2}
_GELU_C = tl.constexpr(0.7071067811865476)
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: q + M - M rounds q half to even for |q| < 2^22


@triton.jit
def _meta_positions(byte, c):
    """(i0, i1) of group c from its meta byte: the device mirror of effkern.ops.sparse24's
    pack_meta (group c sits in the low nibble for even c, the high one for odd c; nibble =
    i0 | (i1 << 2)). Change the two together."""
    nib = (byte.to(tl.int32) >> ((c & 1) * 4)) & 15
    return nib & 3, nib >> 2


@triton.jit
def _sparse_tile(values_ptr, meta_ptr, safe_n, kk, k_ok, K):
    """Dense int8 [BLOCK_K, BLOCK_N] (K-major) of absolute k = kk, decompressed from values and
    meta of columns safe_n; zero where not k_ok."""
    c = (kk // 4)[:, None]
    p = (kk % 4)[:, None]
    byte = tl.load(meta_ptr + safe_n[None, :] * (K // 8) + (kk // 8)[:, None], mask=k_ok[:, None], other=0)
    i0, i1 = _meta_positions(byte, c)
    is0 = p == i0
    is1 = (p == i1) & ~is0  # an invalid nibble (i0 == i1) decodes as the reference does
    v_ptrs = values_ptr + safe_n[None, :] * (K // 2) + 2 * c + is1.to(tl.int32)
    return tl.load(v_ptrs, mask=(is0 | is1) & k_ok[:, None], other=0)


@triton.jit
def _sparse24_kernel(x_ptr, values_ptr, meta_ptr, scale_ptr, bias_ptr, xs_ptr, inv_ptr, y_ptr, ws_ptr, count_ptr,
                     M, N, K, K_SPLIT, HAS_BIAS: tl.constexpr, OUT: tl.constexpr, ACT: tl.constexpr,
                     INV_PER_COLUMN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k0 = tl.program_id(1) * K_SPLIT  # split-K: this program's K range
    k_end = tl.minimum(K, k0 + K_SPLIT)
    # Rows / columns past the edge re-read valid ones (never stored): loads need no M/N mask.
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k0, k_end, BLOCK_K):
        kk = k + offs_k
        k_ok = kk < k_end
        a = tl.load(x_ptr + safe_m[:, None] * K + kk[None, :], mask=k_ok[None, :], other=0)
        b = _sparse_tile(values_ptr, meta_ptr, safe_n, kk, k_ok, K)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    last = True
    if SPLIT_K > 1:  # exact: int32 sums are associative and the full sum fits (K <= 2^17 - 1)
        acc, last = split_k_reduce(acc, ws_ptr, count_ptr, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, SPLIT_K, BLOCK_M, BLOCK_N)

    if last:
        n_mask = offs_n < N
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        if OUT == 0:  # int32: the accumulator plus a saturating bias
            out = acc
            if HAS_BIAS:
                out = saturating_add_i32(out, tl.load(bias_ptr + offs_n, mask=n_mask, other=0)[None, :])
            tl.store(y_ptrs, out, mask=mask)
        else:
            xs = tl.load(xs_ptr + safe_m)
            ws = tl.load(scale_ptr + safe_n)
            s = xs[:, None] * ws[None, :]
            v = acc.to(tl.float32) * s
            if HAS_BIAS:
                v = v + tl.load(bias_ptr + safe_n)[None, :]
            if ACT == 1:
                v = tl.maximum(v, 0.0)
            elif ACT == 2:
                v = 0.5 * v * (1.0 + tl.math.erf(v * _GELU_C))
            if OUT == 1:
                if INV_PER_COLUMN:
                    inv = tl.load(inv_ptr + safe_n)[None, :]
                else:
                    inv = tl.load(inv_ptr)
                q = v * inv
                q = tl.minimum(tl.maximum(q, -256.0), 256.0)  # rint then clamp to int8 is unchanged
                q = (q + _RINT_MAGIC) - _RINT_MAGIC
                q = tl.minimum(tl.maximum(q, -128.0), 127.0)
                tl.store(y_ptrs, q.to(tl.int8), mask=mask)
            else:
                tl.store(y_ptrs, _round_to(v, y_ptr.dtype.element_ty), mask=mask)


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): int8_linear's shapes, simplified
    (untuned: the gathered weight loads, not the tiles, bound this kernel)."""
    block_k = min(128, max(32, triton.next_power_of_2(k)))
    if m > 32:
        return 64, 64, block_k, 4, 3
    return max(16, triton.next_power_of_2(m)), 64, block_k, 4, 3


def sparse24_int8_linear_rows(x: Tensor, values: Tensor, meta: Tensor, scale: Tensor, bias: Tensor | None,
                              x_scale: Tensor, inv_out: Tensor | None, in_features: int, out_dtype: torch.dtype,
                              activation: str | None, split_k: int | None = None) -> Tensor:
    """The op on rows (ref_sparse24_int8_linear_rows): x int8 [M, K]; values int8 [N, K/2]; meta
    uint8 [N, K/8]; scale float32 [N]; x_scale float32 [M]; inv_out float32 [1] or [N] for int8
    output. split_k: K ranges per output tile (None: by shape; 1: off), reduced exactly."""
    op = "sparse24_int8_linear_rows"
    x = _check_rows(op, x, (torch.int8,))
    rows, k = x.shape
    _check_int(op, "in_features", in_features, 8, MAX_INT8_LINEAR_K)
    n = values.shape[0]
    # cheap asserts memory safety needs (the op validated everything else)
    if k != in_features or k % 8 or tuple(values.shape) != (n, k // 2) or tuple(meta.shape) != (n, k // 8):
        raise ValueError(f"{op}: x {tuple(x.shape)}, values {tuple(values.shape)} and meta {tuple(meta.shape)} do not "
                         f"match in_features={in_features}")
    values, meta = values.contiguous(), meta.contiguous()
    integer_out = out_dtype == torch.int32
    if bias is not None:
        bias = _check_columns(op, "bias", bias, n, torch.int32 if integer_out else torch.float32, x.device)
    scale = _check_columns(op, "scale", scale, n, torch.float32, x.device)
    x_scale = _check_columns(op, "x_scale", x_scale, rows, torch.float32, x.device)
    out_kind = _OUT_INT32 if integer_out else _OUT_INT8 if out_dtype == torch.int8 else _OUT_FLOAT
    if out_kind == _OUT_INT8:
        if inv_out is None or inv_out.numel() not in (1, n):
            raise ValueError(f"{op}: int8 output needs inv_out of 1 or {n} values")
        inv_out = inv_out.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_m, block_n, block_k, warps, stages = _config(rows, n, k)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    if split_k is not None:
        _check_int(op, "split_k", split_k, 1, 64)
    split_k, k_split, ws, count = split_k_plan(tiles, k, block_k, x.device, split_k, torch.int32, block_m, block_n)
    _sparse24_kernel[(tiles, split_k)](
        x, values, meta, scale, y if bias is None else bias, x_scale, y if inv_out is None else inv_out, y,
        y if ws is None else ws, y if count is None else count, rows, n, k, k_split,
        HAS_BIAS=bias is not None, OUT=out_kind, ACT=_ACT[activation],
        INV_PER_COLUMN=inv_out is not None and inv_out.numel() > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages,
        enable_fp_fusion=False)  # the epilogue's float order is the contract: no FMA contraction
    return y
