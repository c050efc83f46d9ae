"""The ViT variants of ``effkern.convert``: a timm ``VisionTransformer`` turned, in place, into the
same model running an efficient-ViT method on effkern's kernels.

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    effkern.convert(model, "tome", r=16)          # or "evit", keep_rate=0.7
    logits = model(images)                        # ToMe at r = 16
    logits = model(images, r=8)                   # a per-call override

What stays timm's: the model object, its class (a subclass of it), every module and parameter
name (a timm checkpoint loads strictly before and after), ``patch_embed``, ``_pos_embed``, the
norms, ``forward_features``, ``forward_head``, ``forward_intermediates`` (``output_fmt="NLC"``
once tokens are reduced: the token count there is the one at that depth), gradient
checkpointing, ``reset_classifier``, bf16 and autocast. What changes: for the token methods
(ToMe, EViT, DynamicViT, IdleViT) each ``Block`` of ``model.blocks`` becomes a subclass of its
own class whose ``forward`` runs the method between the attention and the MLP, through
effkern's ops (no N x N attention map at inference: attention is SDPA, token scores come from
``cls_attention``, tokens move with ``token_gather`` / ``merge_tokens``); for EcoFormer /
ShiftAddViT each block's attention becomes a ``BinaryHashAttention`` with its weights.

State that must travel from block to block (ToMe's token sizes, DynamicViT's decisions) is
kept per forward call in ``model.effkern`` (:class:`Shared`, held by every block too), keyed
by block index, so that gradient checkpointing, which re-runs a block in the backward pass,
sees the same inputs again. It is reset when ``patch_embed`` runs, i.e. at the start of every
forward.

timm's PVTv2 (``timm.models.pvt_v2.PyramidVisionTransformerV2``: ``pvt_v2_b0`` ... ``b5``) converts
with ``shiftadd`` and ``shift`` only (the others raise TypeError), as ShiftAddViT's published
PVTv2 code (GATECH-EIC/ShiftAddViT, ``pvt/pvt_v2.py``, ``pvt/fmoe_fc.py``) does it. Nothing but
the replaced modules changes (no class change, no hooks); ``model.effkern`` holds the settings.
``layers`` index the blocks of all stages in order (``stages.s.blocks.j``), ``stages`` selects
whole stages instead.

* ``shiftadd``: the attention of ``stages`` (default (0, 1, 2): the published model keeps MSA in
  the last stage) becomes :class:`~effkern.nn.binary_hash.PVTBinaryHashAttention`, the published
  ``LinAngularAttention_ksh``: one shared query / key projection (timm's ``q``) hashed by KSH to
  {0, 1} codes, values from the value half of timm's ``kv`` at full resolution (no spatial
  reduction: ``sr`` / ``norm`` stay, unused, for timm's checkpoint), out = normalise(v / 2 +
  h (h^T v) / pi) + dwconv(v) with a 9-tap token convolution per head, then ``proj``.
  ``dwconv`` adds ``...attn.dwconv.weight`` (strict=False). ``fit_hash`` fits each hash to its
  queries (the published hash is fitted to the shared q / k as well).
* ``shift``: ``targets`` among ``q``, ``kv``, ``proj``, ``fc1``, ``fc2`` become ShiftLinear;
  ``moe=True`` makes ``fc1`` and ``fc2`` each a ShiftAddMoE of timm's linear and its shift copy
  (the published ``Mlp_FMoE`` of two ``PyTorchFMoE_FC``), keeping timm's depthwise convolution
  between them (a per-token router cannot split a convolution over the token grid). Departure:
  the published ``--moe_attn`` also makes the LinAngular attention's linears such mixtures; here
  attention targets become plain ShiftLinear (as on a ViT), and the router is effkern's
  ShiftAddMoE (noisy top-1 gate, see :class:`~effkern.nn.ShiftAddMoE`), not the published
  ``NaiveGate``.

Methods: ``tome``, ``evit``, ``dynamicvit``, ``idlevit``, ``ecoformer``, ``shiftadd``, ``shift``
(the blocks' linear layers to shift layers) and ``sparse24_int8`` (to 2:4-sparse int8 layers,
GPUSQ-ViT) (see :data:`METHODS`) convert in place; ``ivit`` returns a new, integer-only model
(:class:`~effkern.models.IViT`) with the timm model's weights, since every layer changes.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effkern.models.ivit import IViT
from effkern.nn.binary_hash import BinaryHashAttention, PVTBinaryHashAttention
from effkern.nn.shift import ShiftAddMoE, ShiftLinear
from effkern.nn.sparse24 import Sparse24Int8Linear
from effkern.nn.tokens import (DynamicViTPredictor, dynamicvit_attention, dynamicvit_keep, dynamicvit_keep_decisions,
                               evit_left_tokens, evit_reorganize, evit_scores, idle_select_compute_scatter,
                               idlevit_keep_mask, idlevit_scores, tome_merge)

__all__ = ["METHODS", "DynamicViTLoss", "IdleViTLoss", "binary_hash_attentions", "convert", "evit_keep_rate_schedule",
           "calibrate", "fit_hash", "freeze_sparse24", "hash_state_dict", "load_hash_state_dict", "moe_loss",
           "shift_layers", "sparse24_layers", "tome_schedule"]


# --------------------------------------------------------------------------------------------
# timm's attention, step by step (the method blocks need q, k and the logits' bias between them)
# --------------------------------------------------------------------------------------------


def _qkv_heads(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """timm ``Attention``'s q, k, v ``[B, H, N, d]`` (q_norm / k_norm applied), as its forward."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend_project(attn: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    attn_mask: Tensor | None = None) -> Tensor:
    """The rest of timm ``Attention.forward`` (fused path): SDPA at timm's default scale, then
    :func:`_merge_project`: the same operations in the same order, so an unchanged block gives
    timm's output bit for bit."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return _merge_project(attn, x, o)


def _merge_project(attn: nn.Module, x: Tensor, o: Tensor) -> Tensor:
    """timm ``Attention``'s output of the heads ``o`` ``[B, H, N, d]`` (x: its input, for the
    gate): heads merged, ``norm``, gate, ``proj``, ``proj_drop``."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    o = attn.norm(o.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _no_mask(method: str, attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(f"effkern.convert({method!r}): attn_mask / is_causal are not supported: the method "
                         "changes the token count from block to block, so a mask for the input tokens "
                         "would not fit the later blocks")


# --------------------------------------------------------------------------------------------
# What the blocks of one converted model share: the method, its settings, per-forward state
# --------------------------------------------------------------------------------------------


@dataclass
class Shared:
    """``model.effkern``, also held by every converted block (no reference back to the model).

    ``method`` and ``config`` (the method's settings, per layer where they vary); ``depth`` and
    ``prefix`` (the model's block count and prefix tokens: class, distillation); per forward:
    ``call`` (the overrides given to ``model(x, **overrides)``), ``size`` (ToMe's token sizes
    at the input of block i; absent: all ones), ``kept`` (patch tokens left after block i),
    ``extra`` (a method's own: DynamicViT's decisions). ``modules``: what the method added to
    the model (DynamicViT's predictors), by the names listed in ``added_parameters``."""

    method: str
    config: dict
    depth: int
    prefix: int
    modules: tuple = ()
    added_parameters: tuple[str, ...] = ()
    call: dict = field(default_factory=dict)
    size: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.size.clear()
        self.kept.clear()
        self.extra.clear()

    def __deepcopy__(self, memo):
        # the settings and added modules, not one forward's state (non-leaf tensors do not copy)
        return Shared(self.method, copy.deepcopy(self.config, memo), self.depth, self.prefix,
                      copy.deepcopy(self.modules, memo), self.added_parameters)


def _reset_state(module: nn.Module, args) -> None:
    module.effkern.reset()


