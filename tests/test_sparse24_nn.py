"""effkern.nn.Sparse24Int8Linear (GPUSQ-ViT's 2:4-sparse int8 layer), GPUSQDistillationLoss and
effkern.convert(model, "sparse24_int8"): the training forward against a float transcription of
the fake-quantisation, straight-through gradients, pruning, the frozen layer against the op's
epilogue and the training forward, timm conversion with strict checkpoint loading, a training
step, the loss on a hand-computed example, and torch.compile."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

import effkern
import effkern.nn.sparse24 as sparse24_nn
from effkern.nn import GPUSQDistillationLoss, Sparse24Int8Linear
from effkern.ops import Sparse24Weight, mask_2to4, prune_2to4

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _layer(gen, k=32, n=24, bias=True, activation=None) -> Sparse24Int8Linear:
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return Sparse24Int8Linear.from_linear(lin, activation=activation)


# --------------------------------------------------------------------------------------------
# A transcription of the semantics (float32 fake quantisation), independent of the module
# --------------------------------------------------------------------------------------------


def ref_fake_quant(x: torch.Tensor, w_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token x and per-row w, symmetric int8, scale max|.| / 127 (1 when all zero)."""
    def fq(v):
        v = v.double()
        amax = v.abs().amax(dim=-1, keepdim=True).float()
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        return torch.round(v.float() / s).clamp(-127, 127) * s
    return fq(x), fq(w_masked)


def ref_forward(x, layer) -> torch.Tensor:
    xq, wq = ref_fake_quant(x, layer.weight.detach() * mask_2to4(layer.weight.detach()))
    y = xq @ wq.T
    if layer.bias is not None:
        y = y + layer.bias.detach().float()
    return {None: y, "relu": F.relu(y), "gelu": F.gelu(y)}[layer.activation]


# --------------------------------------------------------------------------------------------
# Pruning and the mask
# --------------------------------------------------------------------------------------------


def test_from_linear_prunes_exactly_2to4_with_the_ops_tie_rule():
    lin = torch.nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -3.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0],
                                       [0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 5.0, -1.0]]))
    layer = Sparse24Int8Linear.from_linear(lin)
    assert torch.equal(layer.weight.detach(), torch.tensor([[0.0, -3.0, 2.0, 0.0, 2.0, 2.0, 0.0, 0.0],
                                                            [0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 5.0, 0.0]]))
    assert layer.mask[0].tolist() == [False, True, True, False, True, True, False, False]
    assert layer.mask[1].tolist() == [True, True, False, False, True, False, True, False]
    assert torch.equal(layer.bias, lin.bias)
    assert set(layer.state_dict()) == {"weight", "bias"}  # timm's names; the mask is not persistent


