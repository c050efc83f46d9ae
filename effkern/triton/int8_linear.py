"""Triton backend of ``int8_linear``: the int8 x int8 -> int32 GEMM with a fused saturating bias
and requantising epilogue, bit for bit the reference ``ref_int_gemm_rows`` of
:mod:`effkern.ops.integer`.

Tiled GEMM, ``tl.dot(int8, int8) -> int32`` accumulation, grouped program order for L2 reuse,
then the epilogue: an int32 saturating bias add and the requantisation of
:mod:`effkern.triton.requant` -- in 32-bit arithmetic (one widening multiply) where that is
proven exact, which covers every realistic scale ratio, else in int64 as the ``requantize``
kernel does. Per-tensor constants known on the host are two scalar arguments; the host picks the
epilogue when it holds the constants, the kernel (per tile, no sync) when they live on the
device. Small M splits K over several programs per tile, reduced exactly in int32 by the last
to arrive. Tile sizes are chosen by shape and epilogue (no autotuning), so that two or three
blocks share an SM at large M. The integer row kernels live in :mod:`effkern.triton.integer`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import MAX_INT8_LINEAR_K
from effkern.triton.integer import _check_columns, _check_int, _check_rows
from effkern.triton.gemm import split_k_plan, split_k_reduce, tile_ids
from effkern.triton.requant import INT32, PER_COLUMN, epilogue_args, requantize_epilogue, saturating_add_i32

@triton.jit(do_not_specialize=["m_val", "e_val"])
def _int8_linear_kernel(x_ptr, w_ptr, bias_ptr, m_ptr, e_ptr, m_val, e_val, y_ptr, ws_ptr, count_ptr,
                        M, N, K, K_SPLIT, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr,
                        CONSTS: tl.constexpr, EPILOGUE: tl.constexpr,
                        OUT_LO: tl.constexpr, OUT_HI: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Split-K: program_id(1) sums K in [k0, k0 + K_SPLIT) (K_SPLIT a multiple of BLOCK_K).
    k0 = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(K, k0 + K_SPLIT)
    # Rows / columns past the edge re-read valid ones (never stored): loads need no M/N mask.
    safe_m = (offs_m % M).to(tl.int64)
    safe_n = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + safe_m[:, None] * K + (k0 + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + safe_n[None, :] * K + (k0 + offs_k)[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k0, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = k_end - k
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    last = True
    if SPLIT_K > 1:  # exact: int32 sums are associative and the full sum fits (K <= 2^17 - 1)
        acc, last = split_k_reduce(acc, ws_ptr, count_ptr, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, SPLIT_K, BLOCK_M, BLOCK_N)

    if last:
        n_mask = offs_n < N
        out = acc
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0)
            out = saturating_add_i32(out, bias[None, :])
        if REQUANT:
            out = requantize_epilogue(out, m_ptr, e_ptr, m_val, e_val, offs_n, n_mask, CONSTS, EPILOGUE, OUT_LO, OUT_HI)
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


# Host wrapper (the arguments of ref_int_gemm_rows)

def _linear_config(m: int, n: int, k: int, consts: int, epilogue: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for Hopper-class GPUs.

    Read by compiling for sm_90a (tests/sm90_launches_int8_linear.py): every tile pipelines its
    loads (cp.async), uses wgmma from BLOCK_M = 64 up and does not spill. For large M the tiles
    are sized so that several blocks share an SM (one's epilogue overlaps another's main loop):
    per-tensor 32-bit: 128 x 128, 8 warps, ~115 registers, 96 KiB: 2 per SM; per-column 32-bit:
    128 x 64, 4 warps (16 columns' constants per thread), ~151 registers, 72 KiB: 3 per SM; the
    int64 epilogue (compiled alone, or beside the 32-bit one when the kernel decides) needs
    far more registers: 64 x 64 tiles.
    """
    block_k = min(128, max(32, triton.next_power_of_2(k)))
    if k % 16:  # rows not 16-byte aligned: byte loads without cp.async, a short K step keeps them few
        block_k = 32
    if m > 64:
        if epilogue != INT32:
            return 64, 64, block_k, 8, 4, 3
        if consts == PER_COLUMN:
            return 128, 64, block_k, 8, 4, 3
        return 128, 128, block_k, 8, 8, 3
    if m > 32:
        return 64, 64, block_k, 8, 4, 4
    block_m = max(16, triton.next_power_of_2(m))
    block_n = 64 if n <= 4096 else 128
    return block_m, block_n, block_k, 8, 4, 4


def int8_linear_rows(x: Tensor, w: Tensor, bias: Tensor | None, m: Tensor | None, e: Tensor | None,
                     out_bits: int, split_k: int | None = None, host_epilogue: bool = True) -> Tensor:
    """saturate_int32(x @ w^T + bias), optionally requantised per output column
    (ref_int_gemm_rows).

    m, e: int64, shape (N,) per column or (1,) per tensor (then the epilogue uses two scalars).
    The 32-bit epilogue is used where every (m, e) satisfies 0 <= m <= 2^31 and 33 <= e <= 62
    (decided here for CPU constants, else per tile in the kernel: no sync); else int64.
    split_k: K ranges per output tile (None: chosen by shape; 1: off), reduced exactly in int32.
    host_epilogue: False leaves the choice of epilogue to the kernel even for CPU constants (as
    for device ones; tests and static reads use it).
    """
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
    requant = m is not None
    m, e, m_val, e_val, consts, epilogue, lo, hi, out_dtype = epilogue_args(op, m, e, n, out_bits, x.device,
                                                                            host_epilogue)
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    # without requantisation the epilogue is the bias alone: the per-tensor 32-bit tiles
    block_m, block_n, block_k, group_m, warps, stages = _linear_config(rows, n, k, consts, epilogue)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    if split_k is not None:
        _check_int(op, "split_k", split_k, 1, 64)
    split_k, k_split, ws, count = split_k_plan(tiles, k, block_k, x.device, split_k, torch.int32, block_m, block_n)
    _int8_linear_kernel[(tiles, split_k)](
        x, w, y if bias is None else bias, y if m is None else m, y if e is None else e, m_val, e_val,
        y, y if ws is None else ws, y if count is None else count, rows, n, k, k_split,
        HAS_BIAS=bias is not None, REQUANT=requant, CONSTS=consts, EPILOGUE=epilogue, OUT_LO=lo, OUT_HI=hi,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=k % block_k == 0,
        SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return y
