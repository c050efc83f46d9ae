"""The 2:4-sparse int8 GEMM family (effkern.ops.sparse24): pruning, the compressed format (meta
bits pinned on a hand-written example), the op against an independent int64 transcription of
its semantics on every backend, GELU's allowance for erf's last ulp, errors, the registry's
samples / fake / opcheck / invalid cases, and torch.compile."""

from __future__ import annotations

import os

import pytest
import torch

import effkern
from effkern._registry import OPS
from effkern.ops import (
    Sparse24Weight,
    mask_2to4,
    pack_meta,
    prune_2to4,
    sparse24_int8_linear,
    unpack_meta,
)
from tests.conftest import DEVICE, backend_reasons

NAME = "sparse24_int8_linear"
OP = OPS[NAME]
BACKENDS = [b for b in OP.backends if not backend_reasons(NAME, b)]


def _int8(gen, shape) -> torch.Tensor:
    return torch.randint(-128, 128, tuple(shape), generator=gen, dtype=torch.int32).to(torch.int8).to(DEVICE)


def _sparse_int8(gen, n, k, zero_frac=0.15) -> torch.Tensor:
    """A dense int8 [N, K] weight with at most two nonzeros per group of four (some fewer)."""
    w = prune_2to4(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32))
    return torch.where(torch.rand(n, k, generator=gen) < zero_frac, 0, w).to(torch.int8)


def _run(backend, *args, **kwargs):
    with effkern.backend(backend):
        return sparse24_int8_linear(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


def test_prune_keeps_the_two_largest_with_ties_to_the_lower_index():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 5.0, -1.0]])
    expected = torch.tensor([[0.0, -3.0, 2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 5.0, 0.0]])
    assert torch.equal(prune_2to4(w), expected)
    mask = mask_2to4(w)
    assert mask.dtype == torch.bool
    # all-equal groups (and all-zero ones) keep positions 0 and 1; [-1, 1, 5, -1] keeps 0 and 2
    assert mask[0].tolist() == [False, True, True, False, True, True, False, False,
                                True, True, False, False, True, False, True, False]


def test_prune_is_exactly_2to4_and_by_magnitude(gen):
    w = torch.randn(13, 64, 2, generator=gen).transpose(1, 2)  # [13, 2, 64], non-contiguous, 3-D
    w[0, 0, :8] = 1.5  # ties everywhere
    mask = mask_2to4(w)
    g = mask.reshape(13, 2, 16, 4)
    assert bool((g.sum(-1) == 2).all())
    a = w.abs().reshape(13, 2, 16, 4)
    kept_min = torch.where(g, a, torch.inf).amin(-1)
    dropped_max = torch.where(g, -torch.inf, a).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    assert torch.equal(prune_2to4(w), torch.where(mask, w, 0.0))
    assert torch.equal(prune_2to4(torch.tensor([[2, -7, 7, 1, 5, -128, 127, 0]], dtype=torch.int8)),
                       torch.tensor([[0, -7, 7, 0, 0, -128, 127, 0]], dtype=torch.int8))  # integer ties, |-128|


def test_prune_needs_k_multiple_of_4():
    with pytest.raises(ValueError, match="prune_2to4: the last dim of w .K. must be a multiple of 4"):
        prune_2to4(torch.ones(2, 6))
    with pytest.raises(ValueError, match="mask_2to4"):
        mask_2to4(torch.ones(3))


# --------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------


