"""Plain-torch transcriptions of the published token-reduction steps: the oracle of
tests/test_tokens_nn.py for :mod:`effkern.nn.tokens`.

Transcribed (steps and names, in plain torch; not the repositories' files) from:

* DynamicViT, raoyongming/DynamicViT ``vit.py`` and ``utils.py``: ``batch_index_select``,
  ``Attention.softmax_with_policy`` / ``Attention.forward(x, policy)``, ``Block``,
  ``PredictorLG`` and the pruning steps of ``VisionTransformerDiffPruning.forward`` (training:
  gumbel-softmax hard decisions as the next policy; inference: argsort of the keep score, keep
  CLS + the best ``num_keep``).
* EViT, youweiliang/evit ``evit.py`` and ``helpers.py``: ``Attention.forward`` (softmax
  attention, ``cls_attn = attn[:, :, 0, 1:].mean(1)``, ``topk`` of ``left_tokens =
  ceil(keep_rate * (N - 1))``), ``complement_idx`` and ``Block.forward`` (gather of the kept
  tokens, optional fused token of the rest weighted by cls_attn).
* IdleViT, Ackesnal/IdleViT ``vit.py``: ``Attention.forward(test=True)`` (CLS-row logits from
  the q/k slices of qkv, argsort of their head-mean, attention among CLS + kept tokens) and
  ``Block.forward(test=True)`` (residuals on the kept tokens, written back into x).
* ToMe, facebookresearch/ToMe ``tome/merge.py`` and ``tome/patch/timm.py``:
  ``bipartite_soft_matching``, ``merge_wavg``, ``ToMeAttention`` (proportional attention
  ``attn + size.log()[:, None, None, :, 0]``, returns ``k.mean(1)``) and ``ToMeBlock``.

Deliberate deviations, all marked ``# effkern:`` below: sorts that rank scores are stable
(``stable=True``; the originals' argsort / topk leave ties unspecified, effkern sends them to
the lower position), and steps the originals run in place or under ``torch.no_grad`` at
inference are written out of place so that gradients can be compared. Module and parameter
names are the originals' (DeiT-era timm: qkv, proj, norm1, mlp.fc1, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ============================================================================================
# DeiT-era timm pieces shared by the DynamicViT, EViT and IdleViT repositories
# ============================================================================================


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def split_heads(qkv_out, num_heads):
    """[B, N, 3C] -> q, k, v each [B, H, N, d]."""
    b, n, c3 = qkv_out.shape
    qkv = qkv_out.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(o):
    """[B, H, N, d] -> [B, N, H * d]."""
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


# ============================================================================================
# DynamicViT
# ============================================================================================


def batch_index_select(x, idx):
    """DynamicViT's utils.batch_index_select: rows idx[b] of x[b] ([B, N, C] or [B, N]) through
    a flattened index with per-batch offsets."""
    b, n = x.shape[:2]
    flat = (idx + torch.arange(b, dtype=torch.long, device=x.device)[:, None] * n).reshape(-1)
    if x.dim() == 3:
        return x.reshape(b * n, x.shape[2])[flat].reshape(b, idx.shape[1], x.shape[2])
    return x.reshape(b * n)[flat].reshape(b, idx.shape[1])


def softmax_with_policy(attn, policy, eps=1e-6):
    """DynamicViT's policy softmax on [B, H, N, N] logits with a [B, N, 1] keep policy: every
    query keeps the kept keys and itself; exp in float32 after subtracting the row max (over all
    keys), (A + eps / N) / (sum A + eps), returned in the logits' dtype."""
    b, n, _ = policy.shape
    keep = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=keep.dtype, device=keep.device).view(1, 1, n, n)
    keep = keep + (1.0 - keep) * eye
    row_max = attn.max(dim=-1, keepdim=True)[0]
    a = (attn - row_max).to(torch.float32).exp() * keep.to(torch.float32)
    a = (a + eps / n) / (a.sum(dim=-1, keepdim=True) + eps)
    return a.type_as(row_max)