def test_from_linear_random_is_2to4_and_leaves_the_linear_alone(gen):
    lin = torch.nn.Linear(64, 40)
    before = lin.weight.detach().clone()
    layer = Sparse24Int8Linear.from_linear(lin)
    assert torch.equal(lin.weight, before)
    assert torch.equal(layer.weight.detach(), prune_2to4(before))
    assert int((layer.weight.reshape(40, 16, 4) != 0).sum(-1).max()) <= 2
    assert torch.equal(layer.mask, mask_2to4(before))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 8"):
        Sparse24Int8Linear(12, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        Sparse24Int8Linear(16, 4, activation="tanh")
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        Sparse24Int8Linear.from_linear(torch.nn.Conv1d(8, 8, 1))
    layer = Sparse24Int8Linear(16, 4)
    with pytest.raises(ValueError, match="x must be bfloat16, float16 or float32"):
        layer(torch.zeros(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has 8 features"):
        layer(torch.zeros(2, 8))


# --------------------------------------------------------------------------------------------
# The training forward and its gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_training_forward_matches_the_transcription(gen, activation):
    layer = _layer(gen, activation=activation).train()
    x = torch.randn(3, 5, 32, generator=gen)
    x[1, 2] = 0  # an all-zero token: scale 1, output = act(bias)
    y = layer(x)
    torch.testing.assert_close(y, ref_forward(x, layer), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1, 2], ref_forward(torch.zeros(1, 32), layer)[0])


def test_straight_through_gradients_and_the_mask(gen):
    layer = _layer(gen).train()
    x = torch.randn(4, 32, generator=gen, requires_grad=True)
    g = torch.randn(4, 24, generator=gen)
    (layer(x) * g).sum().backward()
    mask = layer.mask
    xq, wq = ref_fake_quant(x.detach(), layer.weight.detach())
    # rounding passes the gradient: d/dx through wq, d/dW through xq; the mask zeroes pruned entries
    torch.testing.assert_close(x.grad, g @ wq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, (g.T @ xq) * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    assert bool((layer.weight.grad[~mask] == 0).all())
    # an optimiser step keeps the pruned weights at zero (zero gradient, decoupled decay of zero)
    torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.05).step()
    assert bool((layer.weight.detach()[~mask] == 0).all())


# --------------------------------------------------------------------------------------------
# Frozen: the op
# --------------------------------------------------------------------------------------------


def test_frozen_weight_is_the_ops_from_float_of_the_masked_weight(gen):
    layer = _layer(gen, k=64, n=16)
    mine, theirs = layer.sparse_weight(), Sparse24Weight.from_float(layer.weight.detach())
    assert torch.equal(mine.decompress(), theirs.decompress()) and torch.equal(mine.scale, theirs.scale)
    _, wq = ref_fake_quant(torch.zeros(1, 64), layer.weight.detach())
    assert torch.equal(mine.dequantize(), wq)  # the training forward's weight, exactly


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_freeze_runs_the_op_as_its_epilogue_specifies(gen, backend, monkeypatch):
    layer = _layer(gen).freeze()
    calls = []
    op = sparse24_nn.sparse24_int8_linear
    monkeypatch.setattr(sparse24_nn, "sparse24_int8_linear", lambda *a, **k: calls.append(1) or op(*a, **k))
    x = torch.randn(2, 3, 32, generator=gen)
    with effkern.backend(backend):
        y = layer(x)
    assert calls and y.dtype == torch.float32 and y.shape == (2, 3, 24)
    # the op's epilogue: exact integer sum, s = x_scale * w_scale in float32, v = acc * s + bias
    amax = x.abs().amax(-1, keepdim=True)
    xs = amax / 127
    xq = torch.round(x / xs).clamp(-127, 127).to(torch.int64)
    w = layer.frozen
    acc = (xq @ w.decompress().to(torch.int64).T).to(torch.float32)
    want = acc * (xs * w.scale) + layer.bias.detach()
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_eval_equals_the_fake_quant_forward(gen, dtype, activation):
    layer = _layer(gen, k=64, n=40, activation=activation).to(dtype)
    x = torch.randn(2, 7, 64, generator=gen).to(dtype)
    with torch.no_grad():
        fake = layer.train()(x)
        frozen = layer.freeze()(x)
        plain_eval = layer.train().eval()(x)  # eval without freeze: the fake-quant forward
    assert frozen.dtype == dtype
    assert torch.equal(plain_eval, fake)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(frozen.float(), fake.float(), rtol=tol, atol=tol)


def test_train_and_load_drop_the_frozen_weight(gen):
    layer = _layer(gen).freeze()
    assert layer.frozen is not None
    layer.train()
    assert layer.frozen is None
    layer.freeze()
    dense = torch.nn.Linear(32, 24)
    layer.load_state_dict(dense.state_dict())  # a dense checkpoint: pruned as it loads
    assert layer.frozen is None
    assert torch.equal(layer.mask, mask_2to4(dense.weight)) and torch.equal(layer.weight, prune_2to4(dense.weight))


def test_moving_a_frozen_layer_rebuilds_its_weight(gen):
    layer = _layer(gen).freeze()
    before = layer.frozen
    layer.to(torch.float16)
    assert layer.frozen is not None and layer.frozen is not before
    assert torch.equal(layer.frozen.decompress(), layer.sparse_weight().decompress())
    assert layer(torch.randn(2, 32, generator=gen).half()).dtype == torch.float16


def test_loading_a_trained_sparse_state_gives_its_mask_back(gen):
    layer = _layer(gen)
    other = Sparse24Int8Linear(32, 24)
    other.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(other.mask, layer.mask) and torch.equal(other.weight, layer.weight)


# --------------------------------------------------------------------------------------------
# The distillation loss
# --------------------------------------------------------------------------------------------


def test_distillation_loss_hand_computed():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher probabilities (3/4, 1/4)
    y = torch.tensor([0])
    ce = math.log(2.0)
    kl = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) / 2  # DeiT: per logit (B * C = 2)
    assert GPUSQDistillationLoss()(s, t, y).item() == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-6)
    # T = 2: teacher (sqrt 3, 1) / (sqrt 3 + 1), times T^2
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)) / 2
    loss = GPUSQDistillationLoss(alpha=0.25, temperature=2.0)(s, t, y)
    assert loss.item() == pytest.approx(0.75 * ce + 0.25 * 4 * kl2, rel=1e-6)
    # hard (DeiT): half CE with the label, half with the teacher's argmax (class 0 here)
    assert GPUSQDistillationLoss(distillation="hard")(s, t, y).item() == pytest.approx(ce, rel=1e-6)
    # features: weighted MSE, added with feature_weight
    fs, ft = [torch.tensor([1.0, 3.0]), torch.zeros(2)], [torch.zeros(2), torch.ones(2)]
    crit = GPUSQDistillationLoss(feature_weight=2.0, layer_weights=(1.0, 0.5))
    want = 0.5 * ce + 0.5 * kl + 2.0 * (1.0 * 5.0 + 0.5 * 1.0)
    assert crit(s, t, y, fs, ft).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="distillation must be"):
        GPUSQDistillationLoss(distillation="kl")
    with pytest.raises(ValueError, match="as many student_features"):
        crit(s, t, y, fs[:1], ft)


