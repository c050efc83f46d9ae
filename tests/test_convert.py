"""effkern.convert on real timm models: the no-op setting equals timm bit for bit, the methods
match transcriptions of the published model code (tests/vit_transcriptions.py), and everything
timm's model does keeps working (checkpoints, forward_features / forward_head,
forward_intermediates, gradient checkpointing, reset_classifier, bf16, torch.compile).

Needs timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``: scripts/install.sh does it on
a fresh machine); skipped without it. Small images (64 x 64: 16 patches) keep it fast on a CPU;
the block structure is the real model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm", reason="needs timm (and torchvision): pip install torch==2.14.1 "
                                           "torchvision==0.29.1 timm")

import effkern  # noqa: E402
from effkern.models.variants import METHODS, evit_keep_rate_schedule, tome_schedule  # noqa: E402
from tests import vit_transcriptions as VT  # noqa: E402

IMG = 64
# (timm name, its kwargs): DeiT/ViT without LayerScale, DeiT-III with it, distilled DeiT.
MODELS = {
    "vit_small": ("vit_small_patch16_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}),
}


def make(key: str, seed: int = 0, **kw) -> torch.nn.Module:
    name, extra = MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=IMG, **{**extra, **kw})
    # timm initialises LayerScale at 1e-5 and the head at zero: random values make a difference visible
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma") or n.startswith("head"):
                p.normal_(0, 0.5)
    return model.eval()


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def converted(model, method, **cfg):
    return effkern.convert(copy.deepcopy(model), method, **cfg)


# --------------------------------------------------------------------------------------------
# The no-op setting, checkpoints, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("method, cfg", [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0})])
def test_noop_equals_timm_bit_for_bit(key, method, cfg):
    """At r = 0 / keep rate 1 a converted block runs timm's operations in timm's order."""
    model = make(key)
    x = images()
    conv = converted(model, method, **cfg)
    assert torch.equal(conv(x), model(x))
    assert torch.equal(conv.forward_features(x), model.forward_features(x))


@pytest.mark.parametrize("method, cfg", [("tome", {"r": 4}), ("evit", {"keep_rate": 0.5})])
def test_checkpoint_loads_strictly_both_ways(method, cfg):
    model = make("deit3_small")
    conv = converted(make("deit3_small", seed=5), method, **cfg)
    assert list(conv.state_dict()) == list(model.state_dict())
    conv.load_state_dict(model.state_dict(), strict=True)
    fresh = make("deit3_small", seed=7)
    fresh.load_state_dict(conv.state_dict(), strict=True)
    assert torch.equal(fresh(images()), model(images()))
    assert isinstance(conv, type(model)) and all(isinstance(b, type(model.blocks[0])) for b in conv.blocks)


def test_convert_errors():
    model = make("vit_small")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        effkern.convert(model, "nope")
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        effkern.convert(torch.nn.Linear(2, 2), "tome")
    with pytest.raises(ValueError, match="drop_loc"):
        effkern.convert(model, "evit", drop_loc=(3, 12))
    with pytest.raises(ValueError, match="keep_rate"):
        effkern.convert(model, "evit", keep_rate=0.0)
    with pytest.raises(ValueError, match="r must be"):
        effkern.convert(model, "tome", r=-1)
    conv = converted(model, "tome", r=2)
    with pytest.raises(ValueError, match="attn_mask"):
        conv.forward_features(images(), attn_mask=torch.zeros(2, 1, 17, 17))


def test_convert_again_from_scratch():
    """A converted model converts to another method as if it were timm's."""
    model = make("vit_small")
    x = images()
    twice = effkern.convert(converted(model, "tome", r=3), "evit", keep_rate=0.5)
    once = converted(model, "evit", keep_rate=0.5)
    assert torch.equal(twice(x), once(x))
    assert type(twice) is type(once) and type(twice.blocks[0]) is type(once.blocks[0])


# --------------------------------------------------------------------------------------------
# Against the published model code
# --------------------------------------------------------------------------------------------


