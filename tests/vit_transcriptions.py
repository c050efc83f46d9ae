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


def _embed(model, x):
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def tome_forward(model, x, r, prop_attn=True):
    """ToMeVisionTransformer.forward(x) with model.r = r: the logits, and the tokens after each
    block."""
    rs = parse_r(len(model.blocks), r)
    size = None
    t = _embed(model, x)
    kept = []
    for blk, r_i in zip(model.blocks, rs):
        dim, heads = blk.norm1.normalized_shape[0], blk.attn.num_heads
        tb = _loaded(T.ToMeBlock(dim, heads, blk.mlp.fc1.out_features / dim, blk.attn.qkv.bias is not None), blk)
        # ToMeBlock: x + attn residual, merge, MLP residual (ls applied: effkern)
        x_attn, metric = tb.attn(tb.norm1(t), size if prop_attn else None)
        t = t + tb.ls1(x_attn)
        if r_i > 0:
            merge, _ = T.bipartite_soft_matching(metric, r_i, model.cls_token is not None, False)
            t, size = T.merge_wavg(merge, t, size)
        t = t + tb.ls2(tb.mlp(tb.norm2(t)))
        kept.append(t.shape[1] - model.num_prefix_tokens)
    return model.forward_head(model.norm(t)), kept


def evit_forward(model, x, base_keep_rate, drop_loc, fuse_token, keep_rate=None, tokens=None):
    """EViT.forward(x, keep_rate, tokens) on the timm model's weights: the logits, and the patch
    tokens after each block."""
    depth = len(model.blocks)
    if not isinstance(keep_rate, (tuple, list)):
        keep_rate = (keep_rate,) * depth
    if not isinstance(tokens, (tuple, list)):
        tokens = (tokens,) * depth
    t = _embed(model, x)
    kept = []
    for i, blk in enumerate(model.blocks):
        dim, heads = blk.norm1.normalized_shape[0], blk.attn.num_heads
        rate = base_keep_rate if i in drop_loc else 1.0
        tb = _loaded(T.EViTBlock(dim, heads, blk.mlp.fc1.out_features / dim, blk.attn.qkv.bias is not None,
                                 keep_rate=rate, fuse_token=fuse_token), blk)
        # EViT's Block.forward, with ls1 / ls2 (effkern)
        kr = rate if keep_rate[i] is None else keep_rate[i]
        tmp, index, idx, cls_attn, _ = tb.attn(tb.norm1(t), kr, tokens[i])
        t = t + tb.ls1(tmp)
        if index is not None:
            n, c = t.shape[1], t.shape[2]
            non_cls = t[:, 1:]
            x_others = torch.gather(non_cls, dim=1, index=index)
            if fuse_token:
                compl = T.complement_idx(idx, n - 1)
                non_topk = torch.gather(non_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, c))
                non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
                extra = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
                t = torch.cat([t[:, 0:1], x_others, extra], dim=1)
            else:
                t = torch.cat([t[:, 0:1], x_others], dim=1)
        t = t + tb.ls2(tb.mlp(tb.norm2(t)))
        kept.append(t.shape[1] - 1)
    return model.forward_head(model.norm(t)), kept
