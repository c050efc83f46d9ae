"""The sparse token ops (effkern.ops.tokens): semantics against plain references, every
backend against them, the torch.library contract (opcheck, torch.compile, gradcheck) and input
validation.

References here are deliberately naive (Python loops over batch rows and tokens, float64) or
transcriptions of the published code (tests/tokens_transcriptions.py), independent of the
backend primitives they check.
"""

from __future__ import annotations

import math

import pytest
import torch

import effkern
from effkern.ops import (
    bipartite_matching,
    cls_attention,
    fuse_tokens,
    masked_softmax,
    merge_tokens,
    token_gather,
    token_scatter,
    topk_tokens,
    unmerge_tokens,
)
from tests import tokens_transcriptions as pub
from tests.conftest import DEVICE, require_backend

from effkern._dispatch import BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for ops that round once from a float32 (or exact) result: one ulp of the dtype.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def op_backends(op: str) -> list:
    """Backends to run ``op`` on here: the ones it implements (others skip with the reason)."""
    return [pytest.param(b, id=b) for b in BACKENDS]


def use(op: str, backend: str):
    require_backend(op, backend)
    return effkern.backend(backend)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def randidx(gen, b, k, n, dtype=torch.int64, unique=False):
    if unique:
        idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)]) if b else torch.empty(0, k)
    else:
        idx = torch.randint(0, max(n, 1), (b, k), generator=gen)
    return idx.to(dtype).to(DEVICE)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def ref_gather(x, idx):
    return torch.stack([x[b][idx[b].long()] for b in range(x.shape[0])]) if x.shape[0] else x[:, :0]


def ref_scatter(x, y, idx, reduce):
    out = x.double().clone()
    for b in range(x.shape[0]):
        for k in range(idx.shape[1]):
            j = int(idx[b, k])
            out[b, j] = out[b, j] + y[b, k].double() if reduce == "add" else y[b, k].double()
    return out


