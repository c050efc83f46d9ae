"""Shift layers: linear layers whose weights are signed powers of two (DeepShift, ShiftAddViT).

:class:`ShiftLinear` trains the two published ways and runs frozen through
:func:`effkern.ops.shift_linear`:

* ``mode="ps"`` (DeepShift-PS): parameters ``shift`` (P) and ``sign`` (S), ``[N, K]``; the
  weight is ``W = 2^round(P) * sign(round(S))`` with P clamped (in place, during training, as
  published) to (-(2^(weight_bits-1) - 2), 0). Straight-through gradients, as DeepShift's
  ``ste`` module defines them: dL/dS = dL/dW and dL/dP = dL/dW * sign * 2^P * ln 2.
* ``mode="q"`` (DeepShift-Q): a float ``weight``, its magnitude clamped (in place, during
  training) to [2^lo, 1] (zeros stay zero) and rounded to the nearest power of two in the log
  domain, with a straight-through gradient.

With ``fixed_point=True`` the input and the bias are rounded down to 16.16 fixed point
(straight-through), as ShiftAddViT's layer does. ``freeze()`` (in eval mode) encodes the weight
once into a :class:`effkern.ops.ShiftWeight`; the layer then runs :func:`shift_linear`.

:class:`ShiftAddMoE` routes each token to a multiply expert or a shift expert (ShiftAddViT's
mixture of experts) with a latency-aware balance loss.

Departures from the published code: DeepShift-Q in ShiftAddViT's copy clamps the magnitudes to
[2^-(2^(weight_bits-1) - 1), 1] (16 exponents at weight_bits = 5); here both modes use
DeepShift-PS's range (15 exponents), so that a trained weight is exactly a 5-bit ShiftWeight.
And the rounding to a power of two is exact in the log domain
(:func:`effkern.ops.shift.nearest_exponent`); DeepShift's float32 ``log(|w|) / log(2)``
misrounds weights within an ulp of 2^(k + 1/2) (timm's initialisation of DeiT-S holds a few).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effkern.nn.layers import straight_through
from effkern.ops import ShiftWeight, shift_linear, token_gather, token_scatter
from effkern.ops.shift import nearest_exponent, nearest_power_of_two

_LN2 = math.log(2.0)


class _UnsymmetricMul(torch.autograd.Function):
    """a * b forward; backward: dL/da = g * b, dL/db = g (DeepShift's ``unsym_grad_mul``: the
    sign's gradient is the weight's, not scaled by 2^P)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(b)
        return a * b

    @staticmethod
    def backward(ctx, grad: Tensor):
        (b,) = ctx.saved_tensors
        return grad * b, grad


def round_to_fixed(x: Tensor, fraction_bits: int = 16, integer_bits: int = 16) -> Tensor:
    """DeepShift's ``round_to_fixed``: floor to a multiple of 2^-fraction_bits, clamped to
    [-2^(integer_bits-1), 2^(integer_bits-1) - 1], in x's dtype."""
    delta = 2.0**-fraction_bits
    bound = 2.0 ** (integer_bits - 1)
    return torch.clamp(torch.floor(x / delta) * delta, -bound, bound - 1)


def shift_range(weight_bits: int) -> tuple[int, int]:
    """DeepShift-PS's exponent range at ``weight_bits`` (ternary sign): (-(2^(wb-1) - 2), 0)."""
    return -(2 ** (weight_bits - 1) - 2), 0


