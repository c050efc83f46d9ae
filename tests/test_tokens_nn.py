"""effkern.nn.tokens: each method's step against its plain-torch transcription
(tests/tokens_transcriptions.py), with shared weights (state dicts loaded both ways: the
parameter names match), forward and backward; token counts and edge cases."""

import math

import pytest
import torch

from effkern.nn.layers import Block
from effkern.nn.tokens import (
    DynamicViTAttention,
    DynamicViTBlock,
    DynamicViTPredictor,
    EViTAttention,
    EViTBlock,
    IdleViTBlock,
    ToMeAttention,
    ToMeBlock,
    dynamicvit_keep,
    evit_left_tokens,
    evit_reorganize,
    idle_select_compute_scatter,
    tome_merge,
)
from effkern.ops import token_gather, topk_tokens
from tests import tokens_transcriptions as ref
from tests.conftest import DEVICE

DTYPES = [torch.float32, torch.float64]
HEADS = {24: 3, 40: 5}  # odd head counts; head dims 8
B = 2
# forward / gradient tolerances: the effkern side runs fused SDPA and float32-accumulating ops,
# the transcriptions explicit softmax and torch indexing
FWD = {torch.float32: {"rtol": 1e-4, "atol": 2e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-11}}
BWD = {torch.float32: {"rtol": 1e-3, "atol": 1e-4}, torch.float64: {"rtol": 1e-8, "atol": 1e-10}}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def randn(gen, *shape, dtype=torch.float32, grad=False):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return t.requires_grad_(grad)