def assert_logits_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["vit_small", "deit3_small", "deit_tiny_distilled"])
@pytest.mark.parametrize("r, prop_attn", [(2, True), (3, False), ((3, -1.0), True), ([1, 4, 0, 2, 5], True)])
def test_tome_matches_published_model(key, r, prop_attn):
    model = make(key)
    x = images(3)
    conv = converted(model, "tome", r=r, prop_attn=prop_attn)
    want, kept = VT.tome_forward(model, x, r, prop_attn)
    assert_logits_close(conv(x), want)
    assert [conv.effkern.kept[i] for i in range(len(conv.blocks))] == kept


def test_tome_trace_source_matches_published():
    model = make("vit_small")
    x = images(3)
    conv = converted(model, "tome", r=(3, -1.0), trace_source=True)
    want, kept, source = VT.tome_forward(model, x, (3, -1.0), trace_source=True)
    assert_logits_close(conv(x), want)
    got = conv.effkern.extra["source"]
    assert torch.equal(got, source.to(got.dtype))
    assert torch.equal(got.sum(1), torch.ones(3, 17))  # every input token in exactly one output token


def test_tome_per_call_r():
    model = make("vit_small")
    x = images()
    conv = converted(model, "tome", r=1)
    want, _ = VT.tome_forward(model, x, (3, -0.5))
    assert_logits_close(conv(x, r=(3, -0.5)), want)
    assert_logits_close(conv(x), VT.tome_forward(model, x, 1)[0])  # the override held for one call


def test_tome_schedule_is_parse_r():
    for depth in (1, 2, 12, 24):
        for r in (0, 5, 16, (8, -1.0), (8, 0.5), (16, 1.0), [1, 2, 3]):
            if depth == 1 and not isinstance(r, list):
                continue  # parse_r divides by depth - 1
            assert tome_schedule(depth, r) == VT.parse_r(depth, r), (depth, r)


@pytest.mark.parametrize("key", ["vit_small", "deit3_small"])
@pytest.mark.parametrize("keep_rate, drop_loc, fuse_token", [(0.7, (3, 6, 9), True), (0.5, (1, 3, 9), False),
                                                             (0.25, (0, 11), True)])
def test_evit_matches_published_model(key, keep_rate, drop_loc, fuse_token):
    model = make(key)
    x = images(3)
    conv = converted(model, "evit", keep_rate=keep_rate, drop_loc=drop_loc, fuse_token=fuse_token)
    want, kept = VT.evit_forward(model, x, keep_rate, drop_loc, fuse_token)
    assert_logits_close(conv(x), want)
    assert [conv.effkern.kept[i] for i in range(12)] == kept  # the fused token counted, as EViT


@pytest.mark.parametrize("call", [{"keep_rate": 0.5}, {"keep_rate": 1.0},
                                  {"keep_rate": (1, 1, 1, 0.3, 1, 1, 0.9, 1, 1, 0.5, 1, 1)},
                                  {"tokens": (None, 12, None, None, 5, None, None, None, None, None, None, 2)}])
def test_evit_per_call_arguments(call):
    """EViT's forward(x, keep_rate, tokens): a call's rate prunes only at the pruning layers;
    tokens set the count at any layer."""
    model = make("vit_small")
    x = images()
    conv = converted(model, "evit", keep_rate=0.7, fuse_token=True)
    want, kept = VT.evit_forward(model, x, 0.7, (3, 6, 9), True, **call)
    assert_logits_close(conv(x, **call), want)
    assert [conv.effkern.kept[i] for i in range(12)] == kept


def test_evit_distillation_token_is_kept():
    """effkern keeps every prefix token (EViT would rank the distillation token like a patch)."""
    model = make("deit_tiny_distilled")
    conv = converted(model, "evit", keep_rate=0.25, drop_loc=(1, 5))
    model.train(False)
    feats = conv.forward_features(images())
    # class + distillation + ceil(0.25 * 16) = 4 + fused, then ceil(0.25 * 5) = 2 + fused
    assert feats.shape[1] == 2 + 2 + 1
    logits = conv(images())
    assert logits.shape == (2, model.num_classes)


