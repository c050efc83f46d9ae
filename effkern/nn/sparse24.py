"""2:4-sparse int8 linear layers for GPUSQ-ViT (Yu et al., "Boost Vision Transformer with
GPU-Friendly Sparsity and Quantization", CVPR 2023).

:class:`Sparse24Int8Linear` trains as GPUSQ-ViT's sparsity-aware quantisation-aware training
(QAT) and runs frozen through :func:`effkern.ops.sparse24_int8_linear`:

* the float weight is pruned to 2:4 once (:func:`effkern.ops.prune_2to4`: the two largest |w|
  of every four along K, ties to the lower index); the mask is fixed from then on;
* training forward: ``F.linear(fq_act(x), fq_w(weight * mask), bias)`` with

  - ``fq_w``: symmetric per-output-channel int8, ``s_w[n] = max|w[n]| / 127`` (1 for an
    all-zero row), ``q = clamp(round(w / s_w), -127, 127)``, exactly
    :meth:`effkern.ops.Sparse24Weight.from_float`'s rule;
  - ``fq_act``: dynamic per-token symmetric int8, ``s_x[t] = max|x[t]| / 127`` (1 for an
    all-zero token), ``q = clamp(round(x / s_x), -127, 127)``;
  - straight-through gradients: rounding passes the gradient unchanged (the scales are
    treated as constants); the mask multiplies it, so pruned weights stay zero and get
    zero gradient;

* ``freeze()`` (eval): the int8 weight above, compressed once into a
  :class:`~effkern.ops.Sparse24Weight`; the forward quantises x per token and runs the op
  (float32 epilogue, output in x's dtype). Its output equals the training forward's up to
  float rounding (the op accumulates exactly in int32 and scales once; F.linear sums scaled
  floats). In eval mode without ``freeze()`` the forward stays the fake-quantised one.

Parameter names are nn.Linear's (``weight``, ``bias``) so that a timm checkpoint loads strictly
into a converted model. ``weight`` holds the dense float weight with the pruned entries zero.
The mask is a non-persistent buffer, recomputed from the weight whenever a state dict is
loaded (``mask_2to4`` of the loaded weight, and the weight is pruned with it): a dense (timm)
checkpoint is pruned as :meth:`Sparse24Int8Linear.from_linear` would, a checkpoint of a trained
sparse layer gives its mask back (a group where a kept weight trained to exactly zero may get a
different, equally zero, kept position).

:class:`GPUSQDistillationLoss` is the knowledge-distillation objective of the QAT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effkern.nn.layers import straight_through
from effkern.ops import Sparse24Weight, mask_2to4, sparse24_int8_linear

__all__ = ["GPUSQDistillationLoss", "Sparse24Int8Linear", "quantize_per_channel", "quantize_per_token"]

ACTIVATIONS = (None, "relu", "gelu")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _symmetric_int8(v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(q, scale) in float32: scale = max|v| / 127 along ``dim`` (kept, 1 where all zero),
    q = clamp(round_half_even(v / scale), -127, 127) (int8 values held in float32)."""
    v = v.to(torch.float32)
    amax = v.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(v / scale).clamp(-127, 127), scale


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token int8 of ``x [..., K]``: (q float32 ``[..., K]``, scale float32 ``[..., 1]``)."""
    return _symmetric_int8(x.detach(), dim=-1)


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel int8 of ``w [N, K]``: (q float32 ``[N, K]``, scale float32 ``[N]``),
    the rule of :meth:`Sparse24Weight.from_float`."""
    q, scale = _symmetric_int8(w.detach(), dim=1)
    return q, scale[:, 0]


