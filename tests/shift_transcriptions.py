"""Transcriptions of the published shift layers, the oracles of tests/test_shift.py (steps and
names, in plain torch; not the repositories' files):

* DeepShift (mostafaelhoushi/DeepShift, ``pytorch/deepshift``): ``ste.py`` (every
  straight-through function: identity gradients; ``unsym_grad_mul``), ``utils.py``
  (``round_to_fixed``, ``get_shift_and_sign``, ``round_power_of_2``), ``modules.py``
  (``LinearShift.forward``: clamp the shift's data to (-(2^(wb-1) - 2), 0), round, sign of the
  rounded sign, ``F.linear(input, weight_ps, bias)``).
* ShiftAddViT (GATECH-EIC/ShiftAddViT, ``pvt/deepshift``): ``modules.py`` (``LinearShift`` as
  DeepShift's, plus the input and bias rounded to 16.16 fixed point) and ``modules_q.py``
  (``LinearShiftQ.forward``: ``clampabs`` of the weight's data to [2^-(2^(wb-1) - 1), 1], then
  ``round_power_of_2``, fixed-point input and bias).
* DeepShift's CUDA kernel's arithmetic (``kernels/cuda/shift.cu``): out = bias + sum of
  ``(x >> s)`` negated for a negative sign, on int32 fixed-point inputs, a zero weight encoded as
  a shift by 32 (its result, -1 for a negative x on NVIDIA GPUs, is written out here as what the
  published kernel would add).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class _Identity(torch.autograd.Function):
    """The straight-through functions of DeepShift's ste.py: f forward, identity backward."""

    @staticmethod
    def forward(ctx, x, f):
        return f(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(f, x):
    return _Identity.apply(x, f)


class UnsymmetricGradMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input1, input2):
        ctx.save_for_backward(input1, input2)
        return torch.mul(input1, input2)

    @staticmethod
    def backward(ctx, grad_output):
        input1, input2 = ctx.saved_tensors
        return grad_output * input2, grad_output


def round_to_fixed(input, fraction=16, integer=16):
    delta = math.pow(2.0, -fraction)
    bound = math.pow(2.0, integer - 1)
    rounded = torch.floor(input / delta) * delta
    return torch.clamp(rounded, -bound, bound - 1)


def get_shift_and_sign(x):
    sign = torch.sign(x)
    shift = torch.round(torch.log(torch.abs(x)) / np.log(2))
    return shift, sign


def round_power_of_2(x, exact=False):
    shift, sign = get_shift_and_sign(x)
    if exact:  # effkern: the exact log-domain rounding (float log / log 2 misrounds within an ulp of 2^(k+1/2))
        f, e = torch.frexp(x.abs().double())
        shift = torch.where(f > 2.0**-0.5, e, e - 1).to(x.dtype)
    return (2.0**shift) * sign


def linear_shift_ps(layer, input, weight_bits=5, fixed_point=False):
    """DeepShift's LinearShift.forward (ShiftAddViT's with fixed_point) on ``layer.shift``,
    ``layer.sign``, ``layer.bias`` (parameters; the shift's data clamped in place)."""
    shift_range = (-1 * (2 ** (weight_bits - 1) - 2), 0)
    layer.shift.data = torch.clamp(layer.shift.data, *shift_range)
    shift_rounded = ste(torch.round, layer.shift)
    sign_rounded_signed = ste(torch.sign, ste(torch.round, layer.sign))
    weight_ps = UnsymmetricGradMul.apply(2**shift_rounded, sign_rounded_signed)
    bias = layer.bias
    if fixed_point:
        input = ste(round_to_fixed, input)
        bias = None if bias is None else ste(round_to_fixed, bias)
    return F.linear(input, weight_ps, bias)


def clampabs_(w, lo, hi):
    w[w > hi] = hi
    w[w < -hi] = -hi
    w[(w > 0) & (w < lo)] = lo
    w[(w < 0) & (w > -lo)] = -lo
    return w