def test_evit_keep_rate_schedule_is_published():
    """EViT's adjust_keep_rate: 1 during warm-up, a cosine to the base rate, then the base rate."""
    it = 100
    assert evit_keep_rate_schedule(5 * it, 5, 10, 40, it, 0.7) == 1.0
    assert evit_keep_rate_schedule(10 * it, 10, 10, 40, it, 0.7) == pytest.approx(1.0)
    assert evit_keep_rate_schedule(25 * it, 25, 10, 40, it, 0.7) == pytest.approx(0.85)
    assert evit_keep_rate_schedule(40 * it, 40, 10, 40, it, 0.7) == 0.7


# --------------------------------------------------------------------------------------------
# What timm's model does keeps working
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, cfg", [("tome", {"r": 3}), ("evit", {"keep_rate": 0.5, "drop_loc": (1, 2)})])
def test_forward_intermediates_token_counts(method, cfg):
    """NLC intermediates carry the token count of their depth (the published model's); NCHW is
    refused while tokens are reduced and equals timm's at the no-op setting."""
    model = make("vit_small", depth=4)
    conv = converted(model, method, **cfg)
    x = images()
    final, inter = conv.forward_intermediates(x, output_fmt="NLC")
    assert torch.equal(conv.forward_head(final), conv(x))
    if method == "tome":
        _, kept = VT.tome_forward(model, x, cfg["r"])
    else:
        _, kept = VT.evit_forward(model, x, cfg["keep_rate"], cfg["drop_loc"], True)
    assert [t.shape[1] for t in inter] == kept and kept[-1] < 16
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        conv.forward_intermediates(x)
    noop = converted(model, method, **({"r": 0} if method == "tome" else {**cfg, "keep_rate": 1.0}))
    for a, b in zip(noop.forward_intermediates(x)[1], model.forward_intermediates(x)[1]):
        assert torch.equal(a, b)


TRAINING_CASES = [("tome", {"r": 3}), ("evit", {"keep_rate": 0.5, "drop_loc": (1, 2)}),
                  ("dynamicvit", {"strict": False, "pruning_loc": (1, 2)}),
                  ("idlevit", {"keep_rate": 0.5, "idle_layers": (1, 3)}),
                  ("ecoformer", {"nbits": 8, "num_anchors": 8})]


