"""Model-level transcriptions of the published token-reduction ViTs, run on a timm model's own
weights: the oracle of tests/test_convert.py for :func:`effkern.convert`.

Transcribed (steps and names, in plain torch; not the repositories' files) from:

* ToMe, facebookresearch/ToMe ``tome/patch/timm.py`` (``ToMeVisionTransformer.forward``: r per
  layer from ``parse_r``, size reset to None, then timm's forward with every block a
  ``ToMeBlock``) and ``tome/utils.py`` (``parse_r``).
* EViT, youweiliang/evit ``evit.py`` (``EViT.forward_features``: a per-call keep_rate (one
  value for every block, or one per block) and ``tokens``; each block its own default rate,
  ``base_keep_rate`` at ``drop_loc`` and 1 elsewhere, as ``models.py`` builds it).

The blocks are the module transcriptions of tests/tokens_transcriptions.py with the timm
block's weights loaded (timm's LayerNorm eps). The embedding, the final norm and the head are
the timm model's own (the published models copy DeiT-era timm's). Deviations from the
published code, marked ``# effkern:``: LayerScale (ls1 / ls2) applied where the timm model has
it (DeiT-III; the published blocks predate it), and the stable sorts of the module
transcriptions.
"""

from __future__ import annotations

import torch
from torch import nn

from tests import tokens_transcriptions as T


def parse_r(num_layers, r):
    """ToMe's parse_r: an int, (r, inflect) or a per-layer list -> r per layer."""
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _loaded(module: nn.Module, timm_block: nn.Module) -> nn.Module:
    """A transcription block with the timm block's weights and LayerNorm eps."""
    sd = {k: v for k, v in timm_block.state_dict().items() if not k.startswith(("ls1", "ls2"))}
    module.load_state_dict(sd, strict=True)
    for name in ("norm1", "norm2"):
        getattr(module, name).eps = getattr(timm_block, name).eps
    # effkern: LayerScale where the timm model has it
    module.ls1, module.ls2 = timm_block.ls1, timm_block.ls2
    return module.to(next(timm_block.parameters()).dtype).train(timm_block.training)


def _block_args(blk):
    """(dim, heads, mlp_ratio, qkv_bias) of a timm block, for a transcription block."""
    dim = blk.norm1.normalized_shape[0]
    return dim, blk.attn.num_heads, blk.mlp.fc1.out_features / dim, blk.attn.qkv.bias is not None


def tome_blocks(model):
    return [_loaded(T.ToMeBlock(*_block_args(blk)), blk) for blk in model.blocks]


def evit_blocks(model, base_keep_rate, drop_loc, fuse_token):
    """Each block with its own default rate: base_keep_rate at drop_loc, 1 elsewhere (models.py)."""
    return [_loaded(T.EViTBlock(*_block_args(blk), keep_rate=base_keep_rate if i in drop_loc else 1.0,
                                fuse_token=fuse_token), blk) for i, blk in enumerate(model.blocks)]


def dynamicvit_blocks(model):
    return [_loaded(T.DynamicViTBlock(*_block_args(blk)), blk) for blk in model.blocks]


def idlevit_blocks(model, idle_layers):
    """IdleViT's blocks at the idle layers; elsewhere None (timm's block runs)."""
    return [_loaded(T.IdleViTBlock(*_block_args(blk)), blk) if i in idle_layers else None
            for i, blk in enumerate(model.blocks)]


