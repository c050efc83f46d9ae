"""effkern.convert on timm's PVTv2 (``pvt_v2_b0``, random weights, 64 x 64 images): ``shiftadd``
(ShiftAddViT's PVTv2 attention in stages 1-3, checked against tests/pvt_transcriptions.py) and
``shift`` (shift layers, and fc1 / fc2 mixtures of experts), timm checkpoints, the hash's fit
and state, a training step, the timm names. Other methods refuse a PVTv2.

Not here: torch.compile of the converted model (inductor takes about 70 s on 2 CPU cores for
pvt_v2_b0; the ViT path's compile tests are in tests/test_convert.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="needs timm (and torchvision): pip install torch==2.14.1 "
                                           "torchvision==0.29.1 timm")

import effkern  # noqa: E402
from effkern.models import variants as V  # noqa: E402
from effkern.nn import ShiftAddMoE, ShiftLinear  # noqa: E402
from effkern.nn.binary_hash import PVTBinaryHashAttention  # noqa: E402
from tests import pvt_transcriptions as PT  # noqa: E402

IMG = 64
HASH = {"nbits": 8, "num_anchors": 12}  # small, fast; 12 anchors <= the 32 tokens of stage 3 at batch 2
ALL_LINEARS = ("q", "kv", "proj", "fc1", "fc2")


def make(name: str = "pvt_v2_b0", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():  # timm's head starts near zero (std 0.02): make differences visible
        model.head.weight.normal_(0, 0.5)
    return model.eval()


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def converted(model, method, **cfg):
    return effkern.convert(copy.deepcopy(model), method, **cfg)


def blocks(model):
    return [blk for stage in model.stages for blk in stage.blocks]


# --------------------------------------------------------------------------------------------
# The published attention (tests/pvt_transcriptions.py) with a converted attention's weights
# --------------------------------------------------------------------------------------------


def published(attn: PVTBinaryHashAttention) -> PT.LinAngularAttentionKSH:
    """The published module with ``attn``'s weights: to_qk <- q, to_v <- kv's value half,
    dconv <- dwconv (one kernel per head), the hash buffers."""
    dim = attn.dim
    ref = PT.LinAngularAttentionKSH(dim, attn.num_heads, attn.nbits, attn.num_anchors)
    with torch.no_grad():
        ref.to_qk.weight.copy_(attn.q.weight)
        ref.to_qk.bias.copy_(attn.q.bias)
        ref.to_v.weight.copy_(attn.kv.weight[dim:])
        ref.to_v.bias.copy_(attn.kv.bias[dim:])
        ref.proj.load_state_dict(attn.proj.state_dict())
        ref.dconv.weight.copy_(attn.dwconv.weight[..., None])  # [H, 1, 9] -> [H, 1, 9, 1]
        ref.anchor.copy_(attn.hash_anchors)
        ref.mvec.copy_(attn.hash_mu)
        ref.A.copy_(attn.hash_proj)
    return ref.train(attn.training)


class TimmCall(nn.Module):
    """timm's blocks call ``attn(x, feat_size)``; the published attention takes ``(x, H, W)``."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x, feat_size):
        return self.attn(x, *feat_size)


def published_model(conv: nn.Module) -> nn.Module:
    ref = copy.deepcopy(conv)
    for blk in blocks(ref):
        if isinstance(blk.attn, PVTBinaryHashAttention):
            blk.attn = TimmCall(published(blk.attn))
    return ref


# --------------------------------------------------------------------------------------------
# shiftadd
# --------------------------------------------------------------------------------------------


def test_shiftadd_converts_stages_1_to_3_and_loads_timm_checkpoints():
    model = make()
    with pytest.raises(ValueError, match="strict=False"):
        converted(model, "shiftadd")
    conv = converted(model, "shiftadd", strict=False)
    assert [type(b.attn).__name__ for b in blocks(conv)] == ["PVTBinaryHashAttention"] * 6 + ["Attention"] * 2
    assert conv.effkern.added_parameters == tuple(f"stages.{s}.blocks.{j}.attn.dwconv.weight"
                                                  for s in range(3) for j in range(2))
    assert set(conv.state_dict()) - set(model.state_dict()) == set(conv.effkern.added_parameters)
    assert set(model.state_dict()) <= set(conv.state_dict())
    # a timm checkpoint (no dwconv keys) loads strictly, the dwconv keeps its initial weights
    # (TokenDWConv); back into timm the dwconv weights are unexpected
    before = conv.stages[0].blocks[0].attn.dwconv.weight.clone()
    conv.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(conv.stages[0].blocks[0].attn.dwconv.weight, before)
    result = copy.deepcopy(model).load_state_dict(conv.state_dict(), strict=False)
    assert set(result.unexpected_keys) == set(conv.effkern.added_parameters) and not result.missing_keys
    # without the dwconv the state dict is timm's: strict both ways
    plain = converted(model, "shiftadd", dwconv=False)
    plain.load_state_dict(model.state_dict(), strict=True)
    copy.deepcopy(model).load_state_dict(plain.state_dict(), strict=True)
    assert conv(images()).shape == (2, 1000)