@pytest.mark.parametrize("method, cfg", TRAINING_CASES)
def test_gradient_checkpointing_same_gradients(method, cfg):
    """Checkpointed blocks run again in the backward pass: ToMe's sizes are kept per block."""
    model = make("vit_small", depth=4)
    x = images()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        conv = converted(model, method, **cfg).train()
        conv.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)  # DynamicViT's Gumbel noise: the same draws (checkpoint restores the RNG state)
        conv(x).square().mean().backward()
        grads.append({n: p.grad for n, p in conv.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_reset_classifier_bf16_autocast():
    conv = converted(make("vit_small", depth=4), "tome", r=3)
    conv.reset_classifier(5)
    x = images()
    assert conv(x).shape == (2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert conv.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("method, cfg", TRAINING_CASES)
def test_torch_compile_inference_and_training(method, cfg):
    """inductor, timm's layouts: inference equals eager; a training step runs and matches eager's
    gradients (random numbers drawn as in eager: DynamicViT's Gumbel noise)."""
    with torch._inductor.config.patch(fallback_random=True):
        _compile_inference_and_training(method, cfg)


def _compile_inference_and_training(method, cfg):
    torch._dynamo.reset()
    model = make("vit_small", depth=4)
    x = images()
    torch.manual_seed(0)
    eager = converted(model, method, **cfg)
    torch.manual_seed(0)
    compiled_model = converted(model, method, **cfg)
    fn = torch.compile(compiled_model, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(fn(x), eager(x), rtol=1e-4, atol=1e-4)
    eager.train()
    compiled_model.train()
    torch.manual_seed(1)
    eager(x).square().mean().backward()
    torch.manual_seed(1)
    fn(x).square().mean().backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            # inductor fuses and reorders fp32 sums: tolerances relative to the largest gradient
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4 * float(a.grad.abs().max()),
                                       msg=lambda m, n=n: f"{n}: {m}")


def test_methods_are_described():
    for name, m in METHODS.items():
        assert m.name == name and m.doc
    assert METHODS["tome"].per_call == ("r",) and METHODS["evit"].per_call == ("keep_rate", "tokens")


# --------------------------------------------------------------------------------------------
# DynamicViT
# --------------------------------------------------------------------------------------------


def dynamicvit(key="vit_small", **cfg):
    model = make(key)
    conv = converted(model, "dynamicvit", strict=False, **cfg)
    with torch.no_grad():  # predictors that make a difference (DynamicViT's init scores near 0.5)
        for p in conv.score_predictor.parameters():
            p.normal_(0, 0.3)
    from tests import tokens_transcriptions as T

    preds = []
    for mod in conv.score_predictor:
        ref = T.PredictorLG(mod.in_conv[0].normalized_shape[0])
        ref.load_state_dict(mod.state_dict(), strict=True)
        preds.append(ref)
    return model, conv, preds


def test_dynamicvit_adds_parameters_only_when_allowed():
    model = make("vit_small")
    with pytest.raises(ValueError, match="strict=False"):
        converted(model, "dynamicvit")
    conv = converted(model, "dynamicvit", strict=False)
    assert conv.effkern.added_parameters and all(n.startswith("score_predictor.") for n in conv.effkern.added_parameters)
    assert set(conv.state_dict()) - set(model.state_dict()) == set(conv.effkern.added_parameters)
    conv.load_state_dict(model.state_dict(), strict=False)  # a timm checkpoint: the predictors missing
    assert effkern.convert(conv, "tome").state_dict().keys() == model.state_dict().keys()  # removed again


@pytest.mark.parametrize("key", ["vit_small", "deit3_small"])
@pytest.mark.parametrize("cfg", [{}, {"keep_ratio": 0.5, "pruning_loc": (1, 5, 10)}, {"token_ratio": (0.9, 0.1), "pruning_loc": (2, 4)}])
def test_dynamicvit_inference_matches_published_model(key, cfg):
    model, conv, preds = dynamicvit(key, **cfg)
    x = images(3)
    c = conv.effkern.config
    want, kept = VT.dynamicvit_forward(model, preds, x, c["pruning_loc"], c["token_ratio"])
    assert_logits_close(conv(x), want)
    assert [conv.effkern.kept[i] for i in range(12)] == kept


def test_dynamicvit_noop_equals_timm():
    """token ratio 1 at every location: every token kept, timm's output to float rounding (as
    DynamicViT, the kept tokens are reordered by score, which changes the order of the attention
    sums, not their terms)."""
    model, conv, _ = dynamicvit(token_ratio=(1.0, 1.0, 1.0))
    x = images()
    assert_logits_close(conv(x), model(x))  # logits of magnitude ~10: 1e-4 is fp32 rounding
    assert [conv.effkern.kept[i] for i in range(12)] == [16] * 12


def test_dynamicvit_training_and_loss_match_published():
    """Training: Gumbel decisions (the same noise: same generator state, the published order of
    draws), every block under the policy; DynamicViTLoss = DistillDiffPruningLoss_dynamic with the
    DeiT settings, and the same gradients."""
    from effkern.models.variants import DynamicViTLoss

    model, conv, preds = dynamicvit()
    teacher = make("vit_small", seed=3)
    x, labels = images(3), torch.tensor([1, 5, 7])
    c = conv.effkern.config
    conv.train()
    model.train()
    torch.manual_seed(11)
    logits = conv(x)
    loss = DynamicViTLoss(teacher, c["token_ratio"])(x, logits, labels, conv)
    outputs = VT.dynamicvit_forward(model, preds, x, c["pruning_loc"], c["token_ratio"], training=True, seed=11)
    want = VT.dynamicvit_loss(teacher, x, outputs, labels, c["token_ratio"])
    assert_logits_close(logits, outputs[0])
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    decisions = conv.effkern.extra["decisions"]
    for p, d in enumerate(outputs[3]):
        assert torch.equal(decisions[p], d)
    loss.backward()
    want.backward()
    # the transcription's blocks are copies; the head, the final norm and the predictors are shared
    # (12 layers of fp32 backward in another order: tolerances relative to the largest gradient)
    for name in ("head.weight", "norm.weight", "patch_embed.proj.weight"):
        want_grad = model.get_parameter(name).grad
        torch.testing.assert_close(conv.get_parameter(name).grad, want_grad, rtol=1e-3,
                                   atol=1e-4 * float(want_grad.abs().max()), msg=lambda m: f"{name}: {m}")
    for mod, ref in zip(conv.score_predictor, preds):
        g = ref.out_conv[0].weight.grad
        torch.testing.assert_close(mod.out_conv[0].weight.grad, g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))


def test_dynamicvit_errors():
    with pytest.raises(NotImplementedError, match="prefix"):
        converted(make("deit_tiny_distilled"), "dynamicvit", strict=False)
    with pytest.raises(ValueError, match="pruning_loc"):
        converted(make("vit_small"), "dynamicvit", strict=False, pruning_loc=(6, 3))
    with pytest.raises(ValueError, match="token_ratio"):
        converted(make("vit_small"), "dynamicvit", strict=False, token_ratio=(0.5,))


# --------------------------------------------------------------------------------------------
# IdleViT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["vit_small", "deit3_small"])
@pytest.mark.parametrize("cfg", [{}, {"keep_rate": 0.5, "idle_layers": (2, 3, 9)}, {"idle_layers": (0, 11), "keep_ratios": (0.3, 0.9)}])
def test_idlevit_inference_matches_published_model(key, cfg):
    model = make(key)
    conv = converted(model, "idlevit", **cfg)
    x = images(3)
    c = conv.effkern.config
    assert_logits_close(conv(x), VT.idlevit_forward(model, x, c["idle_layers"], c["keep_ratios"]))


def test_idlevit_defaults_are_published():
    """main.py: idle layers 4..11, keep ratios rho, rho, rho, rho^2, ..., rho = 0.7 (8 of 9 used)."""
    c = converted(make("vit_small"), "idlevit").effkern.config
    assert c["idle_layers"] == tuple(range(4, 12))
    published = [0.7 ** (i + 1) for i in range(3) for _ in range(3)]
    assert c["keep_ratios"] == pytest.approx(published[:8])


def test_idlevit_noop_equals_timm():
    model = make("vit_small")
    x = images()
    conv = converted(model, "idlevit", keep_rate=1.0)
    assert_logits_close(conv(x), model(x))  # all tokens gathered (CLS first, then by score)


def test_idlevit_training_and_cut_loss_match_published():
    from effkern.models.variants import IdleViTLoss

    model = make("vit_small")
    conv = converted(model, "idlevit", keep_rate=0.5, idle_layers=(3, 6, 9))
    x, labels = images(3), torch.tensor([0, 4, 9])
    c = conv.effkern.config
    conv.train()
    model.train()
    logits = conv(x)
    loss = IdleViTLoss()(x, logits, labels, conv)
    want_logits, attns, masks = VT.idlevit_forward(model, x, c["idle_layers"], c["keep_ratios"], training=True)
    want = torch.nn.functional.cross_entropy(want_logits, labels) + 20.0 * VT.idlevit_cut_loss(attns, masks, 3)
    assert_logits_close(logits, want_logits)
    for i, m in zip(c["idle_layers"], masks):
        assert torch.equal(conv.effkern.extra["masks"][i], m)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    loss.backward()
    want.backward()
    for name in ("head.weight", "norm.weight", "patch_embed.proj.weight"):
        g = model.get_parameter(name).grad
        torch.testing.assert_close(conv.get_parameter(name).grad, g, rtol=1e-3, atol=1e-4 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_idlevit_loss_distillation_terms():
    """With a teacher: + 5 KL(teacher || student) + 500 MSE of the normalised CLS features."""
    from effkern.models.variants import IdleViTLoss

    model, teacher = make("vit_small"), make("vit_small", seed=4)
    conv = converted(model, "idlevit").train()
    x, labels = images(), torch.tensor([2, 3])
    logits = conv(x)
    base = IdleViTLoss(cutloss_type="none")(x, logits, labels, conv)
    full = IdleViTLoss(teacher, cutloss_type="none")(x, logits, labels, conv)
    feats_t = teacher.forward_features(x)
    feats_s = conv.effkern.extra["normed"]
    F = torch.nn.functional
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher.forward_head(feats_t), -1), reduction="batchmean",
                  log_target=True)
    mse = F.mse_loss(F.normalize(conv.forward_head(feats_s, pre_logits=True)),
                     F.normalize(teacher.forward_head(feats_t, pre_logits=True)))
    torch.testing.assert_close(full - base, 5.0 * kl + 500.0 * mse, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# timm model names
# --------------------------------------------------------------------------------------------


def test_timm_names_create_the_converted_models():
    import effkern.models  # noqa: F401  (registers the names)
    from effkern.models import timm_names

    for method in METHODS:
        found = timm.list_models(f"*_{method}")
        assert set(found) >= {f"{arch}_{method}" for arch in METHODS[method].archs or timm_names.ARCHS}, method
    torch.manual_seed(0)
    made = timm.create_model("deit_small_patch16_224_tome", img_size=IMG, num_classes=7, r=2).eval()
    torch.manual_seed(0)
    want = effkern.convert(timm.create_model("deit_small_patch16_224", img_size=IMG, num_classes=7), "tome", r=2).eval()
    assert made.effkern.config == want.effkern.config
    assert torch.equal(made(images()), want(images()))
    dyn = timm.create_model("vit_small_patch16_224_dynamicvit", img_size=IMG, keep_ratio=0.5)
    assert dyn.effkern.added_parameters and dyn.effkern.config["token_ratio"] == [0.5, 0.25, 0.125]


def test_models_command_lists_names():
    from effkern.__main__ import models_text

    text = models_text()
    assert "deit_small_patch16_224_evit" in text and "keep_rate=0.7" in text


# --------------------------------------------------------------------------------------------
# EcoFormer / ShiftAddViT attention
# --------------------------------------------------------------------------------------------


def test_binary_hash_fit_layer_by_layer_and_save_load():
    """fit_hash fits each attention to its inputs with the earlier layers already hashed (the
    same as doing it by hand); hash_state_dict + state_dict restore the model exactly."""
    from effkern.models import variants as V
    from effkern.nn import BinaryHashAttention

    model = make("vit_small", depth=4)
    x = images(4)
    conv = converted(model, "ecoformer", nbits=8, num_anchors=12)
    assert list(conv.state_dict()) == list(model.state_dict())  # timm's keys: strict both ways
    V.fit_hash(conv, x, progress=False, iterations=5, generator=torch.Generator().manual_seed(3))
    # by hand
    manual = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        t = manual.norm_pre(manual.patch_drop(manual._pos_embed(manual.patch_embed(x))))
        for blk in manual.blocks:
            blk.attn = BinaryHashAttention.from_attention(blk.attn, nbits=8, num_anchors=12).eval()
            blk.attn.fit_hash(blk.norm1(t), iterations=5, generator=gen)
            t = blk(t)
    for i in range(4):
        for k, v in manual.blocks[i].attn.hash_state_dict().items():
            assert torch.equal(conv.blocks[i].attn.get_buffer(k), v), (i, k)
    conv.eval()
    fresh = converted(make("vit_small", depth=4, seed=9), "ecoformer", nbits=8, num_anchors=12).eval()
    fresh.load_state_dict(conv.state_dict(), strict=True)
    V.load_hash_state_dict(fresh, V.hash_state_dict(conv))
    assert torch.equal(fresh(x), conv(x))
    with pytest.raises(KeyError, match="missing"):
        V.load_hash_state_dict(fresh, {})
    with pytest.raises(ValueError, match="binary-hash attention"):
        effkern.convert(conv, "tome")


def test_shiftadd_adds_the_dwconv_only_when_allowed():
    model = make("vit_small", depth=4)
    with pytest.raises(ValueError, match="strict=False"):
        converted(model, "shiftadd")
    assert type(model.blocks[0].attn).__name__ == "Attention"  # untouched by the refused convert
    conv = converted(model, "shiftadd", strict=False, layers=(1, 3))
    assert conv.effkern.added_parameters == ("blocks.1.attn.dwconv.weight", "blocks.3.attn.dwconv.weight")
    assert set(conv.state_dict()) - set(model.state_dict()) == set(conv.effkern.added_parameters)
    assert [type(b.attn).__name__ for b in conv.blocks] == ["Attention", "BinaryHashAttention"] * 2
    conv.load_state_dict(model.state_dict(), strict=False)
    assert conv(images()).shape == (2, 1000)


# --------------------------------------------------------------------------------------------
# I-ViT
# --------------------------------------------------------------------------------------------


def test_ivit_from_timm_agrees_with_the_float_model():
    """convert(model, "ivit") is a new integer-only IViT with timm's weights; calibrated, it
    agrees with the float model as tests/test_models_ivit.py's criterion (W8A8: a few %)."""
    from effkern.models import IViT
    from effkern.models import variants as V

    model = make("vit_small", depth=2, num_classes=10)
    with torch.no_grad():
        model.cls_token.normal_(0, 0.5)  # a trained CLS token is as large as the patch tokens
    iv = effkern.convert(model, "ivit")
    assert isinstance(iv, IViT) and type(model).__name__ == "VisionTransformer"  # the timm model untouched
    by_hand = IViT(img_size=IMG, patch_size=16, num_classes=10, embed_dim=384, depth=2, num_heads=6)
    by_hand.load_float_state_dict(model.state_dict())
    for (n, a), (_, b) in zip(iv.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(a, b), n
    x = images(6)
    V.calibrate(iv, [x[:3], x[3:]], progress=False)
    with torch.no_grad():
        want, got = model(x), iv(x)
    assert (got - want).norm() / want.norm() < 0.1
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_ivit_calibration_reports_a_degenerate_range():
    from effkern.models import variants as V

    model = make("vit_small", depth=2, num_classes=10)
    with torch.no_grad():
        for p in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed, model.cls_token):
            p.zero_()
    with pytest.raises(ValueError, match="degenerate activation range .* qact_embed"):
        V.calibrate(effkern.convert(model, "ivit"), [images()], progress=False)
    with pytest.raises(NotImplementedError, match="LayerScale"):
        effkern.convert(make("deit3_small"), "ivit")
    with pytest.raises(ValueError, match="no calibration batches"):
        V.calibrate(effkern.convert(make("vit_small", depth=2), "ivit"), [], progress=False)


def test_ivit_timm_names_are_the_deit_presets():
    import effkern.models  # noqa: F401
    from effkern.models import IViT

    assert sorted(timm.list_models("*_ivit")) == ["deit_base_patch16_224_ivit", "deit_small_patch16_224_ivit",
                                                  "deit_tiny_patch16_224_ivit"]
    assert isinstance(timm.create_model("deit_tiny_patch16_224_ivit", img_size=IMG), IViT)


def test_ivit_torch_compile_inference_and_training():
    """inductor: inference equals eager bit for bit (integer arithmetic); a training step (QAT:
    the quantisers' ranges move, straight-through gradients) matches eager's gradients."""
    from effkern.models import variants as V

    torch._dynamo.reset()
    model = make("vit_small", depth=2, num_classes=10)
    with torch.no_grad():
        model.cls_token.normal_(0, 0.5)
    x, labels = images(4), torch.tensor([1, 2, 3, 4])
    iv = V.calibrate(effkern.convert(model, "ivit"), [x], progress=False)
    eager, comp = copy.deepcopy(iv), copy.deepcopy(iv)
    fn = torch.compile(comp, backend="inductor")
    with torch.no_grad():
        assert torch.equal(fn(x), eager(x))
    eager.train()
    comp.train()
    torch.nn.functional.cross_entropy(eager(x), labels).backward()
    torch.nn.functional.cross_entropy(fn(x), labels).backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4 * float(a.grad.abs().max()),
                                       msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------------------------
# Shift layers (DeepShift / ShiftAddViT)
# --------------------------------------------------------------------------------------------

ALL_LINEARS = ("qkv", "proj", "fc1", "fc2")


@pytest.mark.parametrize("key", ["vit_small", "deit3_small"])
def test_shift_matches_shiftaddvit_layers_and_loads_timm_checkpoints(key):
    """mode "q" keeps timm's names (strict loading); the model equals timm's with ShiftAddViT's
    LinearShiftQ in those places; frozen (effkern.ops.shift_linear) it agrees to float rounding."""
    from effkern.models.variants import shift_layers
    from tests import shift_transcriptions as ST

    model = make(key)
    conv = converted(model, "shift", targets=ALL_LINEARS)
    conv.load_state_dict(model.state_dict(), strict=True)
    assert len(shift_layers(conv)) == 4 * len(model.blocks)
    x = images(3)
    with torch.no_grad():
        want = ST.shift_model(model, ALL_LINEARS).eval()(x)
        assert_logits_close(conv(x), want)
        for layer in shift_layers(conv).values():
            layer.freeze()
        # other summation orders; the 16.16 floors of later layers flip where they do
        torch.testing.assert_close(conv(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with pytest.raises(ValueError, match="convert timm's model instead"):
        effkern.convert(conv, "tome")


def test_shift_ps_adds_parameters_only_when_allowed():
    model = make("vit_small", depth=2)
    with pytest.raises(ValueError, match="strict=False"):
        converted(model, "shift", mode="ps")
    conv = converted(model, "shift", mode="ps", strict=False, targets=("fc1",), layers=(1,))
    assert conv.effkern.added_parameters == ("blocks.1.mlp.fc1.shift", "blocks.1.mlp.fc1.sign")
    assert set(conv.state_dict()) - set(model.state_dict()) == set(conv.effkern.added_parameters)
    with pytest.raises(ValueError, match="targets"):
        converted(model, "shift", targets=("fc3",))


def test_shift_trains_a_step_under_torch_compile():
    torch._dynamo.reset()
    model = make("vit_small", depth=2)
    x = images()
    torch.manual_seed(0)
    eager = converted(model, "shift", mode="ps", strict=False).train()
    compiled_model = copy.deepcopy(eager)
    fn = torch.compile(compiled_model, backend="inductor")
    eager(x).square().mean().backward()
    fn(x).square().mean().backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4 * float(a.grad.abs().max()),
                                       msg=lambda m, n=n: f"{n}: {m}")


def test_shift_moe_mlps_train_with_their_balance_loss():
    """moe=True: each MLP a ShiftAddMoE of timm's MLP (multiply expert, its weights) and a shift
    copy; the new names are listed; a training step reaches the routers through both losses; with
    a capacity it compiles for training (static shapes)."""
    from effkern.models.variants import moe_loss

    model = make("vit_small", depth=2)
    with pytest.raises(ValueError, match="capacity is the mixture"):
        converted(model, "shift", capacity=1.0)
    conv = converted(model, "shift", moe=True, strict=False).train()
    assert set(conv.state_dict()) - set(model.state_dict()) == set(conv.effkern.added_parameters)
    assert torch.equal(conv.blocks[0].mlp.experts[0].fc1.weight, model.blocks[0].mlp.fc1.weight)
    x = images()
    (conv(x).square().mean() + moe_loss(conv)).backward()
    assert all(float(b.mlp.w_gate.grad.abs().sum()) > 0 for b in conv.blocks)
    torch._dynamo.reset()
    capped = converted(model, "shift", moe=True, capacity=1.0, strict=False).train()
    torch.manual_seed(0)
    fn = torch.compile(capped, backend="inductor", fullgraph=True)
    (fn(x).square().mean() + moe_loss(capped)).backward()
    assert all(float(b.mlp.w_gate.grad.abs().sum()) > 0 for b in capped.blocks)
