"""int8_linear's Triton GEMM (effkern.triton.int8_linear) against ref_int8_linear_rows, bit for bit,
on each of its paths: split-K on and off, per-tensor (scalar) and per-column constants, the
32-bit epilogue chosen on the host or by the kernel, the int64 epilogue outside the 32-bit
range, out_bits 8/16/32, odd M/N/K and saturation extremes; and the 32-bit requantisation
helper of effkern.triton.requant against the int64 reference on its whole claimed range.

Runs on CUDA when available, else under TRITON_INTERPRET=1 (set before Python starts).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from tests.triton_helpers import GarbageBytes, PoisonedEmpty, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from effkern import _requant as ref  # noqa: E402
from effkern.triton import gemm  # noqa: E402
from effkern.triton import int8_linear as T  # noqa: E402
from effkern.triton.requant import (E_FAST_HI, E_FAST_LO, requant_i32_constants, requant_i32_host,  # noqa: E402
                                    requant_i32_in_range, requantize_tile_i32)


@pytest.fixture(autouse=True)
def poison(monkeypatch, gen):
    """Outputs and split-K partials come from a torch.empty that returns garbage."""
    monkeypatch.setattr(torch, "empty", PoisonedEmpty(GarbageBytes(gen, dtypes=(torch.int8, torch.int16, torch.int32))))


def ints(shape, lo, hi, gen, dtype=torch.int64):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(dtype).to(DEVICE)


def check(x, w, bias, m, e, out_bits, **kw):
    got = T.int8_linear_rows(x, w, bias, m, e, out_bits, **kw)
    want = ref.ref_int_gemm_rows(x, w, bias, m, e, out_bits)
    assert got.dtype == want.dtype and got.shape == want.shape
    if not torch.equal(got, want):
        bad = (got.to(torch.int64) != want.to(torch.int64)).nonzero()
        raise AssertionError(f"{kw}: {len(bad)} of {got.numel()} differ, first at {tuple(bad[0].tolist())}")


def constants(cols, k, gen, lo_shift=-12, hi_shift=-2):
    """m in [2^30, 2^31] (2^31 included), e around the 32-bit range for acc ~ 74^2 sqrt(K)."""
    m = ints((cols,), 2**30, 2**31, gen)
    m[::3] = 2**31
    base = max(1, int(74 * 74 * k**0.5)).bit_length() + 31
    return m, ints((cols,), base + lo_shift, base + hi_shift, gen)


# --------------------------------------------------------------------------------------------
# The 32-bit requantisation helper on its claimed range
# --------------------------------------------------------------------------------------------


@triton.jit
def _i32_kernel(a_ptr, m_ptr, e_ptr, y_ptr, ok_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0)
    m = tl.load(m_ptr + offs, mask=mask, other=2**30)
    e = tl.load(e_ptr + offs, mask=mask, other=40)
    m1, t1 = requant_i32_constants(m, e)
    tl.store(y_ptr + offs, requantize_tile_i32(a, m1, t1, -(2**31), 2**31 - 1), mask=mask)
    tl.store(ok_ptr + offs, requant_i32_in_range(m, e).to(tl.int8), mask=mask)


def test_requantize_tile_i32_matches_int64_reference(gen):
    n = 4096
    a = ints((n,), -(2**31), 2**31 - 1, gen, torch.int32)
    a[:6] = torch.tensor([-(2**31), 2**31 - 1, 0, -1, 1, -(2**30)], dtype=torch.int32)
    m = ints((n,), 0, 2**31, gen)
    m[::4] = 2**31
    m[1::7] = 0
    e = ints((n,), E_FAST_LO, E_FAST_HI, gen)
    e[2::5] = E_FAST_LO  # with m = 2^31 some of these leave the range: flagged, not computed
    ties = slice(1000, 3000)  # low bits zero: exact halves are common
    a[ties] = (a[ties] >> 20) << 20
    m[ties] = (m[ties] >> 14) << 14
    y = torch.empty(n, dtype=torch.int32, device=DEVICE)
    ok = torch.empty(n, dtype=torch.int8, device=DEVICE)
    _i32_kernel[(triton.cdiv(n, 512),)](a, m, e, y, ok, n, BLOCK=512)
    host = torch.tensor([requant_i32_host(int(mm), int(ee)) is not None for mm, ee in zip(m.tolist(), e.tolist())])
    assert torch.equal(ok.bool().cpu(), host)
    assert host.float().mean() > 0.9
    want = ref.ref_round_shift_half_even(a.to(torch.int64) * m, e).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    sel = host.to(DEVICE)
    assert torch.equal(y[sel], want[sel])


# --------------------------------------------------------------------------------------------
# The GEMM, every path
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (1, 33, 100), (33, 17, 197), (197, 100, 33), (5, 64, 1024), (70, 40, 520)]


@pytest.mark.parametrize("shape", SHAPES)
def test_paths(shape, gen):
    mm, n, k = shape
    x = ints((mm, k), -128, 127, gen, torch.int8)
    w = ints((n, k), -128, 127, gen, torch.int8)
    bias = ints((n,), -(2**24), 2**24, gen, torch.int32)
    for split_k in (None, 1, 3):
        check(x, w, None, None, None, 32, split_k=split_k)
        check(x, w, bias, None, None, 32, split_k=split_k)
        for out_bits in (8, 16, 32):
            for cols in (1, n):
                m, e = constants(cols, k, gen)
                for host in (True, False):
                    check(x, w, bias, m, e, out_bits, split_k=split_k, host_epilogue=host)


@pytest.mark.parametrize("host", [True, False])
def test_outside_the_32_bit_range(host, gen):
    """Shifts below 33 or above 62 (and e <= 0) take the int64 epilogue; mixed in one tile too."""
    x = ints((37, 96), -128, 127, gen, torch.int8)
    w = ints((50, 96), -128, 127, gen, torch.int8)
    bias = ints((50,), -(2**30), 2**30, gen, torch.int32)
    odd = torch.tensor([-2, 0, 1, 20, 31, 32, 33, 40, 62, 63, 70], device=DEVICE)
    for split_k in (1, 2):
        for v in odd.tolist():
            check(x, w, bias, torch.tensor([2**31], device=DEVICE), torch.tensor([v], device=DEVICE), 16,
                  split_k=split_k, host_epilogue=host)
        m = ints((50,), 2**30, 2**31, gen)
        e = odd[ints((50,), 0, len(odd) - 1, gen)]
        for out_bits in (8, 32):
            check(x, w, bias, m, e, out_bits, split_k=split_k, host_epilogue=host)


def test_saturation_extremes(gen):
    """acc at +-2^14 K (all -128 / 127), int32-saturating biases, every output width."""
    k = 4096
    x = torch.full((3, k), -128, dtype=torch.int8, device=DEVICE)
    x[1] = 127
    w = torch.full((6, k), -128, dtype=torch.int8, device=DEVICE)
    w[2] = 127
    bias = torch.tensor([2**31 - 1, -(2**31), 0, 2**30, -(2**30), 1], dtype=torch.int32, device=DEVICE)
    for split_k in (1, 4):
        for b in (None, bias):
            check(x, w, b, None, None, 32, split_k=split_k)
            for out_bits in (2, 8, 16, 32):
                for m, e in ((torch.tensor([2**31]), torch.tensor([33])), (torch.tensor([2**30]), torch.tensor([62])),
                             constants(6, k, gen, -20, 0)):
                    for host in (True, False):
                        check(x, w, b, m.to(DEVICE), e.to(DEVICE), out_bits, split_k=split_k, host_epilogue=host)


def test_split_k_choice_and_arguments(gen):
    """Small M splits K (grid fills the SMs); bad constants raise."""
    assert gemm.split_k_count(tiles=36, k=384, block_k=128, sms=132) == 3  # ViT-S qkv at batch 1
    assert gemm.split_k_count(tiles=36, k=100, block_k=128, sms=132) == 1  # one K step
    assert gemm.split_k_count(tiles=12, k=3072, block_k=128, sms=132) == 8
    assert gemm.split_k_count(tiles=900, k=3072, block_k=128, sms=132) == 1
    x = ints((2, 16), -128, 127, gen, torch.int8)
    w = ints((4, 16), -128, 127, gen, torch.int8)
    with pytest.raises(ValueError, match="m must be an int64 tensor"):
        T.int8_linear_rows(x, w, None, torch.ones(3, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="split_k"):
        T.int8_linear_rows(x, w, None, None, None, 8, split_k=0)