def test_meta_bit_layout_pinned():
    # groups: (1, 3) | (0, 2) | one nonzero at 2 -> pad (0, 2) | all zero -> (0, 1)
    #         one nonzero at 0 -> (0, 1) | one at 3 -> (0, 3) | (2, 3) | (1, 2)
    w = torch.tensor([[0, 5, 0, -6, 7, 0, -8, 0, 0, 0, 9, 0, 0, 0, 0, 0,
                       -1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 4, 0, -5, 6, 0]], dtype=torch.int8)
    sw = Sparse24Weight.from_int8(w, torch.tensor([0.5]))
    nibbles = [1 | 3 << 2, 0 | 2 << 2, 0 | 2 << 2, 0 | 1 << 2, 0 | 1 << 2, 0 | 3 << 2, 2 | 3 << 2, 1 | 2 << 2]
    assert nibbles == [0xD, 0x8, 0x8, 0x4, 0x4, 0xC, 0xE, 0x9]
    assert sw.meta.dtype == torch.uint8 and sw.meta.tolist() == [[0x8D, 0x48, 0xC4, 0x9E]]
    assert sw.values.dtype == torch.int8
    assert sw.values.tolist() == [[5, -6, 7, -8, 0, 9, 0, 0, -1, 0, 0, 2, 3, 4, -5, 6]]
    assert sw.in_features == 32 and sw.scale.dtype == torch.float32
    assert torch.equal(sw.decompress(), w)
    pos = unpack_meta(sw.meta)
    assert pos.tolist() == [[[1, 3], [0, 2], [0, 2], [0, 1], [0, 1], [0, 3], [2, 3], [1, 2]]]
    assert torch.equal(pack_meta(pos), sw.meta)


def test_format_round_trip(gen):
    w = _sparse_int8(gen, 37, 96)
    w[3] = 0  # an all-zero row
    scale = torch.rand(37, generator=gen) + 0.1
    sw = Sparse24Weight.from_int8(w, scale)
    assert sw.values.shape == (37, 48) and sw.meta.shape == (37, 12) and sw.scale.shape == (37,)
    assert torch.equal(sw.decompress(), w)
    pos = unpack_meta(sw.meta)
    assert bool((pos[..., 0] < pos[..., 1]).all()) and bool(((pos >= 0) & (pos <= 3)).all())
    assert torch.equal(pack_meta(pos), sw.meta)
    assert torch.equal(sw.dequantize(), w.float() * scale[:, None])