class _ConvertedViT:
    """Mixin placed in front of the model's own class by :func:`convert`.

    ``forward``, ``forward_features`` and ``forward_intermediates`` accept the method's per-call
    overrides as keywords (ToMe: ``r``; EViT: ``keep_rate``, ``tokens``), which hold for that
    call (nested calls inherit them); ``forward_intermediates`` refuses the NCHW output format
    when tokens are reduced (there is no H x W grid left), with a clear error."""

    def _with_overrides(self, fn: Callable, x: Tensor, *args, needs_grid: bool = False, **kwargs):
        shared = self.effkern
        method = METHODS[shared.method]
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in method.per_call}
        saved = shared.call
        shared.call = {**saved, **overrides}
        try:
            if needs_grid and kwargs.get("output_fmt", "NCHW") == "NCHW" and method.reduces_tokens(shared):
                raise ValueError(f"forward_intermediates: output_fmt='NCHW' needs the full token grid, but "
                                 f"{shared.method!r} reduces tokens here; use output_fmt='NLC' (each "
                                 "intermediate then has the token count of its depth)")
            return fn(x, *args, **kwargs)
        finally:
            shared.call = saved

    def forward(self, x: Tensor, *args, **kwargs):
        return self._with_overrides(super().forward, x, *args, **kwargs)

    def forward_features(self, x: Tensor, *args, **kwargs):
        return self._with_overrides(super().forward_features, x, *args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        return self._with_overrides(super().forward_intermediates, x, *args, needs_grid=True, **kwargs)


_CONVERTED_CLASSES: dict[tuple[type, type], type] = {}


def _converted_class(cls: type, mixin: type, prefix: str) -> type:
    key = (cls, mixin)
    if key not in _CONVERTED_CLASSES:
        _CONVERTED_CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CONVERTED_CLASSES[key]


# --------------------------------------------------------------------------------------------
# ToMe (facebookresearch/ToMe, tome/patch/timm.py)
# --------------------------------------------------------------------------------------------


def tome_schedule(num_layers: int, r: int | Sequence[int] | tuple[int, float]) -> list[int]:
    """ToMe's ``parse_r``: r tokens merged per layer. An int: the same r at every layer; a list:
    r per layer (padded with zeros); a tuple ``(r, inflect)``: from ``int(r (1 - inflect))`` to
    ``2 r - that``, linearly over the layers (inflect -1: ToMe's decreasing schedule)."""
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"ToMe: r must be an int >= 0, a list of them or (r, inflect), got {r!r}")
    if not -1 <= inflect <= 1:
        raise ValueError(f"ToMe: the inflection must be in [-1, 1], got {inflect!r}")
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(lo + step * i) for i in range(num_layers)]


class ToMeBlockMixin:
    """ToMe's ``ToMeBlock`` on a timm Block: attention (proportional when ``prop_attn``: log
    token size as a per-key bias of SDPA), then ``tome_merge`` with this layer's r, then the MLP.
    With ``trace_source`` the sources are tracked as ToMe's ``_tome_info["source"]``: after a
    forward, ``model.effkern.extra["source"]`` ``[B, N_out, N_in]`` (0 / 1) says which input
    tokens each output token holds.
    Differs from the published block in applying ls1 / ls2 (LayerScale, Identity unless the
    model has it, e.g. DeiT-III)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _no_mask("tome", attn_mask, is_causal)
        shared, i = self.effkern, self.effkern_layer
        cfg = shared.config
        size = shared.size.get(i)
        r = tome_schedule(shared.depth, shared.call["r"])[i] if "r" in shared.call else cfg["r_per_layer"][i]
        h = self.norm1(x)
        q, k, v = _qkv_heads(self.attn, h)
        bias = None
        if cfg["prop_attn"] and size is not None:
            bias = size[..., 0].log().to(q.dtype)[:, None, None, :]
        x = x + self.drop_path1(self.ls1(_attend_project(self.attn, h, q, k, v, bias)))
        if cfg["trace_source"]:
            x, size, source = tome_merge(x, size, k.mean(1), r, cfg["class_token"], distill_token=cfg["distill_token"],
                                         source=shared.extra.get("source_in", {}).get(i), trace_source=True)
            shared.extra.setdefault("source_in", {})[i + 1] = source
            shared.extra["source"] = source
        else:
            x, size = tome_merge(x, size, k.mean(1), r, cfg["class_token"], distill_token=cfg["distill_token"])
        shared.size[i + 1] = size
        shared.kept[i] = x.shape[1] - shared.prefix
        return _mlp_residual(self, x)


def _tome_configure(model: nn.Module, r: int | Sequence[int] | tuple[int, float] = 0,
                    prop_attn: bool = True, trace_source: bool = False) -> dict:
    class_token = getattr(model, "cls_token", None) is not None
    distill_token = getattr(model, "dist_token", None) is not None
    if model.num_prefix_tokens != int(class_token) + int(distill_token):
        raise NotImplementedError(f"effkern.convert('tome'): {model.num_prefix_tokens} prefix tokens (register "
                                  "tokens?); ToMe protects a class and a distillation token only")
    return {"r": r, "r_per_layer": tome_schedule(len(model.blocks), r), "prop_attn": bool(prop_attn),
            "trace_source": bool(trace_source), "class_token": class_token, "distill_token": distill_token}


# --------------------------------------------------------------------------------------------
# EViT (youweiliang/evit, evit.py)
# --------------------------------------------------------------------------------------------


def evit_keep_rate_schedule(iters: int, epoch: int, warmup_epochs: int, total_epochs: int, iters_per_epoch: int,
                            base_keep_rate: float = 0.5, max_keep_rate: float = 1.0) -> float:
    """EViT's keep-rate warm-up (``helpers.adjust_keep_rate``): 1 for the first ``warmup_epochs``
    (EViT: ``shrink_start_epoch``), then a cosine from ``max_keep_rate`` down to
    ``base_keep_rate`` until ``total_epochs`` (EViT: start + ``shrink_epochs``), then
    ``base_keep_rate``. ``iters``: the global iteration count."""
    if epoch < warmup_epochs:
        return 1.0
    if epoch >= total_epochs:
        return base_keep_rate
    total = iters_per_epoch * (total_epochs - warmup_epochs)
    done = iters - iters_per_epoch * warmup_epochs
    return base_keep_rate + (max_keep_rate - base_keep_rate) * (math.cos(done / total * math.pi) + 1) * 0.5


class EViTBlockMixin:
    """EViT's ``Block`` on a timm Block: attention, then (at a pruning layer) the patch tokens
    ranked by the CLS attention (``cls_attention``, no N x N map) and the best
    ``ceil(keep_rate (N - P))`` kept (P prefix tokens), the others fused into one token with
    ``fuse_token``; then the MLP. Differs from the published block in protecting every prefix
    token (EViT ranks the distillation token like a patch token) and applying ls1 / ls2."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _no_mask("evit", attn_mask, is_causal)
        shared, i = self.effkern, self.effkern_layer
        cfg, prefix, n = shared.config, shared.prefix, x.shape[1]
        keep_rate = _per_layer(shared.call.get("keep_rate"), i, shared.depth)
        tokens = _per_layer(shared.call.get("tokens"), i, shared.depth)
        block_rate = cfg["keep_rate_per_layer"][i]
        if keep_rate is None:
            keep_rate = block_rate
        # As EViT's Attention: a pruning layer (its own rate < 1) prunes when the call's rate is
        # < 1; ``tokens`` sets the count at any layer.
        left = n - prefix
        if tokens is not None:
            left = tokens
        elif block_rate < 1 and keep_rate < 1:
            left = evit_left_tokens(n - prefix + 1, keep_rate)
        if isinstance(left, bool) or not isinstance(left, int) or not 1 <= left <= n - prefix:
            raise ValueError(f"EViT: layer {i} would keep {left!r} of its {n - prefix} patch tokens; "
                             "at least one must be kept")
        h = self.norm1(x)
        q, k, v = _qkv_heads(self.attn, h)
        x = x + self.drop_path1(self.ls1(_attend_project(self.attn, h, q, k, v)))
        if left < n - prefix:
            scores = evit_scores(q, k, self.attn.scale)
            # evit_reorganize keeps token 0 (CLS) and ranks the others: the other prefix tokens
            # (distillation) are kept first by a score of +inf
            if prefix > 1:
                scores = torch.cat([scores.new_full((scores.shape[0], prefix - 1), math.inf), scores[:, prefix - 1:]], 1)
            x = evit_reorganize(x, scores, keep_rate, cfg["fuse_token"], num_keep=left + prefix - 1)
        shared.kept[i] = x.shape[1] - prefix
        return _mlp_residual(self, x)


