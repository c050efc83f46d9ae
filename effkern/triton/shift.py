"""Triton backend of the shift family (effkern.ops.shift): power-of-two weights decoded in
registers into tensor-core operands.

A weight code decodes to ``(-1)^sign * 2^(mag - 1)`` (0 for magnitude 0), built from its bits
in float32 (exact) and converted to x's dtype (exact: at most 2^14), or to int8 for the 4-bit
form (at most 2^6). The tile product runs on tensor cores (``tl.dot``), accumulating in float32
(int32 for int8); the epilogue multiplies column n by ``2^base[n]`` -- a power of two, so the
result is what a dense layer with the decoded weight accumulates -- and adds the bias; the int8
kernel requantises with int8_linear's epilogue (effkern/triton/requant.py). The 5-bit form
reads one byte per weight, the 4-bit form half a byte: its K step of 64 reads 32 bytes per row
and feeds two dot products of 32 (the packing of effkern.ops.shift).

``deepshift_linear_rows`` is DeepShift's shift-add on CUDA cores (no tensor cores): the
comparison point of the benchmark.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import MAX_INT8_LINEAR_K, SHIFT4_GROUP
from effkern.triton.requant import AUTO, PER_COLUMN, epilogue_args, requantize_epilogue, saturating_add_i32
from effkern.triton.gemm import split_k_plan, split_k_reduce, tile_ids
from effkern.triton.mma import mma16

_HALF_GROUP = tl.constexpr(SHIFT4_GROUP // 2)


@triton.jit
def _pow2_f32(c, BITS: tl.constexpr):
    """(-1)^sign * 2^(mag - 1) in float32 from the bits of code c (0 for magnitude 0)."""
    c = c.to(tl.int32)
    mag = c & ((1 << (BITS - 1)) - 1)
    sign = (c >> (BITS - 1)) & 1
    w = (((mag + 126) << 23) | (sign << 31)).to(tl.float32, bitcast=True)
    return tl.where(mag == 0, 0.0, w)


@triton.jit
def _pow2_i8(c):
    """(-1)^sign * 2^(mag - 1) in int8 from a 4-bit code (0 for magnitude 0)."""
    c = c.to(tl.int32)
    mag = c & 7
    v = tl.where(mag == 0, 0, 1 << tl.maximum(mag - 1, 0))
    return tl.where((c & 8) != 0, -v, v).to(tl.int8)


@triton.jit
def _dot(a, b, acc, EXACT_F32: tl.constexpr):
    if EXACT_F32:  # fp32 x: full fp32 products, as torch's default fp32 matmul
        return tl.dot(a, b, acc, input_precision="ieee")
    return mma16(a, b, acc)


@triton.jit
def _shift_product(x_ptr, codes_ptr, offs_m, offs_n, M, N, K, CK, k0, k_end, acc, INT8: tl.constexpr,
                   BITS: tl.constexpr, BLOCK_K: tl.constexpr, EXACT_F32: tl.constexpr):
    """acc + x[offs_m, k0:k_end] @ decode(codes[offs_n, k0:k_end])^T (k0 a multiple of 64).
    Rows and columns past the edge re-read valid ones (never stored): only K is masked."""
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    if BITS == 5:  # one code per byte, [BLOCK_K, BLOCK_N] K-major
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + safe_m[:, None] * K + (k0 + offs_k)[None, :]
        c_ptrs = codes_ptr + safe_n[None, :] * CK + (k0 + offs_k)[:, None]
        for k in range(k0, k_end, BLOCK_K):
            k_left = k_end - k
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            c = tl.load(c_ptrs, mask=offs_k[:, None] < k_left, other=0)
            acc = _dot(a, _pow2_f32(c, BITS).to(a.dtype), acc, EXACT_F32)
            x_ptrs += BLOCK_K
            c_ptrs += BLOCK_K
    else:  # two codes per byte: byte j of a group holds k = j (low nibble) and k = 32 + j (high)
        offs_j = tl.arange(0, _HALF_GROUP)
        x_ptrs = x_ptr + safe_m[:, None] * K + (k0 + offs_j)[None, :]
        c_ptrs = codes_ptr + safe_n[None, :] * CK + (k0 // 2 + offs_j)[:, None]
        for k in range(k0, k_end, 2 * _HALF_GROUP):
            k_left = k_end - k
            b = tl.load(c_ptrs)  # the codes are padded to whole groups (zero codes)
            a_lo = tl.load(x_ptrs, mask=offs_j[None, :] < k_left, other=0)
            a_hi = tl.load(x_ptrs + _HALF_GROUP, mask=offs_j[None, :] + _HALF_GROUP < k_left, other=0)
            if INT8:
                acc = tl.dot(a_lo, _pow2_i8(b & 15), acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, _pow2_i8(b >> 4), acc, out_dtype=tl.int32)
            else:
                acc = _dot(a_lo, _pow2_f32(b & 15, 4).to(a_lo.dtype), acc, EXACT_F32)
                acc = _dot(a_hi, _pow2_f32(b >> 4, 4).to(a_hi.dtype), acc, EXACT_F32)
            x_ptrs += 2 * _HALF_GROUP
            c_ptrs += _HALF_GROUP
    return acc


@triton.jit
def _shift_linear_kernel(x_ptr, codes_ptr, base_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, CK, K_SPLIT,
                         BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_F32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * K_SPLIT  # split-K: this program's K range
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _shift_product(x_ptr, codes_ptr, offs_m, offs_n, M, N, K, CK, k0, tl.minimum(K, k0 + K_SPLIT), acc, False,
                         BITS, BLOCK_K, EXACT_F32)
    last = True
    if SPLIT_K > 1:
        acc, last = split_k_reduce(acc, ws_ptr, count_ptr, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, SPLIT_K, BLOCK_M, BLOCK_N)
    if last:
        n_mask = offs_n < N
        base = tl.load(base_ptr + offs_n, mask=n_mask, other=0)
        y = acc * ((base + 127) << 23).to(tl.float32, bitcast=True)[None, :]  # * 2^base, exact
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["m_val", "e_val"])
def _shift_linear_int8_kernel(x_ptr, codes_ptr, bias_ptr, m_ptr, e_ptr, m_val, e_val, y_ptr, ws_ptr, count_ptr,
                              M, N, K, CK, K_SPLIT, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr,
                              CONSTS: tl.constexpr, EPILOGUE: tl.constexpr, OUT_LO: tl.constexpr,
                              OUT_HI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * K_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = _shift_product(x_ptr, codes_ptr, offs_m, offs_n, M, N, K, CK, k0, tl.minimum(K, k0 + K_SPLIT), acc, True,
                         4, 64, False)
    last = True
    if SPLIT_K > 1:  # exact: int32 sums are associative and the full sum fits (K <= 2^17 - 1)
        acc, last = split_k_reduce(acc, ws_ptr, count_ptr, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, SPLIT_K, BLOCK_M, BLOCK_N)
    if last:
        n_mask = offs_n < N
        out = acc
        if HAS_BIAS:
            out = saturating_add_i32(out, tl.load(bias_ptr + offs_n, mask=n_mask, other=0)[None, :])
        if REQUANT:
            out = requantize_epilogue(out, m_ptr, e_ptr, m_val, e_val, offs_n, n_mask, CONSTS, EPILOGUE, OUT_LO, OUT_HI)
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _deepshift_linear_kernel(x_ptr, codes_ptr, base_ptr, bias_ptr, y_ptr, M, N, K, CK, BITS: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """y = bias + sum_k s * (x >> -p) on CUDA cores: each [BLOCK_M, BLOCK_K, BLOCK_N] block of
    shifted inputs is summed over k in int64 (exact); codes are read as the 5-bit form or
    unpacked from the 4-bit one."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    n_mask = offs_n < N
    base = tl.load(base_ptr + offs_n, mask=n_mask, other=0)
    half = 1 << (BITS - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(x_ptr + safe_m[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0)  # [BM, BK]
        if BITS == 5:
            c = tl.load(codes_ptr + safe_n[None, :] * CK + ks[:, None], mask=k_ok[:, None], other=0).to(tl.int32)
        else:  # k = 64 g + 32 h + j lives in byte 32 g + j, nibble h
            byte = (ks // 64) * 32 + ks % 32
            c = tl.load(codes_ptr + safe_n[None, :] * CK + byte[:, None], mask=k_ok[:, None], other=0).to(tl.int32)
            c = (c >> (((ks // 32) % 2) * 4)[:, None]) & 15
        mag = c & (half - 1)  # [BK, BN]
        right = tl.minimum(tl.maximum(1 - mag - base[None, :], 0), 31)  # -p, where floor(x / 2^31) = floor(x / 2^s), s > 31
        shifted = (x[:, :, None] >> right[None, :, :]).to(tl.int64)  # [BM, BK, BN] (int64: -(-2^31) fits)
        shifted = tl.where(((c & half) != 0)[None, :, :], -shifted, shifted)
        shifted = tl.where((mag == 0)[None, :, :], 0, shifted)
        acc += tl.sum(shifted, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)[None, :]
    y = tl.minimum(tl.maximum(acc, -2147483648), 2147483647).to(tl.int32)
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y, mask=mask)


# --------------------------------------------------------------------------------------------
# Host wrappers (the arguments of the references in effkern.ops.shift)
# --------------------------------------------------------------------------------------------


def _check(op: str, x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int, bits: int,
           x_dtypes: tuple, bias_dtype) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The cheap asserts that memory safety needs (the op has checked everything else)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in x_dtypes:
        raise ValueError(f"{op}: x must be a 2-D tensor of {x_dtypes}")
    if bits not in (4, 5):
        raise ValueError(f"{op}: bits must be 4 or 5, got {bits}")
    ck = in_features if bits == 5 else SHIFT4_GROUP // 2 * triton.cdiv(in_features, SHIFT4_GROUP)
    n = codes.shape[0]
    if (x.shape[1] != in_features or codes.dtype != torch.uint8 or tuple(codes.shape) != (n, ck)
            or base.dtype != torch.int32 or tuple(base.shape) != (n,)):
        raise ValueError(f"{op}: codes [N, {ck}] uint8 and base [N] int32 for in_features={in_features}, bits={bits}")
    if bias is not None and (bias.dtype != bias_dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"{op}: bias must be {bias_dtype} [{n}]")
    dev = x.device
    return (x.contiguous(), codes.to(dev).contiguous(), base.to(dev).contiguous(),
            None if bias is None else bias.to(dev).contiguous())


def _config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small M keeps the row tile at the tensor-core
    minimum and narrows the column tile, for more programs over the weight."""
    if m > 64:
        return 128, 128, 8, 3
    if m > 32:
        return 64, 64, 4, 4
    return max(16, triton.next_power_of_2(m)), 32 if n <= 4096 else 64, 4, 4


def shift_linear_rows(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                      bits: int, split_k: int | None = None) -> Tensor:
    """x [M, K] @ decode(W)^T + bias, float32 accumulation, in x's dtype (ref_shift_linear_rows).
    split_k: K ranges per output tile (None: by shape and SM count; 1: off), their float32
    partials summed in a fixed order (deterministic, but another order than split_k=1's)."""
    op = "shift_linear_rows"
    x, codes, base, bias = _check(op, x, codes, base, bias, in_features, bits,
                                  (torch.float16, torch.bfloat16, torch.float32), x.dtype)
    rows, k = x.shape
    n = codes.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_m, block_n, warps, stages = _config(rows, n)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    split_k, k_split, ws, count = split_k_plan(tiles, k, 64, x.device, split_k, torch.float32, block_m, block_n)
    _shift_linear_kernel[(tiles, split_k)](
        x, codes, base, y if bias is None else bias, y, y if ws is None else ws, y if count is None else count,
        rows, n, k, codes.shape[1], k_split, BITS=bits, HAS_BIAS=bias is not None, EXACT_F32=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return y


def shift_linear_int8_rows(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, m: Tensor | None,
                           e: Tensor | None, in_features: int, out_bits: int, split_k: int | None = None) -> Tensor:
    """int8 x [M, K] @ decode_int8(W)^T + bias (int32, saturating), requantised per column with
    (m, e) (ref_shift_linear_int8_rows). split_k as shift_linear_rows (exact here)."""
    op = "shift_linear_int8_rows"
    x, codes, base, bias = _check(op, x, codes, base, bias, in_features, 4, (torch.int8,), torch.int32)
    rows, k = x.shape
    n = codes.shape[0]
    if k > MAX_INT8_LINEAR_K:
        raise ValueError(f"{op}: K={k} exceeds {MAX_INT8_LINEAR_K}: int32 accumulation could overflow")
    requant = m is not None
    m, e, m_val, e_val, consts, epilogue, lo, hi, out_dtype = epilogue_args(op, m, e, n, out_bits, x.device, True)
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_m, block_n, warps, stages = _config(rows, n)
    if requant and (consts == PER_COLUMN or epilogue == AUTO) and block_m == 128:
        block_n, warps = 64, 4  # per-column constants and the int64 path need the registers
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    split_k, k_split, ws, count = split_k_plan(tiles, k, 64, x.device, split_k, torch.int32, block_m, block_n)
    _shift_linear_int8_kernel[(tiles, split_k)](
        x, codes, y if bias is None else bias, y if m is None else m, y if e is None else e, m_val, e_val, y,
        y if ws is None else ws, y if count is None else count, rows, n, k, codes.shape[1], k_split,
        HAS_BIAS=bias is not None, REQUANT=requant, CONSTS=consts, EPILOGUE=epilogue, OUT_LO=lo, OUT_HI=hi,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return y


def deepshift_linear_rows(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                          bits: int) -> Tensor:
    """bias + sum_k s * (x >> -p), exact, saturated to int32 (ref_deepshift_linear_rows)."""
    op = "deepshift_linear_rows"
    x, codes, base, bias = _check(op, x, codes, base, bias, in_features, bits, (torch.int32,), torch.int32)
    rows, k = x.shape
    n = codes.shape[0]
    y = torch.empty((rows, n), dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y
    block_m, block_n, block_k = 16, 32, 8
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    _deepshift_linear_kernel[grid](x, codes, base, y if bias is None else bias, y, rows, n, k, codes.shape[1],
                                   BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                   BLOCK_K=block_k, num_warps=4)
    return y