class ShiftLinear(nn.Module):
    """``y = x W^T + b`` with power-of-two weights (module docstring).

    Args:
        in_features, out_features, bias: as nn.Linear.
        mode: "ps" (DeepShift-PS) or "q" (DeepShift-Q).
        weight_bits: 2..5; the exponents lie in ``shift_range(weight_bits)`` (5: [-14, 0]).
        fixed_point: round the input and the bias to 16.16 fixed point (ShiftAddViT's layer).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "ps",
                 weight_bits: int = 5, fixed_point: bool = False, device=None, dtype=None):
        super().__init__()
        if mode not in ("ps", "q"):
            raise ValueError(f"ShiftLinear: mode must be 'ps' or 'q', got {mode!r}")
        if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or not 2 <= weight_bits <= 5:
            raise ValueError(f"ShiftLinear: weight_bits must be an integer in [2, 5] (the 5-bit form holds "
                             f"DeepShift's weights), got {weight_bits!r}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.weight_bits, self.fixed_point = mode, weight_bits, bool(fixed_point)
        factory = {"device": device, "dtype": dtype}
        if mode == "ps":
            self.shift = nn.Parameter(torch.empty(out_features, in_features, **factory))
            self.sign = nn.Parameter(torch.empty(out_features, in_features, **factory))
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.frozen: ShiftWeight | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DeepShift's initialisation: P uniform over the range, S uniform in [-1, 1] (ps); the
        weight as nn.Linear (q); the bias uniform in +-1/sqrt(in_features)."""
        if self.mode == "ps":
            nn.init.uniform_(self.shift, *shift_range(self.weight_bits))
            nn.init.uniform_(self.sign, -1, 1)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.frozen = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "ps", weight_bits: int = 5, fixed_point: bool = False) -> "ShiftLinear":
        """A shift layer initialised from ``linear`` as DeepShift's ``convert_to_shift`` does:
        P = round(log2|w|), S = sign(w) (ps; P is clamped into range by the forward); the weight
        itself (q); the bias copied (rounded to 16.16 with ``fixed_point``)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode, weight_bits=weight_bits,
                    fixed_point=fixed_point, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if mode == "ps":
                sign, p = nearest_power_of_two(w)
                layer.shift.copy_(p.to(w.dtype))
                layer.sign.copy_(sign.to(w.dtype))
            else:
                layer.weight.copy_(w)
            if linear.bias is not None:
                b = linear.bias.detach()
                layer.bias.copy_(round_to_fixed(b) if fixed_point else b)
        return layer

    # ---------------------------------------------------------------------------- the weight

    def _clamp_parameters(self) -> None:
        """DeepShift clamps the parameters' data on every training forward (not a gradient op)."""
        lo, hi = shift_range(self.weight_bits)
        with torch.no_grad():
            if self.mode == "ps":
                self.shift.clamp_(lo, hi)
            else:
                mag = self.weight.abs()
                clamped = mag.clamp(2.0**lo, 2.0**hi)
                self.weight.copy_(torch.where(mag == 0, self.weight, torch.sign(self.weight) * clamped))

    def quantized_weight(self) -> Tensor:
        """The power-of-two weight the forward uses, differentiable with the published
        straight-through gradients."""
        lo, hi = shift_range(self.weight_bits)
        if self.mode == "ps":
            shift = straight_through(self.shift, torch.round(self.shift.clamp(lo, hi)))
            sign = straight_through(self.sign, torch.sign(torch.round(self.sign)))
            return _UnsymmetricMul.apply(2.0**shift, sign)
        sign, p = nearest_exponent(self.weight)
        return straight_through(self.weight, (sign * torch.exp2(p.clamp(lo, hi))).to(self.weight.dtype))

    def shift_weight(self) -> ShiftWeight:
        """The weight as a 5-bit :class:`ShiftWeight` (exactly the forward's weight)."""
        lo, hi = shift_range(self.weight_bits)
        with torch.no_grad():
            if self.mode == "ps":
                return ShiftWeight.from_deepshift(self.shift, self.sign, weight_bits=self.weight_bits)
            sign, p = nearest_power_of_two(self.weight)
            return ShiftWeight.from_sign_exponent(sign, p.clamp(lo, hi), bits=5, exponent_range=(lo, lo + 14))

    def freeze(self) -> "ShiftLinear":
        """Encode the weight once (eval mode): the forward then runs effkern.ops.shift_linear.
        ``train()`` drops it again."""
        self.frozen = self.shift_weight()
        return self.eval()

    def train(self, mode: bool = True) -> "ShiftLinear":
        if mode:
            self.frozen = None
        return super().train(mode)

    # ---------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if self.fixed_point:
            x = straight_through(x, round_to_fixed(x))
            bias = None if bias is None else straight_through(bias, round_to_fixed(bias))
        if self.frozen is not None and not self.training:
            return shift_linear(x, self.frozen, None if bias is None else bias.to(x.dtype))
        if self.training:
            self._clamp_parameters()
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}, weight_bits={self.weight_bits}, fixed_point={self.fixed_point}"
                + (", frozen" if self.frozen is not None else ""))


# --------------------------------------------------------------------------------------------
# The multiply / shift mixture of experts (ShiftAddViT)
# --------------------------------------------------------------------------------------------


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """The squared coefficient of variation var(x) / (mean(x)^2 + eps), var unbiased (ShiftAddViT's
    ``cv_squared``)."""
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


