"""What the Triton GEMM families share (int8_linear, the shift GEMMs): the grouped program order,
and split-K -- more programs per output tile when the tiles alone leave SMs idle (small M) --
with a reduction whose bits do not depend on the order the splits finish in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_DEFAULT_SMS = 132  # H100 SXM; the interpreter and the sm_90 compile test have no device to ask


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share each column tile while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m


@triton.jit
def split_k_reduce(acc, ws_ptr, count_ptr, tile, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """(the tile's full sum, whether this program runs the epilogue). Each split stores its
    partial in its own slot of the tile; the split that arrives last (an acq_rel counter) sums
    every slot in slot order, so the bits never depend on the arrival order (float sums too).
    The slots are contiguous: unmasked 16-byte I/O."""
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    slot = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
    tl.store(slot + tl.program_id(1) * (BLOCK_M * BLOCK_N) + tile_offs, acc)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    if last:  # a runtime loop: one partial in registers at a time (unrolled, they spill)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
        for s in range(SPLIT_K):
            acc += tl.load(slot + s * (BLOCK_M * BLOCK_N) + tile_offs, cache_modifier=".cg")
    return acc, last


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count  # cached by torch: no sync
    return _DEFAULT_SMS


def split_k_count(tiles: int, k: int, block_k: int, sms: int) -> int:
    """How many K ranges each output tile is summed over: enough programs to fill the SMs when
    the tiles alone fill less than half of them (small M), at most 8 and at least one BLOCK_K
    step per range."""
    steps = triton.cdiv(k, block_k)
    if tiles >= sms // 2 or steps < 2:
        return 1
    return min(8, triton.cdiv(sms, tiles), steps)


def split_k_plan(tiles: int, k: int, block_k: int, device, split_k: int | None, acc_dtype: torch.dtype,
                 block_m: int, block_n: int) -> tuple[int, int, Tensor | None, Tensor | None]:
    """(SPLIT_K, K_SPLIT, workspace, counters) for ``tiles`` output tiles over K. ``split_k``
    None: split_k_count on this device; 1: off. K_SPLIT is a multiple of block_k and no range is
    empty. The workspace and counters exist only when SPLIT_K > 1."""
    if split_k is None:
        split_k = split_k_count(tiles, k, block_k, sm_count(torch.device(device)))
    if isinstance(split_k, bool) or not isinstance(split_k, int) or not 1 <= split_k <= 64:
        raise ValueError(f"split_k must be an int in [1, 64], got {split_k!r}")
    k_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k if k else block_k
    split_k = max(1, triton.cdiv(k, k_split))
    if split_k == 1:
        return 1, k_split, None, None
    ws = torch.empty((tiles, split_k, block_m * block_n), dtype=acc_dtype, device=device)
    return split_k, k_split, ws, torch.zeros((tiles,), dtype=torch.int32, device=device)