class DynamicViTAttention(nn.Module):
    """DynamicViT's Attention: forward(x, policy); no attention dropout anywhere."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, policy=None):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1) if policy is None else softmax_with_policy(attn, policy)
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


class DynamicViTBlock(nn.Module):
    """DynamicViT's Block: forward(x, policy=None) with the policy handed to the attention."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DynamicViTAttention(dim, num_heads, qkv_bias)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, policy=None):
        x = x + self.drop_path(self.attn(self.norm1(x), policy=policy))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PredictorLG(nn.Module):
    """DynamicViT's PredictorLG: local half of each token + policy-weighted global mean of the
    other half -> log-probabilities [B, N, 2] (channel 0 = keep)."""

    def __init__(self, embed_dim=384):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x, policy):
        x = self.in_conv(x)
        b, n, c = x.shape
        local_x = x[:, :, : c // 2]
        global_x = (x[:, :, c // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand(b, n, c // 2)], dim=-1))


def dynamicvit_train_prune(x, predictor, block, prev_decision):
    """One pruning location of VisionTransformerDiffPruning.forward in training: score the patch
    tokens, sample hard keep decisions (straight-through gumbel softmax, channel 0) masked by the
    previous ones, run the block under the policy [CLS = 1, decisions].
    Returns (x, hard_keep_decision [B, M, 1])."""
    b = x.shape[0]
    pred_score = predictor(x[:, 1:], prev_decision).reshape(b, -1, 2)
    hard_keep = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
    policy = torch.cat([torch.ones(b, 1, 1, dtype=hard_keep.dtype, device=hard_keep.device), hard_keep], dim=1)
    return block(x, policy=policy), hard_keep


def dynamicvit_keep(x, score, num_keep, prev_decision=None):
    """The inference pruning of VisionTransformerDiffPruning.forward: score [B, M] =
    pred_score[:, :, 0]; keep_policy = the num_keep best positions (descending); x keeps CLS and
    those; prev_decision follows. Returns (x, keep_policy, prev_decision)."""
    # effkern: stable sort (DynamicViT: torch.argsort, ties unspecified)
    keep_policy = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :num_keep]
    cls_policy = torch.zeros(x.shape[0], 1, dtype=keep_policy.dtype, device=keep_policy.device)
    now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
    x = batch_index_select(x, now_policy)
    if prev_decision is not None:
        prev_decision = batch_index_select(prev_decision, keep_policy)
    return x, keep_policy, prev_decision


# ============================================================================================
# EViT
# ============================================================================================


def complement_idx(idx, dim):
    """EViT's complement_idx: the ascending indices of range(dim) not in idx (per batch row)."""
    a = torch.arange(dim, device=idx.device).expand(*idx.shape[:-1], dim)
    masked = torch.scatter(a, -1, idx, 0)
    compl = torch.sort(masked, dim=-1).values
    return compl[..., idx.shape[-1]:]


class EViTAttention(nn.Module):
    """EViT's Attention: forward(x, keep_rate, tokens=None) ->
    (x, index [B, left, C] or None, idx [B, left] or None, cls_attn [B, N-1] or None, left_tokens)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, keep_rate=1.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_rate = keep_rate

    def forward(self, x, keep_rate=None, tokens=None):
        if keep_rate is None:
            keep_rate = self.keep_rate
        _, n, c = x.shape
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self.proj_drop(self.proj(merge_heads(attn @ v)))
        left_tokens = n - 1
        if (self.keep_rate < 1 and keep_rate < 1) or tokens is not None:
            left_tokens = math.ceil(keep_rate * (n - 1)) if tokens is None else tokens
            if left_tokens == n - 1:
                return x, None, None, None, left_tokens
            assert left_tokens >= 1
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N-1]
            # effkern: stable descending sort (EViT: torch.topk, ties unspecified)
            idx = torch.sort(cls_attn, dim=1, descending=True, stable=True).indices[:, :left_tokens]
            index = idx.unsqueeze(-1).expand(-1, -1, c)
            return x, index, idx, cls_attn, left_tokens
        return x, None, None, None, left_tokens


class EViTBlock(nn.Module):
    """EViT's Block: forward(x, keep_rate=None, tokens=None) -> (x, n_tokens, None)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, keep_rate=1.0, fuse_token=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EViTAttention(dim, num_heads, qkv_bias, keep_rate=keep_rate)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.keep_rate = keep_rate
        self.fuse_token = fuse_token
        # effkern: timm's LayerScale slots (Identity here; a DeiT-III block's in vit_transcriptions)
        self.ls1, self.ls2 = nn.Identity(), nn.Identity()

    def forward(self, x, keep_rate=None, tokens=None):
        if keep_rate is None:
            keep_rate = self.keep_rate
        _, n, c = x.shape
        tmp, index, idx, cls_attn, _ = self.attn(self.norm1(x), keep_rate, tokens)
        x = x + self.drop_path(self.ls1(tmp))
        if index is not None:
            non_cls = x[:, 1:]
            x_others = torch.gather(non_cls, dim=1, index=index)
            if self.fuse_token:
                compl = complement_idx(idx, n - 1)
                non_topk = torch.gather(non_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, c))
                non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
                extra_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
                x = torch.cat([x[:, 0:1], x_others, extra_token], dim=1)
            else:
                x = torch.cat([x[:, 0:1], x_others], dim=1)
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, x.shape[1] - 1, None


# ============================================================================================
# IdleViT
# ============================================================================================


class IdleViTAttention(nn.Module):
    """IdleViT's Attention, inference path (test=True)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def cls_logits(self, x):
        """[B, H, 1, N]: q of the CLS token against every key, unscaled (IdleViT's ranking)."""
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, 0:1], w[0:c], bias[0:c])
        k = F.linear(x, w[c: 2 * c], bias[c: 2 * c])
        return q.reshape(b, 1, h, d).permute(0, 2, 1, 3) @ k.reshape(b, n, h, d).permute(0, 2, 3, 1)

    def forward_test(self, x, num_keep_node):
        """-> (attention output of CLS + the kept tokens [B, 1 + K, C], their positions [B, 1 + K])."""
        b, _, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        w, bias = self.qkv.weight, self.qkv.bias
        k = F.linear(x, w[c: 2 * c], bias[c: 2 * c])
        # effkern: stable descending sort (IdleViT: torch.argsort, ties unspecified)
        top = torch.sort(self.cls_logits(x).mean(1)[:, 0, 1:], dim=1, descending=True, stable=True).indices
        top = top[:, :num_keep_node]
        top = torch.cat([torch.zeros(b, 1, dtype=top.dtype, device=top.device), top + 1], dim=1)
        x = batch_index_select(x, top)
        k = batch_index_select(k, top)
        m = num_keep_node + 1
        q = F.linear(x, w[0:c], bias[0:c]).reshape(b, m, h, d).permute(0, 2, 1, 3)
        v = F.linear(x, w[2 * c:], bias[2 * c:]).reshape(b, m, h, d).permute(0, 2, 1, 3)
        attn = ((q @ k.reshape(b, m, h, d).permute(0, 2, 3, 1)) * self.scale).softmax(dim=-1)
        return self.proj_drop(self.proj(merge_heads(attn @ v))), top