def test_from_int8_refuses_dense_groups_naming_row_and_group():
    w = torch.zeros(4, 16, dtype=torch.int8)
    w[2, 9:12] = 1  # group 2 of row 2: three nonzeros
    with pytest.raises(ValueError, match=r"from_int8: w_int8 is not 2:4 sparse: row 2, group 2 .* 3 nonzeros"):
        Sparse24Weight.from_int8(w, torch.ones(4))
    with pytest.raises(ValueError, match="K=12.* multiple of 8"):
        Sparse24Weight.from_int8(torch.zeros(2, 12, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        Sparse24Weight.from_int8(torch.zeros(4, 16, dtype=torch.int8), torch.ones(3))
    with pytest.raises(TypeError, match="w_int8 must have dtype int8"):
        Sparse24Weight.from_int8(torch.zeros(4, 16), torch.ones(4))


def test_from_float_scales_and_rounding(gen):
    # scale = 127 / 127 = 1 exactly: q is w rounded half to even
    w = torch.tensor([[127.0, 2.5, 0.0, 0.1, 3.5, -2.5, 0.0, 1.0],
                      [0.0] * 8,
                      [-0.3, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0]])
    sw = Sparse24Weight.from_float(w)
    assert sw.scale.tolist()[:2] == [1.0, 1.0]  # an all-zero row gets scale 1
    s2 = torch.tensor(0.6) / 127  # float32, as from_float computes it
    assert sw.scale[2] == s2
    q2 = torch.round(torch.tensor([-0.3, 0.6]) / s2).tolist()
    assert sw.decompress().tolist() == [[127, 2, 0, 0, 4, -2, 0, 0], [0] * 8, [q2[0], 0, q2[1], 0, 0, 0, 0, 0]]
    # random: q within [-127, 127], the max of each row hits 127, dequantize ~ the pruned weight
    w = torch.randn(24, 64, generator=gen)
    sw = Sparse24Weight.from_float(w)
    q = sw.decompress()
    wp = prune_2to4(w)
    assert torch.equal(sw.scale, wp.abs().amax(1) / 127)
    assert int(q.abs().max()) == 127 and bool((q.abs().amax(1) == 127).all())
    assert torch.equal(q != 0, wp != 0)
    assert bool(((sw.dequantize() - wp).abs() <= sw.scale[:, None] / 2 * (1 + 1e-6)).all())
    lin = torch.nn.Linear(64, 24)
    assert torch.equal(Sparse24Weight.from_linear(lin).decompress(), Sparse24Weight.from_float(lin.weight).decompress())
    with pytest.raises(ValueError, match="from_float: in_features .K=20. must be a multiple of 8"):
        Sparse24Weight.from_float(torch.ones(2, 20))
    with pytest.raises(TypeError, match="from_linear: linear must be a torch.nn.Linear"):
        Sparse24Weight.from_linear(w)


# --------------------------------------------------------------------------------------------
# The op against a transcription of its semantics
# --------------------------------------------------------------------------------------------


def oracle(x, w_dense, w_scale, bias, x_scale, out_dtype, out_scale, activation):
    """The docstring's semantics, written out independently: products summed in int64 from the
    dense weight (not the compressed one), then the epilogue step by step in float32."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.int64).cpu()
    acc = (rows[:, None, :] * w_dense.to(torch.int64).cpu()[None]).sum(-1)
    lead, n = x.shape[:-1], w_dense.shape[0]
    if out_dtype == torch.int32:
        if bias is not None:
            acc = acc + bias.cpu().to(torch.int64)
        return acc.clamp(-(2**31), 2**31 - 1).to(torch.int32).reshape(*lead, n)
    xs = torch.as_tensor(x_scale, dtype=torch.float32).cpu()
    xs = xs.reshape(()).expand(rows.shape[0]) if xs.numel() == 1 else xs.expand(*lead, 1).reshape(-1) \
        if xs.dim() == x.dim() else xs.reshape(-1)
    s = xs[:, None] * w_scale.cpu()[None, :]
    v = acc.to(torch.float32) * s
    if bias is not None:
        v = v + bias.cpu()
    if activation == "relu":
        v = torch.where(v > 0, v, torch.zeros_like(v))
    elif activation == "gelu":
        v = (0.5 * v) * (1.0 + torch.erf(v * torch.tensor(0.7071067811865476, dtype=torch.float32)))
    if out_dtype == torch.int8:
        inv = 1.0 / torch.as_tensor(out_scale, dtype=torch.float32).cpu().reshape(-1)
        q = v * inv
        return torch.round(q).clamp(-128, 127).to(torch.int8).reshape(*lead, n)
    return v.to(out_dtype).reshape(*lead, n)


def _case(gen, shape, n, layout="contiguous"):
    k = shape[-1]
    if layout == "permuted":
        x = _int8(gen, (*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "sliced":
        x = _int8(gen, (*shape[:-1], 2 * k))[..., 1::2]
    else:
        x = _int8(gen, shape)
    w = _sparse_int8(gen, n, k)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    return x, w, Sparse24Weight.from_int8(w, scale).to(DEVICE)


CASES = [
    # (x shape, layout, N, out_dtype, bias, x_scale kind, out_scale kind, activation)
    ((1, 8), "contiguous", 3, torch.int32, True, "tensor", None, None),
    ((3, 72), "sliced", 19, torch.int8, True, "token", "channel", "relu"),
    ((2, 9, 200), "permuted", 30, torch.bfloat16, True, "token1", None, None),
    ((5, 768), "contiguous", 7, torch.float16, False, "float", None, "relu"),
    ((2, 3, 40), "contiguous", 21, torch.float32, True, "batch", None, None),
    ((33, 16), "permuted", 18, torch.int8, False, "float", "tensor", None),
]


def _scales(gen, kind, x):
    lead = tuple(x.shape[:-1])
    if kind == "float":
        return 0.0123
    return {"tensor": torch.tensor(0.02),
            "token": torch.rand(lead, generator=gen) * 0.05 + 1e-3,
            "token1": torch.rand((*lead, 1), generator=gen) * 0.05 + 1e-3,
            "batch": torch.rand((lead[0],) + (1,) * (len(lead)), generator=gen) * 0.05 + 1e-3}[kind].to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_op_matches_the_oracle(gen, backend, case):
    shape, layout, n, out_dtype, has_bias, xs_kind, os_kind, act = CASES[case]
    x, w_dense, sw = _case(gen, shape, n, layout)
    if has_bias:
        bias = (torch.randint(-2**30, 2**30, (n,), generator=gen, dtype=torch.int32) if out_dtype == torch.int32
                else torch.randn(n, generator=gen)).to(DEVICE)
    else:
        bias = None
    xs = _scales(gen, xs_kind, x)
    o = {None: None, "tensor": 0.07, "channel": (torch.rand(n, generator=gen) * 0.1 + 0.01).to(DEVICE)}[os_kind]
    y = _run(backend, x, sw, bias, x_scale=xs, out_dtype=out_dtype, out_scale=o, activation=act)
    expected = oracle(x, w_dense, sw.scale, bias, xs, out_dtype, o, act)
    assert y.dtype == out_dtype and y.shape == (*shape[:-1], n) and y.is_contiguous()
    assert torch.equal(y.cpu(), expected), f"{backend}: {(y.cpu() != expected).sum()} of {y.numel()} differ"
    if out_dtype == torch.int8:  # the values are spread, not saturated: the check means something
        assert len(torch.unique(y)) > 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_random_calls_match_the_oracle(backend):
    seed = int.from_bytes(os.urandom(7), "little")  # fresh inputs each run (the seed is in the message)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        m, n = (int(v) for v in torch.randint(1, 50, (2,), generator=g))
        k = 8 * int(torch.randint(1, 30, (1,), generator=g))
        out_dtype = (torch.int32, torch.int8, torch.bfloat16, torch.float16, torch.float32)[int(torch.randint(5, (1,), generator=g))]
        act = None if out_dtype == torch.int32 else (None, "relu")[int(torch.randint(2, (1,), generator=g))]
        x, w_dense, sw = _case(g, (m, k), n, ("contiguous", "permuted", "sliced")[int(torch.randint(3, (1,), generator=g))])
        xs = (torch.rand(m, generator=g) * 0.05 + 1e-4).to(DEVICE)
        o = 0.05 if out_dtype == torch.int8 else None
        bias = None if out_dtype == torch.int32 else torch.randn(n, generator=g).to(DEVICE)
        y = _run(backend, x, sw, bias, x_scale=xs, out_dtype=out_dtype, out_scale=o, activation=act)
        expected = oracle(x, w_dense, sw.scale, bias, xs, out_dtype, o, act)
        assert torch.equal(y.cpu(), expected), f"seed {seed}: m={m} n={n} k={k} {out_dtype} {act}"


def test_triton_split_k_is_exact(gen):
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    from effkern.ops.sparse24 import ref_sparse24_int8_linear_rows
    from effkern.triton.sparse24 import sparse24_int8_linear_rows

    x, _, sw = _case(gen, (5, 520), 24)
    xs = torch.rand(5, generator=gen).to(DEVICE) * 0.01
    args = (x, sw.values, sw.meta, sw.scale, None, xs, torch.tensor([20.0], device=DEVICE), 520)
    for out_dtype in (torch.int32, torch.int8):
        ref = ref_sparse24_int8_linear_rows(*args, out_dtype, None)
        for split in (1, 3):
            got = sparse24_int8_linear_rows(*args, out_dtype, None, split_k=split)
            assert torch.equal(got, ref), f"split_k={split} {out_dtype}"


# --------------------------------------------------------------------------------------------
# GELU: bit-exact except where erf's last ulp explains the difference
# --------------------------------------------------------------------------------------------


def _next_after(t, direction):
    return torch.nextafter(t, torch.full_like(t, direction))


def _unexplained_gelu(got, ref, v, out_dtype, inv=None):
    """bool mask of the outputs whose difference from the torch reference ``ref`` erf's last ulp
    does not explain. v: float32 values before the activation (exact on every backend).
    int8: a mismatch must be off by one, with the reference's pre-rounding value within 1e-5
    relative of a .5 boundary. Floats: got lies between the outputs gelu gives with erf one ulp
    down and one ulp up, or within one ulp of the output dtype from ref."""
    c = torch.tensor(0.7071067811865476, dtype=torch.float32)
    e = torch.erf(v * c)

    def gelu_with(erf_value):
        return 0.5 * v * (1 + erf_value)

    diff = got != ref
    if out_dtype == torch.int8:
        q = gelu_with(e) * inv  # the reference's pre-rounding value
        assert torch.equal(torch.round(q).clamp(-128, 127).to(torch.int8), ref)  # it is the one rounded
        frac = q.abs() - q.abs().floor()
        near_tie = (frac - 0.5).abs() <= 1e-5 * q.abs()
        return diff & ~(near_tie & ((got.int() - ref.int()).abs() == 1))
    g_lo, g_hi = gelu_with(_next_after(e, -2.0)), gelu_with(_next_after(e, 2.0))
    lo, hi = torch.minimum(g_lo, g_hi).to(out_dtype), torch.maximum(g_lo, g_hi).to(out_dtype)
    ulp = (_next_after(ref, float("inf")) - ref).abs().float()
    return diff & ~(((got >= lo) & (got <= hi)) | ((got.float() - ref.float()).abs() <= ulp))


@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float32, torch.bfloat16, torch.float16])
def test_gelu_backends_agree_up_to_erfs_last_ulp(gen, out_dtype):
    others = [b for b in BACKENDS if b != "torch"]
    if not others:
        pytest.skip("only the torch backend runs here")
    x, _, sw = _case(gen, (61, 128), 50)
    xs = (torch.rand(61, generator=gen) * 0.05 + 1e-3).to(DEVICE)
    bias = torch.randn(50, generator=gen).to(DEVICE)
    o = (torch.rand(50, generator=gen) * 0.05 + 0.01).to(DEVICE) if out_dtype == torch.int8 else None
    inv = None if o is None else 1.0 / o.cpu()
    kw = {"x_scale": xs, "out_dtype": out_dtype, "out_scale": o}
    ref = _run("torch", x, sw, bias, activation="gelu", **kw).cpu()
    v = _run("torch", x, sw, bias, x_scale=xs, out_dtype=torch.float32).cpu()
    assert (v < -1).sum() > 100 and (v > 1).sum() > 100, "the inputs must cover both sides of gelu"
    if out_dtype == torch.int8:
        assert len(torch.unique(ref)) > 20  # not saturated: the comparison means something
    # The checker itself must reject a wrong answer: one element moved by 2 ulps / 2 steps.
    wrong = ref.clone()
    i = int((v.reshape(-1) > 1).nonzero()[7])
    if out_dtype == torch.int8:
        wrong.view(-1)[i] = wrong.view(-1)[i] - 2
    else:
        wrong.view(-1)[i] = _next_after(_next_after(wrong.view(-1)[i:i + 1], float("inf")), float("inf"))[0]
    assert int(_unexplained_gelu(wrong, ref, v, out_dtype, inv).sum()) == 1
    for backend in others:
        got = _run(backend, x, sw, bias, activation="gelu", **kw).cpu()
        assert got.shape == ref.shape and got.dtype == ref.dtype
        compared, differ = got.numel(), int((got != ref).sum())
        bad = _unexplained_gelu(got, ref, v, out_dtype, inv)
        assert compared == 61 * 50 and differ < compared // 20, f"{backend}: {differ} of {compared} differ"
        assert not bool(bad.any()), (f"{backend}: {int(bad.sum())} gelu outputs beyond erf's last ulp: "
                                     f"{got[bad][:5].tolist()} vs {ref[bad][:5].tolist()}")


# --------------------------------------------------------------------------------------------
# Errors of the public function
# --------------------------------------------------------------------------------------------


def test_public_errors(gen):
    x, _, sw = _case(gen, (2, 16), 4)
    with pytest.raises(TypeError, match="sparse24_int8_linear: w must be a Sparse24Weight"):
        sparse24_int8_linear(x, sw.decompress(), x_scale=0.1, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="x_scale must be a float or a float32 tensor"):
        sparse24_int8_linear(x, sw, x_scale="0.1", out_dtype=torch.float16)
    with pytest.raises(TypeError, match="x_scale must have dtype float32"):
        sparse24_int8_linear(x, sw, x_scale=torch.tensor(0.1, dtype=torch.float64), out_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"x_scale must be per tensor .* \(2,\) or broadcastable \(2, 1\)"):
        sparse24_int8_linear(x, sw, x_scale=torch.ones(2, 2), out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out_scale is required for int8 output"):
        sparse24_int8_linear(x, sw, x_scale=0.1, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out_scale must be None|out_scale is only for int8"):
        sparse24_int8_linear(x, sw, x_scale=0.1, out_dtype=torch.int32, out_scale=0.2)
    with pytest.raises(ValueError, match="exceeds 131071"):
        big = Sparse24Weight.from_int8(torch.zeros(1, 2**17 + 8 * 7, dtype=torch.int8), torch.ones(1))
        sparse24_int8_linear(torch.zeros(1, big.in_features, dtype=torch.int8), big, x_scale=1.0, out_dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# The registry's cases (what tests/test_registry.py generates), for this op
# --------------------------------------------------------------------------------------------


def _samples(seed):
    return OP.test_cases.samples(torch.Generator().manual_seed(seed), DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_samples_agree_and_fake_strides(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    ran = 0
    for sample in _samples(1):
        with effkern.backend("torch"):
            ref = OP.op(*sample.args)
        with effkern.backend(backend):
            got = OP.op(*sample.args)
        assert torch.equal(got, ref) and got.stride() == ref.stride(), f"{backend}: {sample.note}"
        mode = FakeTensorMode()
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in sample.args)
        with mode, effkern.backend(backend):
            fake = OP.op(*fake_args)
        assert (fake.shape, fake.dtype, fake.stride()) == (got.shape, got.dtype, got.stride()), sample.note
        ran += 1
    assert ran >= 10


def test_registry_opcheck():
    for sample in _samples(2)[:4]:
        torch.library.opcheck(OP.custom_op, sample.args)


@pytest.mark.parametrize("backend", effkern._dispatch.BACKENDS)
def test_registry_invalid_inputs_refused_on_every_backend(backend):
    bads = OP.test_cases.invalid(torch.Generator().manual_seed(3), DEVICE)
    assert len(bads) >= 15
    for bad in bads:
        with effkern.backend(backend), pytest.raises(bad.error, match=bad.match):
            OP.op(*bad.args)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    x, _, sw = _case(gen, (2, 7, 72), 20)
    xs = (torch.rand(2, 7, 1, generator=gen) * 0.05 + 1e-3).to(DEVICE)
    bias = torch.randn(20, generator=gen).to(DEVICE)

    def block(x_int8, x_scale):
        h = sparse24_int8_linear(x_int8, sw, bias, x_scale=x_scale, out_dtype=torch.bfloat16, activation="relu")
        q = sparse24_int8_linear(x_int8.transpose(0, 1), sw, None, x_scale=0.03, out_dtype=torch.int8, out_scale=0.5)
        return h.float().sum(-1), q

    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        got = compiled(x, xs)
    expected = block(x, xs)
    for g_, e_ in zip(got, expected):
        assert torch.equal(g_, e_)
