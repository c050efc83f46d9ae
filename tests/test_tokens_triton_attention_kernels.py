"""The Triton backend of the attention-like token primitives (effkern.triton.tokens_attention)
against the torch primitives of effkern.ops.tokens.

Runs on CUDA when available, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py before triton is imported); skipped otherwise. Every Triton result is compared
with the torch primitive run in float64 on the same values. The tolerance comes from the dtype,
as in flash-attention's tests: the Triton error may be at most twice the error of the torch
primitive run on the test dtype (which computes in float32 and rounds to the output dtype), plus
1e-5 of the result's scale (and, under the interpreter, which truncates float32 to bfloat16, one
bfloat16 ulp). While a wrapper runs, ``torch.empty`` returns NaN-filled (float) or
garbage-filled (integer) tensors, so an output or scratch element that a kernel fails to write
shows up as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import DEVICE
from tests.triton_helpers import INTERPRET, check, f64, randn, run, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

from effkern.ops import tokens as ref  # noqa: E402  (after the skip)
from effkern.triton import tokens_attention as tri  # noqa: E402

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# cls_attention
# --------------------------------------------------------------------------------------------

# (B, H, N, d): one key; tiny N; d off the power-of-two grid (masked lanes); one / several key
# chunks per head (BLOCK_N = 4096 / BLOCK_D: 64 at d = 64, 128 at d = 17 or 32); N = 785 at
# d = 128 gives 25 chunks, more than one STAT_BLOCK of chunk statistics to merge.
CLS_SHAPES = [(1, 1, 1, 32), (2, 3, 2, 17), (1, 3, 3, 64), (2, 3, 197, 64), (2, 1, 197, 17),
              (1, 3, 197, 32), (1, 2, 785, 128)]


def _cls_inputs(shape, dtype, gen):
    b, h, n, d = shape
    # Logits of std ~3: peaked softmaxes, far from uniform.
    return randn((b, h, d), gen, dtype), randn((b, h, n, d), gen, dtype), 3.0 / math.sqrt(max(d, 1))


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_cls_attention_fwd(dtype, shape, softmax, gen):
    q, k, scale = _cls_inputs(shape, dtype, gen)
    out = run(tri.cls_attention_fwd, q, k, scale, softmax)
    check(out, ref.cls_attention_fwd(*f64(q, k), scale, softmax), ref.cls_attention_fwd(q, k, scale, softmax),
          "cls_attention_fwd")


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_cls_attention_bwd(dtype, shape, softmax, gen):
    q, k, scale = _cls_inputs(shape, dtype, gen)
    grad = randn((shape[0], shape[2]), gen)
    dq, dk = run(tri.cls_attention_bwd, grad, q, k, scale, softmax)
    eq, ek = ref.cls_attention_bwd(*f64(grad, q, k), scale, softmax)
    lq, lk = ref.cls_attention_bwd(grad, q, k, scale, softmax)
    check(dq, eq, lq, "dq")
    check(dk, ek, lk, "dk")


@pytest.mark.parametrize("shape", [(0, 3, 5, 8), (2, 0, 5, 8), (2, 3, 5, 0), (2, 3, 0, 8)])
def test_cls_attention_degenerate_sizes(shape, gen):
    """Empty batch / heads / keys and d = 0: the torch primitive's shapes and values (NaN for
    the mean over no heads, a uniform softmax for d = 0, dq = 0 for no keys)."""
    b, h, n, d = shape
    q, k = randn((b, h, d), gen), randn((b, h, n, d), gen)
    grad = randn((b, n), gen)
    for softmax in (True, False):
        out = run(tri.cls_attention_fwd, q, k, 0.5, softmax)
        expected = ref.cls_attention_fwd(q, k, 0.5, softmax)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, equal_nan=True)
        for got, want in zip(run(tri.cls_attention_bwd, grad, q, k, 0.5, softmax),
                             ref.cls_attention_bwd(grad, q, k, 0.5, softmax)):
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# masked_softmax
# --------------------------------------------------------------------------------------------

# (B, H, N): single key; tiny rows packed several per program (the backward's row blocks of
# one (b, h) then have padding rows); a row of 197 (BLOCK 256, row blocks of 16).
MS_SHAPES = [(1, 1, 1), (2, 3, 2), (1, 3, 3), (2, 1, 17), (1, 1, 197)]
# eps = 0 is allowed (z = sum A >= the diagonal's exp), 1e-6 is DynamicViT's, 0.5 makes the
# row max's own gradient large.
EPS = [0.0, 1e-6, 0.5]


def _policy(kind: str, b: int, n: int, gen, dtype=torch.float32) -> torch.Tensor:
    if kind == "binary":
        p = (torch.rand((b, n), generator=gen) < 0.5).float()
        p[0] = 0  # batch 0: every off-diagonal key dropped, in every row
    else:
        p = torch.rand((b, n), generator=gen)
    return p.to(dtype).to(DEVICE)


def _check_masked_softmax(logits, policy, eps, gen, **kw):
    out = run(tri.masked_softmax_fwd, logits, policy, eps, **kw)
    check(out, ref.masked_softmax_fwd(*f64(logits, policy), eps), ref.masked_softmax_fwd(logits, policy, eps),
          "masked_softmax_fwd")
    grad = randn(logits.shape, gen, logits.dtype)
    d_logits, d_policy = run(tri.masked_softmax_bwd, grad, logits, policy, eps, **kw)
    e_logits, e_policy = ref.masked_softmax_bwd(*f64(grad, logits, policy), eps)
    l_logits, l_policy = ref.masked_softmax_bwd(grad, logits, policy, eps)
    # Rounding noise scales with the incoming gradient (a one-key row's exact gradient is 0).
    g_scale = grad.abs().max().item()
    check(d_logits, e_logits, l_logits, "d_logits", g_scale)
    check(d_policy, e_policy, l_policy, "d_policy", g_scale)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("policy", ["binary", "fractional"])
@pytest.mark.parametrize("shape", MS_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_softmax(dtype, shape, policy, eps, gen):
    b, h, n = shape
    _check_masked_softmax(randn((b, h, n, n), gen, dtype, std=3.0), _policy(policy, b, n, gen), eps, gen)


# (B, H, N, block): rows longer than the forced chunk: a partial last chunk (37 = 2 * 16 + 5),
# one key in the second chunk (17), and a row of exactly one chunk (16, the one-pass path).
MS_CHUNKED = [(2, 1, 37, 16), (1, 2, 17, 16), (1, 2, 16, 16)]


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("case", MS_CHUNKED)
@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_softmax_chunked_rows(dtype, case, eps, gen):
    b, h, n, block = case
    _check_masked_softmax(randn((b, h, n, n), gen, dtype, std=3.0), _policy("fractional", b, n, gen), eps, gen,
                          block=block)


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_softmax_repeated_maxima(dtype, block, gen):
    """Integer logits in [-2, 2]: most rows have several maximal keys, in different chunks when
    block = 16. With eps = 0.5 the row max's gradient (to the first maximal key) is large, so a
    misplaced term fails the comparison."""
    b, h, n = 2, 2, 37
    logits = torch.randint(-2, 3, (b, h, n, n), generator=gen).to(dtype).to(DEVICE)
    logits[0, 0, 5] = 2  # a row that is all maxima
    _check_masked_softmax(logits, _policy("binary", b, n, gen), 0.5, gen, block=block)


@pytest.mark.parametrize("pdtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masked_softmax_policy_dtypes(pdtype, gen):
    """A policy in another float dtype is read as is (float64: converted on the host); d_policy
    comes back in the policy's dtype."""
    logits = randn((2, 2, 9, 9), gen, std=3.0)
    _check_masked_softmax(logits, _policy("fractional", 2, 9, gen, pdtype), 0.5, gen)