def randomize_(module, gen):
    """Random parameters (LayerNorm affine included, so misplaced names would show)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                v = torch.randn(p.shape, generator=gen, dtype=torch.float64) * p.shape[1] ** -0.5
            elif name.endswith(("weight", "gamma")):
                v = 1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                v = 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(v.to(p.dtype))
    return module


def shared(ours, theirs, gen, dtype):
    """Random weights in the transcription, loaded into effkern's module and back (strict: the
    state dict keys are the same both ways); both on DEVICE in dtype."""
    randomize_(theirs, gen)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    return ours.to(DEVICE, dtype), theirs.to(DEVICE, dtype)


def assert_close(a, b, tol):
    torch.testing.assert_close(a, b, **tol)


def assert_backward_match(outs, ref_outs, inputs, ref_inputs, ours, theirs, gen, dtype, tol=None):
    """Same random output gradients into both sides; the gradients of the inputs and of every
    parameter (matched by name) agree."""
    tol = tol or BWD[dtype]
    outs, ref_outs = list(outs), list(ref_outs)
    grads_out = [randn(gen, *o.shape, dtype=o.dtype) for o in outs]
    names = [n for n, _ in ours.named_parameters()]
    ref_params = dict(theirs.named_parameters())
    assert sorted(names) == sorted(ref_params)
    ours_p = dict(ours.named_parameters())
    got = torch.autograd.grad(outs, [*inputs, *(ours_p[n] for n in names)], grads_out, allow_unused=True)
    exp = torch.autograd.grad(ref_outs, [*ref_inputs, *(ref_params[n] for n in names)], grads_out,
                              allow_unused=True)
    labels = [f"input {i}" for i in range(len(inputs))] + names
    for label, a, b in zip(labels, got, exp):
        assert (a is None) == (b is None), label
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, label=label: f"{label}: {m}")


def random_policy(gen, b, m, dtype):
    """A 0/1 keep policy [B, M, 1] with at least one kept token per row."""
    p = (torch.rand(b, m, 1, generator=gen) < 0.6).to(torch.float64)
    p[:, 0] = 1
    return p.to(dtype).to(DEVICE)


# --------------------------------------------------------------------------------------------
# timm names
# --------------------------------------------------------------------------------------------


def test_block_has_timm_parameter_names():
    keys = set(Block(24, 3, qkv_bias=True).state_dict())
    assert keys == {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                    "mlp.fc2.weight", "mlp.fc2.bias"}
    extra = set(ToMeBlock(24, 3, qkv_bias=True, qk_norm=True, init_values=1e-5).state_dict()) - keys
    assert extra == {"ls1.gamma", "ls2.gamma", "attn.q_norm.weight", "attn.q_norm.bias",
                     "attn.k_norm.weight", "attn.k_norm.bias"}
    assert not set(Block(24, 3).state_dict()) & {"attn.qkv.bias"}  # qkv_bias=False as timm


# --------------------------------------------------------------------------------------------
# DynamicViT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c", [(196, 24), (8, 40), (4, 24)])
def test_dynamicvit_predictor_matches_predictorlg(gen, dtype, m, c):
    ours, theirs = shared(DynamicViTPredictor(c), ref.PredictorLG(c), gen, dtype)
    x = randn(gen, B, m, c, dtype=dtype, grad=True)
    policy = random_policy(gen, B, m, dtype).requires_grad_()
    out, expected = ours(x, policy), theirs(x, policy)
    assert out.shape == (B, m, 2)
    assert_close(out, expected, FWD[dtype])
    assert_close(ours(x, policy[..., 0]), expected, FWD[dtype])  # [B, M] policy too
    assert_backward_match([out], [expected], [x, policy], [x, policy], ours, theirs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(197, 24), (9, 40), (5, 24)])
def test_dynamicvit_attention_matches_softmax_with_policy(gen, dtype, n, c):
    ours, theirs = shared(DynamicViTAttention(c, HEADS[c], qkv_bias=True), ref.DynamicViTAttention(c, HEADS[c], True),
                          gen, dtype)
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    policy = random_policy(gen, B, n, dtype).requires_grad_()
    out, expected = ours(x, policy), theirs(x, policy)
    # DynamicViT's softmax_with_policy works in float32 even for float64 logits; effkern's
    # masked_softmax in float64 there, so float64 agrees to float32 precision only
    tol = FWD[torch.float32]
    assert_close(out, expected, tol)
    assert_close(ours(x, policy[..., 0]), expected, tol)
    assert_backward_match([out], [expected], [x, policy], [x, policy], ours, theirs, gen, dtype,
                          tol=BWD[torch.float32])
    # no policy: the plain softmax attention
    out, expected = ours(x), theirs(x)
    assert_close(out, expected, FWD[dtype])
    assert_backward_match([out], [expected], [x], [x], ours, theirs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(197, 40), (9, 24)])
def test_dynamicvit_predictor_and_masked_attention_train_one_step(gen, dtype, n, c):
    """Two pruning locations of VisionTransformerDiffPruning in training (the transcription's
    step drives both sides: effkern's modules are drop-ins), loss with DynamicViT's keep-ratio
    term, backward, one SGD step: gradients and updated weights agree."""
    def make(predictor, block):
        return torch.nn.ModuleList([predictor(c), predictor(c), block(c, HEADS[c], qkv_bias=True),
                                    block(c, HEADS[c], qkv_bias=True)])

    ours, theirs = shared(make(DynamicViTPredictor, DynamicViTBlock),
                          make(ref.PredictorLG, ref.DynamicViTBlock), gen, dtype)
    x0 = randn(gen, B, n, c, dtype=dtype)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))

    def run(mods):
        x = x0.clone().requires_grad_()
        decision = torch.ones(B, n - 1, 1, dtype=dtype, device=DEVICE)
        ratios = []
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the same gumbel noise on both sides
            for i in range(2):
                x, decision = ref.dynamicvit_train_prune(x, mods[i], mods[2 + i], decision)
                ratios.append(decision.mean(1))
        loss = x.square().mean() + sum(((r - 0.7) ** 2).mean() for r in ratios)
        return x, decision, loss

    out, dec, loss = run(ours)
    ref_out, ref_dec, ref_loss = run(theirs)
    assert torch.equal(dec, ref_dec)  # the same hard decisions
    assert 0 < dec.sum() < dec.numel()
    assert_close(out, ref_out, FWD[torch.float32])
    opt, ref_opt = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, **BWD[torch.float32], msg=name)
    opt.step()
    ref_opt.step()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[name], **FWD[torch.float32], msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [197, 9, 5])
@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.0, 1.0])
def test_dynamicvit_keep_matches_inference_pruning(gen, dtype, n, ratio):
    m = n - 1
    num_keep = int(m * ratio)  # DynamicViT's count, the caller's
    x = randn(gen, B, n, 40, dtype=dtype, grad=True)
    score = randn(gen, B, m, dtype=dtype)
    prev = torch.rand(B, m, 1, generator=gen).to(dtype).to(DEVICE)
    kept, keep_idx = dynamicvit_keep(x, score, num_keep)
    expected, keep_policy, ref_prev = ref.dynamicvit_keep(x, score, num_keep, prev)
    assert kept.shape == (B, 1 + num_keep, 40) and keep_idx.shape == (B, num_keep)
    assert torch.equal(kept, expected) and torch.equal(keep_idx, keep_policy)
    assert torch.equal(token_gather(prev, keep_idx), ref_prev)  # prev_decision bookkeeping
    g = randn(gen, *kept.shape, dtype=dtype)
    (grad,) = torch.autograd.grad(kept, x, g)
    (ref_grad,) = torch.autograd.grad(expected, x, g)
    assert torch.equal(grad, ref_grad)


def test_dynamicvit_keep_rejects_mismatched_shapes(gen):
    with pytest.raises(ValueError, match="1 \\+ M"):
        dynamicvit_keep(randn(gen, B, 9, 8), randn(gen, B, 9), 3)
    with pytest.raises(ValueError):
        dynamicvit_keep(randn(gen, B, 9, 8), randn(gen, B, 8), 9)  # num_keep > M


# --------------------------------------------------------------------------------------------
# EViT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(197, 24), (9, 40), (5, 24)])
def test_evit_attention_matches(gen, dtype, n, c):
    keep_rate = 0.6
    ours, theirs = shared(EViTAttention(c, HEADS[c], qkv_bias=True),
                          ref.EViTAttention(c, HEADS[c], True, keep_rate=keep_rate), gen, dtype)
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    out, cls_attn = ours(x, keep_rate)
    ref_out, _, idx, ref_cls_attn, left = theirs(x, keep_rate)
    assert cls_attn.shape == (B, n - 1) and left == math.ceil(keep_rate * (n - 1))
    assert_close(out, ref_out, FWD[dtype])
    assert_close(cls_attn, ref_cls_attn, FWD[dtype])
    assert torch.equal(topk_tokens(cls_attn, left, keep_cls=False)[0], idx)
    assert_backward_match([out, cls_attn], [ref_out, ref_cls_attn], [x], [x], ours, theirs, gen, dtype)
    # nothing to prune: no score, as EViT
    assert ours(x, 1.0)[1] is None
    assert_close(ours(x, 1.0)[0], ref_out, FWD[dtype])
    assert ours(x, 1 - 0.5 / (n - 1))[1] is None  # ceil(...) = N - 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(197, 40), (9, 24), (5, 40)])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 1.0])
@pytest.mark.parametrize("fuse", [False, True])
def test_evit_block_matches(gen, dtype, n, c, keep_rate, fuse):
    ours, theirs = shared(EViTBlock(c, HEADS[c], qkv_bias=True, keep_rate=keep_rate, fuse_token=fuse),
                          ref.EViTBlock(c, HEADS[c], qkv_bias=True, keep_rate=keep_rate, fuse_token=fuse), gen, dtype)
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    out = ours(x)
    expected, n_tokens, _ = theirs(x)
    left = math.ceil(keep_rate * (n - 1))
    assert out.shape[1] == (n if keep_rate >= 1 else 1 + left + fuse) == n_tokens + 1
    assert_close(out, expected, FWD[dtype])
    assert_backward_match([out], [expected], [x], [x], ours, theirs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_evit_reorganize_counts_and_edges(gen, dtype):
    assert evit_left_tokens(197, 0.7) == 138 == math.ceil(0.7 * 196)
    assert evit_left_tokens(9, 0.5) == 4 and evit_left_tokens(9, 0.51) == 5
    n, c = 9, 24
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    cls_attn = torch.softmax(randn(gen, B, n - 1), -1).to(dtype).requires_grad_()
    # nothing pruned: x itself
    assert evit_reorganize(x, cls_attn, 1.0) is x
    assert evit_reorganize(x, None, 1.0, fuse_token=True) is x
    assert evit_reorganize(x, cls_attn, 0.99, fuse_token=True) is x  # ceil(0.99 * 8) = 8 = N - 1
    # keep none: CLS (+ the fused token of every patch token)
    out = evit_reorganize(x, cls_attn, 0.0)
    assert torch.equal(out, x[:, :1])
    out = evit_reorganize(x, cls_attn, 0.0, fuse_token=True)
    fused = (x[:, 1:] * cls_attn[:, :, None]).sum(1, keepdim=True)
    assert out.shape == (B, 2, c) and torch.equal(out[:, :1], x[:, :1])
    assert_close(out[:, 1:], fused, FWD[dtype])
    g = randn(gen, *out.shape, dtype=dtype)
    got = torch.autograd.grad(out, (x, cls_attn), g)
    exp = torch.autograd.grad(torch.cat([x[:, :1], fused], 1), (x, cls_attn), g)
    for a, b in zip(got, exp):
        assert_close(a, b, FWD[dtype])
    # one kept: CLS, the best token, fused rest
    out = evit_reorganize(x, cls_attn, 0.1, fuse_token=True)
    best = cls_attn.argmax(1)
    assert out.shape == (B, 3, c)
    assert torch.equal(out[:, 1], x[torch.arange(B), best + 1])
    with pytest.raises(ValueError, match="cls_attn is None"):
        evit_reorganize(x, None, 0.5)
    with pytest.raises(ValueError, match="keep_rate"):
        evit_reorganize(x, cls_attn, -0.1)


# --------------------------------------------------------------------------------------------
# IdleViT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(197, 24), (9, 40), (5, 24)])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.0, 1.0])
def test_idlevit_block_matches_inference_step(gen, dtype, n, c, keep_rate):
    ours, theirs = shared(IdleViTBlock(Block(c, HEADS[c], qkv_bias=True), keep_rate),
                          ref.IdleViTBlock(c, HEADS[c], qkv_bias=True), gen, dtype)
    assert set(ours.state_dict()) == set(ours.block.state_dict())  # the block's (timm's) keys
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    num_keep = int((n - 1) * keep_rate)  # IdleViT's int(M * keep_ratio)
    assert ours.num_keep(n) == num_keep
    # IdleViT's ranking: head-mean of the CLS row's (unscaled) logits; effkern's: scaled
    scores = ours.scores(x)
    ref_logits = theirs.attn.cls_logits(theirs.norm1(x)).mean(1)[:, 0, 1:]
    assert_close(scores, ref_logits * theirs.attn.scale, FWD[dtype])
    out = ours(x)
    expected = theirs.forward_test(x, num_keep)
    assert out.shape == x.shape
    assert_close(out, expected, FWD[dtype])
    keep, idle = topk_tokens(scores, num_keep, keep_cls=True)
    assert torch.equal(token_gather(out, idle), token_gather(x, idle))  # idle tokens pass through
    assert_close(token_gather(out, keep), ours.block(token_gather(x, keep)), FWD[dtype])
    if num_keep == n - 1:  # everything computed: the dense block
        assert_close(out, ours.block(x), FWD[dtype])
    assert_backward_match([out], [expected], [x], [x], ours, theirs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_keep", [0, 3, 8])
def test_idle_select_compute_scatter_semantics(gen, dtype, num_keep):
    n, c = 9, 40
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    scores = randn(gen, B, n - 1, dtype=dtype)
    w = randn(gen, c, c, dtype=dtype)
    out = idle_select_compute_scatter(x, scores, num_keep, lambda y: torch.tanh(y @ w))
    keep = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=DEVICE),
                      scores.argsort(dim=1, descending=True, stable=True)[:, :num_keep] + 1], 1)
    rows = torch.arange(B, device=DEVICE)[:, None]
    expected = x.clone()
    expected[rows, keep] = torch.tanh(x[rows, keep] @ w)
    assert torch.equal(out, expected)
    g = randn(gen, *out.shape, dtype=dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    (ref_grad,) = torch.autograd.grad(expected, x, g)
    assert_close(grad, ref_grad, FWD[dtype])


def test_idlevit_block_follows_device_and_dtype_and_mode(gen):
    wrapped = IdleViTBlock(Block(24, 3, qkv_bias=True, drop_path=0.1), 0.5).to(torch.float64)
    assert wrapped.block.attn.qkv.weight.dtype == torch.float64
    assert wrapped.block.attn.qkv.weight is wrapped.attn.qkv.weight
    wrapped.eval()
    assert not wrapped.block.training and not wrapped.block.drop_path1.training
    wrapped.train()
    assert wrapped.block.training and wrapped.block.drop_path1.training
    with pytest.raises(ValueError, match="keep_rate"):
        IdleViTBlock(Block(24, 3), 1.5)


# --------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------


def random_size(gen, n, dtype):
    return torch.randint(1, 5, (B, n, 1), generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(197, 24), (9, 40), (5, 24)])
@pytest.mark.parametrize("with_size", [False, True])
def test_tome_attention_matches_proportional_attention(gen, dtype, n, c, with_size):
    ours, theirs = shared(ToMeAttention(c, HEADS[c], qkv_bias=True), ref.ToMeAttention(c, HEADS[c], True), gen, dtype)
    x = randn(gen, B, n, c, dtype=dtype, grad=True)
    size = random_size(gen, n, dtype).requires_grad_() if with_size else None
    (out, metric), (ref_out, ref_metric) = ours(x, size), theirs(x, size)
    assert metric.shape == (B, n, c // HEADS[c])
    assert_close(out, ref_out, FWD[dtype])
    assert_close(metric, ref_metric, FWD[dtype])
    if with_size:
        assert_close(ours(x, size[..., 0])[0], ref_out, FWD[dtype])  # [B, N] sizes too
    inputs = [x, size] if with_size else [x]
    assert_backward_match([out, metric], [ref_out, ref_metric], inputs, inputs, ours, theirs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,r", [(197, 16), (197, 98), (9, 2), (9, 1000), (5, 2), (6, 3)])
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("class_token", [True, False])
def test_tome_merge_matches_merge_wavg(gen, dtype, n, r, with_size, class_token):
    x = randn(gen, B, n, 40, dtype=dtype, grad=True)
    metric = randn(gen, B, n, 8, dtype=dtype)
    size = random_size(gen, n, dtype).requires_grad_() if with_size else None
    out, out_size = tome_merge(x, size, metric, r, class_token)
    expected, ref_size = ref.merge_wavg(ref.bipartite_soft_matching(metric, r, class_token)[0], x, size)
    r_eff = min(r, (n - class_token) // 2)
    assert out.shape == (B, n - r_eff, 40) and out_size.shape == (B, n - r_eff, 1)
    assert_close(out, expected, FWD[dtype])
    assert torch.equal(out_size, ref_size)
    total = size.sum((1, 2)) if with_size else torch.full((B,), float(n), dtype=dtype, device=DEVICE)
    assert torch.equal(out_size.sum((1, 2)), total)  # sizes accumulate, mass is kept
    if class_token:  # CLS first, never merged
        assert_close(out[:, 0], x[:, 0], FWD[dtype])
        assert (out_size[:, 0] == (size[:, 0] if with_size else 1)).all()
    inputs = [x, size] if with_size else [x]
    g = [randn(gen, *out.shape, dtype=dtype), randn(gen, *out_size.shape, dtype=dtype)]
    outs, ref_outs = ([out, out_size], [expected, ref_size]) if with_size else ([out], [expected])
    got = torch.autograd.grad(outs, inputs, g[: len(outs)])
    exp = torch.autograd.grad(ref_outs, inputs, g[: len(outs)])
    for a, b in zip(got, exp):
        assert_close(a, b, BWD[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,r,depth", [(197, 24, 16, 4), (197, 40, 0, 2), (9, 40, 2, 3), (5, 24, 100, 3)])
def test_tome_blocks_match_over_layers(gen, dtype, n, c, r, depth):
    def make(block):
        return torch.nn.ModuleList([block(c, HEADS[c], qkv_bias=True) for _ in range(depth)])

    ours, theirs = shared(make(ToMeBlock), make(ref.ToMeBlock), gen, dtype)
    for blk in ours:
        blk.r = r
    x0 = randn(gen, B, n, c, dtype=dtype, grad=True)
    x, size, ref_x, ref_size = x0, None, x0, None
    tokens = n
    for blk, ref_blk in zip(ours, theirs):
        x, size = blk(x, size)
        ref_x, ref_size = ref_blk(ref_x, r, ref_size)
        tokens -= min(r, (tokens - 1) // 2)
        assert x.shape == (B, tokens, c)
        assert_close(x, ref_x, FWD[dtype])
        if r == 0:
            assert size is None and ref_size is None
        else:
            assert torch.equal(size, ref_size)
            assert size.shape == (B, tokens, 1) and (size.sum((1, 2)) == n).all()  # sizes sum to N
    assert_backward_match([x], [ref_x], [x0], [x0], ours, theirs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tome_merge_edges(gen, dtype):
    x = randn(gen, B, 9, 24, dtype=dtype)
    metric = randn(gen, B, 9, 8, dtype=dtype)
    size = random_size(gen, 9, dtype)
    # r = 0: untouched, size stays None (ToMe's Block skips the merge)
    out, out_size = tome_merge(x, None, metric, 0)
    assert out is x and out_size is None
    assert tome_merge(x, size, metric, 0)[1] is size
    # r past the cap: (N - 1) // 2 with a class token, N // 2 without
    assert tome_merge(x, None, metric, 50)[0].shape[1] == 9 - 4
    assert tome_merge(x, None, metric, 50, class_token=False)[0].shape[1] == 9 - 4
    x2, m2 = x[:, :2], metric[:, :2]
    out, out_size = tome_merge(x2, None, m2, 5)  # capped to nothing: all-ones sizes, as merge_wavg
    assert out is x2 and torch.equal(out_size, torch.ones(B, 2, 1, dtype=dtype, device=DEVICE))
    with pytest.raises(ValueError, match="r must be"):
        tome_merge(x, None, metric, -1)


def test_tome_block_attributes_and_plain_block(gen):
    blk = ToMeBlock(24, 3, qkv_bias=True)
    assert blk.r == 0 and blk.class_token and blk.prop_attn
    randomize_(blk, gen)
    x = randn(gen, B, 9, 24)
    dense = Block(24, 3, qkv_bias=True)
    dense.load_state_dict(blk.state_dict())
    out, size = blk(x)
    assert size is None
    assert_close(out, dense(x), FWD[torch.float32])  # r = 0: timm's Block


# --------------------------------------------------------------------------------------------
# half precision: every step runs (forward and backward) and tracks its float64 result
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["dynamicvit", "evit", "idlevit", "tome"])
def test_steps_run_in_half_precision(gen, dtype, method):
    n, c = 9, 24
    if method == "dynamicvit":
        module = torch.nn.ModuleList([DynamicViTPredictor(c), DynamicViTBlock(c, 3, qkv_bias=True)])

        ranks = []  # the float64 run's ranking of the patch tokens, as exact small integers

        def step(mods, x):
            policy = torch.ones(B, n, 1, dtype=x.dtype, device=DEVICE)
            policy[:, 2::3] = 0
            h = mods[1](x, policy)
            score = mods[0](h[:, 1:], policy[:, 1:])[..., 0]
            # The keep decision is a hard top-k and half precision may swap near-equal scores
            # (which inputs do depends on the seed): every run keeps the tokens the float64
            # run ranks best, so the comparison measures the arithmetic, not a tie-break.
            if not ranks:
                order = score.detach().argsort(dim=-1, descending=True, stable=True)
                steps = torch.arange(order.shape[-1], 0, -1, device=order.device).expand_as(order)
                ranks.append(torch.empty_like(score).scatter_(-1, order, steps.to(score.dtype)))
            return dynamicvit_keep(h, ranks[0].to(score.dtype), 4)[0]
    elif method == "evit":
        module = EViTBlock(c, 3, qkv_bias=True, keep_rate=0.5, fuse_token=True)
        step = lambda m, x: m(x)
    elif method == "idlevit":
        module = IdleViTBlock(Block(c, 3, qkv_bias=True), 0.5)
        step = lambda m, x: m(x)
    else:
        module = ToMeBlock(c, 3, qkv_bias=True, r=2)

        def step(m, x):
            x, size = m(*m(x))
            return x * size
    randomize_(module, gen)
    x = randn(gen, B, n, c, dtype=torch.float64)
    expected = step(module.to(DEVICE, torch.float64), x)
    xh = x.to(dtype).requires_grad_()
    out = step(module.to(dtype), xh)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.1)
    out.float().square().sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
