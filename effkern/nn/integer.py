"""I-ViT's integer-only modules over effkern's integer ops.

Like I-ViT's modules, each takes and returns ``(x, scale)`` where ``x`` is the *dequantised*
float tensor ``I * scale``; the arithmetic in between is the integer ops of
:mod:`effkern.ops.integer`, bit-exact with I-ViT. Module and parameter names follow I-ViT
(``QuantLinear.weight/.bias``, ``IntLayerNorm.weight/.bias``), so its checkpoints load.

Quantisation-aware training: every module's output value is the integer result, and its
gradient is the straight-through estimator: identity through rounding and clamping, and the
derivative of the float function the integer op approximates otherwise (softmax,
x * sigmoid(1.702 x) for ShiftGELU, LayerNorm, linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effkern.ops import int8_linear, int_gelu, int_layernorm, int_softmax, requantize
from effkern.ops.integer import int_dtype_for_bits


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantised value, exactly. Backward: the gradient of the float surrogate."""

    @staticmethod
    def forward(ctx, quantized: Tensor, surrogate: Tensor) -> Tensor:
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


def straight_through(quantized: Tensor, surrogate: Tensor) -> Tensor:
    """``quantized`` in the forward pass, ``surrogate``'s gradient in the backward pass."""
    if not surrogate.requires_grad:
        return quantized
    return _StraightThrough.apply(quantized.to(surrogate.dtype), surrogate)


def to_integer(x: Tensor, scale: Tensor, bits: int, what: str) -> Tensor:
    """``round(x / scale)`` as an integer tensor of ``bits`` bits; raises if it does not fit
    (the caller's quantiser and this module disagree on the bit width)."""
    i = torch.round(x.detach() / scale)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # float bounds: under torch.compile (CPU, torch 2.14) a float tensor compared with the int
    # -2^31 or 2^31 - 1 came out True for -127 and 115; the float compare is the same test
    if i.numel() and (i.min() < float(lo) or i.max() > float(hi)):
        raise ValueError(
            f"{what}: x / scale spans [{int(i.min())}, {int(i.max())}], outside the {bits}-bit range "
            f"[{lo}, {hi}]; quantise the input to {bits} bits first (QuantAct) or raise input_bits"
        )
    return i.to(int_dtype_for_bits(bits))


def dequantize(y: Tensor, scale: Tensor, like: Tensor) -> Tensor:
    """``y * scale`` computed in ``like``'s floating dtype."""
    return y.to(like.dtype) * scale.to(like.dtype)


def symmetric_scale(x_min: Tensor, x_max: Tensor, bits: int) -> Tensor:
    """I-ViT's symmetric scale max(|min|, |max|) / (2^(bits-1) - 1), at least 1e-8."""
    return (torch.maximum(x_min.abs(), x_max.abs()) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)


