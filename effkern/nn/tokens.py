"""The per-method token steps of DynamicViT, EViT, IdleViT and ToMe as thin modules over
:mod:`effkern.ops.tokens`.

Each step is the published one (the original repositories' code, transcribed in
``tests/tokens_transcriptions.py`` and tested against it), with the token bookkeeping done by
effkern's ops instead of torch indexing: ``topk_tokens`` ranks, ``token_gather`` /
``token_scatter`` move rows, ``fuse_tokens`` builds EViT's fused token, ``cls_attention`` scores
tokens without an N x N map, ``masked_softmax`` is DynamicViT's policy softmax and
``bipartite_matching`` / ``merge_tokens`` are ToMe's matching and size-weighted merge.

The attentions and blocks subclass timm's ``Attention`` and ``Block`` from
:mod:`effkern.nn.layers` and keep their module and parameter names (``Attention``: qkv, q_norm,
k_norm, attn_drop, proj, proj_drop; ``Block``: norm1, attn, ls1, drop_path1, norm2, mlp, ls2,
drop_path2; ``Mlp``: fc1, act, drop1, norm, fc2, drop2), so timm / DeiT / DynamicViT / EViT /
IdleViT / ToMe checkpoints load into them with ``load_state_dict``.

One deliberate difference from every original: ties are deterministic. effkern ranks with
stable sorts (equal scores: the lower token position first), where the originals call
``torch.argsort`` / ``torch.topk``, which do not promise an order for ties. On tie-free scores
the selections are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effkern.nn.layers import Attention, Block
from effkern.ops import (
    bipartite_matching,
    cls_attention,
    fuse_tokens,
    masked_softmax,
    merge_tokens,
    token_gather,
    token_scatter,
    topk_tokens,
)

__all__ = [
    "DynamicViTAttention",
    "DynamicViTBlock",
    "DynamicViTPredictor",
    "EViTAttention",
    "EViTBlock",
    "IdleViTBlock",
    "ToMeAttention",
    "ToMeBlock",
    "dynamicvit_attention",
    "dynamicvit_keep",
    "dynamicvit_keep_decisions",
    "evit_left_tokens",
    "evit_reorganize",
    "evit_scores",
    "idle_select_compute_scatter",
    "idlevit_keep_mask",
    "idlevit_scores",
    "tome_merge",
]


# ============================================================================================
# DynamicViT (raoyongming/DynamicViT, vit.py)
# ============================================================================================


class DynamicViTPredictor(nn.Module):
    """DynamicViT's token keep predictor, ``PredictorLG``, with its submodule names.

    ``forward(x, policy)``: x ``[B, M, C]`` the patch tokens (CLS excluded), policy ``[B, M, 1]``
    (or ``[B, M]``) the previous keep decisions. As PredictorLG: ``h = in_conv(x)``; the local
    half ``h[..., :C/2]`` of each token is concatenated with the policy-weighted mean of the
    global half ``h[..., C/2:]`` over kept tokens; ``out_conv`` maps that to log-probabilities
    ``[B, M, 2]``, channel 0 = keep. C must be even (as in PredictorLG). Pure torch: there is no
    token movement here to hand to an op.
    """

    def __init__(self, embed_dim: int = 384):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"DynamicViTPredictor: embed_dim must be even, got {embed_dim}")
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        if policy.dim() == 2:
            policy = policy[:, :, None]
        h = self.in_conv(x)
        b, m, c = h.shape
        local_h, global_h = h[:, :, : c // 2], h[:, :, c // 2:]
        global_h = (global_h * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
        return self.out_conv(torch.cat([local_h, global_h.expand(b, m, c // 2)], dim=-1))


class DynamicViTAttention(Attention):
    """DynamicViT's attention (``Attention.forward(x, policy)`` with ``softmax_with_policy``) as
    a timm Attention drop-in.

    ``forward(x, policy=None)``: without a policy, timm's fused attention. With a keep policy
    ``[B, N, 1]`` or ``[B, N]`` (CLS included, 1 = kept), the logits ``(q k^T) * scale`` go
    through :func:`effkern.ops.masked_softmax` (each query attends to the kept keys and itself;
    DynamicViT's eps = 1e-6 stabiliser, computed in float32), then ``attn_drop``, then ``@ v``.
    Differs from DynamicViT only in applying ``attn_drop`` (DynamicViT's attention never does;
    identical at attn_drop = 0, DynamicViT's setting).
    """

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        if policy is None:
            return super().forward(x)
        q, k, v = self.qkv_heads(x)
        return self.project(dynamicvit_attention(q, k, v, policy, self.scale, self.attn_drop))


def dynamicvit_attention(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float,
                         attn_drop: nn.Module) -> Tensor:
    """DynamicViT's training attention of heads q, k, v ``[B, H, N, d]`` under a keep policy
    ``[B, N, 1]``: ``attn_drop(masked_softmax(q k^T * scale, policy)) @ v`` (``[B, H, N, d]``)."""
    return attn_drop(masked_softmax((q @ k.transpose(-2, -1)) * scale, policy)) @ v


class DynamicViTBlock(Block):
    """DynamicViT's ``Block.forward(x, policy=None)``: timm's Block with the policy passed to
    :class:`DynamicViTAttention` (training-time masking; at inference the pruned tokens are
    gone, see :func:`dynamicvit_keep`, and the policy is None). Applies ls1 / ls2 where timm's
    Block has them (Identity unless ``init_values``; DynamicViT's Block has none)."""

    attn_layer = DynamicViTAttention

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), policy)))
        return self.mlp_residual(x)


