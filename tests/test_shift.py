"""The shift family beyond the generated registry tests: the ShiftWeight format (packing,
rounding, round trips), shift_linear_int8 as int8_linear on the decoded weight, deepshift_linear
against DeepShift's kernel arithmetic, and effkern.nn.ShiftLinear against transcriptions of
DeepShift's and ShiftAddViT's layers (forward and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effkern
from effkern.nn.shift import ShiftLinear, round_to_fixed, shift_range
from effkern.ops import ShiftWeight, deepshift_linear, int8_linear, shift_linear, shift_linear_int8
from effkern.ops import shift as S
from tests import shift_transcriptions as T
from tests.conftest import DEVICE


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize("k", [1, 63, 64, 65, 197])
def test_round_trip_and_decode(bits, k):
    g = _gen(k)
    w = torch.randn(9, k, generator=g) * torch.rand(9, 1, generator=g)
    w[0, 0] = 0.0  # a zero weight stays zero
    sw = ShiftWeight.from_float(w, bits=bits)
    assert sw.codes.dtype == torch.uint8 and tuple(sw.codes.shape) == (9, S.code_columns(k, bits))
    d = sw.decode(torch.float64)
    assert d[0, 0] == 0 and torch.equal(torch.sign(d), torch.sign(w))
    again = ShiftWeight.from_float(d, bits=bits)  # a power-of-two weight encodes to itself
    assert torch.equal(again.codes, sw.codes) and torch.equal(again.base, sw.base)
    assert torch.equal(again.decode(torch.float64), d)
    # every non-zero decoded weight is a power of two inside its channel's window
    sign, p = S.nearest_power_of_two(d)
    nz = sign != 0
    assert torch.equal(d[nz].abs(), torch.ldexp(torch.ones_like(d[nz]), p[nz].double()))
    lo = sw.base.to(torch.int64)[:, None].expand_as(p)
    assert bool(((p >= lo) & (p <= lo + S.num_exponents(bits) - 1))[nz].all())


def test_4bit_packing_layout():
    """Byte 32 g + j holds k = 64 g + j (low nibble) and 64 g + 32 + j (high nibble)."""
    k = 130
    sign = torch.ones(1, k, dtype=torch.int32)
    p = torch.tensor([[i % 7 for i in range(k)]])
    sw = ShiftWeight.from_sign_exponent(sign, p, bits=4, exponent_range=(0, 6))
    codes = sw.codes[0].to(torch.int64)
    assert codes.numel() == 96  # three groups of 64, K padded with zero codes
    for kk in range(k):
        g, r = divmod(kk, 64)
        byte = codes[32 * g + r % 32]
        nibble = (byte >> 4) if r >= 32 else (byte & 15)
        assert nibble == p[0, kk] + 1, kk
    assert int(codes[64 + 2:].max()) == 0  # the padding


def test_nearest_power_of_two_is_exact_and_matches_deepshift():
    g = _gen(1)
    w = torch.randn(64, 300, generator=g) * 10.0 ** torch.randint(-4, 2, (64, 1), generator=g)
    sign, p = S.nearest_power_of_two(w)
    shift, dsign = T.get_shift_and_sign(w)
    assert torch.equal(sign.float(), dsign) and torch.equal(p.float(), shift)
    # the exact rule: log2 rounds up above 2^(k + 1/2), whose nearest floats sit on either side
    mid = torch.tensor([2.0**0.5, 2.0**-3.5], dtype=torch.float64)
    below, above = torch.nextafter(mid, torch.zeros_like(mid)), torch.nextafter(mid, torch.full_like(mid, 9.0))
    assert S.nearest_power_of_two(below)[1].tolist() == [0, -4]
    assert S.nearest_power_of_two(above)[1].tolist() == [1, -3]


def test_from_deepshift_is_deepshifts_weight():
    g = _gen(2)
    shift = torch.empty(17, 40).uniform_(-16, 2, generator=g)
    sign = torch.empty(17, 40).uniform_(-1.4, 1.4, generator=g)
    sw = ShiftWeight.from_deepshift(shift, sign)
    want = 2.0 ** torch.round(shift.clamp(-14, 0)) * torch.sign(torch.round(sign))
    assert torch.equal(sw.decode(), want) and bool((sw.base == -14).all())


def test_exponent_window_clamps_as_deepshift():
    w = torch.tensor([[1.0, 2.0**-3, 2.0**-9, -(2.0**-20), 0.0]])
    sw = ShiftWeight.from_float(w, bits=4)  # the top 7 exponents of the row: [-6, 0]
    assert int(sw.base) == -6
    assert sw.decode().tolist() == [[1.0, 2.0**-3, 2.0**-6, -(2.0**-6), 0.0]]
    with pytest.raises(ValueError, match="exponent_range"):
        ShiftWeight.from_float(w, bits=4, exponent_range=(-10, 0))
    with pytest.raises(ValueError, match="normal range"):
        ShiftWeight.from_float(torch.tensor([[2.0**-140]]), bits=5)


# --------------------------------------------------------------------------------------------
# The integer ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel_out", [False, True])
def test_shift_linear_int8_is_int8_linear_on_the_decoded_weight(per_channel_out):
    """The scale of column n is in_scale * 2^base[n]: int8_linear with that per-channel scale
    on the int8 decode gives the same bits."""
    g = _gen(3)
    w = ShiftWeight.from_float(torch.randn(40, 200, generator=g) * 0.05, bits=4)
    x = torch.randint(-128, 128, (13, 200), generator=g, dtype=torch.int32).to(torch.int8).to(DEVICE)
    bias = torch.randint(-5000, 5000, (40,), generator=g, dtype=torch.int32).to(DEVICE)
    out_scale = torch.rand(40, generator=g) + 0.05 if per_channel_out else 0.3
    got = shift_linear_int8(x, w.to(DEVICE), bias, in_scale=0.02, out_scale=out_scale, out_bits=8)
    in_scales = torch.tensor(0.02, dtype=torch.float32) * torch.ldexp(torch.ones(40), w.base.float())
    want = int8_linear(x, S.decode_int8(w.codes, 200).to(DEVICE), bias, in_scale=in_scales, out_scale=out_scale, out_bits=8)
    assert torch.equal(got, want)
    assert torch.equal(shift_linear_int8(x, w.to(DEVICE)), int8_linear(x, S.decode_int8(w.codes, 200).to(DEVICE)))


def test_shift_linear_int8_needs_the_4bit_form():
    w = ShiftWeight.from_float(torch.randn(4, 8), bits=5)
    with pytest.raises(ValueError, match="4-bit form"):
        shift_linear_int8(torch.zeros(2, 8, dtype=torch.int8), w)


def test_deepshift_linear_matches_deepshifts_kernel_arithmetic():
    """Non-zero weights: DeepShift's kernel arithmetic. Zero weights: nothing (DeepShift's shift
    by 32 adds -1 for every negative input: the bug this op does not copy)."""
    g = _gen(4)
    shift = torch.randint(-14, 1, (24, 100), generator=g)
    sign = torch.randint(-1, 2, (24, 100), generator=g)
    x = torch.randint(-2**24, 2**24, (9, 100), generator=g, dtype=torch.int32)
    bias = torch.randint(-2**20, 2**20, (24,), generator=g, dtype=torch.int32)
    w = ShiftWeight.from_sign_exponent(sign, shift, exponent_range=(-14, 0))
    got = deepshift_linear(x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE)).cpu().to(torch.int64)
    published = T.deepshift_kernel(x, shift, sign, bias)
    zero_term = (x.to(torch.int64) >> 31) @ (sign == 0).to(torch.int64).T  # -1 per negative x at a zero weight
    assert torch.equal(got, published - zero_term)
    assert bool((x < 0).any()) and bool((sign == 0).any()) and not torch.equal(got, published)


def test_deepshift_fixed_point_is_shift_linear_at_16_16():
    """On 16.16 inputs whose shifts drop no bits, the integer layer equals the float one."""
    g = _gen(5)
    w = ShiftWeight.from_float(torch.randn(8, 32, generator=g), bits=5, exponent_range=(-6, 0))
    x = torch.randint(-2**10, 2**10, (4, 32), generator=g).float() / 2**6  # multiples of 2^-6 -> exact shifts
    y = deepshift_linear((x * 2**16).to(torch.int32), w).double() / 2**16
    assert torch.equal(y, shift_linear(x.double(), w))


# --------------------------------------------------------------------------------------------
# ShiftLinear against the published layers
# --------------------------------------------------------------------------------------------


def _pair(mode, fixed_point, weight_bits=5, seed=6, k=37, n=11):
    torch.manual_seed(seed)
    ours = ShiftLinear(k, n, mode=mode, weight_bits=weight_bits, fixed_point=fixed_point)
    if mode == "q":
        with torch.no_grad():  # magnitudes above ShiftAddViT-Q's 2^-15 floor, some beyond 1 (clamped)
            ours.weight.copy_(torch.sign(torch.randn(n, k)) * 2.0 ** torch.empty(n, k).uniform_(-13.5, 0.8))
    ref = copy.deepcopy(ours)
    return ours, ref


def _grads(module, x, fwd):
    x = x.clone().requires_grad_()
    out = fwd(module, x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("fixed_point", [False, True])
@pytest.mark.parametrize("weight_bits", [5, 3])
def test_shift_linear_ps_matches_deepshift(fixed_point, weight_bits):
    ours, ref = _pair("ps", fixed_point, weight_bits)
    with torch.no_grad():
        ours.shift.mul_(1.3)  # some shifts outside the range: clamped by both
        ref.shift.copy_(ours.shift)
    x = torch.randn(3, 5, 37) * 4
    ours.train(), ref.train()
    got = _grads(ours, x, lambda m, x: m(x))
    want = _grads(ref, x, lambda m, x: T.linear_shift_ps(m, x, weight_bits, fixed_point))
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(ours.shift, ref.shift)  # clamped in place, as published
    # dL/dP = dL/dW * sign * 2^P * ln 2 and dL/dS = dL/dW (the formulas)
    w_grad = got[2]["sign"]
    p = torch.round(ours.shift.clamp(*shift_range(weight_bits)))
    s = torch.sign(torch.round(ours.sign))
    torch.testing.assert_close(got[2]["shift"], w_grad * s * 2.0**p * torch.log(torch.tensor(2.0)))


def test_shift_linear_q_matches_shiftaddvit():
    ours, ref = _pair("q", True)
    x = torch.randn(4, 37) * 3
    ours.train(), ref.train()
    got = _grads(ours, x, lambda m, x: m(x))
    want = _grads(ref, x, lambda m, x: T.linear_shift_q(m, x))
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6, msg=name)


def test_shift_linear_q_range_departure():
    """Documented: magnitudes below 2^-14 clamp to 2^-14 here (ShiftAddViT-Q: 2^-15), so that a
    trained weight is exactly a 5-bit ShiftWeight."""
    layer = ShiftLinear(2, 1, bias=False, mode="q")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0**-15, -(2.0**-17)]]))
    layer.train()(torch.ones(1, 2))
    assert layer.quantized_weight().tolist() == [[2.0**-14, -(2.0**-14)]]


@pytest.mark.parametrize("mode", ["ps", "q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_inference_runs_shift_linear(mode, dtype):
    torch.manual_seed(7)
    lin = nn.Linear(70, 30)
    layer = ShiftLinear.from_linear(lin, mode=mode, fixed_point=True).to(DEVICE)
    x = (torch.randn(5, 70) * 2).to(DEVICE, dtype)
    layer.eval()
    with torch.no_grad():
        want = layer(x.float())  # F.linear on the quantised weight
        frozen = layer.freeze()(x.float())
    assert layer.frozen is not None and "frozen" in repr(layer)
    torch.testing.assert_close(frozen, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.frozen.decode(), layer.quantized_weight().detach().float())
    with torch.no_grad():
        low = layer(x)
    assert low.dtype == dtype
    layer.train()
    assert layer.frozen is None


def test_from_linear_initialises_as_deepshift_convert():
    torch.manual_seed(8)
    lin = nn.Linear(20, 6)
    ps = ShiftLinear.from_linear(lin, mode="ps")
    shift, sign = T.get_shift_and_sign(lin.weight.detach())
    assert torch.equal(ps.shift, shift) and torch.equal(ps.sign, sign) and torch.equal(ps.bias, lin.bias)
    q = ShiftLinear.from_linear(lin, mode="q", fixed_point=True)
    assert torch.equal(q.weight, lin.weight) and torch.equal(q.bias, round_to_fixed(lin.bias.detach()))
    with pytest.raises(ValueError, match="mode"):
        ShiftLinear(2, 2, mode="x")
    with pytest.raises(ValueError, match="weight_bits"):
        ShiftLinear(2, 2, weight_bits=6)


def test_shift_linear_module_compiles_for_training():
    torch._dynamo.reset()
    torch.manual_seed(9)
    layer = ShiftLinear(24, 8, mode="ps", fixed_point=True)
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 24)
    compiled = torch.compile(layer, backend="inductor")
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, a), (_, b) in zip(layer.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    effkern  # noqa: B018 - the package import registers the ops


# --------------------------------------------------------------------------------------------
# ShiftAddMoE
# --------------------------------------------------------------------------------------------


def _moe(capacity=None, noisy=True, dim=32, seed=10):
    from effkern.nn import ShiftAddMoE

    torch.manual_seed(seed)
    return ShiftAddMoE(nn.Linear(dim, 16), ShiftLinear(dim, 16, mode="q"), dim, out_dim=16, noisy_gating=noisy,
                       capacity=capacity)


def test_moe_routes_as_shiftaddvits_noisy_gate():
    """Same noise draws: the same experts, the same load term; the released code's gates are the
    constant 1 (documented departure: here the gate probability, in the output and importance)."""
    from effkern.nn.shift import cv_squared

    moe = _moe().train()
    x = torch.randn(50, 32)
    torch.manual_seed(3)
    top, gate, loss = moe.route(x)
    torch.manual_seed(3)
    want_top, want_gates, _, want_load_loss = T.noisy_gate(x, moe.w_gate, moe.w_noise)
    assert torch.equal(top, want_top) and bool((want_gates.sum(1) == 1).all())
    importance = torch.zeros(2).index_add(0, top, gate.detach()) * torch.tensor([6.0, 4.0])
    torch.testing.assert_close(loss.detach(), cv_squared(importance) + want_load_loss.detach(), rtol=1e-5, atol=1e-6)


def test_moe_output_and_router_gradient():
    moe = _moe(noisy=False).train()
    x = torch.randn(3, 7, 32)
    y = moe(x)
    top, gate, _ = moe.route(x.reshape(-1, 32))
    t = x.reshape(-1, 32)
    want = torch.where((top == 0)[:, None], moe.experts[0](t), moe.experts[1](t)) * gate[:, None]
    torch.testing.assert_close(y.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()  # the task loss alone reaches the router
    assert moe.w_gate.grad is not None and float(moe.w_gate.grad.abs().sum()) > 0


def test_moe_capacity_gives_static_shapes_and_drops_the_weakest():
    full, capped, every = _moe(noisy=False), _moe(capacity=0.25, noisy=False), _moe(capacity=1.0, noisy=False)
    capped.load_state_dict(full.state_dict())
    every.load_state_dict(full.state_dict())
    x = torch.randn(40, 32)
    with torch.no_grad():
        top, gate, _ = full.route(x)
        y_full = full.eval()(x)
        torch.testing.assert_close(every.eval()(x), y_full, rtol=1e-5, atol=1e-6)  # room for all: the same
        y_cap = capped.eval()(x)
    kept = torch.zeros(40, dtype=torch.bool)
    for e in (0, 1):
        idx = torch.nonzero(top == e)[:, 0]
        kept[idx[gate[idx].argsort(descending=True)[:10]]] = True  # ceil(0.25 * 40) slots each
    torch.testing.assert_close(y_cap[kept], y_full[kept], rtol=1e-5, atol=1e-6)
    assert bool((y_cap[~kept] == 0).all())
    torch._dynamo.reset()
    compiled = torch.compile(capped, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), y_cap, rtol=1e-5, atol=1e-6)


def test_moe_balance_loss_trains_the_routing_towards_60_percent_shift():
    """alpha = (6, 4): balanced when 6 x importance(mult) = 4 x importance(shift), i.e. 60% of the
    tokens on the shift expert. From a router that sends everything to mult, the balance loss
    alone moves it there."""
    moe = _moe(noisy=True, seed=11).train()
    with torch.no_grad():
        d = moe.w_gate[:, 0].abs().mean()  # every token on mult (the noise still reaches shift)
        moe.w_gate[:, 1] -= d
        moe.w_gate[:, 0] += d
    x = torch.randn(256, 32, generator=_gen(12)).abs() + 0.1
    moe(x)
    start = float(moe.shift_ratio)
    opt = torch.optim.Adam([moe.w_gate, moe.w_noise], lr=0.02)
    torch.manual_seed(13)
    ratios = []
    for _ in range(300):
        opt.zero_grad()
        moe(x)
        moe.aux_loss.backward()
        opt.step()
        ratios.append(float(moe.shift_ratio))
    final = sum(ratios[-50:]) / 50
    assert start < 0.1 and abs(final - 0.6) < 0.1, (start, final)


@pytest.mark.parametrize("bits", [4, 5])
def test_triton_split_k_agrees(bits):
    """Small M splits K over several programs per tile (split_k_plan); the partials are summed in
    slot order: float within rounding of the unsplit kernel, int8 bit for bit."""
    T_shift = pytest.importorskip("effkern.triton.shift")  # on CPU under the interpreter (tests/conftest.py)
    g = _gen(20 + bits)
    w = ShiftWeight.from_float(torch.randn(40, 300, generator=g) * 0.05, bits=bits).to(DEVICE)
    x = torch.randn(5, 300, generator=g).to(DEVICE)
    ref = S.ref_shift_linear_rows(x, w.codes, w.base, None, 300, bits)
    for split in (1, 3, 5):
        got = T_shift.shift_linear_rows(x, w.codes, w.base, None, 300, bits, split_k=split)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if bits == 4:
        xi = torch.randint(-128, 128, (5, 300), generator=g, dtype=torch.int32).to(torch.int8).to(DEVICE)
        want = S.ref_shift_linear_int8_rows(xi, w.codes, w.base, None, None, None, 300, 32)
        for split in (2, 5):
            assert torch.equal(T_shift.shift_linear_int8_rows(xi, w.codes, w.base, None, None, None, 300, 32,
                                                               split_k=split), want)
