"""The CUDA kernel of the 2:4-sparse int8 GEMM (kernels/sparse24) without a GPU, and on one.

CPU (always), through kernels/sparse24/host_check.cpp compiled for the host:
* the registers the kernel's ldmatrix and 32-bit loads give each lane (swizzled stages, every
  fragment of every warp) are exactly the operands tests/sparse_mma_emulation.py derives from the
  PTX ISA for the tile (that model is pinned to torch's CUTLASS-layout conversion in
  tests/test_sparse_mma_emulation.py);
* the host model of mma.sp equals that emulation on random registers;
* the whole kernel, replayed block by block (split-K included), gives the exact int32 product,
  and its epilogue follows the specified float order (tests/test_sparse24.py's transcription).
GPU (marked cuda): a one-warp probe of the instruction on known inputs first, then the kernel.
"""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import effkern
from effkern.ops.sparse24 import (
    SPARSE24_INT8_LINEAR,
    Sparse24Weight,
    sparse24_int8_linear,
)
from tests import sparse_mma_emulation as emu
from tests.cuda_lib_helpers import (
    ROOT,
    assert_cpu_tensors_refused,
    assert_cuda_op_matches_python,
    build_host_check,
    needs_lib,
    require_cuda,
)

P = ctypes.POINTER
U32 = ctypes.c_uint32


def ptr(t, ctype):
    return None if t is None else ctypes.cast(t.data_ptr(), P(ctype))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    lib = build_host_check(tmp_path_factory, "sparse24")
    i64, i32, f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.sparse24_plan.argtypes = [i64, i64, i64, ctypes.c_int, P(i64)]
    lib.sparse24_fragment.argtypes = [P(ctypes.c_int8), P(ctypes.c_int8), P(ctypes.c_uint8), i64, i64, i64,
                                      ctypes.c_int, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      P(U32), P(U32), P(U32)]
    lib.sparse24_mma.argtypes = [P(U32), P(U32), P(U32), P(i32)]
    lib.sparse24_emulate.argtypes = [P(ctypes.c_int8), P(ctypes.c_int8), P(ctypes.c_uint8), i64, i64, i64,
                                     ctypes.c_int, ctypes.c_int, P(f32), ctypes.c_int, P(f32), P(f32), P(i32),
                                     P(f32), ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return lib


def random_sparse(gen, n, k):
    """A random 2:4 int8 weight [N, K] (some groups with fewer than two non-zeros) and its
    compressed (values, meta)."""
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int64).to(torch.int8)
    scores = torch.rand(n, k // 4, 4, generator=gen)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
    w = torch.where(keep.view(n, k), w, torch.zeros_like(w))
    w[0, :8] = 0  # empty groups get padded positions
    values, meta = emu.compress(w)
    return w, values, meta


def as_u32(t):
    return t.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.uint32) if t.dtype != torch.uint32 else t