def linear_shift_q(layer, input, weight_bits=5, fixed_point=True, effkern=False):
    """ShiftAddViT's LinearShiftQ.forward on ``layer.weight``, ``layer.bias``. ``effkern``: with
    effkern.nn.ShiftLinear's two documented departures, for model-level comparisons on arbitrary
    weights: DeepShift-PS's exponent range -(2^(wb-1) - 2) and the exact log-domain rounding."""
    shift_range = (-1 * (2 ** (weight_bits - 1) - (2 if effkern else 1)), 0)
    layer.weight.data = clampabs_(layer.weight.data, 2 ** shift_range[0], 2 ** shift_range[1])
    weight_q = ste(lambda w: round_power_of_2(w, exact=effkern), layer.weight)
    bias = layer.bias
    if fixed_point:
        input = ste(round_to_fixed, input)
        bias = None if bias is None else ste(round_to_fixed, bias)
    return F.linear(input, weight_q, bias)


def deepshift_kernel(x_fixed, shift, sign, bias_fixed=None):
    """DeepShift's shift kernel's arithmetic, per output: for each k, v = x >> -shift (shift <= 0),
    negated where sign < 0; a zero sign means shift = -32, i.e. x >> 32, which NVIDIA's shifter
    clamps to 31: 0 or -1. Int64 sums here (the published int32 accumulator wraps)."""
    m, k = x_fixed.shape
    n = shift.shape[0]
    out = torch.zeros(m, n, dtype=torch.int64)
    for j in range(n):
        s = torch.where(sign[j] == 0, torch.full_like(shift[j], 32), -shift[j]).to(torch.int64).clamp(max=31)
        v = x_fixed.to(torch.int64) >> s
        v = torch.where(sign[j] < 0, -v, v)
        out[:, j] = v.sum(1)
    if bias_fixed is not None:
        out += bias_fixed.to(torch.int64)
    return out


class PublishedShiftQ(torch.nn.Module):
    """A linear layer running ``linear_shift_q`` on its own copy of the weight and bias."""

    def __init__(self, linear, weight_bits=5, fixed_point=True):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.weight_bits, self.fixed_point = weight_bits, fixed_point

    def forward(self, x):
        return linear_shift_q(self, x, self.weight_bits, self.fixed_point, effkern=True)


def shift_model(model, targets=("fc1", "fc2"), weight_bits=5, fixed_point=True):
    """A copy of a timm ViT with the blocks' ``targets`` linears running ShiftAddViT's
    LinearShiftQ (DeepShift-Q with fixed point; effkern's range and rounding), the rest timm's own."""
    import copy

    out = copy.deepcopy(model)
    for blk in out.blocks:
        for t in targets:
            parent = blk.attn if t in ("qkv", "proj") else blk.mlp
            setattr(parent, t, PublishedShiftQ(getattr(parent, t), weight_bits, fixed_point))
    return out


def noisy_gate(inp, w_gate, w_noise, top_k=1, alpha=(6, 4)):
    """ShiftAddViT's NoisyGate.forward (fmoe_new.py), training: (top_k_indices, gates, loss,
    the load term alone)."""
    from torch.distributions.normal import Normal

    clean_logits = inp @ w_gate
    raw_noise_stddev = inp @ w_noise
    noise_stddev = F.softplus(raw_noise_stddev) + 1e-2
    noisy_logits = clean_logits + (torch.randn_like(clean_logits) * noise_stddev)
    top_logits, top_indices = noisy_logits.topk(min(top_k + 1, 2), dim=1)
    top_k_logits, top_k_indices = top_logits[:, :top_k], top_indices[:, :top_k]
    top_k_gates = torch.softmax(top_k_logits, 1)
    gates = torch.zeros_like(noisy_logits).scatter(1, top_k_indices, top_k_gates)
    # _prob_in_top_k
    batch, m = clean_logits.size(0), top_logits.size(1)
    flat = top_logits.flatten()
    pos_in = torch.arange(batch) * m + top_k
    threshold_if_in = flat.gather(0, pos_in)[:, None]
    threshold_if_out = flat.gather(0, pos_in - 1)[:, None]
    normal = Normal(torch.tensor([0.0]), torch.tensor([1.0]))
    prob = torch.where(noisy_logits > threshold_if_in, normal.cdf((clean_logits - threshold_if_in) / noise_stddev),
                       normal.cdf((clean_logits - threshold_if_out) / noise_stddev))
    load = prob.sum(0) * torch.tensor(alpha, dtype=prob.dtype)
    importance = gates.sum(0) * torch.tensor(alpha, dtype=gates.dtype)

    def cv_squared(x):
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    return top_k_indices[:, 0], gates, cv_squared(importance) + cv_squared(load), cv_squared(load)
