"""I-ViT modules: values equal the integer ops, gradients are the straight-through estimators,
scales survive a state_dict round trip."""

import pytest
import torch
import torch.nn.functional as F

from effkern.nn import IntGELU, IntLayerNorm, IntSoftmax, QuantAct, QuantLinear
from effkern.ops import int8_linear, int_gelu, int_layernorm, int_softmax


def _quantized(gen, shape, scale, bits=8, dtype=torch.float32):
    lim = 2 ** (bits - 1)
    i = torch.randint(-lim, lim, shape, generator=gen)
    return (i * scale).to(dtype).requires_grad_(), torch.tensor(scale, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int_softmax_module_value_and_ste_gradient(gen, dtype):
    x, s = _quantized(gen, (2, 3, 17), 0.05, dtype=dtype)
    y, out_scale = IntSoftmax()(x, s)
    y_int, _ = int_softmax(torch.round(x.detach() / s).to(torch.int32), s)
    assert torch.equal(y.detach(), (y_int * out_scale).to(dtype))
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    (expected,) = torch.autograd.grad(torch.softmax(x, -1), x, g)
    assert torch.equal(grad, expected)


def test_int_gelu_module_value_and_ste_gradient(gen):
    x, s = _quantized(gen, (5, 64), 0.04, dtype=torch.float64)
    y, out_scale = IntGELU()(x, s)
    y_int, _ = int_gelu(torch.round(x.detach() / s).to(torch.int8), s)
    assert torch.equal(y.detach(), y_int * out_scale.double())
    # it approximates GELU (8-bit sigmoid, shift-based exp: a few percent of |x|)
    assert ((y.detach() - F.gelu(x.detach())).abs() <= 0.05 * x.detach().abs() + 0.02).all()
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, g)
    (expected,) = torch.autograd.grad(x * torch.sigmoid(1.702 * x), x, g)
    assert torch.equal(grad, expected)


def test_int_layernorm_module_value_and_ste_gradient(gen):
    ln = IntLayerNorm(48).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=gen)
        ln.bias.uniform_(-0.5, 0.5, generator=gen)
    x, s = _quantized(gen, (4, 7, 48), 0.1, dtype=torch.float64)
    y, out_scale = ln(x, s)
    y_int, _ = int_layernorm(torch.round(x.detach() / s).to(torch.int8), ln.weight, ln.bias)
    assert torch.equal(y.detach(), y_int.double() * out_scale)
    assert (y.detach() - F.layer_norm(x.detach(), (48,), ln.weight, ln.bias)).abs().max() < 0.05
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, ln.weight, ln.bias), g)
    expected = torch.autograd.grad(F.layer_norm(x, (48,), ln.weight, ln.bias, 1e-5), (x, ln.weight, ln.bias), g)
    for a, b in zip(grads, expected):
        assert torch.equal(a, b)


def test_float_surrogates_gradcheck(gen):
    # The straight-through gradients above are the float surrogates' gradients; check those.
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.softmax(t, -1), (x,))
    assert torch.autograd.gradcheck(lambda t: t * torch.sigmoid(1.702 * t), (x,))
    assert torch.autograd.gradcheck(lambda t, w, b: F.layer_norm(t, (6,), w, b), (x, w, b))


def test_quant_act_calibrates_and_keeps_scale_after_reload(gen):
    act = QuantAct(8)
    x = torch.randn(4, 10, generator=gen)
    act.train()
    act(x)
    act(x * 1.5)
    scale = act.act_scaling_factor.clone()
    assert scale.item() > 0
    act.eval()
    y, s = act(x)
    assert torch.equal(s, scale)
    q = y / s
    assert (q - torch.round(q)).abs().max() < 1e-4 and q.abs().max() <= 128  # on the integer grid
    reloaded = QuantAct(8)
    reloaded.load_state_dict(act.state_dict())
    reloaded.eval()
    y2, s2 = reloaded(x)
    assert torch.equal(y2, y) and torch.equal(s2, s)


def test_quant_act_requantizes_integer_inputs_with_identity(gen):
    act = QuantAct(8)
    act.train()
    x, sx = _quantized(gen, (3, 12), 0.013, bits=16)
    idn, si = _quantized(gen, (3, 12), 0.002, bits=8)
    y, s = act(x, sx, identity=idn, identity_scaling_factor=si)
    q = y.detach() / s
    assert (q - torch.round(q)).abs().max() < 1e-4 and q.abs().max() <= 128  # on the integer grid
    assert (y.detach() - (x + idn).detach()).abs().max() <= s.item() * 1.01  # within one step
    # straight-through: identity gradient to both branches
    gx, gi = torch.autograd.grad(y.sum(), (x, idn))
    assert torch.equal(gx, torch.ones_like(gx)) and torch.equal(gi, torch.ones_like(gi))


def test_quant_act_errors():
    act = QuantAct(8).eval()
    with pytest.raises(RuntimeError, match="no activation range yet"):
        act(torch.randn(3))
    with pytest.raises(ValueError, match="activation_bit"):
        QuantAct(40)


def test_quant_linear_matches_int8_gemm_and_trains(gen):
    lin = torch.nn.Linear(40, 24)
    qlin = QuantLinear.from_linear(lin)
    x, s = _quantized(gen, (2, 5, 40), 0.02)
    y, out_scale = qlin(x, s)
    w_int, w_scale = qlin.quantized_weight()
    b_int = torch.round(lin.bias.detach() / (s * w_scale)).to(torch.int32)
    acc = int8_linear(torch.round(x.detach() / s).to(torch.int8), w_int, b_int)
    assert torch.equal(y.detach(), acc.float() * (s * w_scale))
    rel = (y.detach() - lin(x.detach())).norm() / lin(x.detach()).norm()
    assert rel < 0.02  # 8-bit weights: close to the float layer
    y.sum().backward()
    assert lin.weight.grad is None and qlin.weight.grad is not None and qlin.bias.grad is not None


def test_module_rejects_inputs_outside_declared_bits(gen):
    x, s = _quantized(gen, (2, 8), 0.01, bits=12)
    with pytest.raises(ValueError, match="outside the 8-bit range"):
        IntGELU()(x, s)


def test_ivit_mlp_chain_backward(gen):
    """QuantAct -> QuantLinear -> QuantAct -> IntGELU -> QuantAct -> QuantLinear, trained one step."""
    act0, fc1, act1, gelu, act2, fc2 = QuantAct(), QuantLinear(16, 32), QuantAct(), IntGELU(), QuantAct(), QuantLinear(32, 16)
    x = torch.randn(3, 9, 16, generator=gen)
    h, s = act0(x)
    h, s = fc1(h, s)
    h, s = act1(h, s)
    h, s = gelu(h, s)
    h, s = act2(h, s)
    out, _ = fc2(h, s)
    out.square().mean().backward()
    assert fc1.weight.grad.abs().sum() > 0 and fc2.weight.grad.abs().sum() > 0