def dynamicvit_keep_decisions(decision: Tensor, keep_idx: Tensor) -> Tensor:
    """The previous keep decisions ``[B, M, 1]`` of the kept patch tokens (DynamicViT's
    ``prev_decision = batch_index_select(prev_decision, keep_policy)``), ``keep_idx`` from
    :func:`dynamicvit_keep`."""
    return token_gather(decision, keep_idx, validate=False)


def dynamicvit_keep(x: Tensor, keep_scores: Tensor, num_keep: int) -> tuple[Tensor, Tensor]:
    """DynamicViT's inference-time pruning step (``VisionTransformerDiffPruning.forward``, eval).

    Args:
        x: ``[B, 1 + M, C]`` tokens, CLS first.
        keep_scores: ``[B, M]`` the predictor's keep score of each patch token
            (``pred_score[..., 0]``).
        num_keep: patch tokens to keep, in [0, M]; DynamicViT uses ``int(M0 * token_ratio)`` of
            the initial patch count M0, computed by the caller.

    Returns ``(x_kept [B, 1 + num_keep, C], keep_idx [B, num_keep])``: CLS then the num_keep
    best patch tokens in descending score order (DynamicViT's ``now_policy`` order), via
    :func:`~effkern.ops.topk_tokens` + :func:`~effkern.ops.token_gather`; ``keep_idx`` are the
    kept patch positions, 0-based (DynamicViT's ``keep_policy``), for the caller's
    ``prev_decision = token_gather(prev_decision, keep_idx)``. Ties: the lower position first
    (DynamicViT's argsort leaves them unspecified). Differentiable in x.
    """
    if x.dim() != 3 or keep_scores.dim() != 2 or x.shape[1] != keep_scores.shape[1] + 1:
        raise ValueError(f"dynamicvit_keep: x must be [B, 1 + M, C] and keep_scores [B, M], got "
                         f"{tuple(x.shape)} and {tuple(keep_scores.shape)}")
    keep, _ = topk_tokens(keep_scores, num_keep, keep_cls=True)
    return token_gather(x, keep, validate=False), keep[:, 1:] - 1


# ============================================================================================
# EViT (youweiliang/evit, evit.py)
# ============================================================================================


def evit_left_tokens(num_tokens: int, keep_rate: float) -> int:
    """EViT's count of patch tokens kept: ``ceil(keep_rate * (N - 1))`` for N tokens (CLS incl.)."""
    return math.ceil(keep_rate * (num_tokens - 1))