def _embed(model, x):
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def merge_source(merge, x, source=None):
    """ToMe's merge_source: the adjacency of the initial tokens and the merged groups."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def tome_forward(model, x, r, prop_attn=True, trace_source=False, blocks=None):
    """ToMeVisionTransformer.forward(x) with model.r = r: the logits, and the tokens after each
    block (and with trace_source, ToMe's final _tome_info["source"]). ``blocks``: tome_blocks(model),
    built once (else on each call)."""
    rs = parse_r(len(model.blocks), r)
    blocks = blocks or tome_blocks(model)
    size = source = None
    t = _embed(model, x)
    kept = []
    for tb, r_i in zip(blocks, rs):
        # ToMeBlock: x + attn residual, merge, MLP residual (ls applied: effkern)
        x_attn, metric = tb.attn(tb.norm1(t), size if prop_attn else None)
        t = t + tb.ls1(x_attn)
        if r_i > 0:
            merge, _ = T.bipartite_soft_matching(metric, r_i, model.cls_token is not None,
                                                 getattr(model, "dist_token", None) is not None)
            if trace_source:
                source = merge_source(merge, t, source)
            t, size = T.merge_wavg(merge, t, size)
        t = t + tb.ls2(tb.mlp(tb.norm2(t)))
        kept.append(t.shape[1] - model.num_prefix_tokens)
    if trace_source:
        return model.forward_head(model.norm(t)), kept, source
    return model.forward_head(model.norm(t)), kept


def evit_forward(model, x, base_keep_rate, drop_loc, fuse_token, keep_rate=None, tokens=None, blocks=None):
    """EViT.forward(x, keep_rate, tokens) on the timm model's weights: the logits, and the patch
    tokens after each block. ``blocks``: evit_blocks(model, ...), built once (else on each call)."""
    blocks = blocks or evit_blocks(model, base_keep_rate, drop_loc, fuse_token)
    depth = len(model.blocks)
    if not isinstance(keep_rate, (tuple, list)):
        keep_rate = (keep_rate,) * depth
    if not isinstance(tokens, (tuple, list)):
        tokens = (tokens,) * depth
    t = _embed(model, x)
    kept = []
    for i, tb in enumerate(blocks):
        # EViT's Block.forward (ls1 / ls2: the timm block's, effkern); a None rate: the block's
        t, _, _ = tb(t, keep_rate[i], tokens[i])
        kept.append(t.shape[1] - 1)
    return model.forward_head(model.norm(t)), kept


def dynamicvit_forward(model, predictors, x, pruning_loc, token_ratio, training=False, seed=None, blocks=None):
    """VisionTransformerDiffPruning.forward(x) on the timm model's weights and the given
    predictors (PredictorLG's names). Inference: the logits and the patch tokens after each
    block. Training (distill=True): (logits, final normed patch tokens, prev_decision,
    out_pred_prob), the Gumbel noise drawn from torch's generator in the published order, after
    ``torch.manual_seed(seed)`` (the transcription blocks are built first: their initialisation
    draws from the generator too). ``blocks``: dynamicvit_blocks(model), built once (else on each
    call)."""
    blocks = [tb.train(training) for tb in blocks or dynamicvit_blocks(model)]
    if seed is not None:
        torch.manual_seed(seed)
    b = x.shape[0]
    t = _embed(model, x)
    init_n = t.shape[1] - 1  # effkern: the patch count (DynamicViT hard-codes 14 * 14)
    prev_decision = torch.ones(b, init_n, 1, dtype=t.dtype, device=t.device)
    policy = torch.ones(b, init_n + 1, 1, dtype=t.dtype, device=t.device)
    out_pred_prob, kept, p_count = [], [], 0
    for i, tb in enumerate(blocks):

        def run(t, policy=None):  # Block.forward with ls1 / ls2 (effkern)
            t = t + tb.ls1(tb.attn(tb.norm1(t), policy=policy))
            return t + tb.ls2(tb.mlp(tb.norm2(t)))

        if i in pruning_loc:
            spatial_x = t[:, 1:]
            pred_score = predictors[p_count](spatial_x, prev_decision).reshape(b, -1, 2)
            if training:
                hard_keep_decision = torch.nn.functional.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                out_pred_prob.append(hard_keep_decision.reshape(b, init_n))
                cls_policy = torch.ones(b, 1, 1, dtype=hard_keep_decision.dtype, device=hard_keep_decision.device)
                policy = torch.cat([cls_policy, hard_keep_decision], dim=1)
                t = run(t, policy=policy)
                prev_decision = hard_keep_decision
            else:
                score = pred_score[:, :, 0]
                num_keep_node = int(init_n * token_ratio[p_count])
                # effkern: stable sort (DynamicViT: argsort, ties unspecified)
                keep_policy = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :num_keep_node]
                cls_policy = torch.zeros(b, 1, dtype=keep_policy.dtype, device=keep_policy.device)
                now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
                t = T.batch_index_select(t, now_policy)
                prev_decision = T.batch_index_select(prev_decision, keep_policy)
                t = run(t)
            p_count += 1
        else:
            t = run(t, policy) if training else run(t)
        kept.append(t.shape[1] - 1)
    t = model.norm(t)
    features = t[:, 1:]
    logits = model.forward_head(t)
    if training:
        return logits, features, prev_decision.detach(), out_pred_prob
    return logits, kept


def dynamicvit_loss(teacher, inputs, outputs, labels, keep_ratio, clf_weight=1.0, ratio_weight=2.0,
                    distill_weight=0.5, mse_token=True):
    """DistillDiffPruningLoss_dynamic.forward (dynamic=False), its teacher a timm model: (logits,
    final normed patch tokens)."""
    pred, token_pred, mask, out_pred_score = outputs
    pred_loss = 0.0
    for i, score in enumerate(out_pred_score):
        pos_ratio = score.mean(1)
        pred_loss = pred_loss + ((pos_ratio - keep_ratio[i]) ** 2).mean()
    cls_loss = torch.nn.functional.cross_entropy(pred, labels)
    with torch.no_grad():
        feats = teacher.forward_features(inputs)
        cls_t, token_t = teacher.forward_head(feats), feats[:, 1:]
    cls_kl_loss = torch.nn.functional.kl_div(torch.nn.functional.log_softmax(pred, dim=-1),
                                             torch.nn.functional.log_softmax(cls_t, dim=-1),
                                             reduction="batchmean", log_target=True)
    b, n, c = token_pred.size()
    bool_mask = mask.reshape(b * n) > 0.5
    token_pred = token_pred.reshape(b * n, c)
    token_t = token_t.reshape(b * n, c)
    if mask.sum() < 0.1:
        token_kl_loss = token_pred.new(1,).fill_(0.0)
    else:
        token_t = token_t[bool_mask]
        token_pred = token_pred[bool_mask]
        if mse_token:
            token_kl_loss = torch.pow(token_pred - token_t, 2).mean()
        else:
            token_kl_loss = torch.nn.functional.kl_div(torch.nn.functional.log_softmax(token_pred, dim=-1),
                                                       torch.nn.functional.log_softmax(token_t, dim=-1),
                                                       reduction="batchmean", log_target=True)
    return (clf_weight * cls_loss + ratio_weight * pred_loss / len(out_pred_score)
            + distill_weight * cls_kl_loss + distill_weight * token_kl_loss)


def _idle_test_block(tb, x, num_keep_node):
    """IdleViT's Block.forward(test=True) (ls1 / ls2 applied: effkern)."""
    b, _, c = x.shape
    top_tokens, top = tb.attn.forward_test(tb.norm1(x), num_keep_node)
    top_tokens = T.batch_index_select(x, top) + tb.ls1(top_tokens)
    top_tokens = top_tokens + tb.ls2(tb.mlp(tb.norm2(top_tokens)))
    dim1 = torch.arange(b, dtype=top.dtype, device=top.device).reshape(-1, 1).expand(b, num_keep_node + 1)
    x = x.clone()  # effkern: out of place
    x[dim1.reshape(-1), top.reshape(-1)] = top_tokens.reshape(b * (num_keep_node + 1), c)
    return x


def _idle_train_block(tb, x, num_keep_node):
    """IdleViT's Block.forward(x, num_keep_node) in training: Attention.forward with
    softmax_with_top_attn, the residuals masked to the kept tokens -> (x, attn_mask, attn_rt)."""
    b, n, c = x.shape
    heads = tb.attn.num_heads
    qkv = tb.attn.qkv(tb.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * tb.attn.scale
    attn_rt = attn
    # softmax_with_top_attn; effkern: stable descending sort (IdleViT: argsort, ties unspecified)
    top = torch.sort(attn.mean(1)[:, 0, 1:], dim=1, descending=True, stable=True).indices[:, :num_keep_node]
    top = torch.cat([torch.zeros(b, 1, dtype=top.dtype, device=top.device), top + 1], dim=1)
    dim1 = torch.arange(b, dtype=top.dtype).reshape(-1, 1).expand(b, num_keep_node + 1).reshape(-1)
    dim2 = top.reshape(-1)
    bias = torch.ones((b, n), dtype=attn.dtype, device=attn.device)
    bias[dim1, dim2] = 0.0
    bias = (bias * (-100000.0)).reshape(b, 1, 1, n).expand(-1, heads, n, -1)
    out = ((attn + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    out = tb.attn.proj_drop(tb.attn.proj(out))
    attn_mask = torch.zeros((b, n), dtype=attn.dtype, device=attn.device)
    attn_mask[dim1, dim2] = 1.0
    attn_mask = attn_mask.reshape(b, n, 1)
    x = x + tb.ls1(out) * attn_mask
    x = x + tb.ls2(tb.mlp(tb.norm2(x))) * attn_mask
    return x, attn_mask, attn_rt


def idlevit_forward(model, x, idle_layers, keep_ratios, training=False, blocks=None):
    """IdleVisionTransformer.forward(x) on the timm model's weights (the non-idle blocks are
    timm's own: the published Block without idling is the same computation). Inference: the
    logits. Training: (logits, out_attns, out_attn_masks). ``blocks``: idlevit_blocks(model,
    idle_layers), built once (else on each call)."""
    blocks = blocks or idlevit_blocks(model, idle_layers)
    t = _embed(model, x)
    init_n = t.shape[1] - 1
    p_count, out_attns, out_masks = 0, [], []
    for blk, tb in zip(model.blocks, blocks):
        if tb is not None:
            num_keep_node = int(init_n * keep_ratios[p_count])
            p_count += 1
            if training:
                t, mask, attn = _idle_train_block(tb, t, num_keep_node)
                out_attns.append(attn)
                out_masks.append(mask)
            else:
                t = _idle_test_block(tb, t, num_keep_node)
        else:
            t = blk(t)
    logits = model.forward_head(model.norm(t))
    return (logits, out_attns, out_masks) if training else logits


def idlevit_cut_loss(out_attns, out_attn_masks, num_idle_layers):
    """IdleViTTotalLoss's token cut loss, cutloss_type "both" (effkern: every idle layer; the
    published loop deletes entries of the lists it enumerates, skipping every other layer)."""
    cut_loss = 0.0
    for i, mask in enumerate(out_attn_masks):
        b, n, _ = mask.shape
        w = out_attns[i].mean(1).softmax(dim=-1)
        diffcut = torch.abs(mask.reshape(b, n, 1) - mask.reshape(b, 1, n))
        diffcut[:, :, 0] = 0.0
        samecut = mask.reshape(b, n, 1) * mask.reshape(b, 1, n)
        inter_dist = (diffcut.reshape(b, n, n) * w).sum(-1)
        inter_loss = torch.nn.functional.mse_loss(inter_dist, torch.zeros(b, n, dtype=inter_dist.dtype))
        intra_dist = (samecut * w).sum(-1)
        intra_loss = torch.nn.functional.mse_loss(intra_dist, mask.reshape(b, n))
        cut_loss = cut_loss + inter_loss + intra_loss
    return cut_loss / num_idle_layers