def _listed(value, depth: int = 1) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value] * depth


def _per_layer(value, i: int, depth: int):
    if isinstance(value, (tuple, list)):
        if len(value) != depth:
            raise ValueError(f"EViT: a per-layer keep_rate / tokens needs {depth} values, got {len(value)}")
        return value[i]
    return value


def _evit_configure(model: nn.Module, keep_rate: float = 0.7, drop_loc: Sequence[int] = (3, 6, 9),
                    fuse_token: bool = True) -> dict:
    depth = len(model.blocks)
    _check_rate("evit", "keep_rate", keep_rate)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("effkern.convert('evit'): EViT ranks tokens by the class token's attention; "
                         "this model has no class token")
    bad = [i for i in drop_loc if not 0 <= i < depth]
    if bad:
        raise ValueError(f"effkern.convert('evit'): drop_loc {bad} outside the model's {depth} layers")
    rates = [keep_rate if i in drop_loc else 1.0 for i in range(depth)]
    return {"keep_rate": keep_rate, "drop_loc": tuple(drop_loc), "fuse_token": bool(fuse_token),
            "keep_rate_per_layer": rates}


# --------------------------------------------------------------------------------------------
# DynamicViT (raoyongming/DynamicViT, models/dyvit.py and losses.py)
# --------------------------------------------------------------------------------------------