# --------------------------------------------------------------------------------------------
# timm: convert, strict checkpoint loading, a training step
# --------------------------------------------------------------------------------------------


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10)


def test_convert_a_timm_vit_with_strict_checkpoint_loading(gen):
    from effkern.models.variants import METHODS, freeze_sparse24, sparse24_layers

    assert "sparse24_int8" in METHODS
    timm_model = _vit()
    ckpt = timm_model.state_dict()
    model = effkern.convert(_vit(), "sparse24_int8")  # strict: adds no parameters
    layers = sparse24_layers(model)
    assert sorted(layers) == sorted(f"blocks.{i}.{p}" for i in range(2)
                                    for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert set(model.state_dict()) == set(ckpt)
    model.load_state_dict(ckpt, strict=True)  # a dense timm checkpoint, pruned as it loads
    for name, layer in layers.items():
        assert torch.equal(layer.weight, prune_2to4(ckpt[f"{name}.weight"]))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        fake = model.eval()(x)
        frozen = freeze_sparse24(model)(x)
    assert all(layer.frozen is not None for layer in layers.values())
    torch.testing.assert_close(frozen, fake, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="modules were replaced"):
        effkern.convert(model, "sparse24_int8")
    with pytest.raises(ValueError, match="targets must be distinct names"):
        effkern.convert(_vit(), "sparse24_int8", targets=("q",))
    part = effkern.convert(_vit(), "sparse24_int8", targets=("fc1",), layers=(1,))
    assert list(sparse24_layers(part)) == ["blocks.1.mlp.fc1"]


def test_timm_name_is_registered():
    pytest.importorskip("timm")
    import timm

    import effkern.models  # noqa: F401  (registers the names)

    assert "deit_tiny_patch16_224_sparse24_int8" in timm.list_models("*_sparse24_int8")
    model = timm.create_model("deit_tiny_patch16_224_sparse24_int8", img_size=32, depth=2, targets=("fc2",))
    assert model.effkern.config["targets"] == ("fc2",)
    assert isinstance(model.blocks[1].mlp.fc2, Sparse24Int8Linear)
    assert isinstance(model.blocks[1].mlp.fc1, torch.nn.Linear)


def test_a_training_step_with_distillation(gen):
    from effkern.models.variants import sparse24_layers

    teacher = _vit().eval()
    student = effkern.convert(_vit(), "sparse24_int8").train()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    y = torch.tensor([1, 7])
    with torch.no_grad():
        t = teacher(x)
    loss = GPUSQDistillationLoss()(student(x), t, y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    for name, layer in sparse24_layers(student).items():
        assert bool((layer.weight.grad[~layer.mask] == 0).all()), name
        assert bool(layer.weight.grad[layer.mask].abs().sum() > 0), name


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def test_compiled_training_step_matches_eager(gen):
    layer = _layer(gen)
    x = torch.randn(4, 32, generator=gen)

    def step(layer, x):
        y = layer(x)
        y.square().sum().backward()
        return y

    want = step(layer, x)
    grad = layer.weight.grad.clone()
    layer.zero_grad()
    start = time.monotonic()
    got = torch.compile(step, backend="inductor", fullgraph=False)(layer, x)
    if time.monotonic() - start > 20:
        pytest.skip("inductor took over 20 s to compile on this machine")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, grad, rtol=1e-5, atol=1e-6)
    assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_compiled_frozen_forward_is_the_op(gen):
    layer = _layer(gen).freeze()
    x = torch.randn(4, 32, generator=gen)
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True)(x)  # the op's fake kernel: one graph
        assert torch.equal(got, layer(x))
