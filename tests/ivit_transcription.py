"""A literal transcription of I-ViT's float PyTorch code (models/quantization_utils/quant_modules.py:
IntSoftmax, IntGELU, IntLayerNorm, fixedpoint_mul/batch_frexp), run in float64.

It is an independent check of effkern's integer reference: on inputs where float64 is exact
(every intermediate an integer or half-integer below 2^53) the two must agree to the bit.
"""

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import torch


def _int_exp_shift(x_int, scaling_factor, n):
    x_int = x_int + torch.floor(x_int / 2) - torch.floor(x_int / 2**4)
    with torch.no_grad():
        x0_int = torch.floor(-1.0 / scaling_factor).to(torch.float64)
    x_int = torch.max(x_int, n * x0_int)
    q = torch.floor(x_int / x0_int)
    r = x_int - x0_int * q
    exp_int = r / 2 - x0_int
    exp_int = torch.clamp(torch.floor(exp_int * 2 ** (n - q)), min=0)
    return exp_int


def ivit_softmax(x_int, scaling_factor, output_bit=8, n=15):
    """IntSoftmax.forward on x = x_int * S; returns the integer output."""
    x_int = x_int.to(torch.float64)
    x_int_max, _ = x_int.max(dim=-1, keepdim=True)
    x_int = x_int - x_int_max
    exp_int = _int_exp_shift(x_int, scaling_factor, n)
    exp_int_sum = exp_int.sum(dim=-1, keepdim=True)
    exp_int_sum.clamp_max_(2**31 - 1)
    factor = torch.floor((2**31 - 1) / exp_int_sum)
    return torch.floor(exp_int * factor / 2 ** (32 - output_bit))


def ivit_gelu(x_int, scaling_factor, output_bit=8, n=23):
    """IntGELU.forward; returns the integer output x_int * sigmoid_int."""
    pre_x_int = x_int.to(torch.float64)
    scaling_factor_sig = scaling_factor * 1.702
    x_int_max, _ = pre_x_int.max(dim=-1, keepdim=True)
    x_int = pre_x_int - x_int_max
    exp_int = _int_exp_shift(x_int, scaling_factor_sig, n)
    exp_int_max = _int_exp_shift(-x_int_max, scaling_factor_sig, n)
    exp_int_sum = exp_int + exp_int_max
    exp_int_sum.clamp_max_(2**31 - 1)
    factor = torch.floor((2**31 - 1) / exp_int_sum)
    sigmoid_int = torch.floor(exp_int * factor / 2 ** (31 - output_bit + 1))
    return pre_x_int * sigmoid_int


def ivit_layernorm(x_int, weight, bias, iters=10):
    """IntLayerNorm.forward; returns (integer output, scaling factor)."""
    x_int = x_int.to(torch.float64)
    dim_sqrt = torch.sqrt(torch.tensor(x_int.shape[-1], dtype=torch.float))
    mean_int = torch.round(x_int.mean(axis=-1, keepdim=True))
    y_int = x_int - mean_int
    var_int = torch.sum(y_int**2, axis=-1, keepdim=True)
    k = 2**16
    for _ in range(iters):
        k = torch.floor((k + torch.floor(var_int / k)) / 2)
    factor = torch.floor((2**31 - 1) / k)
    y_int = torch.floor(y_int * factor / 2)
    scaling_factor = dim_sqrt / 2**30
    b = bias.detach() / weight.detach()
    bias_int = torch.floor(b / scaling_factor)
    return y_int + bias_int.to(torch.float64), scaling_factor * weight


def _batch_frexp(inputs, max_bit=31):
    m, e = np.frexp(inputs.cpu().numpy())
    m = [int(Decimal(v * (2**max_bit)).quantize(Decimal("1"), rounding=ROUND_HALF_UP)) for v in m.reshape(-1)]
    return (torch.tensor(m, dtype=torch.float64).view(inputs.shape),
            torch.from_numpy(float(max_bit) - e).to(torch.float64).view(inputs.shape))


def ivit_requantize(z_int, pre_scale, z_scale, bit_num):
    """fixedpoint_mul.forward's integer part (symmetric mode)."""
    n = 2 ** (bit_num - 1) - 1
    new_scale = pre_scale.to(torch.double) / z_scale.to(torch.float).to(torch.double)
    m, e = _batch_frexp(new_scale)
    output = torch.round(z_int.to(torch.double) * m / (2.0**e))
    return torch.clamp(output, -n - 1, n)