def _evit_prunes(num_tokens: int, keep_rate: float) -> bool:
    if not keep_rate >= 0:
        raise ValueError(f"EViT: keep_rate must be >= 0, got {keep_rate!r}")
    return keep_rate < 1 and evit_left_tokens(num_tokens, keep_rate) < num_tokens - 1


class EViTAttention(Attention):
    """EViT's ``Attention`` as a timm Attention drop-in.

    ``forward(x, keep_rate=1.0) -> (out, cls_attn)``: ``out`` is timm's fused attention output
    ``[B, N, C]``; ``cls_attn`` ``[B, N - 1]`` is EViT's token score, the CLS query's softmax
    attention to the patch keys averaged over heads (``attn[:, :, 0, 1:].mean(1)``), from
    :func:`effkern.ops.cls_attention` (float32, float64 for float64; no N x N map), sliced
    ``[:, 1:]``. As in EViT, ``cls_attn`` is None when nothing would be pruned (keep_rate >= 1
    or ``ceil(keep_rate * (N - 1)) >= N - 1``). Differences: the score is taken before
    attention dropout (EViT's after, identical at attn_drop = 0); EViT's ``tokens`` override
    is the caller's business (:func:`evit_reorganize`).
    """

    def forward(self, x: Tensor, keep_rate: float = 1.0) -> tuple[Tensor, Tensor | None]:
        q, k, v = self.qkv_heads(x)
        out = self.project(self.attend(q, k, v))
        if not _evit_prunes(x.shape[1], keep_rate):
            return out, None
        return out, evit_scores(q, k, self.scale)


def evit_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """EViT's token scores ``[B, N - 1]`` from heads q, k ``[B, H, N, d]``: the class query's
    softmax attention to the other keys, averaged over heads (``attn[:, :, 0, 1:].mean(1)``),
    from :func:`effkern.ops.cls_attention` (no N x N map)."""
    return cls_attention(q[:, :, 0], k, scale=scale)[:, 1:]


def evit_reorganize(x: Tensor, cls_attn: Tensor | None, keep_rate: float, fuse_token: bool = False, *,
                    num_keep: int | None = None) -> Tensor:
    """EViT's token reorganisation (``Block.forward`` between the attention and the MLP).

    Args:
        x: ``[B, N, C]`` tokens after the attention residual, CLS first.
        cls_attn: ``[B, N - 1]`` the patch tokens' scores (:class:`EViTAttention`).
        keep_rate: EViT keeps ``left = ceil(keep_rate * (N - 1))`` patch tokens.
        fuse_token: append EViT's fused token, the sum of the dropped tokens weighted by their
            cls_attn (not renormalised), via :func:`~effkern.ops.fuse_tokens`.
        num_keep: keep this many of the N - 1 tokens instead (EViT's per-call ``tokens``);
            keep_rate is then ignored, and num_keep = N - 1 returns x.

    Returns ``[B, 1 + left (+ 1), C]``: CLS, the ``left`` best tokens in descending score order
    (:func:`~effkern.ops.topk_tokens` + :func:`~effkern.ops.token_gather`), then the fused
    token. x itself (unchanged) when keep_rate >= 1 or left >= N - 1, as EViT. keep_rate = 0
    keeps only CLS (+ fused), where EViT asserts left >= 1. Ties: the lower position first.
    Differentiable in x and, through the fused token, in cls_attn.
    """
    n = x.shape[1]
    if num_keep is None:
        if not _evit_prunes(n, keep_rate):
            return x
        num_keep = evit_left_tokens(n, keep_rate)
    elif isinstance(num_keep, bool) or not isinstance(num_keep, int) or not 0 <= num_keep <= n - 1:
        raise ValueError(f"evit_reorganize: num_keep must be an int in [0, {n - 1}], got {num_keep!r}")
    elif num_keep == n - 1:
        return x
    if cls_attn is None:
        raise ValueError("evit_reorganize: cls_attn is None but keep_rate prunes tokens")
    keep, drop = topk_tokens(cls_attn, num_keep, keep_cls=True)
    out = token_gather(x, keep, validate=False)
    if fuse_token:
        weights = F.pad(cls_attn, (1, 0))  # CLS (never dropped) gets weight 0: x's positions
        out = torch.cat([out, fuse_tokens(x, weights, drop, validate=False)], dim=1)
    return out