class ShiftAddMoE(nn.Module):
    """Per-token top-1 routing over a multiply expert (index 0) and a shift expert (index 1).

    The router is ShiftAddViT's ``NoisyGate``: clean logits ``x @ w_gate``; with ``noisy_gating``
    in training, plus Gaussian noise of std ``softplus(x @ w_noise) + 0.01``; each token goes to
    its top logit. The balance loss (``self.aux_loss`` after each forward, add it to the training
    loss) is ``cv^2(alpha * importance) + cv^2(alpha * load)`` with the latency weights
    ``alpha = (6, 4)``: importance sums the routed tokens' gate probabilities per expert, load the
    probability of each expert staying top under the noise (noisy gating) or its token count.
    Its balance point routes alpha[0] / (alpha[0] + alpha[1]) = 60% of the tokens to the shift
    expert at (6, 4).

    Departure from the released code: there the top-1 gate value is the constant 1 (a softmax over
    one logit), so the router gets no gradient from the task loss, and importance counts tokens.
    Here each expert's output is scaled by its gate probability ``softmax(logits)[top]`` and
    importance sums those probabilities, so the router learns from both losses.

    Dispatch gathers each expert's tokens with effkern's token gather and adds the scaled outputs
    back with its token scatter (no exp/log combine). ``capacity`` (a fraction of the tokens,
    e.g. 1.0) gives every expert a fixed number of slots, ceil(capacity * tokens): static shapes
    for torch.compile and CUDA graphs; an expert's tokens beyond its slots (lowest gate
    probability first) are dropped (output 0), unused slots compute a padding row weighted 0.
    """

    def __init__(self, mult: nn.Module, shift: nn.Module, dim: int, *, out_dim: int | None = None,
                 noisy_gating: bool = True, alpha: tuple[float, float] = (6.0, 4.0), capacity: float | None = None):
        super().__init__()
        if capacity is not None and not capacity > 0:
            raise ValueError(f"ShiftAddMoE: capacity must be > 0 (a fraction of the tokens) or None, got {capacity!r}")
        self.experts = nn.ModuleList([mult, shift])
        self.dim, self.out_dim = dim, dim if out_dim is None else out_dim
        self.noisy_gating, self.alpha, self.capacity = noisy_gating, tuple(float(a) for a in alpha), capacity
        # on the module's device, so that routing copies nothing from the host (CUDA graphs)
        self.register_buffer("alpha_weights", torch.tensor(self.alpha), persistent=False)
        self.w_gate = nn.Parameter(torch.empty(dim, 2))
        self.w_noise = nn.Parameter(torch.empty(dim, 2))
        nn.init.kaiming_uniform_(self.w_gate, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.w_noise, a=math.sqrt(5))
        self.aux_loss: Tensor | None = None
        self.shift_ratio: Tensor | None = None

    def route(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(top expert per token, its gate probability, the balance loss) for tokens [M, C]."""
        clean = t @ self.w_gate.to(t.dtype)
        noisy = self.noisy_gating and self.training
        if noisy:
            std = F.softplus(t @ self.w_noise.to(t.dtype)) + 1e-2
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top = logits.argmax(dim=-1)
        probs = torch.softmax(logits.float(), dim=-1)
        gate = probs.gather(1, top[:, None])[:, 0]
        alpha = self.alpha_weights.float()
        routed = F.one_hot(top, 2).to(probs.dtype)
        importance = (routed * probs).sum(0)
        if noisy:  # P(expert stays top under the noise): the other logit is the threshold (top-1 of 2)
            other = logits.flip(-1)
            load = torch.distributions.Normal(0.0, 1.0).cdf((clean.float() - other.float()) / std.float()).sum(0)
        else:
            load = routed.sum(0)
        return top, gate, cv_squared(alpha * importance) + cv_squared(alpha * load)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        t = x.reshape(-1, x.shape[-1])
        top, gate, self.aux_loss = self.route(t)
        self.shift_ratio = (top == 1).float().mean()
        out = t.new_zeros((1, t.shape[0], self.out_dim))
        for e, expert in enumerate(self.experts):
            if self.capacity is None:  # data-dependent shapes: eager
                idx = torch.nonzero(top == e)[:, 0]
                weight = gate[idx]
            else:
                slots = min(t.shape[0], math.ceil(self.capacity * t.shape[0]))
                score = torch.where(top == e, gate, torch.full_like(gate, -1.0))
                weight, idx = torch.topk(score, slots)
                weight = weight.clamp(min=0.0)  # a padding slot (another expert's token) counts 0
            rows = token_gather(t[None], idx[None], validate=False)
            y = expert(rows) * weight[None, :, None].to(t.dtype)
            out = token_scatter(out, y, idx[None], reduce="add", validate=False)
        return out.reshape(*lead, self.out_dim)