class IdleViTBlock(nn.Module):
    """IdleViT's Block, inference path: forward_test(x, num_keep_node) -> x."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = IdleViTAttention(dim, num_heads, qkv_bias)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward_test(self, x, num_keep_node):
        b, _, c = x.shape
        top_tokens, top = self.attn.forward_test(self.norm1(x), num_keep_node)
        top_tokens = batch_index_select(x, top) + self.drop_path(top_tokens)
        top_tokens = top_tokens + self.drop_path(self.mlp(self.norm2(top_tokens)))
        dim1 = torch.arange(b, dtype=top.dtype, device=top.device).reshape(-1, 1).expand(b, num_keep_node + 1)
        # effkern: out of place (IdleViT writes into x under torch.no_grad)
        x = x.clone()
        x[dim1.reshape(-1), top.reshape(-1)] = top_tokens.reshape(b * (num_keep_node + 1), c)
        return x


# ============================================================================================
# ToMe
# ============================================================================================


def bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    """ToMe's balanced bipartite matching: a = even tokens, b = odd tokens, cosine scores, each
    a-token's best b; the r best-matched a-tokens merge into their b. Returns (merge(x, mode),
    unmerge(x)) as ToMe does (without distill_token support in unmerge, like ToMe)."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return (lambda x, mode=None: x), (lambda x: x)

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        # effkern: stable descending sort (ToMe: argsort, ties unspecified)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]
    return merge_functions(unm_idx, src_idx, dst_idx, t, distill_token)


def merge_functions(unm_idx, src_idx, dst_idx, t, distill_token=False):
    """The (merge, unmerge) closures of ToMe's bipartite_soft_matching for a given plan
    (indices [B, *, 1]; t tokens), split out so that a test can apply a plan made elsewhere."""
    r = src_idx.shape[1]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x):
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
        out = torch.zeros(n, t, c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(merge, x, size=None):
    """ToMe's size-weighted merge: (merge(x * s, sum) / merge(s, sum), merge(s, sum))."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


class ToMeAttention(nn.Module):
    """ToMe's ToMeAttention (timm Attention names): proportional attention, returns k.mean(1)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, size=None):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if size is not None:
            attn = attn + size.log()[:, None, None, :, 0]
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v))), k.mean(1)


class ToMeBlock(nn.Module):
    """ToMe's ToMeBlock on timm's Block names; the per-layer r and the running size are passed
    explicitly (ToMe keeps them in a shared _tome_info dict, prop_attn = True)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ToMeAttention(dim, num_heads, qkv_bias)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x, r, size=None, class_token=True, prop_attn=True):
        x_attn, metric = self.attn(self.norm1(x), size if prop_attn else None)
        x = x + self.drop_path1(x_attn)
        if r > 0:
            merge, _ = bipartite_soft_matching(metric, r, class_token, False)
            x, size = merge_wavg(merge, x, size)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, size