@pytest.mark.parametrize("fitted", [False, True])
def test_shiftadd_matches_published_pvt_v2(fitted):
    """The whole model equals timm's PVTv2 with ShiftAddViT's published attention in stages 1-3
    (same weights and hash), in eval (packed codes) and training (straight-through) mode."""
    model = make()
    x = images()
    conv = converted(model, "shiftadd", strict=False, **HASH)
    if fitted:
        V.fit_hash(conv, x, progress=False, iterations=3, generator=torch.Generator().manual_seed(0))
    ref = published_model(conv)
    for training in (False, True):
        conv.train(training)
        ref.train(training)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-4)


def test_shiftadd_attention_gradients_match_published():
    torch.manual_seed(3)
    attn = PVTBinaryHashAttention(64, num_heads=2, sr_ratio=4, **HASH).train()
    ref = published(attn)
    x = torch.randn(2, 64, 64, requires_grad=True)
    grad = torch.randn(2, 64, 64)
    (gx,) = torch.autograd.grad((attn(x, (8, 8)) * grad).sum(), x)
    gx_ref, gqk, gv, gconv = torch.autograd.grad((ref(x, 8, 8) * grad).sum(),
                                                 [x, ref.to_qk.weight, ref.to_v.weight, ref.dconv.weight])
    (attn(x, (8, 8)) * grad).sum().backward()
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn.q.weight.grad, gqk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn.kv.weight.grad[64:], gv, rtol=1e-4, atol=1e-5)
    assert not attn.kv.weight.grad[:64].any()  # the key half is not used (shared q / k)
    torch.testing.assert_close(attn.dwconv.weight.grad, gconv[..., 0], rtol=1e-4, atol=1e-5)


def test_shiftadd_keeps_stage_4_and_selects_stages():
    model = make()
    conv = converted(model, "shiftadd", strict=False)
    t = torch.randn(2, 160, 4, 4)
    with torch.no_grad():
        assert torch.equal(conv.stages[3](t), model.stages[3](t))
    assert all(torch.equal(v, model.stages[3].state_dict()[k]) for k, v in conv.stages[3].state_dict().items())
    one = converted(model, "shiftadd", strict=False, stages=(1,))
    assert [isinstance(b.attn, PVTBinaryHashAttention) for b in blocks(one)] == [False] * 2 + [True] * 2 + [False] * 4
    every = converted(model, "shiftadd", strict=False, stages=(0, 1, 2, 3))
    assert all(isinstance(b.attn, PVTBinaryHashAttention) for b in blocks(every))
    assert every(images()).shape == (2, 1000)
    by_layer = converted(model, "shiftadd", strict=False, layers=(7,))
    assert by_layer.effkern.added_parameters == ("stages.3.blocks.1.attn.dwconv.weight",)
    with pytest.raises(ValueError, match="stages must be distinct"):
        converted(model, "shiftadd", strict=False, stages=(4,))
    with pytest.raises(ValueError, match="layers or stages, not both"):
        converted(model, "shiftadd", strict=False, stages=(0,), layers=(0,))


def test_fit_hash_and_hash_state_round_trip():
    """fit_hash fits each attention to its own inputs (the first one: the normalised patch
    embedding, as by hand); hash_state_dict + state_dict restore the model exactly."""
    model = make()
    x = images()
    conv = converted(model, "shiftadd", strict=False, **HASH)
    V.fit_hash(conv, x, progress=False, iterations=3, generator=torch.Generator().manual_seed(3))
    first = conv.stages[0].blocks[0]
    by_hand = PVTBinaryHashAttention.from_attention(model.stages[0].blocks[0].attn, **HASH)
    with torch.no_grad():
        tokens = first.norm1(conv.patch_embed(x).flatten(1, 2))
    by_hand.fit_hash(tokens, iterations=3, generator=torch.Generator().manual_seed(3))
    for k, v in by_hand.hash_state_dict().items():
        assert torch.equal(first.attn.get_buffer(k), v), k
    conv.eval()
    fresh = converted(make(seed=9), "shiftadd", strict=False, **HASH).eval()
    fresh.load_state_dict(conv.state_dict(), strict=True)
    V.load_hash_state_dict(fresh, V.hash_state_dict(conv))
    assert len(V.hash_state_dict(conv)) == 6 * 3
    with torch.no_grad():
        assert torch.equal(fresh(x), conv(x))
    with pytest.raises(ValueError, match="convert timm's model instead"):
        effkern.convert(conv, "shift")


def test_shiftadd_training_step_reaches_every_new_parameter():
    model = make()
    conv = converted(model, "shiftadd", strict=False, **HASH)
    # fitted (mu centres the kernel features): some hash values fall where the straight-through
    # estimator passes gradients (0 < y < 1); a random hash may give every token the same codes
    V.fit_hash(conv, images(), progress=False, iterations=2, generator=torch.Generator().manual_seed(0))
    conv.train()(images()).square().mean().backward()
    params = dict(conv.named_parameters())
    for name in conv.effkern.added_parameters:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    for blk in blocks(conv)[:6]:
        assert blk.attn.q.weight.grad.abs().sum() > 0  # through the straight-through hash
        assert blk.attn.sr.weight.grad is None  # kept for the checkpoint only