class QuantAct(nn.Module):
    """Activation quantiser: tracks the activation range, quantises to ``activation_bit`` bits.

    In training mode the running min/max follow each batch with momentum
    ``act_range_momentum`` (the first batch initialises them); in eval mode they are frozen.
    ``x_min``, ``x_max`` and ``act_scaling_factor`` are buffers, so a reloaded module keeps its
    scale.

    ``forward(x, pre_act_scaling_factor=None, identity=None, identity_scaling_factor=None)``:
    without ``pre_act_scaling_factor`` x is a float tensor, quantised by round-and-clamp. With
    it, x is already quantised (x = I * pre_act_scaling_factor) and is requantised by the
    integer-only dyadic :func:`~effkern.ops.requantize`, I-ViT's ``fixedpoint_mul``; an
    ``identity`` branch (a residual) is requantised the same way and added before the clamp.
    Returns ``(x_q, scale)``.
    """

    def __init__(self, activation_bit: int = 8, act_range_momentum: float = 0.95):
        super().__init__()
        if not 2 <= activation_bit <= 16:
            raise ValueError(f"QuantAct: activation_bit must be in [2, 16], got {activation_bit}")
        self.activation_bit = activation_bit
        self.act_range_momentum = act_range_momentum
        self.register_buffer("x_min", torch.zeros(1))
        self.register_buffer("x_max", torch.zeros(1))
        self.register_buffer("act_scaling_factor", torch.zeros(1))

    def extra_repr(self) -> str:
        return f"activation_bit={self.activation_bit}, act_range_momentum={self.act_range_momentum}"

    @torch.no_grad()
    def _update_range(self, x: Tensor) -> None:
        lo, hi = x.min().reshape(1), x.max().reshape(1)
        if bool(self.x_min == self.x_max):  # not initialised yet
            self.x_min.copy_(lo)
            self.x_max.copy_(hi)
        else:
            m = self.act_range_momentum
            self.x_min.mul_(m).add_(lo * (1 - m))
            self.x_max.mul_(m).add_(hi * (1 - m))
        self.act_scaling_factor.copy_(symmetric_scale(self.x_min, self.x_max, self.activation_bit))

    def forward(self, x: Tensor, pre_act_scaling_factor: Tensor | None = None, identity: Tensor | None = None,
                identity_scaling_factor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_act = x if identity is None else x + identity
        if self.training:
            self._update_range(x_act.detach())
        elif bool(self.act_scaling_factor == 0):
            raise RuntimeError("QuantAct: no activation range yet; run it in training mode on calibration data first")
        scale = self.act_scaling_factor
        bits = self.activation_bit
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if pre_act_scaling_factor is None:
            q = torch.clamp(torch.round(x_act.detach() / scale), lo, hi)
        else:
            q = self._requantize(x, pre_act_scaling_factor)
            if identity is not None:
                if identity_scaling_factor is None:
                    raise ValueError("QuantAct: identity needs identity_scaling_factor")
                q = q + self._requantize(identity, identity_scaling_factor)
            q = q.clamp(lo, hi)
        return straight_through(dequantize(q, scale, x_act), x_act), scale

    def _requantize(self, x: Tensor, x_scale: Tensor) -> Tensor:
        """Integer-only: I at x_scale -> round(I * m / 2^e) at this module's scale (unclamped
        beyond int32, the caller clamps)."""
        x_scale = x_scale.detach().reshape(-1)
        i = to_integer(x, x_scale, 32, "QuantAct")
        return requantize(i, x_scale, self.act_scaling_factor, out_bits=32).to(x.dtype)


class QuantLinear(nn.Linear):
    """I-ViT's QuantLinear on :func:`~effkern.ops.int8_linear`.

    Weights are quantised per output channel (symmetric, ``weight_bit`` = 8), the bias to int32
    at scale ``act_scale * weight_scale``; ``forward(x, act_scaling_factor)`` takes an 8-bit
    quantised input (from QuantAct) and returns ``(out, out_scale)`` with the exact int32
    accumulator dequantised by the per-channel ``out_scale``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bit: int = 8,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if weight_bit != 8:
            raise ValueError("QuantLinear: only 8-bit weights are supported (int8 GEMM)")
        self.weight_bit = weight_bit

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.load_state_dict(linear.state_dict())
        return q

    def quantized_weight(self) -> tuple[Tensor, Tensor]:
        """(int8 weight, per-channel float32 weight scale)."""
        w = self.weight.detach().float()
        w_scale = symmetric_scale(w.amin(dim=1), w.amax(dim=1), self.weight_bit)
        w_int = torch.clamp(torch.round(w / w_scale[:, None]), -128, 127).to(torch.int8)
        return w_int, w_scale

    def forward(self, x: Tensor, act_scaling_factor: Tensor) -> tuple[Tensor, Tensor]:
        act_scale = act_scaling_factor.detach().float().reshape(())
        w_int, w_scale = self.quantized_weight()
        out_scale = act_scale * w_scale
        b_int = None
        if self.bias is not None:
            b_int = torch.round(self.bias.detach().float() / out_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
        x_int = to_integer(x, act_scale, 8, "QuantLinear")
        acc = int8_linear(x_int, w_int, b_int)
        out = dequantize(acc, out_scale, x)
        return straight_through(out, F.linear(x, self.weight, self.bias)), out_scale


class QuantMatMul(nn.Module):
    """I-ViT's QuantMatMul: ``forward(a, a_scale, b, b_scale) -> (a @ b, a_scale * b_scale)`` on
    the integers of two quantised tensors (at most ``input_bits`` bits each).

    The integer product is exact: it is taken in float64, whose 53-bit mantissa holds every sum
    of 8-bit products up to 2^37 terms. Gradient: that of the float ``a @ b``.
    """

    def __init__(self, input_bits: int = 8):
        super().__init__()
        self.input_bits = input_bits

    def forward(self, a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor) -> tuple[Tensor, Tensor]:
        a_scale, b_scale = a_scale.detach().reshape(()), b_scale.detach().reshape(())
        a_int = to_integer(a, a_scale, self.input_bits, "QuantMatMul (a)")
        b_int = to_integer(b, b_scale, self.input_bits, "QuantMatMul (b)")
        scale = a_scale * b_scale
        out = dequantize(a_int.double() @ b_int.double(), scale, a)
        return straight_through(out, a @ b), scale


class IntSoftmax(nn.Module):
    """I-ViT's Shiftmax: ``forward(x, scale) -> (softmax_q, 2^-(output_bit-1))`` over the last dim."""

    def __init__(self, output_bit: int = 8, n: int = 15):
        super().__init__()
        self.output_bit, self.n = output_bit, n

    def extra_repr(self) -> str:
        return f"output_bit={self.output_bit}, n={self.n}"

    def forward(self, x: Tensor, scaling_factor: Tensor) -> tuple[Tensor, Tensor]:
        x_int = to_integer(x, scaling_factor.detach().reshape(()), 32, "IntSoftmax")
        y, out_scale = int_softmax(x_int, scaling_factor.detach(), out_bits=self.output_bit, n=self.n)
        return straight_through(dequantize(y, out_scale, x), torch.softmax(x, dim=-1)), out_scale


class IntGELU(nn.Module):
    """I-ViT's ShiftGELU: ``forward(x, scale) -> (gelu_q, scale * 2^-(output_bit-1))``.

    The straight-through gradient is that of x * sigmoid(1.702 x), the function it approximates.
    """

    def __init__(self, output_bit: int = 8, n: int = 23, input_bits: int = 8):
        super().__init__()
        self.output_bit, self.n, self.input_bits = output_bit, n, input_bits

    def extra_repr(self) -> str:
        return f"output_bit={self.output_bit}, n={self.n}, input_bits={self.input_bits}"

    def forward(self, x: Tensor, scaling_factor: Tensor) -> tuple[Tensor, Tensor]:
        x_int = to_integer(x, scaling_factor.detach().reshape(()), self.input_bits, "IntGELU")
        y, out_scale = int_gelu(x_int, scaling_factor.detach(), out_bits=self.output_bit, n=self.n)
        return straight_through(dequantize(y, out_scale, x), x * torch.sigmoid(1.702 * x)), out_scale


class IntLayerNorm(nn.LayerNorm):
    """I-ViT's I-LayerNorm: ``forward(x, scale) -> (layernorm_q, per-channel scale)``.

    A drop-in for nn.LayerNorm's parameters (``weight``, ``bias``), which it trains through the
    straight-through estimator of the float LayerNorm. ``scaling_factor`` is accepted for
    I-ViT's calling convention; a LayerNorm's output does not depend on its input scale, but
    the input must be integers at that scale (``input_bits`` bits).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, iters: int = 10, input_bits: int = 8,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
        self.iters, self.input_bits = iters, input_bits

    def forward(self, x: Tensor, scaling_factor: Tensor) -> tuple[Tensor, Tensor]:
        x_int = to_integer(x, scaling_factor.detach().reshape(()), self.input_bits, "IntLayerNorm")
        y, out_scale = int_layernorm(x_int, self.weight.detach(), self.bias.detach(), iters=self.iters)
        surrogate = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return straight_through(dequantize(y, out_scale, x), surrogate), out_scale