class EViTBlock(Block):
    """EViT's ``Block``: timm's Block with the reorganisation between attention and MLP.

    ``forward(x, keep_rate=None) -> x`` (keep_rate None: the block's ``keep_rate``; EViT's
    Block also returns the token count and, on request, the kept indices, which here are the
    shape and :func:`~effkern.ops.topk_tokens`' business). Applies ls1 / ls2 (Identity unless
    ``init_values``; EViT's Block has none).
    """

    attn_layer = EViTAttention

    def __init__(self, *args, keep_rate: float = 1.0, fuse_token: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_rate = keep_rate
        self.fuse_token = fuse_token

    def forward(self, x: Tensor, keep_rate: float | None = None) -> Tensor:
        keep_rate = self.keep_rate if keep_rate is None else keep_rate
        tmp, cls_attn = self.attn(self.norm1(x), keep_rate)
        x = x + self.drop_path1(self.ls1(tmp))
        x = evit_reorganize(x, cls_attn, keep_rate, self.fuse_token)
        return self.mlp_residual(x)


# ============================================================================================
# IdleViT (Ackesnal/IdleViT, vit.py: Block.forward(test=True))
# ============================================================================================


def idle_select_compute_scatter(x: Tensor, scores: Tensor, num_keep: int,
                                compute: Callable[[Tensor], Tensor]) -> Tensor:
    """IdleViT's select / compute / scatter-back step: the idle tokens skip the layer.

    Args:
        x: ``[B, 1 + M, C]`` tokens, CLS first.
        scores: ``[B, M]`` patch token scores (IdleViT: the head-mean of the CLS row's scaled
            attention logits, see :meth:`IdleViTBlock.scores`).
        num_keep: patch tokens to compute, in [0, M] (IdleViT: ``int(M * keep_ratio)``).
        compute: the layer, ``[B, 1 + num_keep, C] -> [B, 1 + num_keep, C]`` (cast to x's dtype).

    ``keep = topk_tokens(scores, num_keep, keep_cls=True)``; the CLS and kept tokens are
    gathered, computed together and scattered back in place of their inputs
    (``token_scatter(..., reduce="replace")``); the idle tokens pass through unchanged.
    Returns a new ``[B, 1 + M, C]`` (IdleViT writes into x in place). Ties: the lower position
    first. Differentiable in x and compute's parameters.
    """
    keep, _ = topk_tokens(scores, num_keep, keep_cls=True)
    y = compute(token_gather(x, keep, validate=False)).to(x.dtype)  # e.g. under autocast
    return token_scatter(x, y, keep, reduce="replace", validate=False)


@torch.no_grad()
def idlevit_scores(block: nn.Module, x: Tensor) -> Tensor:
    """IdleViT's token scores ``[B, M]`` for a timm-style block (norm1, attn.qkv, ...): the
    head-mean of the CLS query's attention logits to the patch keys, from ``block.norm1`` and
    ``block.attn.qkv`` (only q_CLS and the keys are projected):
    :func:`~effkern.ops.cls_attention` with ``softmax=False``. IdleViT ranks the unscaled
    logits; scaled ones (by ``attn.scale`` > 0) rank the same. Not differentiable (ranking
    only)."""
    attn = block.attn
    h = block.norm1(x)
    b, n, c = h.shape
    heads = attn.num_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, 0], w[:c], None if bias is None else bias[:c]).reshape(b, heads, c // heads)
    k = F.linear(h, w[c: 2 * c], None if bias is None else bias[c: 2 * c])
    k = k.reshape(b, n, heads, c // heads).transpose(1, 2)
    q = getattr(attn, "q_norm", nn.Identity())(q)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    scale = getattr(attn, "scale", (c // heads) ** -0.5)
    return cls_attention(q, k, scale=scale, softmax=False)[:, 1:]


def idlevit_keep_mask(q: Tensor, k: Tensor, scale: float, num_keep: int) -> Tensor:
    """IdleViT's training-time selection from heads q, k ``[B, H, N, d]``: 1.0 for the class
    token and the ``num_keep`` patch tokens with the highest head-mean CLS attention logits
    (``softmax_with_top_attn``'s ranking), 0.0 for the idle ones, as ``[B, N, 1]`` in q's dtype.
    Not differentiable (a ranking)."""
    b, _, n, _ = q.shape
    scores = cls_attention(q[:, :, 0].detach(), k.detach(), scale=scale, softmax=False)[:, 1:]
    keep, _ = topk_tokens(scores, num_keep, keep_cls=True)
    return torch.zeros(b, n, dtype=q.dtype, device=q.device).scatter(1, keep, 1.0)[:, :, None]


class IdleViTBlock(nn.Module):
    """IdleViT's idle block around an existing timm-style block (norm1, attn.qkv, ...).

    ``IdleViTBlock(block, keep_rate)``; ``forward(x, scores=None) -> x``: the CLS token and the
    ``int(M * keep_rate)`` best-scored patch tokens go through ``block`` together, the others
    idle (:func:`idle_select_compute_scatter`). Without ``scores``, IdleViT's own: see
    :meth:`scores`.

    The block's children and parameters are adopted under their own names, so this wrapper's
    ``state_dict`` is the block's (timm's keys: a checkpoint loads either way); ``.block`` is
    the wrapped module.
    """

    def __init__(self, block: nn.Module, keep_rate: float):
        super().__init__()
        if not 0 <= keep_rate <= 1:
            raise ValueError(f"IdleViTBlock: keep_rate must be in [0, 1], got {keep_rate!r}")
        self.keep_rate = keep_rate
        self._wrapped = (block,)  # a tuple: not registered, its members are adopted below
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, buf in block.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in block._non_persistent_buffers_set)

    @property
    def block(self) -> nn.Module:
        return self._wrapped[0]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # direct parameters / buffers may have been replaced by new tensors: share them again
        self.block._parameters.update({k: self._parameters[k] for k in self.block._parameters})
        self.block._buffers.update({k: self._buffers[k] for k in self.block._buffers})
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.block.training = mode
        return self

    def num_keep(self, num_tokens: int) -> int:
        """IdleViT's ``int(M * keep_ratio)`` for ``num_tokens`` = 1 + M tokens."""
        return int((num_tokens - 1) * self.keep_rate)

    def scores(self, x: Tensor) -> Tensor:
        """IdleViT's token scores of the wrapped block: :func:`idlevit_scores`."""
        return idlevit_scores(self.block, x)

    def forward(self, x: Tensor, scores: Tensor | None = None) -> Tensor:
        if scores is None:
            scores = self.scores(x)
        return idle_select_compute_scatter(x, scores, self.num_keep(x.shape[1]), self.block)


# ============================================================================================
# ToMe (facebookresearch/ToMe, tome/merge.py and tome/patch/timm.py)
# ============================================================================================


class ToMeAttention(Attention):
    """ToMe's ``ToMeAttention`` as a timm Attention drop-in.

    ``forward(x, size=None) -> (out, metric)``: with token sizes ``[B, N, 1]`` (or ``[B, N]``),
    proportional attention: ``log(size)`` is added to the logits as a per-key bias (ToMe's
    ``attn + size.log()[:, None, None, :, 0]``), here an additive ``[B, 1, 1, N]`` mask of the
    fused attention. ``metric = k.mean(1)`` ``[B, N, d]``, the head-mean of the keys, ToMe's
    matching feature.
    """

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q, k, v = self.qkv_heads(x)
        bias = None
        if size is not None:
            s = size[..., 0] if size.dim() == 3 else size
            bias = s.log().to(q.dtype)[:, None, None, :]
        return self.project(self.attend(q, k, v, bias)), k.mean(1)


def tome_merge(x: Tensor, size: Tensor | None, metric: Tensor, r: int,
               class_token: bool = True, *, distill_token: bool = False, source: Tensor | None = None,
               trace_source: bool = False) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """ToMe's merge: ``bipartite_soft_matching(metric, r, class_token)`` then ``merge_wavg``.

    Args:
        x: ``[B, N, C]`` tokens; size: ``[B, N, 1]`` token sizes or None (all 1).
        metric: ``[B, N, *]`` matching features (:class:`ToMeAttention`'s k.mean(1)).
        r: tokens to remove, >= 0; capped at ``(N - class_token) // 2`` as ToMe.
        class_token: protect token 0 (it stays first).
        distill_token: protect token 1 too, a distillation token (it stays second), as ToMe.

        source, trace_source: ToMe's source tracking (``merge_source``): with trace_source the
            result has a third member, ``source' [B, N - r, N0]``, which input token each merged
            token holds (0 / 1; ``source`` None: the identity of the N tokens), merged by max.

    Returns ``(x' [B, N - r, C], size' [B, N - r, 1])`` via
    :func:`~effkern.ops.bipartite_matching` + :func:`~effkern.ops.merge_tokens` (size-weighted
    mean, float32 accumulation): the kept a-tokens, then the b-tokens with their merged
    sources. r = 0 returns the inputs (size may stay None), as ToMe's Block skips the merge; a
    positive r capped to nothing returns x and all-ones sizes, as ToMe's merge_wavg. Ties (of
    the matching scores): the lower position first. Differentiable in x and size (the
    matching is not, as in ToMe).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"tome_merge: r must be an integer >= 0, got {r!r}")
    if trace_source and source is None:
        b, n = x.shape[:2]
        source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    if r == 0:
        return (x, size, source) if trace_source else (x, size)
    # validate=False: no device sync per layer (nor a graph break under torch.compile). The
    # metric and sizes come from the model and the plan from the line above; invalid values
    # give a wrong merge, never an out-of-bounds access or a merged class token.
    plan = bipartite_matching(metric, r, class_token=class_token, distill_token=distill_token, validate=False)
    if plan.num_merged == 0:
        out = x, (x.new_ones(x.shape[0], x.shape[1], 1) if size is None else size)
    else:
        out = merge_tokens(plan, x, size, validate=False)
    if not trace_source:
        return out
    # each merged row holds the union of its input rows' sources (ToMe: merge(source, "amax"))
    index = plan.dest[:, :, None].expand(-1, -1, source.shape[2])
    merged = source.new_zeros(source.shape[0], out[0].shape[1], source.shape[2])
    return (*out, merged.scatter_reduce(1, index, source, "amax"))


class ToMeBlock(Block):
    """ToMe's ``ToMeBlock`` (timm patch): timm's Block with the merge between attention and MLP.

    ``forward(x, size=None) -> (x, size)``: ``x = x + drop_path1(ls1(attn(norm1(x), size)))``
    (proportional attention when ``prop_attn``), then :func:`tome_merge` with the block's
    ``r`` (attribute; ToMe pops it from a per-layer list) and ``class_token``, then the MLP
    residual. Sizes accumulate: they sum to the input token count. Differs from ToMe in
    applying ls1 / ls2 (timm's LayerScale; ToMe's block skips them, identical without
    ``init_values``) and in tracing no sources.
    """

    attn_layer = ToMeAttention

    def __init__(self, *args, r: int = 0, class_token: bool = True, prop_attn: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.r = r
        self.class_token = class_token
        self.prop_attn = prop_attn

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x_attn, metric = self.attn(self.norm1(x), size if self.prop_attn else None)
        x = x + self.drop_path1(self.ls1(x_attn))
        x, size = tome_merge(x, size, metric, self.r, self.class_token)
        return self.mlp_residual(x), size