# --------------------------------------------------------------------------------------------
# shift
# --------------------------------------------------------------------------------------------


def test_shift_layers_match_shiftaddvit_and_freeze():
    """mode "q" keeps timm's names (strict loading); the model equals timm's with ShiftAddViT's
    LinearShiftQ in those places; frozen (effkern.ops.shift_linear) it agrees to float rounding."""
    from tests import shift_transcriptions as ST

    model = make()
    conv = converted(model, "shift", targets=ALL_LINEARS)
    conv.load_state_dict(model.state_dict(), strict=True)
    layers = V.shift_layers(conv)
    assert len(layers) == 5 * 8
    assert all(isinstance(b.mlp.dwconv, nn.Conv2d) for b in blocks(conv))  # timm's, kept
    ref = copy.deepcopy(model)
    for blk in blocks(ref):
        for t in ALL_LINEARS:
            parent = blk.mlp if t.startswith("fc") else blk.attn
            setattr(parent, t, ST.PublishedShiftQ(getattr(parent, t), 5, True))
    x = images()
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(conv.train()(x), want, rtol=1e-4, atol=1e-4)  # the quantised training forward
        torch.testing.assert_close(conv.eval()(x), want, rtol=1e-4, atol=1e-4)
        for layer in layers.values():
            layer.freeze()
        torch.testing.assert_close(conv(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    fc = converted(model, "shift", stages=(3,))
    assert sorted(V.shift_layers(fc)) == [f"stages.3.blocks.{j}.mlp.{t}" for j in range(2) for t in ("fc1", "fc2")]
    with pytest.raises(ValueError, match="targets must be distinct names among"):
        converted(model, "shift", targets=("qkv",))


def test_shift_moe_makes_fc1_fc2_mixtures_and_trains():
    """moe=True: fc1 and fc2 each a ShiftAddMoE of timm's linear and its shift copy, timm's dwconv
    between them; the names are listed; a step reaches every new parameter through both losses."""
    model = make()
    with pytest.raises(ValueError, match="strict=False"):
        converted(model, "shift", moe=True)
    conv = converted(model, "shift", moe=True, mode="ps", strict=False).train()
    assert set(conv.state_dict()) - set(model.state_dict()) == set(conv.effkern.added_parameters)
    for blk, orig in zip(blocks(conv), blocks(model)):
        for t in ("fc1", "fc2"):
            moe = getattr(blk.mlp, t)
            assert isinstance(moe, ShiftAddMoE) and isinstance(moe.experts[1], ShiftLinear)
            assert torch.equal(moe.experts[0].weight, getattr(orig.mlp, t).weight)
        assert torch.equal(blk.mlp.dwconv.weight, orig.mlp.dwconv.weight)
    (conv(images()).square().mean() + V.moe_loss(conv)).backward()
    params = dict(conv.named_parameters())
    for name in conv.effkern.added_parameters:
        if name.rsplit(".", 1)[-1] in ("w_gate", "w_noise"):
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    capped = converted(model, "shift", moe=True, capacity=1.0, strict=False).eval()
    with torch.no_grad():
        assert capped(images()).shape == (2, 1000)


# --------------------------------------------------------------------------------------------
# Other methods, timm names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tome", "evit", "dynamicvit", "idlevit", "ecoformer", "ivit"])
def test_other_methods_refuse_a_pvt(method):
    model = make()
    with pytest.raises(TypeError, match=rf"convert\('{method}'\).*PVTv2 \(PyramidVisionTransformerV2\)"):
        converted(model, method)
    assert type(model.stages[0].blocks[0].attn).__name__ == "Attention"


def test_stages_is_for_pvt_only():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    with pytest.raises(ValueError, match="stages selects the stages of a PVTv2"):
        converted(vit, "shiftadd", strict=False, stages=(0,))


def test_timm_names_create_the_converted_pvts():
    import effkern.models  # noqa: F401  (registers the names)

    for method in ("shiftadd", "shift"):
        assert {f"pvt_v2_b{i}_{method}" for i in range(3)} <= set(timm.list_models(f"pvt_v2_*_{method}"))
    torch.manual_seed(0)
    made = timm.create_model("pvt_v2_b0_shiftadd", num_classes=7, **HASH).eval()
    torch.manual_seed(0)
    want = effkern.convert(timm.create_model("pvt_v2_b0", num_classes=7), "shiftadd", strict=False, **HASH).eval()
    assert made.effkern.config == want.effkern.config
    assert made.effkern.added_parameters == want.effkern.added_parameters
    with torch.no_grad():
        assert torch.equal(made(images()), want(images()))
    shift = timm.create_model("pvt_v2_b0_shift", moe=True)
    assert isinstance(shift.stages[0].blocks[0].mlp.fc1, ShiftAddMoE)