class Sparse24Int8Linear(nn.Module):
    """``y = act(x W^T + b)`` with W 2:4 sparse and int8, x int8 per token (module docstring).

    Args:
        in_features: K, a multiple of 8 (whole meta bytes of the compressed weight).
        out_features, bias: as nn.Linear.
        activation: None, "relu" or "gelu" (exact erf GELU), applied after the bias: fused into
            the op's epilogue when frozen (use it when the layer is followed by that activation,
            and drop the latter).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 8 or in_features % 8:
            raise ValueError(f"Sparse24Int8Linear: in_features must be a positive multiple of 8 (whole meta bytes "
                             f"of the 2:4 weight), got {in_features!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Sparse24Int8Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # recomputed from the weight on load (module docstring), hence not in the state dict
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device),
                             persistent=False)
        self.frozen: Sparse24Weight | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, then pruned to 2:4 (a new mask)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.prune_()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activation: str | None = None) -> Sparse24Int8Linear:
        """``linear``'s weight pruned to 2:4 (effkern.ops.prune_2to4's rule) and its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Int8Linear.from_linear: linear must be a torch.nn.Linear, got "
                            f"{type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activation=activation,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.prune_()
        return layer.train(linear.training)

    # ---------------------------------------------------------------------------- the mask

    @torch.no_grad()
    def prune_(self) -> None:
        """Set the mask to the weight's 2:4 pattern (mask_2to4) and zero the pruned weights."""
        self.mask = mask_2to4(self.weight)
        self.weight.mul_(self.mask)
        self.frozen = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:  # a new weight: its mask (module docstring)
            self.prune_()

    # ---------------------------------------------------------------------------- the weight

    def masked_weight(self) -> Tensor:
        """``weight * mask``: its gradient is zero at the pruned entries."""
        return self.weight * self.mask

    def quantized_weight(self) -> Tensor:
        """The fake-quantised weight of the training forward (float32, straight-through)."""
        w = self.masked_weight()
        q, scale = quantize_per_channel(w)
        return straight_through(w, (q * scale[:, None]).to(w.dtype))

    def sparse_weight(self) -> Sparse24Weight:
        """The compressed int8 weight (exactly the training forward's quantised weight)."""
        q, scale = quantize_per_channel(self.masked_weight())
        return Sparse24Weight.from_int8(q.to(torch.int8), scale)

    def freeze(self) -> Sparse24Int8Linear:
        """Compress the weight once (eval mode): the forward then runs effkern.ops.sparse24_int8_linear.
        ``train()`` or loading a state dict drops it again; moving the layer (``.to``) rebuilds it."""
        self.frozen = self.sparse_weight()
        return self.eval()

    def train(self, mode: bool = True) -> Sparse24Int8Linear:
        if mode:
            self.frozen = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .half() / .cuda(): the compressed weight is not a buffer; rebuild it there
        out = super()._apply(fn, *args, **kwargs)
        if self.frozen is not None:
            self.frozen = self.sparse_weight()
        return out

    # ---------------------------------------------------------------------------- forward

    def _check_input(self, x: Tensor) -> None:
        if x.dtype not in OUT_DTYPES:
            raise ValueError(f"Sparse24Int8Linear: x must be bfloat16, float16 or float32 (the output dtype), got "
                             f"{x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Sparse24Int8Linear: x has {x.shape[-1]} features, the layer takes {self.in_features}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.frozen is not None and not self.training:
            q, scale = quantize_per_token(x)
            bias = None if self.bias is None else self.bias.detach().to(torch.float32)
            return sparse24_int8_linear(q.to(torch.int8), self.frozen, bias, x_scale=scale, out_dtype=x.dtype,
                                        activation=self.activation)
        q, scale = quantize_per_token(x)
        xq = straight_through(x, (q * scale).to(x.dtype))
        y = F.linear(xq, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.activation == "relu":
            return F.relu(y)
        return F.gelu(y) if self.activation == "gelu" else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}" + (", frozen" if self.frozen is not None else ""))


# --------------------------------------------------------------------------------------------
# Distillation (GPUSQ-ViT's mixed-strategy knowledge distillation)
# --------------------------------------------------------------------------------------------


class GPUSQDistillationLoss(nn.Module):
    """The dense float model teaches its 2:4-sparse int8 copy.

    GPUSQ-ViT's paper (no code was released) trains both the 2:4 pruning stage and the QAT
    stage with a "mixed-strategy" knowledge distillation: a hard-label loss, a soft-logits loss
    between student and teacher, and a feature-based loss on intermediate features (in QAT
    weighted by layer). Its loss weights are not reproduced here; the logit terms follow DeiT
    (Touvron et al. 2021), whose published defaults are used:

    * ``distillation="soft"``: ``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(p_t || p_s)`` with
      ``p = softmax(logits / T)`` and the KL summed over the batch and the classes and divided by
      their count, as DeiT's ``DistillationLoss`` does (``F.kl_div(..., reduction="sum") /
      numel``); alpha = 0.5, T = 1 (DeiT's ``--distillation-alpha`` / ``--distillation-tau``).
    * ``distillation="hard"``: ``0.5 * CE(s, y) + 0.5 * CE(s, argmax t)``.
    * plus ``feature_weight * sum_l w_l * MSE(f_s[l], f_t[l])`` over the given features (weights
      ``layer_weights``, uniform 1 / L by default; feature_weight 0: off).

    ``forward(student_logits, teacher_logits, target, student_features=(), teacher_features=())``:
    ``target`` int64 class indices ``[B]`` or soft targets ``[B, C]`` (mixup); the teacher's
    tensors are detached.
    """

    def __init__(self, *, distillation: str = "soft", alpha: float = 0.5, temperature: float = 1.0,
                 feature_weight: float = 0.0, layer_weights: Sequence[float] | None = None):
        super().__init__()
        if distillation not in ("soft", "hard"):
            raise ValueError(f"GPUSQDistillationLoss: distillation must be 'soft' or 'hard', got {distillation!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"GPUSQDistillationLoss: alpha must be in [0, 1], got {alpha!r}")
        if not temperature > 0:
            raise ValueError(f"GPUSQDistillationLoss: temperature must be > 0, got {temperature!r}")
        if not feature_weight >= 0:
            raise ValueError(f"GPUSQDistillationLoss: feature_weight must be >= 0, got {feature_weight!r}")
        self.distillation, self.alpha, self.temperature = distillation, float(alpha), float(temperature)
        self.feature_weight = float(feature_weight)
        self.layer_weights = None if layer_weights is None else tuple(float(w) for w in layer_weights)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                student_features: Sequence[Tensor] = (), teacher_features: Sequence[Tensor] = ()) -> Tensor:
        s, t = student_logits.float(), teacher_logits.detach().float()
        if s.shape != t.shape:
            raise ValueError(f"GPUSQDistillationLoss: student_logits {tuple(s.shape)} and teacher_logits "
                             f"{tuple(t.shape)} differ in shape")
        task = F.cross_entropy(s, target if target.dtype == torch.int64 else target.float())
        if self.distillation == "hard":
            loss = 0.5 * task + 0.5 * F.cross_entropy(s, t.argmax(dim=-1))
        else:
            tau = self.temperature
            kl = F.kl_div(F.log_softmax(s / tau, dim=-1), F.log_softmax(t / tau, dim=-1), reduction="sum",
                          log_target=True) / s.numel()  # DeiT's normalisation: per logit
            loss = (1 - self.alpha) * task + self.alpha * tau * tau * kl
        if self.feature_weight == 0:
            return loss
        if len(student_features) != len(teacher_features) or not student_features:
            raise ValueError(f"GPUSQDistillationLoss: feature_weight > 0 needs as many student_features as "
                             f"teacher_features (at least one), got {len(student_features)} and {len(teacher_features)}")
        n = len(student_features)
        weights = self.layer_weights or (1.0 / n,) * n
        if len(weights) != n:
            raise ValueError(f"GPUSQDistillationLoss: layer_weights has {len(weights)} entries for {n} features")
        feat = sum(w * F.mse_loss(fs.float(), ft.detach().float())
                   for w, fs, ft in zip(weights, student_features, teacher_features))
        return loss + self.feature_weight * feat
