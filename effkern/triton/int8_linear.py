"""Triton backend of ``int8_linear``: the int8 x int8 -> int32 GEMM with a fused saturating bias
and requantising epilogue, bit for bit the reference ``ref_int8_linear_rows`` of
:mod:`effkern.ops.integer`.

Tiled GEMM, ``tl.dot(int8, int8) -> int32`` accumulation, grouped program order for L2 reuse,
then the epilogue: saturating bias add and the requantisation helper that the ``requantize``
kernel also uses (:mod:`effkern.triton.requant`). Tile sizes are chosen by shape (no
autotuning). The integer row kernels of the family live in :mod:`effkern.triton.integer`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import MAX_INT8_LINEAR_K, int_dtype_for_bits
from effkern.triton.integer import _check_columns, _check_int, _check_rows
from effkern.triton.requant import out_range, requantize_tile

_INT32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _int8_linear_kernel(x_ptr, w_ptr, bias_ptr, m_ptr, e_ptr, y_ptr, M, N, K,
                        HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr,
                        OUT_LO: tl.constexpr, OUT_HI: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    # Grouped program order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge re-read valid ones (never stored): loads need no M/N mask.
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + safe_m[:, None] * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + safe_n[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    n_mask = offs_n < N
    out = acc.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        out = tl.minimum(tl.maximum(out + bias[None, :], _INT32_MIN), 2147483647)
    if REQUANT:
        m = tl.load(m_ptr + offs_n, mask=n_mask, other=0)[None, :]
        e = tl.load(e_ptr + offs_n, mask=n_mask, other=0)[None, :]
        out = requantize_tile(out, m, e, OUT_LO, OUT_HI)
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)



# Host wrapper (the arguments of ref_int8_linear_rows)

def _linear_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for Hopper-class GPUs."""
    # Checked by compiling for sm_90a: these tiles pipeline their loads (cp.async), use wgmma
    # from BLOCK_M = 64 up, and the int64 requantising epilogue does not spill (64 x 128 with
    # 4 warps does).
    block_k = min(128, max(32, triton.next_power_of_2(k)))
    if m > 64:
        return 128, 128, block_k, 8, 8, 3
    if m > 32:
        return 64, 128, block_k, 8, 8, 4
    block_m = max(16, triton.next_power_of_2(m))
    block_n = 64 if n <= 4096 else 128
    return block_m, block_n, block_k, 8, 4, 4


def int8_linear_rows(x: Tensor, w: Tensor, bias: Tensor | None, m: Tensor | None, e: Tensor | None,
                     out_bits: int) -> Tensor:
    """saturate_int32(x @ w^T + bias), optionally requantised per output column
    (ref_int8_linear_rows)."""
    op = "int8_linear_rows"
    x = _check_rows(op, x, (torch.int8,))
    if not isinstance(w, Tensor) or w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: w must be an int8 tensor [N, {x.shape[1]}]")
    rows, k = x.shape
    n = w.shape[0]
    if k > MAX_INT8_LINEAR_K:
        raise ValueError(f"{op}: K={k} exceeds {MAX_INT8_LINEAR_K}: int32 accumulation could overflow")
    w = w.to(x.device).contiguous()
    if bias is not None:
        bias = _check_columns(op, "bias", bias, n, torch.int32, x.device)
    if (m is None) != (e is None):
        raise ValueError(f"{op}: give both m and e, or neither")
    requant = m is not None
    if requant:
        _check_int(op, "out_bits", out_bits, 2, 32)
        m = _check_columns(op, "m", m, n, torch.int64, x.device)
        e = _check_columns(op, "e", e, n, torch.int64, x.device)
        lo, hi = out_range(out_bits)
        out_dtype = int_dtype_for_bits(out_bits)
    else:
        lo, hi = out_range(32)
        out_dtype = torch.int32
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_m, block_n, block_k, group_m, warps, stages = _linear_config(rows, n, k)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n, block_n),)
    _int8_linear_kernel[grid](
        x, w, bias if bias is not None else y, m if requant else y, e if requant else y, y, rows, n, k,
        HAS_BIAS=bias is not None, REQUANT=requant, OUT_LO=lo, OUT_HI=hi,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=k % block_k == 0,
        num_warps=warps, num_stages=stages)
    return y