class DynamicViTBlockMixin:
    """DynamicViT's ``VisionTransformerDiffPruning.forward``, spread over the blocks.

    At a pruning location p the predictor ``model.score_predictor[p]`` scores the patch tokens
    (given the previous decisions). In training (all tokens stay): hard keep decisions by
    straight-through Gumbel-softmax, times the previous ones, become the attention policy of
    this and the following blocks (``masked_softmax``, DynamicViT's ``softmax_with_policy``;
    every training block attends under the policy, all ones before the first location). At
    inference: the ``int(M0 * ratio_p)`` best patch tokens are kept (``topk_tokens`` +
    ``token_gather``; M0 the patch count at the input) and the others are gone. Differences
    from the published code: LayerScale applied where the model has it; ``attn_drop`` applied
    (DynamicViT never does; identical at 0, its setting); ties to the lower position."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _no_mask("dynamicvit", attn_mask, is_causal)
        shared, i = self.effkern, self.effkern_layer
        cfg, st = shared.config, shared.extra
        b = x.shape[0]
        if i == 0:  # the published forward's initial decision and policy (all ones)
            st["m0"] = x.shape[1] - 1
            st["decision_in"] = {0: x.new_ones(b, st["m0"], 1)}
            st["policy_in"] = {0: x.new_ones(b, st["m0"] + 1, 1)}
            st["decisions"] = {}
        decision, policy = st["decision_in"][i], st["policy_in"][i]
        if i in cfg["pruning_loc"]:
            p = cfg["pruning_loc"].index(i)
            pred = shared.modules[p](x[:, 1:], decision).reshape(b, -1, 2)
            if self.training:
                decision = F.gumbel_softmax(pred, hard=True)[:, :, 0:1] * decision
                st["decisions"][p] = decision.reshape(b, st["m0"])
                policy = torch.cat([decision.new_ones(b, 1, 1), decision], 1)
            else:
                x, keep = dynamicvit_keep(x, pred[:, :, 0], int(st["m0"] * cfg["token_ratio"][p]))
                decision = dynamicvit_keep_decisions(decision, keep)
        st["decision_in"][i + 1], st["policy_in"][i + 1] = decision, policy
        h = self.norm1(x)
        q, k, v = _qkv_heads(self.attn, h)
        if self.training:
            out = _merge_project(self.attn, h, dynamicvit_attention(q, k, v, policy, self.attn.scale, self.attn.attn_drop))
        else:
            out = _attend_project(self.attn, h, q, k, v)
        x = x + self.drop_path1(self.ls1(out))
        shared.kept[i] = x.shape[1] - 1
        return _mlp_residual(self, x)


def _layer_indices(method: str, name: str, values: Sequence[int], depth: int) -> tuple[int, ...]:
    """Increasing block indices in [0, depth), checked."""
    values = tuple(int(i) for i in values)
    if sorted(set(values)) != list(values) or not all(0 <= i < depth for i in values):
        raise ValueError(f"effkern.convert({method!r}): {name} must be increasing layer indices in [0, {depth}), "
                         f"got {values}")
    return values


def _check_rate(method: str, name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"effkern.convert({method!r}): {name} must be in (0, 1], got {value!r}")


def _dynamicvit_configure(model: nn.Module, keep_ratio: float = 0.7, pruning_loc: Sequence[int] = (3, 6, 9),
                          token_ratio: Sequence[float] | None = None) -> dict:
    depth = len(model.blocks)
    if model.num_prefix_tokens != 1 or getattr(model, "cls_token", None) is None:
        raise NotImplementedError("effkern.convert('dynamicvit'): needs exactly one prefix token, the class token "
                                  f"(this model has {model.num_prefix_tokens}); DynamicViT's published models have no other")
    pruning_loc = _layer_indices("dynamicvit", "pruning_loc", pruning_loc, depth)
    if token_ratio is None:
        _check_rate("dynamicvit", "keep_ratio", keep_ratio)
        token_ratio = [keep_ratio ** (p + 1) for p in range(len(pruning_loc))]
    token_ratio = [float(r) for r in token_ratio]
    if len(token_ratio) != len(pruning_loc) or not all(0 <= r <= 1 for r in token_ratio):
        raise ValueError(f"effkern.convert('dynamicvit'): token_ratio needs one value in [0, 1] per pruning "
                         f"location, got {token_ratio}")
    return {"keep_ratio": keep_ratio, "pruning_loc": pruning_loc, "token_ratio": token_ratio}


def _dynamicvit_modules(model: nn.Module, cfg: dict) -> nn.ModuleList:
    """The predictors, ``model.score_predictor`` (DynamicViT's name: its checkpoints load), each
    initialised as DynamicViT's ``_init_weights`` does (truncated normal 0.02 for Linear weights,
    zero biases, unit LayerNorm)."""
    dim = model.blocks[0].norm1.normalized_shape[0]
    ref = next(model.parameters())
    predictors = nn.ModuleList([DynamicViTPredictor(dim) for _ in cfg["pruning_loc"]])
    for m in predictors.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    model.score_predictor = predictors.to(device=ref.device, dtype=ref.dtype)
    return model.score_predictor


class DynamicViTLoss(nn.Module):
    """DynamicViT's training loss for DeiT (``losses.DistillDiffPruningLoss_dynamic`` with the
    settings of its ``main.py`` for DeiT):

        clf_weight * CE(logits, labels)
        + ratio_weight * mean_p mean_batch((mean_tokens(decision_p) - token_ratio_p)^2)
        + distill_weight * KL(teacher logits || logits)
        + distill_weight * MSE(kept tokens, the teacher's tokens)

    ``teacher``: the dense timm model (eval, no grad), giving its logits and its final normed
    patch tokens. ``forward(images, logits, labels, model)`` reads the converted model's last
    training forward (``model.effkern.extra``: the decisions and the final normed tokens)."""

    def __init__(self, teacher: nn.Module, token_ratio: Sequence[float], *, clf_weight: float = 1.0,
                 ratio_weight: float = 2.0, distill_weight: float = 0.5, mse_token: bool = True,
                 base_criterion: nn.Module | None = None):
        super().__init__()
        self.teacher = teacher
        self.token_ratio = list(token_ratio)
        self.clf_weight, self.ratio_weight, self.distill_weight = clf_weight, ratio_weight, distill_weight
        self.mse_token = mse_token
        self.base_criterion = base_criterion if base_criterion is not None else nn.CrossEntropyLoss()

    def forward(self, images: Tensor, logits: Tensor, labels: Tensor, model: nn.Module) -> Tensor:
        st = model.effkern.extra
        if "normed" not in st:
            raise RuntimeError("DynamicViTLoss: run the converted model in training mode first")
        decisions = [st["decisions"][p] for p in sorted(st["decisions"])]
        ratio_loss = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, self.token_ratio))
        with torch.no_grad():
            feats = self.teacher.forward_features(images)
            cls_t, token_t = self.teacher.forward_head(feats), feats[:, self.teacher.num_prefix_tokens:]
        cls_kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(cls_t, dim=-1), reduction="batchmean",
                          log_target=True)
        token_pred, mask = st["normed"][:, model.effkern.prefix:], st["decision_in"][model.effkern.depth]
        b, n, c = token_pred.shape
        keep = mask.reshape(b * n) > 0.5
        if mask.sum() < 0.1:
            token_loss = token_pred.new_zeros(1)
        else:
            tp, tt = token_pred.reshape(b * n, c)[keep], token_t.reshape(b * n, c)[keep]
            if self.mse_token:
                token_loss = (tp - tt).pow(2).mean()
            else:
                token_loss = F.kl_div(F.log_softmax(tp, dim=-1), F.log_softmax(tt, dim=-1), reduction="batchmean",
                                      log_target=True)
        return (self.clf_weight * self.base_criterion(logits, labels)
                + self.ratio_weight * ratio_loss / len(self.token_ratio)
                + self.distill_weight * cls_kl + self.distill_weight * token_loss)


def _capture_tokens(module: nn.Module, args, out: Tensor) -> None:
    """model.norm's forward hook: the training losses (DynamicViT's, IdleViT's) need the final
    normed tokens."""
    if module.training:
        module.effkern.extra["normed"] = out


# --------------------------------------------------------------------------------------------
# IdleViT (Ackesnal/IdleViT, vit.py and losses.py)
# --------------------------------------------------------------------------------------------


class IdleViTBlockMixin:
    """IdleViT's ``Block`` at an idle layer (others: timm's own forward).

    The class token and the ``int(M0 * ratio)`` patch tokens whose CLS attention logits (head
    mean) are highest are computed; the others idle: they skip the layer unchanged. Inference
    (``test=True`` in IdleViT): the selected tokens are gathered, run through timm's block and
    scattered back (``idle_select_compute_scatter``). Training: every token is computed, the
    idle keys get a bias of -1e5 in the attention and the idle tokens' residuals are masked out,
    as IdleViT's ``softmax_with_top_attn``; the head-mean logits and the keep mask are kept for
    :class:`IdleViTLoss`'s token cut loss. Differences from the published code: LayerScale and
    attention dropout applied where the model has them; ties to the lower position."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        shared, i = self.effkern, self.effkern_layer
        cfg = shared.config
        if i not in cfg["idle_layers"]:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        _no_mask("idlevit", attn_mask, is_causal)
        ratio = cfg["keep_ratios"][cfg["idle_layers"].index(i)]
        num_keep = int((x.shape[1] - 1) * ratio)
        shared.kept[i] = num_keep
        if not self.training:
            plain = super().forward
            return idle_select_compute_scatter(x, idlevit_scores(self, x), num_keep, lambda t: plain(t))
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = _qkv_heads(self.attn, h)
        mask = idlevit_keep_mask(q, k, self.attn.scale, num_keep).to(x.dtype)
        bias = ((1.0 - mask) * -100000.0).reshape(b, 1, 1, n).to(q.dtype)
        x = x + self.drop_path1(self.ls1(_attend_project(self.attn, h, q, k, v, bias))) * mask
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) * mask
        # for the token cut loss: the head-mean of the scaled logits, one [B, N, N] product
        d = q.shape[-1]
        qh = q.transpose(1, 2).reshape(b, n, -1)
        kh = k.transpose(1, 2).reshape(b, n, -1)
        shared.extra.setdefault("logits", {})[i] = (qh @ kh.transpose(1, 2)) * (self.attn.scale / (qh.shape[-1] // d))
        shared.extra.setdefault("masks", {})[i] = mask
        return x


def _idlevit_configure(model: nn.Module, keep_rate: float = 0.7, idle_layers: Sequence[int] | None = None,
                       keep_ratios: Sequence[float] | None = None) -> dict:
    depth = len(model.blocks)
    if model.num_prefix_tokens != 1 or getattr(model, "cls_token", None) is None:
        raise NotImplementedError("effkern.convert('idlevit'): needs exactly one prefix token, the class token "
                                  f"(this model has {model.num_prefix_tokens})")
    idle_layers = _layer_indices("idlevit", "idle_layers", range(4, depth) if idle_layers is None else idle_layers,
                                 depth)
    if keep_ratios is None:
        _check_rate("idlevit", "keep_rate", keep_rate)
        # IdleViT's main.py: keep_rate^1, ^2, ^3, each for a third of the idle layers
        per = math.ceil(len(idle_layers) / 3)
        keep_ratios = [keep_rate ** (j // per + 1) for j in range(len(idle_layers))]
    keep_ratios = [float(r) for r in keep_ratios]
    if len(keep_ratios) != len(idle_layers) or not all(0 <= r <= 1 for r in keep_ratios):
        raise ValueError(f"effkern.convert('idlevit'): keep_ratios needs one value in [0, 1] per idle layer, "
                         f"got {keep_ratios}")
    return {"keep_rate": keep_rate, "idle_layers": idle_layers, "keep_ratios": keep_ratios}


class IdleViTLoss(nn.Module):
    """IdleViT's training loss (``losses.IdleViTTotalLoss``, defaults of its ``main.py``):

        CE(logits, labels) + cut_weight * sum_l cut_l / L
        + distill_weight * KL(teacher logits || logits)
        + 100 distill_weight * MSE(normalize(CLS feature), normalize(teacher's)),

    the token cut loss of idle layer l (``cutloss_type`` "both"): with W the row softmax of the
    head-mean logits and m the keep mask, MSE(sum_j |m_i - m_j| W_ij [j > 0], 0) +
    MSE(sum_j m_i m_j W_ij, m_i). The distillation terms only with ``teacher`` (IdleViT's
    ``--distill``; off by default). ``forward(images, logits, labels, model)`` reads the
    converted model's last training forward. One departure: IdleViT's loop deletes list
    entries while enumerating them, so only every other idle layer enters its cut loss; here
    every idle layer does (the sum is still divided by the number of idle layers)."""

    def __init__(self, teacher: nn.Module | None = None, *, cut_weight: float = 20.0, distill_weight: float = 5.0,
                 cutloss_type: str = "both", base_criterion: nn.Module | None = None):
        super().__init__()
        if cutloss_type not in ("both", "intra", "inter", "none"):
            raise ValueError(f"IdleViTLoss: cutloss_type must be both, intra, inter or none, got {cutloss_type!r}")
        self.teacher = teacher
        self.cut_weight, self.distill_weight, self.cutloss_type = cut_weight, distill_weight, cutloss_type
        self.base_criterion = base_criterion if base_criterion is not None else nn.CrossEntropyLoss()

    def cut_loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = mask.shape
        w = logits.softmax(dim=-1)
        m = mask.reshape(b, n)
        loss = logits.new_zeros(())
        if self.cutloss_type in ("both", "inter"):
            diff = (m[:, :, None] - m[:, None, :]).abs()
            diff[:, :, 0] = 0.0
            loss = loss + F.mse_loss((diff * w).sum(-1), torch.zeros_like(m))
        if self.cutloss_type in ("both", "intra"):
            loss = loss + F.mse_loss(((m[:, :, None] * m[:, None, :]) * w).sum(-1), m)
        return loss

    def forward(self, images: Tensor, logits: Tensor, labels: Tensor, model: nn.Module) -> Tensor:
        shared = model.effkern
        st = shared.extra
        if "normed" not in st:
            raise RuntimeError("IdleViTLoss: run the converted model in training mode first")
        layers = shared.config["idle_layers"]
        loss = self.base_criterion(logits, labels)
        if self.cutloss_type != "none":
            cut = sum(self.cut_loss(st["logits"][i], st["masks"][i]) for i in layers)
            loss = loss + self.cut_weight * cut / len(layers)
        if self.teacher is not None:
            with torch.no_grad():
                feats = self.teacher.forward_features(images)
                cls_t, token_t = self.teacher.forward_head(feats), self.teacher.forward_head(feats, pre_logits=True)
            token_s = model.forward_head(st["normed"], pre_logits=True)
            loss = loss + self.distill_weight * F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(cls_t, dim=-1),
                                                         reduction="batchmean", log_target=True)
            loss = loss + 100 * self.distill_weight * F.mse_loss(F.normalize(token_s), F.normalize(token_t))
        return loss


# --------------------------------------------------------------------------------------------
# The blocks the module-replacing methods convert: a ViT's, or a PVTv2's (timm pvt_v2) stages'
# --------------------------------------------------------------------------------------------

# ShiftAddViT's PVTv2 (pvt/pvt_v2.py): binary-hash attention in stages 1-3, MSA in the last one
PVT_HASH_STAGES = (0, 1, 2)


def _is_pvt(model: nn.Module) -> bool:
    """timm's ``PyramidVisionTransformerV2`` (its module is loaded whenever such a model exists)."""
    pvt = sys.modules.get("timm.models.pvt_v2")
    return pvt is not None and isinstance(model, pvt.PyramidVisionTransformerV2)


def _blocks(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, stage, block) of every block in forward order; ``layers`` index this list. ViT:
    ``blocks.i`` (stage 0); PVTv2: ``stages.s.blocks.j``."""
    if _is_pvt(model):
        return [(f"stages.{s}.blocks.{j}", s, blk) for s, stage in enumerate(model.stages)
                for j, blk in enumerate(stage.blocks)]
    return [(f"blocks.{i}", 0, blk) for i, blk in enumerate(model.blocks)]


def _stage_layers(method: str, model: nn.Module, layers: Sequence[int] | None, stages: Sequence[int] | None,
                  default_stages: Sequence[int] | None) -> Sequence[int] | None:
    """``layers`` (block indices, checked by the caller) as given, or those of the blocks of
    ``stages`` (PVTv2 only; when neither is given: ``default_stages``, None: every block)."""
    pvt = _is_pvt(model)
    if stages is not None and not pvt:
        raise ValueError(f"effkern.convert({method!r}): stages selects the stages of a PVTv2; a "
                         f"{type(model).__name__} takes layers")
    if stages is not None and layers is not None:
        raise ValueError(f"effkern.convert({method!r}): pass layers or stages, not both")
    if layers is not None or not pvt or (stages is None and default_stages is None):
        return layers
    n = len(model.stages)
    stages = tuple(int(s) for s in (default_stages if stages is None else stages))
    if not all(0 <= s < n for s in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"effkern.convert({method!r}): stages must be distinct stage indices in [0, {n}), got {stages}")
    return tuple(i for i, (_, s, _) in enumerate(_blocks(model)) if s in stages)


# --------------------------------------------------------------------------------------------
# EcoFormer / ShiftAddViT: binary-hash attention (effkern.nn.BinaryHashAttention)
# --------------------------------------------------------------------------------------------


def _hash_configure(form: str):
    def configure(model: nn.Module, nbits: int = 16, num_anchors: int = 25, hash: str = "ksh",
                  dwconv: bool | None = None, layers: Sequence[int] | None = None,
                  stages: Sequence[int] | None = None) -> dict:
        depth = len(_blocks(model))
        layers = _stage_layers(form, model, layers, stages, default_stages=PVT_HASH_STAGES)
        layers = tuple(range(depth)) if layers is None else tuple(int(i) for i in layers)
        if not all(0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"effkern.convert({form!r}): layers must be distinct indices in [0, {depth}), got {layers}")
        return {"form": form, "nbits": nbits, "num_anchors": num_anchors, "hash": hash,
                "dwconv": (form == "shiftadd") if dwconv is None else bool(dwconv), "layers": layers}
    return configure


def _hash_attentions(model: nn.Module, cfg: dict, dry_run: bool = False) -> tuple[str, ...]:
    """Each listed block's attention replaced by BinaryHashAttention.from_attention (timm's
    weights; PVTv2: PVTBinaryHashAttention, ShiftAddViT's PVTv2 form). Returns the names of the
    parameters this adds, the dwconv weights (ShiftAddViT); ``dry_run``: only that, the model
    untouched."""
    blocks = _blocks(model)
    added = tuple(f"{blocks[i][0]}.attn.dwconv.weight" for i in cfg["layers"]) if cfg["dwconv"] else ()
    if dry_run:
        return added
    cls = PVTBinaryHashAttention if _is_pvt(model) else BinaryHashAttention
    for i in cfg["layers"]:
        blk = blocks[i][2]
        blk.attn = cls.from_attention(blk.attn, form=cfg["form"], nbits=cfg["nbits"], num_anchors=cfg["num_anchors"],
                                      hash=cfg["hash"], dwconv=cfg["dwconv"])
    return added


def binary_hash_attentions(model: nn.Module) -> dict[str, BinaryHashAttention]:
    """The binary-hash attentions of a converted model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryHashAttention)}


class _Captured(Exception):
    pass


@torch.no_grad()
def fit_hash(model: nn.Module, images: Tensor, *, progress: bool = True, generator: torch.Generator | None = None,
             **fit_options) -> nn.Module:
    """Fit the KSH hash of every binary-hash attention of ``model`` (``effkern.convert(model,
    "ecoformer" / "shiftadd")``) to calibration ``images``, layer by layer: each attention is
    fitted to its inputs with the earlier layers already hashed, as the model will run
    (:meth:`~effkern.nn.BinaryHashAttention.fit_hash`; ``fit_options``: topk, iterations, lr,
    momentum, max_tokens). A progress bar over the layers (tqdm when installed) unless
    ``progress=False``. Returns the model (in the training mode it had)."""
    attns = binary_hash_attentions(model)
    if not attns:
        raise ValueError("fit_hash: the model has no binary-hash attention (effkern.convert(model, 'ecoformer'))")
    was_training = model.training
    model.eval()
    try:
        for name, attn in _progress(list(attns.items()), "fitting the binary hash", progress):
            captured = {}

            def grab(module, args, kwargs, captured=captured):
                captured["x"] = args[0]
                raise _Captured

            handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model(images)
            except _Captured:
                pass
            finally:
                handle.remove()
            attn.fit_hash(captured["x"], generator=generator, **fit_options)
    finally:
        model.train(was_training)
    return model


def hash_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The fitted hashes of a converted model, ``{"<attention>.<buffer>": tensor}``: they are
    data-fitted buffers outside ``state_dict()`` (so that timm checkpoints load strictly); save
    them beside it: ``torch.save({"model": model.state_dict(), "hash": hash_state_dict(model)})``."""
    return {f"{name}.{k}": v for name, attn in binary_hash_attentions(model).items()
            for k, v in attn.hash_state_dict().items()}


def load_hash_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore :func:`hash_state_dict`'s output (every attention's keys, exactly)."""
    attns = binary_hash_attentions(model)
    expected = set(hash_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"load_hash_state_dict: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                       f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for name, attn in attns.items():
        prefix = name + "."
        attn.load_hash_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        def report(items=items):
            for n, item in enumerate(items):
                print(f"{desc}: {n + 1}/{len(items)}", file=sys.stderr, flush=True)
                yield item
        return report()
    return tqdm(items, desc=desc)


# --------------------------------------------------------------------------------------------
# Shift layers (DeepShift / ShiftAddViT): the blocks' linear layers with power-of-two weights
# --------------------------------------------------------------------------------------------

SHIFT_TARGETS = {"qkv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}
# timm's PVTv2: separate q and kv linears
PVT_SHIFT_TARGETS = {"q": "attn", "kv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}


def _shift_targets(model: nn.Module) -> dict[str, str]:
    return PVT_SHIFT_TARGETS if _is_pvt(model) else SHIFT_TARGETS


def _shift_configure(model: nn.Module, mode: str = "q", weight_bits: int = 5, fixed_point: bool = True,
                     targets: Sequence[str] = ("fc1", "fc2"), layers: Sequence[int] | None = None,
                     moe: bool = False, capacity: float | None = None, stages: Sequence[int] | None = None) -> dict:
    depth = len(_blocks(model))
    if mode not in ("ps", "q"):
        raise ValueError(f"effkern.convert('shift'): mode must be 'ps' or 'q', got {mode!r}")
    targets, known = tuple(targets), tuple(_shift_targets(model))
    bad = [t for t in targets if t not in known]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"effkern.convert('shift'): targets must be distinct names among {known} "
                         f"({type(model).__name__}), got {targets}")
    layers = _stage_layers("shift", model, layers, stages, default_stages=None)
    layers = _layer_indices("shift", "layers", range(depth) if layers is None else layers, depth)
    if capacity is not None and not moe:
        raise ValueError("effkern.convert('shift'): capacity is the mixture of experts' (moe=True)")
    return {"mode": mode, "weight_bits": weight_bits, "fixed_point": bool(fixed_point), "targets": targets,
            "layers": layers, "moe": bool(moe), "capacity": capacity}


def _to_shift(linear: nn.Module, cfg: dict) -> ShiftLinear:
    return ShiftLinear.from_linear(linear, mode=cfg["mode"], weight_bits=cfg["weight_bits"],
                                   fixed_point=cfg["fixed_point"])


def _shift_names(linear: nn.Linear, mode: str) -> list[str]:
    """A ShiftLinear's parameter names (from_linear of ``linear``)."""
    return ["shift", "sign"] * (mode == "ps") + ["weight"] * (mode == "q") + ["bias"] * (linear.bias is not None)


def _shift_linears(model: nn.Module, cfg: dict, dry_run: bool = False) -> tuple[str, ...]:
    """Each target linear of each listed block replaced by ShiftLinear.from_linear (DeepShift's
    conversion); with ``moe``, each listed block's MLP by a ShiftAddMoE of timm's MLP (multiply
    expert) and a copy of it with shift layers (shift expert); on PVTv2 (whose MLP has a
    depthwise convolution over the token grid between fc1 and fc2, which per-token routing
    cannot split) fc1 and fc2 each become a ShiftAddMoE of timm's linear and its shift copy,
    as ShiftAddViT's PVT code (``Mlp_FMoE``) does. Returns the names of the parameters this adds
    (mode "ps": shift and sign in place of weight; mode "q" keeps timm's names; the MoE: every
    parameter of it, timm's names move under ``experts``); ``dry_run``: only that."""
    blocks, pvt, where = _blocks(model), _is_pvt(model), _shift_targets(model)
    added = []
    for i in cfg["layers"]:
        name, _, blk = blocks[i]
        if cfg["moe"] and pvt:
            for t in ("fc1", "fc2"):
                linear = getattr(blk.mlp, t)
                added += [f"{name}.mlp.{t}.{n}" for n in ("w_gate", "w_noise")]
                added += [f"{name}.mlp.{t}.experts.0.{n}" for n, _ in linear.named_parameters()]
                added += [f"{name}.mlp.{t}.experts.1.{n}" for n in _shift_names(linear, cfg["mode"])]
                if not dry_run:
                    moe = ShiftAddMoE(linear, _to_shift(linear, cfg), linear.in_features, out_dim=linear.out_features,
                                      capacity=cfg["capacity"])
                    setattr(blk.mlp, t, moe.to(linear.weight))
        elif cfg["moe"]:
            mlp = blk.mlp
            dim = mlp.fc1.in_features
            names = [f"{name}.mlp.w_gate", f"{name}.mlp.w_noise"]
            names += [f"{name}.mlp.experts.{e}.{n}" for e in (0, 1) for n, _ in mlp.named_parameters()
                      if not (e == 1 and cfg["mode"] == "ps" and n.endswith(".weight") and n.split(".")[0] in ("fc1", "fc2"))]
            if cfg["mode"] == "ps":
                names += [f"{name}.mlp.experts.1.{t}.{w}" for t in ("fc1", "fc2") for w in ("shift", "sign")]
            added += names
            if not dry_run:
                shift = copy.deepcopy(mlp)
                for t in ("fc1", "fc2"):
                    setattr(shift, t, _to_shift(getattr(shift, t), cfg))
                moe = ShiftAddMoE(mlp, shift, dim, out_dim=mlp.fc2.out_features, capacity=cfg["capacity"])
                blk.mlp = moe.to(next(mlp.parameters()))
        for t in cfg["targets"]:
            if cfg["moe"] and t in ("fc1", "fc2"):
                continue  # inside the MoE's shift expert
            parent = getattr(blk, where[t])
            if cfg["mode"] == "ps":
                added += [f"{name}.{where[t]}.{t}.shift", f"{name}.{where[t]}.{t}.sign"]
            if not dry_run:
                setattr(parent, t, _to_shift(getattr(parent, t), cfg))
    return tuple(added)


def moe_loss(model: nn.Module) -> Tensor:
    """The sum of the balance losses of the last forward of every ShiftAddMoE in ``model``
    (``effkern.convert(model, "shift", moe=True)``): add it to the training loss."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, ShiftAddMoE) and m.aux_loss is not None]
    if not losses:
        raise ValueError("moe_loss: no ShiftAddMoE has run a forward in this model")
    return torch.stack([loss.float() for loss in losses]).sum()


def shift_layers(model: nn.Module) -> dict[str, ShiftLinear]:
    """The shift layers of a converted model, by module name (``layer.freeze()`` each for
    inference through effkern.ops.shift_linear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShiftLinear)}


# --------------------------------------------------------------------------------------------
# GPUSQ-ViT: the blocks' linear layers 2:4 sparse with int8 weights and activations
# --------------------------------------------------------------------------------------------


def _sparse24_configure(model: nn.Module, targets: Sequence[str] = ("qkv", "proj", "fc1", "fc2"),
                        layers: Sequence[int] | None = None) -> dict:
    depth = len(model.blocks)
    targets = tuple(targets)
    if not targets or len(set(targets)) != len(targets) or any(t not in SHIFT_TARGETS for t in targets):
        raise ValueError(f"effkern.convert('sparse24_int8'): targets must be distinct names among "
                         f"{tuple(SHIFT_TARGETS)}, got {targets}")
    layers = _layer_indices("sparse24_int8", "layers", range(depth) if layers is None else layers, depth)
    return {"targets": targets, "layers": layers}


def _sparse24_linears(model: nn.Module, cfg: dict, dry_run: bool = False) -> tuple[str, ...]:
    """Each target linear of each listed block replaced by Sparse24Int8Linear.from_linear (pruned
    to 2:4). The layer keeps timm's parameter names (its mask is not in the state dict), so
    this adds no parameters; ``dry_run``: only that."""
    if not dry_run:
        for i in cfg["layers"]:
            blk = model.blocks[i]
            for t in cfg["targets"]:
                parent = getattr(blk, SHIFT_TARGETS[t])
                setattr(parent, t, Sparse24Int8Linear.from_linear(getattr(parent, t)))
    return ()


def sparse24_layers(model: nn.Module) -> dict[str, Sparse24Int8Linear]:
    """The 2:4-sparse int8 layers of a converted model (``effkern.convert(model, "sparse24_int8")``),
    by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Sparse24Int8Linear)}


def freeze_sparse24(model: nn.Module) -> nn.Module:
    """``model.eval()``, then ``freeze()`` every Sparse24Int8Linear: each compresses its weight
    once and runs effkern.ops.sparse24_int8_linear. ``model.train()`` undoes it; freeze again
    after changing weights in eval mode. Returns the model."""
    model.eval()
    for layer in sparse24_layers(model).values():
        layer.freeze()
    return model


# --------------------------------------------------------------------------------------------
# I-ViT: integer-only (effkern.models.IViT), a new model with the timm model's weights
# --------------------------------------------------------------------------------------------


def _ivit_configure(model: nn.Module) -> dict:
    blk = model.blocks[0]
    problems = []
    if model.num_prefix_tokens != 1 or getattr(model, "cls_token", None) is None:
        problems.append(f"{model.num_prefix_tokens} prefix tokens (I-ViT has the class token only)")
    if not isinstance(blk.ls1, nn.Identity):
        problems.append("LayerScale (DeiT-III)")
    if getattr(model, "global_pool", "token") != "token":
        problems.append(f"global_pool={model.global_pool!r} (I-ViT classifies the class token)")
    if not isinstance(blk.attn.q_norm, nn.Identity) or not isinstance(blk.mlp.norm, nn.Identity):
        problems.append("q/k or MLP norms")
    if problems:
        raise NotImplementedError(f"effkern.convert('ivit'): this model has {', '.join(problems)}; I-ViT covers "
                                  "DeiT / ViT without them")
    embed = model.patch_embed
    return {"img_size": tuple(embed.img_size), "patch_size": tuple(embed.patch_size),
            "in_chans": embed.proj.in_channels, "num_classes": model.num_classes,
            "embed_dim": blk.norm1.normalized_shape[0], "depth": len(model.blocks), "num_heads": blk.attn.num_heads,
            "mlp_ratio": blk.mlp.fc1.out_features / blk.norm1.normalized_shape[0],
            "qkv_bias": blk.attn.qkv.bias is not None}


def _ivit_build(model: nn.Module, cfg: dict) -> nn.Module:
    """A new :class:`~effkern.models.IViT` of the same shape with the timm model's weights (the
    quantisers still need their ranges: :func:`calibrate`)."""
    if cfg["img_size"][0] != cfg["img_size"][1] or cfg["patch_size"][0] != cfg["patch_size"][1]:
        raise NotImplementedError("effkern.convert('ivit'): square images and patches only")
    new = IViT(img_size=cfg["img_size"][0], patch_size=cfg["patch_size"][0], in_chans=cfg["in_chans"],
               num_classes=cfg["num_classes"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
               num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"])
    ref = next(model.parameters())
    new.to(device=ref.device)
    new.load_float_state_dict({k: v for k, v in model.state_dict().items()})
    return new.train(model.training)


@torch.no_grad()
def calibrate(model: nn.Module, batches, *, progress: bool = True) -> nn.Module:
    """Set every quantiser's range of an I-ViT model (``effkern.convert(model, "ivit")``) from
    calibration batches of images (train-mode passes, then eval), with a progress bar. A
    quantiser whose range is degenerate (min = max: a constant input) has the scale floor
    1e-8: a ``UserWarning`` names such quantisers, and when a later layer cannot work with it
    (Shiftmax's overflow check) the ValueError names them."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: no calibration batches")

    def degenerate() -> list[str]:
        return [name for name, m in model.named_modules()
                if hasattr(m, "act_scaling_factor") and bool(m.act_scaling_factor.ne(0).all())
                and bool((m.x_min == m.x_max).all())]

    model.train()
    try:
        for images in _progress(batches, "calibrating I-ViT", progress):
            model(images)
    except ValueError as e:  # a degenerate scale downstream (e.g. Shiftmax's overflow check)
        bad = degenerate()
        if not bad:
            raise
        raise ValueError(f"calibrate: degenerate activation range (min = max, scale at its 1e-8 floor) at "
                         f"{', '.join(bad[:5])}, which made a later layer fail: calibrate on more varied "
                         "images") from e
    finally:
        model.eval()
    bad = degenerate()
    if bad:
        warnings.warn(f"calibrate: {len(bad)} quantiser(s) saw a degenerate range (min = max), their scale is the "
                      f"1e-8 floor: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; calibrate on more varied "
                      "images", UserWarning, stacklevel=2)
    return model


# --------------------------------------------------------------------------------------------
# The method table and convert
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    block_mixin: type
    configure: Callable[..., dict]
    per_call: tuple[str, ...]
    reduces_tokens: Callable[[Shared], bool]
    doc: str
    add_modules: Callable[[nn.Module, dict], nn.Module] | None = None
    # modules swapped in place (attention); returns the parameter names it adds (dry_run: only that)
    replace_modules: Callable[..., tuple[str, ...]] | None = None
    # a new model instead of the converted one (I-ViT: every layer changes)
    build: Callable[[nn.Module, dict], nn.Module] | None = None
    # the timm archs given a timm name (None: all of timm_names.ARCHS)
    archs: tuple[str, ...] | None = None
    # also converts timm's PVTv2 (replace_modules over its stages' blocks)
    pvt: bool = False


METHODS: dict[str, Method] = {
    "tome": Method("tome", ToMeBlockMixin, _tome_configure, ("r",),
                   lambda sh: any(tome_schedule(sh.depth, sh.call["r"]) if "r" in sh.call else sh.config["r_per_layer"]),
                   "Token Merging (Bolya et al. 2023): r tokens merged per layer (int, list, or (r, inflect)); "
                   "prop_attn=True. Training-free. Defaults: r=0."),
    "evit": Method("evit", EViTBlockMixin, _evit_configure, ("keep_rate", "tokens"),
                   lambda sh: any(t is not None for t in _listed(sh.call.get("tokens"))) or any(
                       b < 1 and (c is None or c < 1)
                       for b, c in zip(sh.config["keep_rate_per_layer"], _listed(sh.call.get("keep_rate"), sh.depth))),
                   "EViT (Liang et al. 2022): keep_rate of the attentive patch tokens at drop_loc layers "
                   "(0-based), the rest fused into one token. Defaults: keep_rate=0.7, drop_loc=(3, 6, 9), "
                   "fuse_token=True."),
    "dynamicvit": Method("dynamicvit", DynamicViTBlockMixin, _dynamicvit_configure, (),
                         lambda sh: any(r < 1 for r in sh.config["token_ratio"]),
                         "DynamicViT (Rao et al. 2021): predictors at pruning_loc (0-based, (3, 6, 9)) keep "
                         "keep_ratio^1, ^2, ^3 of the patch tokens (keep_ratio 0.7); Gumbel-softmax decisions and "
                         "DynamicViTLoss in training. Adds parameters: convert(..., strict=False).",
                         _dynamicvit_modules),
    "ecoformer": Method("ecoformer", None, _hash_configure("ecoformer"), (), lambda sh: False,
                        "EcoFormer (Liu et al. 2022): binary-hash linear attention at `layers` (all), {-1, +1} codes of "
                        "nbits=16 bits from a KSH hash of num_anchors=25 anchors; fit_hash(model, images) fits it.",
                        None, _hash_attentions),
    "shiftadd": Method("shiftadd", None, _hash_configure("shiftadd"), (), lambda sh: False,
                       "ShiftAddViT (You et al. 2023) attention: binary-hash linear attention with {0, 1} codes "
                       "(additions) plus a depthwise convolution of V (dwconv, which adds parameters: strict=False); "
                       "fit_hash(model, images) fits the hash. PVTv2: stages (0, 1, 2), ShiftAddViT's PVTv2 "
                       "attention (shared q / k, full-resolution values, a 9-tap dwconv per head).",
                       None, _hash_attentions, pvt=True),
    "ivit": Method("ivit", None, _ivit_configure, (), lambda sh: False,
                   "I-ViT (Li and Gu 2023): integer-only inference (Shiftmax, ShiftGELU, I-LayerNorm, dyadic "
                   "requantisation, int8 GEMMs). Returns a NEW model (effkern.models.IViT) with the timm weights; "
                   "calibrate(model, batches) sets its ranges, or fine-tune it (QAT) in train mode.",
                   build=_ivit_build,
                   archs=("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")),
    "shift": Method("shift", None, _shift_configure, (), lambda sh: False,
                    "Shift layers (DeepShift; ShiftAddViT's linear layers): the blocks' `targets` (fc1, fc2; also "
                    "qkv, proj) at `layers` (all) become ShiftLinear, power-of-two weights, mode='q' (DeepShift-Q: "
                    "timm's parameter names, strict loading) or 'ps' (DeepShift-PS: shift and sign parameters, "
                    "strict=False); weight_bits=5, fixed_point=True (ShiftAddViT's 16.16 input and bias); moe=True: "
                    "each MLP a ShiftAddMoE of timm's MLP and its shift copy (strict=False; moe_loss(model) is "
                    "the balance loss), capacity for static shapes. PVTv2: targets among q, kv, proj, fc1, fc2 at "
                    "layers or stages (all); moe=True makes fc1 and fc2 each a ShiftAddMoE.",
                    None, _shift_linears, pvt=True),
    "sparse24_int8": Method("sparse24_int8", None, _sparse24_configure, (), lambda sh: False,
                            "GPUSQ-ViT (Yu et al. 2023): the blocks' `targets` (qkv, proj, fc1, fc2) at `layers` "
                            "(all) become Sparse24Int8Linear: weights pruned to 2:4 (fixed mask) and int8 per "
                            "output channel, activations int8 per token; trains as sparsity-aware QAT "
                            "(straight-through; GPUSQDistillationLoss for distillation); freeze_sparse24(model) "
                            "runs the sparse int8 op. Keeps timm's parameter names (strict loading; a dense "
                            "checkpoint is pruned as it loads).",
                            None, _sparse24_linears),
    "idlevit": Method("idlevit", IdleViTBlockMixin, _idlevit_configure, (), lambda sh: False,
                      "IdleViT (Xu et al. 2023): at idle_layers (0-based, 4..depth-1) only the class token and the "
                      "keep_ratios (keep_rate^1, ^2, ^3 per third; keep_rate 0.7) best patch tokens by CLS attention "
                      "are computed, the others idle unchanged; IdleViTLoss's token cut loss in training."),
}
_PLANNED: tuple[str, ...] = ()


def _check_timm_vit(model: nn.Module) -> None:
    needed = ("blocks", "patch_embed", "_pos_embed", "num_prefix_tokens", "forward_features", "forward_head")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise TypeError(f"effkern.convert: expected a timm VisionTransformer, got {type(model).__name__} "
                        f"(missing {', '.join(missing)})")
    for i, blk in enumerate(model.blocks):
        parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        attn_parts = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim")
        if not all(hasattr(blk, p) for p in parts) or not all(hasattr(blk.attn, p) for p in attn_parts):
            raise TypeError(f"effkern.convert: block {i} ({type(blk).__name__}) is not timm's pre-norm Block with "
                            "its Attention; other block types are not supported")


def convert(model: nn.Module, method: str, *, strict: bool = True, **config) -> nn.Module:
    """Convert a timm ``VisionTransformer`` (or, for ``shiftadd`` and ``shift``, a timm
    ``PyramidVisionTransformerV2``) in place to run ``method``; returns the model.

    Args:
        model: timm's ``VisionTransformer`` (DeiT, DeiT-III, ViT-S/B/L, any image size) with
            pre-norm ``Block``s. Already converted: converted again from scratch. Or timm's
            PVTv2 (``pvt_v2_b0`` ...) for the methods marked ``pvt`` in :data:`METHODS`
            (another method raises TypeError); there ``layers`` index the blocks of all stages
            in order and ``stages`` selects whole stages (see the module docstring).
        method: one of :data:`METHODS` (``python -m effkern models`` lists them with their
            settings).
        strict: True (default): the converted model's state_dict keys stay timm's, and a method
            that adds parameters (DynamicViT's predictors) raises ValueError naming them; False:
            they are added, initialised as the method does, and listed in
            ``model.effkern.added_parameters``.
        **config: the method's settings (its published defaults otherwise).

    Per-call overrides: ``model(x, r=8)`` (ToMe), ``model(x, keep_rate=0.5)`` or
    ``model(x, keep_rate=[...per layer...], tokens=[...])`` (EViT), also accepted by
    ``forward_features`` and ``forward_intermediates``.
    """
    if method in _PLANNED:
        raise NotImplementedError(f"effkern.convert: method {method!r} is not available yet "
                                  f"(available: {', '.join(METHODS)})")
    if method not in METHODS:
        raise ValueError(f"effkern.convert: unknown method {method!r} (available: {', '.join(METHODS)})")
    m = METHODS[method]
    if binary_hash_attentions(model) or shift_layers(model) or sparse24_layers(model):
        raise ValueError("effkern.convert: this model's modules were replaced (binary-hash attention: ecoformer / "
                         "shiftadd; shift layers: shift; 2:4 sparse int8 layers: sparse24_int8); convert timm's "
                         "model instead")
    pvt = _is_pvt(model)
    if pvt and not m.pvt:
        raise TypeError(f"effkern.convert({method!r}): not available for timm's PVTv2 ({type(model).__name__}); "
                        f"a PVTv2 converts with {', '.join(n for n, x in METHODS.items() if x.pvt)}")
    if not pvt:
        _check_timm_vit(model)
    if not isinstance(strict, bool):
        raise TypeError(f"effkern.convert: strict must be a bool, got {strict!r}")
    cfg = m.configure(model, **config)
    if m.build is not None:
        return m.build(model, cfg)
    if not pvt:
        _undo(model)
    modules, added, added_module = (), (), None
    if m.add_modules is not None:
        mods = m.add_modules(model, cfg)
        name = next(n for n, c in model.named_children() if c is mods)
        added = tuple(f"{name}.{n}" for n, _ in mods.named_parameters())
        if strict:
            delattr(model, name)
            raise ValueError(f"effkern.convert({method!r}) adds parameters ({len(added)}: {added[0]}, ...), so the "
                             "model's state_dict is no longer timm's; pass strict=False to accept that (they are "
                             "listed in model.effkern.added_parameters)")
        modules, added_module = tuple(mods), name
    if m.replace_modules is not None:
        added = m.replace_modules(model, cfg, dry_run=True)
        if strict and added:
            raise ValueError(f"effkern.convert({method!r}) with these settings adds parameters ({len(added)}: "
                             f"{added[0]}, ...), so the model's state_dict is no longer timm's; pass strict=False "
                             "to accept that (they are listed in model.effkern.added_parameters)")
        m.replace_modules(model, cfg)
    if pvt:  # the replaced modules are the whole method: no per-forward state, blocks unchanged
        model.effkern = Shared(method, cfg, len(_blocks(model)), 0, (), added)
        return model
    model.__class__ = _converted_class(_unconverted_class(type(model)), _ConvertedViT, "Effkern")
    shared = Shared(method, cfg, len(model.blocks), int(model.num_prefix_tokens), modules, added)
    model.effkern = shared
    model._effkern_added = added_module
    for module, hook, kind in ((model.patch_embed, _reset_state, "pre"), (model.norm, _capture_tokens, "post")):
        module.effkern = shared
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        module._effkern_hook = register(hook)
    for i, blk in enumerate(model.blocks):
        base = _unconverted_class(type(blk))
        blk.__class__ = base if m.block_mixin is None else _converted_class(base, m.block_mixin, m.name.capitalize())
        blk.effkern = shared
        blk.effkern_layer = i
    return model


def _undo(model: nn.Module) -> None:
    """Remove what an earlier convert added (hooks, modules): convert again from scratch."""
    for module in (model.patch_embed, model.norm):
        if getattr(module, "_effkern_hook", None) is not None:
            module._effkern_hook.remove()
            module._effkern_hook = None
    if getattr(model, "_effkern_added", None):
        delattr(model, model._effkern_added)
        model._effkern_added = None


def _unconverted_class(cls: type) -> type:
    """The timm class under a converted one (convert twice: from scratch)."""
    for base in cls.__mro__:
        if base.__module__ != __name__ and base not in (_ConvertedViT, ToMeBlockMixin, EViTBlockMixin, DynamicViTBlockMixin, IdleViTBlockMixin):
            return base
    return cls