def ref_fuse(x, w, idx):
    out = torch.zeros(x.shape[0], 1, x.shape[2], dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        for j in idx[b].tolist():
            out[b, 0] += w[b, j].double() * x[b, j].double()
    return out


def ref_cls_attention(q, k, scale, softmax):
    logits = (q.double()[:, :, None, :] @ k.double().transpose(-1, -2))[:, :, 0] * scale
    return (logits.softmax(-1) if softmax else logits).mean(1)


# --------------------------------------------------------------------------------------------
# token_gather / token_scatter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", op_backends("token_gather"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,k", [(1, 3, 1), (2, 5, 0), (3, 1, 3), (197, 67, 138), (785, 24, 269), (197, 384, 197)])
def test_gather_matches_reference(gen, backend, dtype, n, c, k):
    x = randn(gen, 3, n, c, dtype=dtype)
    idx = randidx(gen, 3, k, n, dtype=torch.int32 if n % 2 else torch.int64)
    with use("token_gather", backend):
        out = token_gather(x, idx)
    assert out.dtype == dtype and out.shape == (3, k, c)
    assert torch.equal(out, ref_gather(x, idx))


@pytest.mark.parametrize("backend", op_backends("token_gather"))
def test_gather_2d_noncontiguous_and_empty_batch(gen, backend):
    x = noncontiguous(randn(gen, 4, 197))
    idx = noncontiguous(randidx(gen, 4, 50, 197))
    with use("token_gather", backend):
        assert torch.equal(token_gather(x, idx), ref_gather(x, idx))
        assert token_gather(randn(gen, 0, 9, 4), randidx(gen, 0, 3, 9)).shape == (0, 3, 4)


@pytest.mark.parametrize("backend", op_backends("token_scatter"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["replace", "add"])
@pytest.mark.parametrize("n,c,k", [(1, 3, 1), (2, 5, 0), (3, 1, 3), (197, 67, 138), (785, 24, 400), (197, 384, 197)])
def test_scatter_matches_reference(gen, backend, dtype, reduce, n, c, k):
    x = randn(gen, 2, n, c, dtype=dtype)
    y = randn(gen, 2, k, c, dtype=dtype)
    idx = randidx(gen, 2, k, n, unique=True, dtype=torch.int32 if c % 2 else torch.int64)
    with use("token_scatter", backend):
        out = token_scatter(x, y, idx, reduce=reduce)
    expected = ref_scatter(x, y, idx, reduce)
    assert out.dtype == dtype and out.shape == x.shape
    if reduce == "replace":
        assert torch.equal(out, expected.to(dtype))
    else:  # x + y rounded once
        assert torch.equal(out, expected.to(dtype)) or dtype != torch.float32
        torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("backend", op_backends("token_scatter"))
def test_scatter_add_accumulates_repeats(gen, backend):
    x = randn(gen, 3, 9, 7)
    y = randn(gen, 3, 40, 7)
    idx = randidx(gen, 3, 40, 9)  # many repeats
    with use("token_scatter", backend):
        out = token_scatter(x, y, idx, reduce="add")
    torch.testing.assert_close(out.double(), ref_scatter(x, y, idx, "add"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", op_backends("token_scatter"))
def test_scatter_noncontiguous_2d(gen, backend):
    x = noncontiguous(randn(gen, 2, 31))
    y = noncontiguous(randn(gen, 2, 11))
    idx = noncontiguous(randidx(gen, 2, 11, 31, unique=True))
    with use("token_scatter", backend):
        out = token_scatter(x, y, idx)
    assert torch.equal(out, ref_scatter(x, y, idx, "replace").float())


@pytest.mark.parametrize("backend", op_backends("token_gather"))
def test_unvalidated_out_of_range_indices_stay_in_bounds(gen, backend):
    """validate=False: an out-of-range index gathers zeros and scatters nowhere."""
    x = randn(gen, 2, 5, 3)
    idx = torch.tensor([[0, -1, 4, 5], [99, 2, -7, 1]], device=DEVICE)
    with use("token_gather", backend):
        out = token_gather(x, idx, validate=False)
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[0, 2], x[0, 4])
    assert not out[0, 1].any() and not out[0, 3].any() and not out[1, 0].any() and not out[1, 2].any()
    require_backend("token_scatter", backend)
    y = randn(gen, 2, 4, 3)
    with effkern.backend(backend):
        out = token_scatter(x, y, idx, validate=False)
    expected = x.clone()
    expected[0, 0], expected[0, 4], expected[1, 2], expected[1, 1] = y[0, 0], y[0, 2], y[1, 1], y[1, 3]
    assert torch.equal(out, expected)


def test_gather_and_scatter_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([[6, 0, 6, 2], [1, 1, 1, 5]])  # repeats accumulate in the gather's gradient
    uniq = torch.tensor([[6, 0, 3, 2], [1, 4, 0, 5]])
    torch.autograd.gradcheck(lambda x: token_gather(x, idx), (x,))
    torch.autograd.gradcheck(lambda x: token_gather(x[:, :, 0], idx), (x,))
    torch.autograd.gradcheck(lambda x, y: token_scatter(x, y, uniq), (x, y))
    torch.autograd.gradcheck(lambda x, y: token_scatter(x, y, idx, reduce="add"), (x, y))


# --------------------------------------------------------------------------------------------
# topk_tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", op_backends("topk_tokens"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 0), (1, 1), (2, 1), (3, 3), (196, 137), (784, 269), (784, 0)])
@pytest.mark.parametrize("keep_cls", [True, False])
def test_topk_matches_torch_topk_on_tie_free_scores(gen, backend, dtype, m, k, keep_cls):
    perm = torch.stack([torch.randperm(m, generator=gen) for _ in range(3)])
    if dtype == torch.bfloat16:  # consecutive bf16 numbers from 1.0 up (bf16 integers tie past 256)
        scores = (perm + 0x3F80).to(torch.int16).view(torch.bfloat16)
    else:  # integers, exact in fp16 up to 2048
        scores = (perm - m // 2).to(dtype)
    scores = scores.to(DEVICE)
    with use("topk_tokens", backend):
        keep, drop = topk_tokens(scores, k, keep_cls=keep_cls)
    off = int(keep_cls)
    top = torch.topk(scores.float(), k, dim=1, largest=True, sorted=True).indices + off
    expected_keep = torch.cat([torch.zeros(3, 1, dtype=torch.int64, device=DEVICE), top], 1) if keep_cls else top
    mask = torch.ones(3, m, dtype=torch.bool, device=DEVICE)
    mask.scatter_(1, top - off, False)
    expected_drop = torch.stack([mask[b].nonzero()[:, 0] for b in range(3)]) + off
    assert keep.dtype == drop.dtype == torch.int64
    assert torch.equal(keep, expected_keep) and torch.equal(drop, expected_drop)


@pytest.mark.parametrize("backend", op_backends("topk_tokens"))
def test_topk_ties_nan_and_signed_zero(backend):
    nan, inf = math.nan, math.inf
    scores = torch.tensor([[1.0, 3.0, -0.0, 3.0, 0.0, nan, -inf, 1.0]], device=DEVICE)
    with use("topk_tokens", backend):
        keep, drop = topk_tokens(scores, 5, keep_cls=False)
    # NaN first, ties to the lower position, -0.0 == 0.0
    assert keep.tolist() == [[5, 1, 3, 0, 7]] and drop.tolist() == [[2, 4, 6]]
    with effkern.backend(backend):
        keep, drop = topk_tokens(scores, 6)
    assert keep.tolist() == [[0, 6, 2, 4, 1, 8, 3]] and drop.tolist() == [[5, 7]]


# --------------------------------------------------------------------------------------------
# fuse_tokens, cls_attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", op_backends("fuse_tokens"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,j", [(1, 3, 1), (3, 5, 0), (197, 67, 59), (785, 24, 300)])
def test_fuse_tokens_matches_reference(gen, backend, dtype, n, c, j):
    x = randn(gen, 2, n, c, dtype=dtype)
    w = torch.rand(2, n, generator=gen).to(DEVICE)
    idx = randidx(gen, 2, j, n)
    with use("fuse_tokens", backend):
        out = fuse_tokens(x, w, idx)
    assert out.shape == (2, 1, c) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_fuse(x, w, idx), **TOL[dtype])


@pytest.mark.parametrize("backend", op_backends("cls_attention"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,n,d", [(1, 1, 32), (3, 2, 17), (6, 197, 64), (2, 785, 32)])
@pytest.mark.parametrize("softmax", [True, False])
def test_cls_attention_matches_reference(gen, backend, dtype, h, n, d, softmax):
    q, k = randn(gen, 2, h, d, dtype=dtype), randn(gen, 2, h, n, d, dtype=dtype)
    with use("cls_attention", backend):
        out = cls_attention(q, k, softmax=softmax)
    assert out.dtype == torch.float32 and out.shape == (2, n)
    # float32 arithmetic on exactly represented inputs
    torch.testing.assert_close(out.double(), ref_cls_attention(q, k, d**-0.5, softmax), rtol=2e-5, atol=2e-6)


def test_cls_attention_never_builds_the_full_map():
    """Memory: a [B, H, N, N] map at N = 4096 would need 4 GiB; cls_attention works in O(N)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 8, generator=g), torch.randn(1, 1, 4096, 8, generator=g)
    out = cls_attention(q, k, scale=0.5)
    torch.testing.assert_close(out.double(), ref_cls_attention(q, k, 0.5, True))


# --------------------------------------------------------------------------------------------
# masked_softmax
# --------------------------------------------------------------------------------------------


def policies(gen, b, n):
    hard = (torch.rand(b, n, generator=gen) < 0.6).double()
    hard[0, 1:] = 0  # batch 0: every key but the query itself dropped
    return [hard, torch.rand(b, n, generator=gen, dtype=torch.float64)]


@pytest.mark.parametrize("backend", op_backends("masked_softmax"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,n", [(1, 1), (3, 2), (2, 3), (6, 197)])
def test_masked_softmax_matches_dynamicvit(gen, backend, dtype, h, n):
    logits = randn(gen, 2, h, n, n, dtype=dtype) * 3
    for policy in policies(gen, 2, n):
        policy = policy.to(DEVICE)
        with use("masked_softmax", backend):
            out = masked_softmax(logits, policy)
        expected = pub.softmax_with_policy(logits.double(), policy[:, :, None])
        assert out.dtype == dtype and out.shape == logits.shape
        torch.testing.assert_close(out.double(), expected, **TOL[dtype])


def test_masked_softmax_gradients():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    for policy in policies(g, 2, 5):
        policy.requires_grad_(True)
        # a large eps makes the row max's own gradient visible
        for eps in (1e-6, 0.1):
            torch.autograd.gradcheck(lambda a, p: masked_softmax(a, p, eps=eps), (logits, policy))


@pytest.mark.parametrize("backend", op_backends("masked_softmax_backward"))
def test_masked_softmax_backward_matches_autograd_of_dynamicvit(gen, backend):
    logits = randn(gen, 2, 3, 33, 33).requires_grad_(True)
    policy = policies(gen, 2, 33)[1].float().to(DEVICE).requires_grad_(True)
    grad = randn(gen, 2, 3, 33, 33)
    with use("masked_softmax", backend), effkern.backend(backend):
        d_logits, d_policy = torch.autograd.grad(masked_softmax(logits, policy, eps=1e-2), (logits, policy), grad)
    a64, p64 = logits.detach().double().requires_grad_(True), policy.detach().double().requires_grad_(True)
    e_logits, e_policy = torch.autograd.grad(pub.softmax_with_policy(a64, p64[:, :, None], eps=1e-2), (a64, p64), grad.double())
    torch.testing.assert_close(d_logits.double(), e_logits, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d_policy.double(), e_policy, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------


TOME_TIE = 1e-5  # float32 cosine scores this close to each other may rank either way


def plan_is_tomes(plan, merge, n):
    """Whether the plan merges the same tokens into the same rows as ToMe's merge does."""
    one_hot = torch.eye(n, dtype=torch.float64).expand(plan.dest.shape[0], n, n)
    tomes = merge(one_hot, mode="sum").transpose(1, 2)  # [B, n, rows]: token -> its row
    return torch.equal(tomes, torch.nn.functional.one_hot(plan.dest.cpu(), n - plan.num_merged).double())


def assert_tome_plan_up_to_ties(plan, metric, class_token):
    """ToMe's rules with scores allowed to differ by TOME_TIE: each merged a-token goes to a
    b-token of (near-)maximal score; merged a-tokens have the (near-)highest best scores and
    are listed in descending order; unmerged ones follow in index order with a class token,
    else in descending order too."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0] = -math.inf
    node_max = scores.max(-1).values
    unm, src, dst = (i.cpu() for i in (plan.unm_idx, plan.src_idx, plan.dst_idx))
    assert torch.equal(torch.cat([src, unm], 1).sort(1).values, torch.arange(node_max.shape[1]).expand_as(node_max))
    src_scores = scores.gather(1, src[..., None].expand(-1, -1, scores.shape[2]))
    assert bool((src_scores.gather(2, dst[..., None])[..., 0] >= node_max.gather(1, src) - TOME_TIE).all())
    ranked = torch.cat([src, unm], 1) if not class_token else src
    ranked_max = node_max.gather(1, ranked)
    assert bool((ranked_max[:, 1:] <= ranked_max[:, :-1] + TOME_TIE).all())
    if class_token:
        assert bool((node_max.gather(1, unm).amax(1) <= node_max.gather(1, src).amin(1) + TOME_TIE).all())
        assert torch.equal(unm, unm.sort(1).values)


@pytest.mark.parametrize("backend", op_backends("bipartite_matching"))
@pytest.mark.parametrize("n,r", [(1, 1), (2, 1), (3, 1), (9, 2), (9, 100), (197, 16), (785, 128)])
@pytest.mark.parametrize("class_token", [True, False])
def test_tome_merge_matches_tome(gen, backend, n, r, class_token):
    metric = randn(gen, 2, n, 16)
    x = randn(gen, 2, n, 24)
    size = torch.randint(1, 5, (2, n, 1), generator=gen).float().to(DEVICE)
    with use("bipartite_matching", backend), use("merge_tokens", backend):
        plan = bipartite_matching(metric, r, class_token=class_token)
        merged, merged_size = merge_tokens(plan, x, size)
        plain, ones_size = merge_tokens(plan, x)
    merge, _ = pub.bipartite_soft_matching(metric.double(), r, class_token=class_token)
    if not plan_is_tomes(plan, merge, n):
        # float32 scores ranked two near-equal float64 scores the other way: the plan must
        # still be ToMe's up to such near-ties, and the merge is ToMe's for that plan
        assert_tome_plan_up_to_ties(plan, metric.double(), class_token)
        idx = [i[..., None].cpu() for i in (plan.unm_idx, plan.src_idx, plan.dst_idx)]
        merge, _ = pub.merge_functions(*idx, n)
    e_merged, e_size = pub.merge_wavg(merge, x.double(), size.double())
    e_plain, e_ones = pub.merge_wavg(merge, x.double())
    assert merged.shape == e_merged.shape and merged_size.shape == e_size.shape
    torch.testing.assert_close(merged.double(), e_merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_size.double(), e_size)
    torch.testing.assert_close(plain.double(), e_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ones_size.double(), e_ones)
    assert torch.equal(merged_size.sum(1), size.sum(1))


def test_unmerge_inverts_merge_for_tokens_that_were_not_merged(gen):
    metric, x = randn(gen, 3, 197, 8), randn(gen, 3, 197, 12)
    plan = bipartite_matching(metric, 30)
    merged, _ = merge_tokens(plan, x)
    back = unmerge_tokens(plan, merged)
    merge, unmerge = pub.bipartite_soft_matching(metric.double(), 30, class_token=True)
    torch.testing.assert_close(back.double(), unmerge(merged.double()))
    counts = torch.zeros(3, merged.shape[1], dtype=torch.int64).scatter_add_(1, plan.dest.cpu(), torch.ones(3, 197, dtype=torch.int64))
    alone = (counts.gather(1, plan.dest.cpu()) == 1).to(DEVICE)
    assert torch.equal(back[alone], x[alone])


def test_tome_matching_ties_go_to_the_lower_position():
    # four identical a-rows and b-rows: every score ties
    metric = torch.ones(1, 8, 4)
    plan = bipartite_matching(metric, 2, class_token=False)
    assert plan.src_idx.tolist() == [[0, 1]] and plan.dst_idx.tolist() == [[0, 0]]
    assert plan.unm_idx.tolist() == [[2, 3]]


def test_tome_zero_rows_and_r_zero(gen):
    metric = randn(gen, 2, 7, 4)
    metric[:, 3] = 0  # a zero row stays zero instead of becoming NaN
    plan = bipartite_matching(metric, 2)
    assert plan.dest.shape == (2, 7) and plan.num_merged == 2
    x = randn(gen, 2, 7, 5)
    plan0 = bipartite_matching(metric, 0)
    assert plan0.num_merged == 0 and torch.equal(plan0.dest, torch.arange(7, device=DEVICE).expand(2, 7))
    assert torch.equal(merge_tokens(plan0, x)[0], x) and torch.equal(unmerge_tokens(plan0, x), x)


def test_merge_gradients():
    g = torch.Generator().manual_seed(2)
    plan = bipartite_matching(torch.randn(2, 11, 6, generator=g), 4)
    x = torch.randn(2, 11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    size = (torch.rand(2, 11, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    torch.autograd.gradcheck(lambda x, s: merge_tokens(plan, x, s), (x, size))
    torch.autograd.gradcheck(lambda x: merge_tokens(plan, x), (x,))
    torch.autograd.gradcheck(lambda x: unmerge_tokens(plan, x), (x[:, :7],))


# --------------------------------------------------------------------------------------------
# gradients of the rest; the Triton/CUDA backward against the torch backward
# --------------------------------------------------------------------------------------------


def test_fuse_and_cls_attention_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([[1, 8, 1], [0, 2, 3]])
    torch.autograd.gradcheck(lambda x, w: fuse_tokens(x, w, idx), (x, w))
    q = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    for softmax in (True, False):
        torch.autograd.gradcheck(lambda q, k: cls_attention(q, k, scale=0.7, softmax=softmax), (q, k))


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    return torch.autograd.grad(out, inputs, grad_out)


BACKWARD_CASES = {
    "cls_attention_backward": lambda g: (
        lambda q, k: cls_attention(q, k), [randn(g, 2, 3, 32), randn(g, 2, 3, 197, 32)], randn(g, 2, 197)),
    "merge_tokens_backward": lambda g: (
        (lambda plan: lambda x, s: merge_tokens(plan, x, s))(bipartite_matching(randn(g, 2, 197, 8), 40)),
        [randn(g, 2, 197, 24), torch.rand(2, 197, 1, generator=g).to(DEVICE) + 1], randn(g, 2, 157, 24)),
}


@pytest.mark.parametrize("op", list(BACKWARD_CASES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_backends_match_torch(gen, op, backend):
    fn, inputs, grad_out = BACKWARD_CASES[op](gen)
    require_backend(op, backend)
    expected = _grads(fn, inputs, grad_out)
    with effkern.backend(backend, "torch"):
        got = _grads(fn, inputs, grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------
# torch.library contract: opcheck and torch.compile
# --------------------------------------------------------------------------------------------


def _opcheck_cases(g):
    x = torch.randn(2, 9, 5, generator=g)
    idx = torch.tensor([[3, 0, 8], [1, 1, 2]])
    uniq = torch.tensor([[3, 0, 8], [1, 4, 2]])
    y = torch.randn(2, 3, 5, generator=g)
    metric = torch.randn(2, 9, 4, generator=g)
    plan = bipartite_matching(metric, 3)
    return {
        "token_gather": (x.requires_grad_(True), idx, True),
        "token_scatter": (x, y.requires_grad_(True), uniq, "replace", True),
        "topk_tokens": (torch.randn(2, 8, generator=g), 3, True),
        "fuse_tokens": (x, torch.rand(2, 9, generator=g).requires_grad_(True), idx, True),
        "cls_attention": (torch.randn(2, 3, 4, generator=g, requires_grad=True),
                          torch.randn(2, 3, 9, 4, generator=g, requires_grad=True), 0.5, True),
        "masked_softmax": (torch.randn(2, 3, 9, 9, generator=g, requires_grad=True),
                           torch.rand(2, 9, generator=g, requires_grad=True), 1e-6),
        "bipartite_matching": (metric, 3, True),
        "merge_tokens": (x, torch.rand(2, 9, generator=g).requires_grad_(True) + 1, plan.dest, plan.sources, plan.starts),
    }


@pytest.mark.parametrize("op", list(_opcheck_cases(torch.Generator().manual_seed(0))))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(op, backend):
    require_backend(op, backend, "cpu")
    args = _opcheck_cases(torch.Generator().manual_seed(4))[op]
    with effkern.backend(backend, "torch"):
        torch.library.opcheck(getattr(torch.ops.effkern, op), args)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 6, generator=g)
    metric = torch.randn(2, 9, 4, generator=g)
    q, k = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    logits, policy = torch.randn(2, 3, 9, 9, generator=g), torch.rand(2, 9, generator=g)

    def step(x, metric, q, k, logits, policy):
        scores = cls_attention(q, k)[:, 1:]
        keep, drop = topk_tokens(scores, 5)
        kept = token_gather(x, keep, validate=False)
        fused = fuse_tokens(x, torch.nn.functional.pad(scores, (1, 0)), drop, validate=False)
        back = token_scatter(x, kept * 2, keep, validate=False)
        plan = bipartite_matching(metric, 2)
        merged, size = merge_tokens(plan, back)
        return kept, fused, unmerge_tokens(plan, merged), size, masked_softmax(logits, policy)

    args = (x, metric, q, k, logits, policy)
    expected = step(*args)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written out of bounds
# --------------------------------------------------------------------------------------------


def test_index_errors(gen):
    x = randn(gen, 2, 5, 3)
    y = randn(gen, 2, 2, 3)
    with pytest.raises(IndexError, match=r"idx must lie in \[0, 5\).*\[0, 5\]"):
        token_gather(x, torch.tensor([[0, 5], [1, 2]], device=DEVICE), validate=True)
    with pytest.raises(IndexError, match=r"idx must lie in \[0, 5\).*\[-1, 3\]"):
        token_scatter(x, y, torch.tensor([[0, 3], [-1, 2]], device=DEVICE), validate=True)
    with pytest.raises(IndexError, match="fuse_tokens"):
        fuse_tokens(x, torch.rand(2, 5, device=DEVICE), torch.tensor([[7], [0]], device=DEVICE), validate=True)
    with pytest.raises(ValueError, match="repeats a token"):
        token_scatter(x, y, torch.tensor([[1, 1], [0, 2]], device=DEVICE), validate=True)
    token_scatter(x, y, torch.tensor([[1, 1], [0, 2]], device=DEVICE), reduce="add")  # fine
    with pytest.raises(TypeError, match="idx must have dtype int64 or int32, got float32"):
        token_gather(x, torch.zeros(2, 2, device=DEVICE))
    with pytest.raises(TypeError, match="int64 or int32, got int16"):
        token_gather(x, torch.zeros(2, 2, dtype=torch.int16, device=DEVICE))
    with pytest.raises(ValueError, match="idx has batch size 3 but x has 2"):
        token_gather(x, torch.zeros(3, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="y must have shape"):
        token_scatter(x, randn(gen, 2, 3, 3), torch.zeros(2, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="y must have dtype float32"):
        token_scatter(x, y.double(), torch.zeros(2, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="reduce must be"):
        token_scatter(x, y, torch.zeros(2, 2, dtype=torch.int64, device=DEVICE), reduce="max")
    with pytest.raises(ValueError, match="idx must be 2-D"):
        token_gather(x, torch.zeros(4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="x must have dtype"):
        token_gather(x.to(torch.int32), torch.zeros(2, 2, dtype=torch.int64, device=DEVICE))


def test_other_argument_errors(gen):
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 4\]"):
        topk_tokens(randn(gen, 2, 4), 5)
    with pytest.raises(ValueError, match="k must be"):
        topk_tokens(randn(gen, 2, 4), -1)
    with pytest.raises(ValueError, match=r"k \[B, H, N, d\]"):
        cls_attention(randn(gen, 2, 3, 4), randn(gen, 2, 3, 9, 5))
    with pytest.raises(ValueError, match=r"N >= 1"):
        cls_attention(randn(gen, 2, 3, 4), randn(gen, 2, 3, 0, 4))
    with pytest.raises(ValueError, match="scale must be finite"):
        cls_attention(randn(gen, 2, 3, 4), randn(gen, 2, 3, 9, 4), scale=math.inf)
    with pytest.raises(ValueError, match=r"policy must be \[B, N\]"):
        masked_softmax(randn(gen, 2, 3, 9, 9), randn(gen, 2, 8))
    with pytest.raises(ValueError, match=r"\[B, H, N, N\]"):
        masked_softmax(randn(gen, 2, 3, 9, 8), randn(gen, 2, 9))
    with pytest.raises(ValueError, match="r must be an integer >= 0"):
        bipartite_matching(randn(gen, 2, 9, 4), -1)
    plan = bipartite_matching(randn(gen, 2, 9, 4), 2)
    with pytest.raises(ValueError, match="plan was made for"):
        merge_tokens(plan, randn(gen, 2, 11, 4))
    with pytest.raises(ValueError, match="size must be"):
        merge_tokens(plan, randn(gen, 2, 9, 4), torch.ones(2, 8, 1, device=DEVICE))
    with pytest.raises(ValueError, match="x_merged must be"):
        unmerge_tokens(plan, randn(gen, 2, 9, 4))
    with pytest.raises(ValueError, match="weights must be"):
        fuse_tokens(randn(gen, 2, 9, 4), torch.rand(2, 8, device=DEVICE), torch.zeros(2, 1, dtype=torch.int64, device=DEVICE))


# --------------------------------------------------------------------------------------------
# defects found by fuzzing (issue 8): each test failed before its fix
# --------------------------------------------------------------------------------------------


def _storages(tensors) -> list[int]:
    return [t.untyped_storage().data_ptr() for t in tensors if t.numel()]


@pytest.mark.parametrize("backend", op_backends("bipartite_matching"))
@pytest.mark.parametrize("n,r", [(9, 0), (2, 3), (1, 1), (9, 2)])
def test_bipartite_matching_outputs_never_alias(gen, backend, n, r):
    """r = 0 or N too small at batch size 1 used to return views of one arange (torch.library's
    output-aliasing error); every plan tensor is now fresh."""
    metric = randn(gen, 1, n, 4)
    with use("bipartite_matching", backend):
        plan = bipartite_matching(metric, r)
    ptrs = _storages(plan)
    assert len(set(ptrs)) == len(ptrs) and metric.untyped_storage().data_ptr() not in ptrs
    assert all(t.is_contiguous() for t in plan)
    if r == 0:
        assert torch.equal(plan.dest, torch.arange(n, device=DEVICE)[None]) and plan.num_merged == 0


@pytest.mark.parametrize("backend", op_backends("bipartite_matching"))
def test_bipartite_matching_huge_and_non_finite_metrics(gen, backend):
    """Huge finite metric values are normalised without overflow (the plan of 1e20 * m is the
    plan of m on every backend); non-finite values raise ValueError (validate=True), and with
    validate=False the class token is still never merged."""
    metric = randn(gen, 2, 17, 8)
    with use("bipartite_matching", backend):
        plain = bipartite_matching(metric, 6)
        huge = bipartite_matching(metric * 1e20, 6)
        huger = bipartite_matching(metric * 3e37, 6)
    for a, b, c in zip(plain, huge, huger):
        assert torch.equal(a, b) and torch.equal(a, c)
    bad = metric.clone()
    bad[0, 3, 1] = math.nan
    bad[1, 5, 0] = math.inf
    with effkern.backend(backend):
        with pytest.raises(ValueError, match="bipartite_matching: metric must be finite"):
            bipartite_matching(bad, 6, validate=True)
        for values in (bad, torch.full_like(metric, math.nan), torch.full_like(metric, math.inf)):
            plan = bipartite_matching(values, 8, validate=False)  # r capped at 8 of 17
            assert plan.num_merged == 8
            assert bool((plan.unm_idx[:, 0] == 0).all()) and bool((plan.dest[:, 0] == 0).all())
            assert not bool((plan.src_idx == 0).any())


@pytest.mark.parametrize("backend", op_backends("masked_softmax"))
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_masked_softmax_rows_without_weight_are_uniform(gen, backend, eps):
    """A fully masked (-inf) row, or (eps = 0) a row whose kept keys are all -inf, used to give
    NaN on the torch backend and 1/N (or NaN) on Triton; it is the uniform 1/N on every backend,
    with zero logit gradients and finite policy gradients."""
    n = 7
    logits = randn(gen, 2, 3, n, n) * 3
    logits[0, 1, 2] = -math.inf  # fully masked row
    logits[1, 0, 4, 4:] = -math.inf  # the query itself and the keys after it
    policy = torch.rand(2, n, generator=gen).to(DEVICE)
    policy[1, :4] = 0  # batch 1: only keys 4.. kept, all -inf in row (0, 4)
    logits = logits.requires_grad_(True)
    policy = policy.requires_grad_(True)
    grad = randn(gen, 2, 3, n, n)
    with use("masked_softmax", backend), effkern.backend(backend):
        out = masked_softmax(logits, policy, eps=eps)
        d_logits, d_policy = torch.autograd.grad(out, (logits, policy), grad)
    uniform = torch.full((n,), 1 / n, device=DEVICE)
    assert torch.equal(out[0, 1, 2], uniform) and torch.equal(out[1, 0, 4], uniform)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(d_logits).all()) and bool(torch.isfinite(d_policy).all())
    assert not d_logits[0, 1, 2].any() and not d_logits[1, 0, 4].any()
    with effkern.backend("torch"):
        e_out = masked_softmax(logits, policy, eps=eps)
        e_logits, e_policy = torch.autograd.grad(e_out, (logits, policy), grad)
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(d_logits, e_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_policy, e_policy, rtol=1e-4, atol=1e-5)
    # elsewhere: DynamicViT's formula
    keep = torch.ones(2, 3, n, dtype=torch.bool, device=DEVICE)
    keep[0, 1, 2] = keep[1, 0, 4] = False
    expected = pub.softmax_with_policy(logits.detach().double(), policy.detach().double()[:, :, None], eps=eps)
    torch.testing.assert_close(out.detach().double()[keep], expected[keep], rtol=1e-5, atol=1e-6)


def test_cls_attention_head_dim_zero_raises_value_error(gen):
    with pytest.raises(ValueError, match="cls_attention: the head dim d must be >= 1"):
        cls_attention(randn(gen, 2, 3, 0), randn(gen, 2, 3, 9, 0))
    with pytest.raises(ValueError, match="head dim"):
        cls_attention(randn(gen, 2, 3, 0), randn(gen, 2, 3, 9, 0), scale=1.0)


def test_integer_arguments_refuse_bools(gen):
    with pytest.raises(ValueError, match="topk_tokens: k must be an integer, got True"):
        topk_tokens(randn(gen, 2, 5), True)
    with pytest.raises(ValueError, match="k must be an integer"):
        topk_tokens(randn(gen, 2, 5), False)
    with pytest.raises(ValueError, match="bipartite_matching: r must be an integer, got True"):
        bipartite_matching(randn(gen, 2, 9, 4), True)


@pytest.mark.parametrize("backend", op_backends("merge_tokens"))
def test_merge_tokens_refuses_hand_edited_plans(gen, backend):
    """A hand-edited plan used to make the Triton merge loop for minutes (starts = 2^40); plans
    are validated (ValueError naming the tensor), and with validate=False every backend stays in
    bounds and loops at most N steps."""
    require_backend("merge_tokens", backend)
    plan = bipartite_matching(randn(gen, 2, 9, 4), 3)
    x = randn(gen, 2, 9, 5)

    def edited(field, fn):
        t = getattr(plan, field).clone()
        fn(t)
        return plan._replace(**{field: t})

    def set_(b, i, v):
        def fn(t):
            t[b, i] = v
        return fn

    bad = {
        "plan.starts must rise strictly": [edited("starts", set_(0, 1, 2**40)), edited("starts", set_(1, 2, -5)),
                                           edited("starts", set_(0, 0, 1))],
        "plan.sources must list every token": [edited("sources", set_(0, 0, 9)), edited("sources", set_(1, 1, 0))],
        r"plan.dest must lie in \[0, 6\)": [edited("dest", set_(1, 4, 6))],
        "plan.dest disagrees": [edited("dest", lambda t: t[0].copy_(t[0].flip(0)))],
    }
    for match, plans in bad.items():
        for p in plans:
            with effkern.backend("torch"), pytest.raises(ValueError, match=match):
                merge_tokens(p, x, validate=True)
            with effkern.backend(backend), pytest.raises(ValueError, match=match):
                merge_tokens(p, x, validate=True)
            with effkern.backend(backend):
                merge_tokens(p, x, validate=False)  # returns: no hang, no out-of-bounds access
    with effkern.backend(backend), pytest.raises(ValueError, match="size must be finite and > 0"):
        merge_tokens(plan, x, torch.zeros(2, 9, 1, device=DEVICE), validate=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fake_strides_equal_real_strides(gen, backend):
    """token_scatter(reduce="add") used to return a strided view of its scratch buffer on the
    torch backend while the fake promised a contiguous tensor; every output now has exactly
    the fake's strides (batch size 1 included, where a size-1 dim hides odd strides)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_backend("token_scatter", backend, "cpu")
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(1, 9, 5, generator=g).transpose(1, 2).transpose(1, 2)
    plan = bipartite_matching(torch.randn(1, 9, 4, generator=g), 0)
    calls = [
        ("token_scatter", (x1, torch.randn(1, 3, 5, generator=g), torch.tensor([[1, 1, 4]]), "add", True)),
        ("token_scatter", (torch.randn(2, 9, 5, generator=g), torch.randn(2, 3, 5, generator=g),
                           torch.tensor([[1, 1, 4], [0, 2, 2]]), "add", True)),
        ("token_gather", (torch.randn(1, 9, generator=g), torch.tensor([[1, 1, 4]]), True)),
        ("merge_tokens", (torch.randn(1, 9, 3, generator=g), None, plan.dest, plan.sources, plan.starts, True)),
        ("bipartite_matching", (torch.randn(1, 9, 4, generator=g), 0, True, True)),
        ("cls_attention_backward", (torch.randn(1, 9, generator=g), torch.randn(1, 2, 3, generator=g),
                                    torch.randn(1, 2, 9, 3, generator=g), 0.5, True)),
    ]
    for name, args in calls:
        op = getattr(torch.ops.effkern, name)
        mode = FakeTensorMode()
        with mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        with effkern.backend(backend, "torch"):
            real = op(*args)
        for f, r in zip(fake if isinstance(fake, tuple) else (fake,), real if isinstance(real, tuple) else (real,)):
            assert f.shape == r.shape and f.stride() == r.stride(), (name, f.shape, f.stride(), r.stride())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inductor_trains_through_token_gather_and_scatter(backend):
    """EViT / IdleViT steps compiled by inductor, forward and backward, on timm's permuted
    (non-contiguous) activations: used to crash on token_scatter(reduce="add")'s strides."""
    require_backend("token_gather", backend, "cpu")
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 9, 3, 6, generator=g).permute(2, 0, 1, 3)  # [3, B, N, C] views
    x, w = qkv[0].clone().requires_grad_(True), torch.rand(2, 9, generator=g).requires_grad_(True)
    keep = torch.tensor([[0, 3, 5, 8], [0, 1, 2, 7]])
    drop = torch.tensor([[1, 2, 4, 6, 7], [3, 4, 5, 6, 8]])

    def step(x, w):
        v = x.transpose(1, 2).transpose(1, 2) * 2  # a strided activation
        kept = token_gather(v, keep, validate=False)
        fused = fuse_tokens(v, w, drop, validate=False)
        idle = token_scatter(v, kept * 3, keep, validate=False)  # IdleViT: kept rows updated
        added = token_scatter(v, kept, keep, reduce="add", validate=False)
        return (kept.square().sum() + fused.sum() + (idle * idle.detach()).sum() + added.sum()), kept

    with effkern.backend(backend, "torch"):
        (loss, kept) = step(x, w)
        expected = torch.autograd.grad(loss, (x, w))
        compiled = torch.compile(step, backend="inductor", fullgraph=True)
        (c_loss, c_kept) = compiled(x, w)
        got = torch.autograd.grad(c_loss, (x, w))
    torch.testing.assert_close(c_loss, loss)
    torch.testing.assert_close(c_kept, kept)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduce", ["replace", "add"])
def test_token_scatter_into_no_tokens_is_an_index_error(reduce):
    # Found by the registry's corrupted-call property test: with N = 0 the repeat check had
    # no hit counts to reduce and raised torch's own RuntimeError.
    x = torch.zeros(2, 0, 3)
    y = torch.ones(2, 2, 3)
    idx = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(IndexError, match=r"token_scatter: idx must lie in \[0, 0\)"):
        token_scatter(x, y, idx, reduce=reduce)