@pytest.mark.parametrize("m,n,k", [(5, 136, 128), (70, 200, 192)])
def test_kernel_fragments_are_the_ptx_operands(host, m, n, k):
    """Every fragment of every warp of the first blocks, at every K step: the kernel's loads give
    each lane what the PTX ISA says the lane holds for that tile."""
    gen = torch.Generator().manual_seed(m + n + k)
    _, values, meta = random_sparse(gen, n, k)
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int64).to(torch.int8)
    block_tokens = 16 if m <= 16 else 64
    warps = {16: [(32 * w_, 0) for w_ in range(4)], 64: [(64 * (w_ // 2), 32 * (w_ % 2)) for w_ in range(4)]}
    frags = (2, 2) if block_tokens == 16 else (4, 4)
    checked = 0
    for block_row0 in range(0, n, 128):
        for step in range(k // 64):
            for wr, wt in warps[block_tokens]:
                for i in range(frags[0]):
                    for j in range(frags[1]):
                        row0, tok0 = wr + 16 * i, wt + 8 * j
                        if block_row0 + row0 >= n or tok0 >= m:
                            continue
                        a = torch.zeros(32, 4, dtype=torch.uint32)
                        b = torch.zeros(32, 4, dtype=torch.uint32)
                        e = torch.zeros(32, dtype=torch.uint32)
                        host.sparse24_fragment(ptr(x, ctypes.c_int8), ptr(values, ctypes.c_int8),
                                               ptr(meta, ctypes.c_uint8), m, n, k, block_tokens, 0, block_row0,
                                               step, row0, tok0, ptr(a, U32), ptr(b, U32), ptr(e, U32))
                        # the PTX operands of the same tile, from zero-padded copies of the operands
                        rows = block_row0 + row0
                        pad_v = torch.zeros(rows + 16, k // 2, dtype=torch.int8)
                        pad_m = torch.full((rows + 16, k // 8), 0x44, dtype=torch.uint8)
                        avail = min(n, rows + 16)
                        pad_v[:avail] = values[:avail]
                        pad_m[:avail] = meta[:avail]
                        pad_x = torch.zeros(tok0 + 8, k, dtype=torch.int8)
                        pad_x[:min(m, tok0 + 8)] = x[:min(m, tok0 + 8)]
                        want = emu.lane_registers(pad_v, pad_m, pad_x.t(), rows, 64 * step, tok0)
                        assert a.tolist() == want.a, (rows, step, tok0, "A")
                        assert b.tolist() == want.b, (rows, step, tok0, "B")
                        live = [lane for lane in range(32) if rows + lane // 4 + 8 * (lane % 4 & 1) < n]
                        assert [int(e[ln]) for ln in live] == [want.e[ln] for ln in live], (rows, step, tok0, "e")
                        checked += 1
    assert checked >= 8


def test_host_mma_model_is_the_emulation(host):
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        _, values, meta = random_sparse(gen, 16, 64)
        bmat = torch.randint(-128, 128, (64, 8), generator=gen, dtype=torch.int64).to(torch.int8)
        regs = emu.lane_registers(values, meta, bmat, 0, 0, 0)
        c0 = torch.randint(-(2**31), 2**31, (32, 4), generator=gen, dtype=torch.int64)
        want = emu.mma_sp_emulate(regs.a, regs.b, c0.tolist(), regs.e)
        a = torch.tensor(regs.a, dtype=torch.int64).to(torch.uint32)
        b = torch.tensor(regs.b, dtype=torch.int64).to(torch.uint32)
        e = torch.tensor(regs.e, dtype=torch.int64).to(torch.uint32)
        c = c0.to(torch.int32).contiguous()
        assert host.sparse24_mma(ptr(a, U32), ptr(b, U32), ptr(e, U32), ptr(c, ctypes.c_int32)) == 0
        assert c.tolist() == want


def test_plan_splits_k_for_few_tokens(host):
    plan = (ctypes.c_int64 * 5)()
    host.sparse24_plan(1, 768, 3072, 132, plan)
    assert (plan[0], plan[3]) == (16, 8)
    host.sparse24_plan(64 * 197, 3072, 768, 132, plan)
    assert (plan[0], plan[3]) == (64, 1)


def emulate(host, x, values, meta, n, kind=0, act=0, x_scale=None, w_scale=None, bias=None, inv=None, sms=1):
    m, k = x.shape
    out_dtype = {0: torch.int32, 1: torch.float32, 2: torch.float32, 3: torch.int8}[kind]
    y = torch.full((m, n), -7, dtype=out_dtype)
    f = ctypes.c_float
    xs = torch.ones(1) if x_scale is None else x_scale
    ws = torch.ones(n) if w_scale is None else w_scale
    splits = host.sparse24_emulate(ptr(x, ctypes.c_int8), ptr(values, ctypes.c_int8), ptr(meta, ctypes.c_uint8),
                                   m, n, k, kind, act, ptr(xs, f), int(xs.numel() > 1), ptr(ws, f),
                                   ptr(bias if bias is not None and bias.dtype == torch.float32 else None, f),
                                   ptr(bias if bias is not None and bias.dtype == torch.int32 else None,
                                       ctypes.c_int32),
                                   ptr(inv, f), int(inv is not None and inv.numel() > 1), y.data_ptr(), sms)
    assert splits > 0
    return y, splits


@pytest.mark.parametrize("m,n,k", [(1, 136, 128), (5, 72, 192), (70, 200, 128), (130, 136, 256)])
@pytest.mark.parametrize("sms", [1, 132])
def test_kernel_product_is_exact(host, m, n, k, sms):
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    w, values, meta = random_sparse(gen, n, k)
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int64).to(torch.int8)
    bias = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    y, splits = emulate(host, x, values, meta, n, kind=0, bias=bias, sms=sms)
    acc = x.long() @ w.long().T + bias.long()
    assert torch.equal(y, acc.clamp(-(2**31), 2**31 - 1).to(torch.int32))
    assert (splits > 1) == (sms > 1 and k > 64)


def epilogue_transcription(acc, x_scale, w_scale, bias, act, inv):
    """The specified float order (effkern/ops/sparse24.py), in float32 torch ops."""
    s = (x_scale.reshape(-1, 1) * w_scale.reshape(1, -1)).float()
    v = acc.float() * s
    v = v + bias
    if act == 1:
        v = torch.clamp_min(v, 0.0)
    if act == 2:
        v = 0.5 * v * (1.0 + torch.erf(v * 0.7071067811865476))
    if inv is None:
        return v
    return torch.round((v * inv).clamp(-128, 127)).to(torch.int8)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("kind", [1, 3])
def test_kernel_epilogue_follows_the_specified_order(host, act, kind):
    gen = torch.Generator().manual_seed(act * 10 + kind)
    m, n, k = 37, 136, 192
    w, values, meta = random_sparse(gen, n, k)
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int64).to(torch.int8)
    x_scale = torch.rand(m, generator=gen) * 1e-3 + 1e-4
    w_scale = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=gen)
    inv = (1.0 / (torch.rand(n, generator=gen) * 0.05 + 0.01)).float() if kind == 3 else None
    for sms in (1, 132):
        y, _ = emulate(host, x, values, meta, n, kind=kind, act=act, x_scale=x_scale, w_scale=w_scale, bias=bias,
                       inv=inv, sms=sms)
        want = epilogue_transcription(x.long() @ w.long().T, x_scale, w_scale, bias, act, inv)
        if act == 2:  # erf of the C library against torch's: a last-ulp difference at most
            if kind == 1:
                torch.testing.assert_close(y, want, rtol=2e-7, atol=1e-7)
            else:
                assert int((y.int() - want.int()).abs().max()) <= 1
                assert float((y != want).float().mean()) < 0.01
        else:
            assert torch.equal(y, want)


# --------------------------------------------------------------------------------------------
# the library op (CPU: schema and refusals) and the kernel's own limits
# --------------------------------------------------------------------------------------------


@needs_lib
def test_library_op_fits_the_python_kernel():
    assert_cuda_op_matches_python("sparse24_int8_linear")


@needs_lib
def test_library_op_refuses_cpu_tensors():
    w = Sparse24Weight.from_float(torch.randn(8, 64))
    x = torch.zeros(2, 64, dtype=torch.int8)
    assert_cpu_tensors_refused({"cuda_sparse24_int8_linear": lambda: torch.ops.effkern.cuda_sparse24_int8_linear(
        x, w.values, w.meta, w.scale, None, torch.ones(2), None, 64, 0, 0)})


def test_cuda_backend_declines_k_off_the_mma_step():
    check = SPARSE24_INT8_LINEAR.kernels.impls["cuda"].check
    w = Sparse24Weight.from_float(torch.randn(8, 72))
    args = (w.values, w.meta, w.scale, None, torch.ones(3), None, 72, torch.int32, None)
    assert check(torch.zeros(3, 72, dtype=torch.int8), *args) == ["K=72 is not a multiple of 64 (the sparse MMA's K step)"]
    w = Sparse24Weight.from_float(torch.randn(8, 128))
    args = (w.values, w.meta, w.scale, None, torch.ones(3), None, 128, torch.int32, None)
    assert check(torch.zeros(3, 128, dtype=torch.int8), *args) == []


# --------------------------------------------------------------------------------------------
# GPU: the one-warp probe first, then the kernel
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """tests/sparse24_probe.cu built with nvcc for this GPU."""
    require_cuda()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc to build the probe")
    major, minor = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("sparse24_probe") / "probe.so"
    subprocess.run([nvcc, "-std=c++17", "-O2", f"-arch=sm_{major}{minor}", "-shared", "-Xcompiler", "-fPIC",
                    "-I", ROOT, os.path.join(ROOT, "tests", "sparse24_probe.cu"), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.sparse24_probe.argtypes = [ctypes.c_void_p] * 5
    return lib


def run_probe(lib, regs, c):
    dev = [torch.tensor(v, dtype=torch.int64).to(torch.int32).cuda() for v in (regs.a, regs.b, c, regs.e)]
    d = torch.full((32, 4), -1, dtype=torch.int32, device="cuda")
    assert lib.sparse24_probe(*(t.data_ptr() for t in dev), d.data_ptr()) == 0
    return d.cpu().tolist()


@pytest.mark.cuda
def test_probe_one_sparse_mma_pins_the_lane_layout(probe):
    """One mma.sp on known operands: the hardware's D is the emulation's, for several metadata
    patterns; the other plausible metadata layout (rows and K halves of e swapped) is not."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        w, values, meta = random_sparse(gen, 16, 64)
        bmat = torch.randint(-128, 128, (64, 8), generator=gen, dtype=torch.int64).to(torch.int8)
        regs = emu.lane_registers(values, meta, bmat, 0, 0, 0)
        c = torch.randint(-(2**20), 2**20, (32, 4), generator=gen).tolist()
        got = run_probe(probe, regs, c)
        assert got == emu.mma_sp_emulate(regs.a, regs.b, c, regs.e)
        assert emu.d_matrix(got).tolist() == (w.long() @ bmat.long() + emu.d_matrix(c)).tolist()
        swapped = [regs.e[4 * (ln // 4) + [0, 2, 1, 3][ln % 4]] for ln in range(32)]
        if swapped != regs.e:
            assert run_probe(probe, emu.LaneRegisters(regs.a, regs.b, swapped), c) != got


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", [(1, 136, 128), (16, 768, 3072), (70, 200, 192), (197, 384, 1536)])
@pytest.mark.parametrize("out", ["int32", "int8", "bfloat16", "float16", "float32-gelu"])
def test_cuda_kernel_matches_reference(m, n, k, out):
    require_cuda()
    gen = torch.Generator().manual_seed(m + n + k)
    w = Sparse24Weight.from_float(torch.randn(n, k, generator=gen)).to("cuda")
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int64).to(torch.int8).cuda()
    dtype = getattr(torch, out.split("-")[0])
    act = "gelu" if out.endswith("gelu") else None
    kw = {"x_scale": (torch.rand(m, generator=gen) * 1e-2 + 1e-3).cuda(), "out_dtype": dtype, "activation": act}
    if dtype == torch.int32:
        bias = torch.randint(-(2**20), 2**20, (n,), generator=gen, dtype=torch.int32).cuda()
    else:
        bias = torch.randn(n, generator=gen).cuda()
    if dtype == torch.int8:
        kw["out_scale"] = torch.tensor(0.05)
    with effkern.backend("cuda"):
        got = sparse24_int8_linear(x, w, bias, **kw)
    with effkern.backend("torch"):
        want = sparse24_int8_linear(x, w, bias, **kw)
    if act is None:
        assert torch.equal(got, want)
    else:  # erff on both sides, but in another compilation: allow a last-ulp difference
        torch.testing.assert_close(got, want, rtol=3e-7, atol=1e-6)