@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 0, 3)])
def test_masked_softmax_empty(shape, gen):
    b, h, n = shape
    logits, policy = randn((b, h, n, n), gen), _policy("fractional", b, n, gen)
    out = run(tri.masked_softmax_fwd, logits, policy, 1e-6)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    grad = randn((b, h, n, n), gen)
    for got, want in zip(run(tri.masked_softmax_bwd, grad, logits, policy, 1e-6),
                         ref.masked_softmax_bwd(grad, logits, policy, 1e-6)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("eps", EPS)
def test_masked_softmax_rows_without_weight(block, eps, gen):
    """Rows whose A sums to 0 (all logits -inf; or, with a dropped-key policy, every kept key
    -inf) are the uniform 1/N with zero logit gradients, in one pass and in chunks (block = 16,
    N = 37: three chunks), as the torch primitive (it used to give NaN there)."""
    b, h, n = 2, 2, 37
    logits = randn((b, h, n, n), gen, std=3.0)
    logits[0, 1, 5] = -math.inf
    logits[1, 0, 30] = -math.inf
    logits[1, 1, 7, 7:] = -math.inf  # the query and every key after it
    policy = _policy("fractional", b, n, gen)
    policy[1, :7] = 0
    _check_masked_softmax(logits, policy, eps, gen, block=block)
    out = run(tri.masked_softmax_fwd, logits, policy, eps, block=block)
    uniform = torch.full((n,), 1 / n, device=DEVICE)
    for row in ((0, 1, 5), (1, 0, 30), (1, 1, 7)):
        assert torch.equal(out[row], uniform), row
    d_logits, d_policy = run(tri.masked_softmax_bwd, randn(logits.shape, gen), logits, policy, eps, block=block)
    assert bool(torch.isfinite(d_logits).all()) and bool(torch.isfinite(d_policy).all())
    for row in ((0, 1, 5), (1, 0, 30), (1, 1, 7)):
        assert not d_logits[row].any(), row


# --------------------------------------------------------------------------------------------
# tome_match
# --------------------------------------------------------------------------------------------

# (B, N, C): N even / odd; C of one chunk (16, 17) or several (64, 300); b-rows in one block or
# two (N = 197: 98 b-rows, BLOCK_B = 64); several a-row blocks (N = 197: 99 a-rows, BLOCK_A = 32).
TOME_SHAPES = [(1, 2, 16), (2, 3, 17), (2, 8, 64), (1, 197, 64), (2, 33, 300)]


def _check_tome(metric, class_token, min_clear: float = 0.0):
    node_max, node_idx = run(tri.tome_match, metric, class_token)
    e_max, e_idx = ref.tome_match(metric.double(), class_token)
    l_max, _ = ref.tome_match(metric, class_token)
    assert node_idx.dtype == torch.int64 and node_idx.shape == e_idx.shape
    inf = torch.isinf(e_max)
    assert torch.equal(torch.isinf(node_max), inf), "-inf rows differ"
    assert bool((node_max[inf] == e_max[inf].float()).all())
    check(node_max[~inf], e_max[~inf], l_max[~inf], "node_max")
    # Scores in float64: node_idx must be torch's where the best score leads the next by more
    # than float32 rounding, and a near-maximal one elsewhere.
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    top = scores.topk(min(2, scores.shape[-1]), dim=-1).values
    gap = top[..., 0] - top[..., -1] if scores.shape[-1] > 1 else torch.full_like(top[..., 0], math.inf)
    clear = (gap > 1e-5) | inf
    assert torch.equal(node_idx[clear], e_idx[clear]), "node_idx differs from torch's"
    chosen = scores.gather(-1, node_idx.clamp(0, scores.shape[-1] - 1)[..., None])[..., 0]
    assert bool(((top[..., 0] - chosen)[~clear] <= 1e-5).all())
    assert clear.float().mean().item() >= min_clear, "too few rows without near-ties to check node_idx"


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("shape", TOME_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_tome_match(dtype, shape, class_token, gen):
    _check_tome(randn(shape, gen, dtype), class_token, min_clear=0.9)


@pytest.mark.parametrize("values", [
    "integer",
    pytest.param("real", marks=pytest.mark.skipif(
        INTERPRET, reason="the interpreter's tl.dot is numpy's matmul, which may round equal columns differently")),
])
@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_tome_match_ties_first_index(dtype, class_token, values, gen):
    """Duplicate b-rows give equal scores: the first index wins, within one b-row block and
    across blocks (BLOCK_B = 64). A zero a-row scores 0 against everything: index 0. Integer
    metrics make every dot exact, so equal scores stay equal under any summation order."""
    b, n, c = 2, 197, 64
    if values == "integer":
        metric = torch.randint(-3, 4, (b, n, c), generator=gen).to(dtype).to(DEVICE)
    else:
        metric = randn((b, n, c), gen, dtype)
    for a_row, b_row, dup in ((1, 3, 40), (2, 70, 75), (3, 5, 90), (4, 66, 12)):
        metric[:, 2 * dup + 1] = metric[:, 2 * b_row + 1]  # b-row dup duplicates b-row b_row
        metric[:, 2 * a_row] = metric[:, 2 * b_row + 1]  # a-row a_row matches both exactly
    metric[:, 2 * 5] = 0
    node_max, node_idx = run(tri.tome_match, metric, class_token)
    assert node_idx[:, 1].tolist() == [3] * b and node_idx[:, 2].tolist() == [70] * b
    assert node_idx[:, 3].tolist() == [5] * b and node_idx[:, 4].tolist() == [12] * b
    assert node_idx[:, 5].tolist() == [0] * b and node_max[:, 5].tolist() == [0.0] * b
    _check_tome(metric, class_token)


def test_tome_match_empty_batch():
    node_max, node_idx = run(tri.tome_match, torch.zeros((0, 7, 16), device=DEVICE), True)
    assert node_max.shape == (0, 4) and node_max.dtype == torch.float32
    assert node_idx.shape == (0, 4) and node_idx.dtype == torch.int64


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tome_match_huge_and_tiny_rows(dtype, class_token, gen):
    """Rows scaled by 2^-10 .. 2^124 (squares far beyond float32) score as the unscaled rows do:
    each row is scaled by a power of two before its norm is taken (the squares of |x| ~ 1e20
    used to overflow to inf, and inf * 0 to NaN scores). Rows below the 1e-12 norm clamp are
    not unit rows (F.normalize's semantics); none is drawn here."""
    b, n, c = 2, 37, 40  # C = 40: two metric chunks
    base = randn((b, n, c), gen, dtype)
    exps = torch.randint(-10, 125, (b, n, 1), generator=gen).double().to(DEVICE)
    metric = (base.double() * 2.0**exps).to(dtype)  # exact: powers of two
    _check_tome(metric, class_token)
    node_max, node_idx = run(tri.tome_match, metric, class_token)
    b_max, b_idx = run(tri.tome_match, base, class_token)
    torch.testing.assert_close(node_max, b_max, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(node_max[:, int(class_token):]).all())
