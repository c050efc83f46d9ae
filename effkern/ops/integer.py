"""Integer-only ViT ops (I-ViT): Shiftmax, ShiftGELU, I-LayerNorm, dyadic requantisation and
the int8 GEMM they sit between.

Conventions. A quantised tensor is an integer tensor ``I`` with a positive float32 scale ``S``;
it stands for the real tensor ``I * S``. Every op below reproduces, to the bit, the integer
steps I-ViT's PyTorch code performs (the published models were trained with them). Those steps
are written out once, in the ``ref_*`` functions of this module: the pure-torch reference that is
the oracle for the Triton and CUDA backends. The reference computes in int64 and never overflows.

Layout of this module, one section per op:
  validation + scale-derived integer constants (computed once, in float32 exactly as I-ViT does,
  and handed to every backend as integers) -> reference -> public op (torch.library custom op,
  fake impl, backend dispatch).

The ops are integer in and integer out, so they carry no autograd; quantisation-aware training
goes through the straight-through estimators of :mod:`effkern.nn.integer`.

Host synchronisation. No op synchronises host and device on its hot path when its scales are
Python floats or CPU tensors: the scale-derived constants (x0, the dyadic m and e) and their
range checks are computed on the host in plain Python (float32 steps emulated exactly with
numpy), handed to the kernels as scalar arguments, and the few device tensors built from them
(output scales, per-tensor m and e vectors) are made by fill kernels (``torch.full``), never by
a host -> device copy of pageable memory; per-channel host scales travel through pinned memory
with ``non_blocking=True``. Costs that remain, by design:
* int_softmax / int_gelu with a scale that lives on the GPU read it back once per call (x0 is a
  kernel scalar): one synchronisation. Pass the scale as a float or CPU tensor to avoid it.
* requantize / int8_linear with a scale on the GPU compute m and e on the device (no sync); the
  check that such a scale is finite and positive reads it back and runs only when validation is
  on (``effkern.validation()`` or ``EFFKERN_VALIDATE=1``; always on CPU, where it is free).
* int_layernorm computes bias_int from weight and bias on their device (no sync); the check
  that every channel's bias_int fits +-2^30 reads it back and runs only when validation is on
  (the same switch: always on CPU, off on a GPU unless asked for).
"""

from __future__ import annotations

# The public API (effkern.ops re-exports it).
__all__ = ["int8_linear", "int_gelu", "int_layernorm", "int_softmax", "requantize"]

import math

import numpy as np
import torch
from torch import Tensor

from effkern._common import (INT32_MAX, INT_DTYPES, MAX_INT8_LINEAR_K, check_int, check_same_device, dtype_name,
                             int_dtype_for_bits, validation_enabled)
from effkern._requant import (as_scale_tensor, check_gemm_requant, check_scalar_scale, dyadic_columns, host_scale,
                              ref_int_gemm_rows, ref_requantize_rows, scale_for_columns)
from effkern._registry import Invalid, Sample, cuda_kernel, define_op, torch_kernel, triton_kernel

_DTYPE_BITS = {torch.int8: 8, torch.int16: 16, torch.int32: 32}
NARROW_INT_DTYPES = (torch.int8, torch.int16)  # the inputs of int_gelu and int_layernorm
FAMILY = "integer"


def _cuda_grid_limit(rows: Tensor, *args) -> list[str]:
    """The CUDA row kernels launch one block per row on grid dimension x (at most 2^31 - 1)."""
    return [f"{rows.shape[0]} rows exceed the grid limit of 2^31 - 1"] if rows.shape[0] > 2**31 - 1 else []


# --------------------------------------------------------------------------------------------
# Argument checks shared by the ops
# --------------------------------------------------------------------------------------------


def _check_int_input(op: str, x: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(
            f"{op}: x must have dtype {' or '.join(dtype_name(d) for d in dtypes)}, "
            f"got {dtype_name(x.dtype)}"
        )
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the row), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: the last dimension of x (the row length) must be >= 1, got 0")


def _np_f32(value: float) -> np.float32:
    """A Python float rounded to float32 (round to nearest even; out of range -> inf), the
    host-side stand-in for a float32 tensor element: numpy's float32 arithmetic on it is IEEE
    float32, as torch's CPU kernels."""
    with np.errstate(over="ignore"):
        return np.float32(value)


# --------------------------------------------------------------------------------------------
# Shared integer building blocks (reference)
# --------------------------------------------------------------------------------------------


# Bound on |x0| that keeps every shift-exp intermediate inside int64: (r - 2*x0) <= 2^31 is
# shifted left by at most 31 bits (see ref_shift_exp).
MAX_ABS_X0 = 2**30


def shift_exp_x0(scale, op: str = "shift_exp", what: str = "scale") -> int:
    """I-ViT's x0 = floor(-1 / S), computed in float32 (S a float32 value: a Python float that
    is one, a numpy float32, or a one-element CPU tensor).

    Raises ValueError naming ``what`` when a finite S gives no usable x0: a subnormal S makes
    -1/S infinite, a huge one (or one whose derived S overflows float32) makes x0 = 0, and a
    small one makes |x0| exceed 2^30, where the integer exp would overflow int64.
    """
    if isinstance(scale, Tensor):
        scale = scale.detach().to(torch.float32).reshape(()).item()
    s = _np_f32(scale)
    value = float(s)
    with np.errstate(all="ignore"):
        neg_inv = np.floor(np.float32(-1.0) / s)  # float32 division, as torch's -1.0 / S
    if not math.isfinite(neg_inv) or -float(neg_inv) > MAX_ABS_X0:
        raise ValueError(f"{op}: {what}={value:.6g} is too small: x0 = floor(-1/({what})) is below -2^30, "
                         f"where the integer exp would overflow int64")
    if not math.isfinite(value) or int(neg_inv) == 0:
        raise ValueError(f"{op}: {what}={value:.6g} is too large: x0 = floor(-1/({what})) must be "
                         f"negative and finite")
    return int(neg_inv)


def ref_shift_exp(d: Tensor, x0: int, n: int) -> Tensor:
    """I-ViT's shift-based exponential of the int64 tensor d (real value d * S, x0 = floor(-1/S)).

    It returns roughly 2^n * exp(d * S) / S in integers: exp(d*S) = 2^(d*S*log2 e), with
    log2 e ~ 1 + 1/2 - 1/16 applied by shifts, the power of two split into an integer part q and
    a remainder r approximated linearly. Inputs below n * x0 (d * S below about -n / 1.44) are
    clamped there, as in I-ViT.

    For d <= 0 (every use in softmax, and GELU's per-element term) the shift n - q lies in
    [0, n]. GELU also evaluates it at d = -rowmax, which is positive for rows whose maximum is
    negative; the shift then exceeds n without bound. Every such use goes through
    min(e + ..., 2^31 - 1), and the value is >= 2^31 once the shift reaches 32, so it is returned
    as 2^31 there instead of overflowing int64.
    """
    p = d + (d >> 1) - (d >> 4)
    p = torch.clamp(p, min=n * x0)
    q = torch.div(p, x0, rounding_mode="floor")
    r = p - x0 * q
    shift = n - q
    e = ((r - 2 * x0) << shift.clamp(max=31)) >> 1
    return torch.where(shift >= 32, torch.full_like(e, 2**31), e)


def ref_div_round_half_even(a: Tensor, b: int) -> Tensor:
    """round-half-to-even(a / b) for int64 a and an int b > 0, exactly."""
    q = torch.div(a, b, rounding_mode="floor")
    twice_rem = 2 * (a - q * b)
    round_up = (twice_rem > b) | ((twice_rem == b) & (q % 2 == 1))
    return q + round_up.to(q.dtype)


# --------------------------------------------------------------------------------------------
# int_softmax (I-ViT Shiftmax)
# --------------------------------------------------------------------------------------------


def ref_int_softmax_rows(x: Tensor, x0: int, n: int, out_bits: int) -> Tensor:
    """Reference Shiftmax over the last dim of an integer tensor, given x0 = floor(-1/S)."""
    i = x.to(torch.int64)
    e = ref_shift_exp(i - i.amax(dim=-1, keepdim=True), x0, n)
    s = e.sum(dim=-1, keepdim=True).clamp(max=INT32_MAX)  # e >= 1, so s >= 1
    f = torch.div(INT32_MAX, s, rounding_mode="floor")
    return ((e * f) >> (32 - out_bits)).to(int_dtype_for_bits(out_bits))


def _softmax_x0(scale: Tensor, n: int, out_bits: int) -> int:
    (host,) = host_scale("int_softmax", "scale", scale)
    x0 = shift_exp_x0(host, "int_softmax")
    # The largest exp term is -x0 * 2^n. Up to 2^31 - 1 every output fits out_bits (when the
    # row sum saturates, f = 1 and y = e >> (32 - out_bits)); beyond it the output would not.
    if -x0 * 2**n > INT32_MAX:
        raise ValueError(
            f"int_softmax: scale={host:.6g} is too small for n={n}: x0 = floor(-1/scale) = {x0} "
            f"makes the largest exp term -x0 * 2^n exceed 2^31 - 1, so outputs would overflow "
            f"{out_bits} bits; use a scale >= {2.0**n / INT32_MAX:.6g} or a smaller n"
        )
    return x0


def _check_int_softmax(x: Tensor, scale: Tensor, out_bits: int, n: int) -> None:
    _check_int_input("int_softmax", x, INT_DTYPES)
    check_scalar_scale("int_softmax", "scale", scale, x)
    if out_bits not in (8, 16):
        raise ValueError(f"int_softmax: out_bits must be 8 or 16, got {out_bits!r}")
    check_int("int_softmax", "n", n, 1, 30)


INT_SOFTMAX = define_op(
    "int_softmax", family=FAMILY, doc="I-ViT Shiftmax over the last dim",
    check=_check_int_softmax, dispatch_on="x",
    kernels=[
        torch_kernel(ref_int_softmax_rows, dtypes=INT_DTYPES),
        triton_kernel("integer:int_softmax_rows", dtypes=INT_DTYPES),
        cuda_kernel("cuda_int_softmax", dtypes=INT_DTYPES, check=_cuda_grid_limit),
    ],
)


@INT_SOFTMAX.impl
def _int_softmax_op(x: Tensor, scale: Tensor, out_bits: int, n: int) -> tuple[Tensor, Tensor]:
    x0 = _softmax_x0(scale, n, out_bits)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = INT_SOFTMAX.kernels(x=rows, x0=x0, n=n, out_bits=out_bits)
    out_scale = torch.full((), 2.0 ** -(out_bits - 1), dtype=torch.float32, device=x.device)
    return y.reshape(x.shape), out_scale


@INT_SOFTMAX.fake
def _(x, scale, out_bits, n):
    return x.new_empty(x.shape, dtype=int_dtype_for_bits(out_bits)), x.new_empty((), dtype=torch.float32)


def int_softmax(x_int: Tensor, scale, *, out_bits: int = 8, n: int = 15) -> tuple[Tensor, Tensor]:
    """I-ViT's integer-only softmax (Shiftmax) over the last dim.

    Args:
        x_int: int8, int16 or int32 logits, any shape ``[..., L]`` with L >= 1.
        scale: their positive scale S (float, or a one-element float tensor).
        out_bits: 8 (int8 output) or 16 (int16 output).
        n: exponent precision; the exp terms carry n fractional bits.

    Returns:
        ``(y_int, out_scale)`` with ``out_scale = 2^-(out_bits - 1)``: y_int * out_scale
        approximates softmax(x_int * scale).

    Steps (all integer, with x0 = floor(-1/S) in float32): d = I - rowmax(I);
    p = d + (d >> 1) - (d >> 4); p = max(p, n*x0); q = floor(p / x0); r = p - x0*q;
    e = ((r - 2*x0) << (n - q)) >> 1; s = min(sum(e), 2^31 - 1); f = floor((2^31 - 1) / s);
    y = (e * f) >> (32 - out_bits).

    Overflow: the row sum of e exceeds int32 for long or flat rows (e.g. 785 equal logits with
    x0 = -100); it saturates at 2^31 - 1 as I-ViT specifies (then f = 1) and is accumulated in
    int64, so every backend is exact. Scales so small that a single e exceeds 2^31 - 1
    (S < 2^n / (2^31 - 1)) would overflow the output and raise ValueError.

    Accuracy: once the row sum saturates, y = e >> (32 - out_bits) and the row no longer sums
    to about 1. Each e is at most -x0 * 2^n, so rows of length L stay normalised when
    L * 2^n / S < 2^31, e.g. S > 3e-3 for L = 197 and n = 15. I-ViT feeds Shiftmax 8-bit logits,
    whose scales are that coarse; 16-bit logits need a smaller n.
    """
    s = as_scale_tensor("int_softmax", "scale", scale)
    return torch.ops.effkern.int_softmax(x_int, s, out_bits, n)


# --------------------------------------------------------------------------------------------
# int_gelu (I-ViT ShiftGELU)
# --------------------------------------------------------------------------------------------


def ref_int_gelu_rows(x: Tensor, x0: int, n: int, out_bits: int) -> Tensor:
    """Reference ShiftGELU over the last dim, given x0 = floor(-1 / (1.702 * S))."""
    i = x.to(torch.int64)
    m = i.amax(dim=-1, keepdim=True)
    e = ref_shift_exp(i - m, x0, n)
    e_neg_max = ref_shift_exp(-m, x0, n)
    s = (e + e_neg_max).clamp(max=INT32_MAX)
    f = torch.div(INT32_MAX, s, rounding_mode="floor")
    sigmoid = (e * f) >> (32 - out_bits)
    return (i * sigmoid).to(torch.int32)


def _gelu_x0(x_dtype: torch.dtype, scale: Tensor, n: int, out_bits: int) -> int:
    (host,) = host_scale("int_gelu", "scale", scale)
    with np.errstate(over="ignore"):
        scaled = _np_f32(host) * _np_f32(1.702)  # S' = 1.702 * S in float32, as I-ViT (and torch's S * 1.702)
    x0 = shift_exp_x0(scaled, "int_gelu", "1.702 * scale")
    # The sigmoid term is at most 2^(out_bits-1) - 1, except when e + e(-max) saturates at
    # 2^31 - 1 (f = 1): then it is e >> (32 - out_bits), e at most -x0 * 2^n. The int32 output
    # I * sigmoid must not overflow for any input of this dtype.
    max_sigmoid = max(2 ** (out_bits - 1) - 1, (-x0 * 2**n) >> (32 - out_bits))
    max_abs_input = 2 ** (_DTYPE_BITS[x_dtype] - 1)
    if max_abs_input * max_sigmoid > INT32_MAX:
        raise ValueError(
            f"int_gelu: scale={host:.6g} is too small for n={n}, out_bits={out_bits} and "
            f"{dtype_name(x_dtype)} inputs: the saturated sigmoid term reaches {max_sigmoid}, so "
            f"x * sigmoid could overflow the int32 output"
        )
    return x0


def _check_int_gelu(x: Tensor, scale: Tensor, out_bits: int, n: int) -> None:
    _check_int_input("int_gelu", x, NARROW_INT_DTYPES)
    check_scalar_scale("int_gelu", "scale", scale, x)
    check_int("int_gelu", "out_bits", out_bits, 2, 16)
    check_int("int_gelu", "n", n, 1, 30)


INT_GELU = define_op(
    "int_gelu", family=FAMILY, doc="I-ViT ShiftGELU, rowwise over the last dim",
    check=_check_int_gelu, dispatch_on="x",
    kernels=[
        torch_kernel(ref_int_gelu_rows, dtypes=NARROW_INT_DTYPES),
        triton_kernel("integer:int_gelu_rows", dtypes=NARROW_INT_DTYPES),
        cuda_kernel("cuda_int_gelu", dtypes=NARROW_INT_DTYPES, check=_cuda_grid_limit),
    ],
)


@INT_GELU.impl
def _int_gelu_op(x: Tensor, scale: Tensor, out_bits: int, n: int) -> tuple[Tensor, Tensor]:
    x0 = _gelu_x0(x.dtype, scale, n, out_bits)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = INT_GELU.kernels(x=rows, x0=x0, n=n, out_bits=out_bits)
    step = 2.0 ** -(out_bits - 1)
    if scale.device.type == "cpu":  # a fill on x's device, no copy (exact: a power-of-two step)
        value = float(_np_f32(scale.detach().to(torch.float32).reshape(()).item()) * np.float32(step))
        out_scale = torch.full((), value, dtype=torch.float32, device=x.device)
    else:
        out_scale = scale.detach().to(torch.float32).reshape(()) * step
    return y.reshape(x.shape), out_scale


@INT_GELU.fake
def _(x, scale, out_bits, n):
    return x.new_empty(x.shape, dtype=torch.int32), x.new_empty((), dtype=torch.float32)


def int_gelu(x_int: Tensor, scale, *, out_bits: int = 8, n: int = 23) -> tuple[Tensor, Tensor]:
    """I-ViT's integer-only GELU (ShiftGELU): x * sigmoid(1.702 x), rowwise over the last dim.

    Args:
        x_int: int8 or int16 activations ``[..., C]``.
        scale: their positive scale S.
        out_bits: precision of the integer sigmoid (2..16).
        n: exponent precision of the shift-based exp.

    Returns:
        ``(y_int, out_scale)``: int32 ``y_int = I * sigmoid_int`` and
        ``out_scale = S * 2^-(out_bits - 1)``.

    Steps: S' = 1.702 * S (float32), x0 = floor(-1/S'), m = rowmax(I); e = shiftexp(I - m),
    em = shiftexp(-m) (the Shiftmax exp steps with this n); s = min(e + em, 2^31 - 1);
    f = floor((2^31 - 1) / s); sigmoid = (e * f) >> (32 - out_bits); y = I * sigmoid.

    Known saturation, reproduced on purpose (trained I-ViT models depend on it): the sigmoid is
    computed as e^(x-m) / (e^(x-m) + e^(-m)), and shiftexp clamps its argument at n * x0, i.e.
    at a real value of about -n / (1.702 * 1.4375) = -9.4 for n = 23. For rows whose maximum
    exceeds about 9.4 (in real units) e^(-m) is therefore stuck at its floor, and the sigmoid of
    that row's small entries no longer tends to 0. Also, e + em saturates at 2^31 - 1 when
    -x0 * 2^n is large (small scales) or when the row maximum is negative and em grows; then
    f = 1 and the sigmoid term becomes e >> (32 - out_bits), which can exceed
    2^(out_bits-1) - 1. I-ViT does the same. The exp terms exceed int32 for scales below about
    2^n / 2^31 / 1.702 and are computed in int64; scales so small that I * sigmoid could
    overflow int32 raise ValueError.
    """
    s = as_scale_tensor("int_gelu", "scale", scale)
    return torch.ops.effkern.int_gelu(x_int, s, out_bits, n)


# --------------------------------------------------------------------------------------------
# int_layernorm (I-ViT I-LayerNorm)
# --------------------------------------------------------------------------------------------


def ref_int_layernorm_rows(x: Tensor, bias_int: Tensor, iters: int) -> Tensor:
    """Reference I-LayerNorm over the last dim, given bias_int [C] (int32)."""
    i = x.to(torch.int64)
    c = i.shape[-1]
    y = i - ref_div_round_half_even(i.sum(dim=-1, keepdim=True), c)
    var = (y * y).sum(dim=-1, keepdim=True)  # a sum of squares, not a mean (I-ViT)
    k = torch.full_like(var, 2**16)
    for _ in range(iters):  # integer Newton iteration towards sqrt(var)
        k = torch.div(k + torch.div(var, k, rounding_mode="floor"), 2, rounding_mode="floor")
    f = torch.div(INT32_MAX, k, rounding_mode="floor")
    return (((y * f) >> 1) + bias_int.to(device=x.device, dtype=torch.int64)).to(torch.int32)


def layernorm_constants(c: int, weight: Tensor, bias: Tensor, validate: bool | None = True) -> tuple[Tensor, Tensor]:
    """I-LayerNorm's (bias_int, out_scale) from the float affine parameters, in float32 as I-ViT:
    s = sqrt(C) / 2^30, bias_int = floor((bias / weight) / s), out_scale = s * weight.

    bias_int must lie in [-2^30, 2^30] so that the int32 output cannot overflow (the normalised
    part (y * f) >> 1 lies in [-2^30, 2^30 - 1]); a ValueError names the first offending channel.
    That check reads bias_int back to the host (a synchronisation on a GPU): ``validate=True``
    always runs it, False never, None as :func:`effkern._common.validation_enabled` says for
    weight's device (on CPU: yes; on a GPU: only under ``effkern.validation()``). The rest makes
    no copy between host and device: s is a float32 host value, placed on weight's device by a
    fill.
    """
    w = weight.detach().to(torch.float32)
    b = bias.detach().to(torch.float32)
    s = float(np.sqrt(np.float32(c)) / np.float32(2.0**30))  # float32 sqrt, as torch.sqrt (exact /2^30)
    # A 0-d tensor on w's device, not a Python scalar: a CUDA division by a CPU scalar multiplies
    # by its reciprocal, which can differ in the last bit from the division the reference does.
    s_dev = torch.full((), s, dtype=torch.float32, device=w.device)
    bias_float = torch.floor((b / w) / s_dev)
    check = validation_enabled(w.device) if validate is None else bool(validate)
    host = bias_float.cpu() if check else None
    bad = None if host is None else ~(torch.isfinite(host) & (host.abs() <= 2**30))
    if bad is not None and bool(bad.any()):
        ch = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"int_layernorm: channel {ch} has bias/weight = {b[ch].item():.6g}/{w[ch].item():.6g}; "
            f"floor((bias/weight) / (sqrt(C)/2^30)) = {host[ch].item():.6g} must be finite and within "
            f"+-2^30 (|bias/weight| <= sqrt(C) = {math.sqrt(c):.4g}) for the int32 output to be exact"
        )
    return bias_float.to(torch.int32), s_dev * w


def _check_int_layernorm(x: Tensor, weight: Tensor, bias: Tensor, iters: int) -> None:
    _check_int_input("int_layernorm", x, NARROW_INT_DTYPES)
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"int_layernorm: {name} must be a floating-point tensor")
        if tuple(t.shape) != (c,):
            raise ValueError(f"int_layernorm: {name} must have shape ({c},) to match x's last dim, got {tuple(t.shape)}")
        check_same_device("int_layernorm", name, t, "x", x)
    # With k starting at 2^16 and halving at worst (all-equal rows: var = 0), 16 iterations keep
    # k >= 1; more could divide by zero.
    check_int("int_layernorm", "iters", iters, 0, 16)


INT_LAYERNORM = define_op(
    "int_layernorm", family=FAMILY, doc="I-ViT I-LayerNorm over the last dim",
    check=_check_int_layernorm, dispatch_on="x",
    kernels=[
        torch_kernel(ref_int_layernorm_rows, dtypes=NARROW_INT_DTYPES),
        triton_kernel("integer:int_layernorm_rows", dtypes=NARROW_INT_DTYPES),
        cuda_kernel("cuda_int_layernorm", dtypes=NARROW_INT_DTYPES, check=_cuda_grid_limit),
    ],
)


@INT_LAYERNORM.impl
def _int_layernorm_op(x: Tensor, weight: Tensor, bias: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    bias_int, out_scale = layernorm_constants(x.shape[-1], weight, bias, validate=None)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = INT_LAYERNORM.kernels(x=rows, bias_int=bias_int.contiguous(), iters=iters)
    return y.reshape(x.shape), out_scale


@INT_LAYERNORM.fake
def _(x, weight, bias, iters):
    return x.new_empty(x.shape, dtype=torch.int32), weight.new_empty(weight.shape, dtype=torch.float32)


def int_layernorm(x_int: Tensor, weight: Tensor, bias: Tensor, *, iters: int = 10) -> tuple[Tensor, Tensor]:
    """I-ViT's integer-only LayerNorm over the last dim C.

    The input scale cancels out of a LayerNorm, so none is needed.

    Args:
        x_int: int8 or int16 ``[..., C]``.
        weight, bias: the float affine parameters ``[C]`` (converted to float32).
        iters: iterations of the integer square root (0..16; I-ViT uses 10).

    Returns:
        ``(y_int, out_scale)``: int32 y_int and the per-channel float32 scale
        ``out_scale = sqrt(C) / 2^30 * weight``.

    Steps: mu = round-half-even(sum(I) / C) (exact); y = I - mu; var = sum(y^2) (a sum, not a
    mean); k = 2^16, then ``iters`` times k = floor((k + floor(var / k)) / 2);
    f = floor((2^31 - 1) / k); out = ((y * f) >> 1) + floor((bias / weight) / (sqrt(C) / 2^30)).

    Overflow: y^2 and var exceed int32 for int16 inputs and are computed in int64; channels with
    |bias / weight| > sqrt(C) would overflow the int32 output and raise ValueError.
    """
    return torch.ops.effkern.int_layernorm(x_int, weight, bias, iters)


# --------------------------------------------------------------------------------------------
# requantize (dyadic)
# --------------------------------------------------------------------------------------------


def _check_requantize(x: Tensor, in_scale: Tensor, out_scale: Tensor, out_bits: int) -> None:
    _check_int_input("requantize", x, INT_DTYPES)
    scale_for_columns("requantize", "in_scale", in_scale, x)
    scale_for_columns("requantize", "out_scale", out_scale, x)
    check_int("requantize", "out_bits", out_bits, 2, 32)


REQUANTIZE = define_op(
    "requantize", family=FAMILY, doc="dyadic requantisation I * m / 2^e",
    check=_check_requantize, dispatch_on="x",
    kernels=[
        torch_kernel(ref_requantize_rows, dtypes=INT_DTYPES),
        triton_kernel("integer:requantize_rows", dtypes=INT_DTYPES),
    ],
)


@REQUANTIZE.impl
def _requantize_op(x: Tensor, in_scale: Tensor, out_scale: Tensor, out_bits: int) -> Tensor:
    # As int8_linear: (1,) for per-tensor scales, left on the host for host scales (the Triton
    # kernel then takes them as scalars and picks its 32-bit epilogue on the host).
    per_tensor = in_scale.numel() == 1 and out_scale.numel() == 1
    host = in_scale.device.type == "cpu" and out_scale.device.type == "cpu"
    m, e = dyadic_columns("requantize", in_scale, out_scale, 1 if per_tensor else x.shape[-1],
                           None if host else x.device)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return REQUANTIZE.kernels(x=rows, m=m, e=e, out_bits=out_bits).reshape(x.shape)


@REQUANTIZE.fake
def _(x, in_scale, out_scale, out_bits):
    return x.new_empty(x.shape, dtype=int_dtype_for_bits(out_bits))


def requantize(x_int: Tensor, in_scale, out_scale, *, out_bits: int) -> Tensor:
    """Dyadic requantisation: integers at scale ``in_scale`` -> ``out_bits`` integers at
    ``out_scale``, in integer arithmetic only.

    (m, e) come from frexp(in_scale / out_scale) (ratio in float64 of the float32 scales):
    m = round-half-up(mantissa * 2^31), e = 31 - exponent; then
    y = clamp(round-half-even(I * m / 2^e), -2^(out_bits-1), 2^(out_bits-1) - 1), computed
    exactly (|I * m| <= 2^62 fits int64). Scales are per-tensor or per-channel over the last dim.

    Args:
        x_int: int8, int16 or int32 ``[..., C]``.
        in_scale, out_scale: positive floats or float tensors with one value or C values.
        out_bits: 2..32; the output dtype is the narrowest of int8/int16/int32 that holds it.
    """
    i = as_scale_tensor("requantize", "in_scale", in_scale)
    o = as_scale_tensor("requantize", "out_scale", out_scale)
    return torch.ops.effkern.requantize(x_int, i, o, out_bits)


# --------------------------------------------------------------------------------------------
# int8_linear
# --------------------------------------------------------------------------------------------

def _check_int8_linear(x: Tensor, w: Tensor, bias: Tensor | None, in_scale: Tensor | None,
                       out_scale: Tensor | None, out_bits: int) -> None:
    op = "int8_linear"
    _check_int_input(op, x, (torch.int8,))
    if not isinstance(w, Tensor) or w.dtype != torch.int8 or w.dim() != 2:
        raise TypeError(f"{op}: w must be a 2-D int8 tensor [out_features, in_features]")
    k = x.shape[-1]
    if w.shape[1] != k:
        raise ValueError(f"{op}: x has {k} input features but w has shape {tuple(w.shape)} (expects [N, {k}])")
    if k > MAX_INT8_LINEAR_K:
        raise ValueError(f"{op}: in_features={k} exceeds {MAX_INT8_LINEAR_K}: int32 accumulation could overflow")
    check_same_device(op, "w", w, "x", x)
    n_out = w.shape[0]
    if bias is not None:
        if bias.dtype != torch.int32 or tuple(bias.shape) != (n_out,):
            raise ValueError(f"{op}: bias must be int32 with shape ({n_out},), got {dtype_name(bias.dtype)} {tuple(bias.shape)}")
        check_same_device(op, "bias", bias, "x", x)
    check_gemm_requant(op, in_scale, out_scale, out_bits, x, n_out)


INT8_LINEAR = define_op(
    "int8_linear", family=FAMILY, doc="int8 x int8 -> int32 GEMM with fused requantisation",
    check=_check_int8_linear, dispatch_on="x",
    kernels=[
        torch_kernel(ref_int_gemm_rows, dtypes=(torch.int8,)),
        triton_kernel("int8_linear:int8_linear_rows", dtypes=(torch.int8,)),
    ],
)


@INT8_LINEAR.impl
def _int8_linear_op(x: Tensor, w: Tensor, bias: Tensor | None, in_scale: Tensor | None,
                    out_scale: Tensor | None, out_bits: int) -> Tensor:
    m = e = None
    if out_scale is not None:
        # (1,) when both scales are per-tensor (a shape test, no sync), and left on the host when
        # they are host scales: the Triton kernel then takes per-tensor constants as two scalar
        # arguments and picks its epilogue on the host; each backend moves what it needs.
        per_tensor = in_scale.numel() == 1 and out_scale.numel() == 1
        host = in_scale.device.type == "cpu" and out_scale.device.type == "cpu"
        m, e = dyadic_columns("int8_linear", in_scale, out_scale, 1 if per_tensor else w.shape[0],
                               None if host else x.device)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    bias = None if bias is None else bias.contiguous()
    y = INT8_LINEAR.kernels(x=rows, w=w.contiguous(), bias=bias, m=m, e=e, out_bits=out_bits)
    return y.reshape(*x.shape[:-1], w.shape[0])


@INT8_LINEAR.fake
def _(x, w, bias, in_scale, out_scale, out_bits):
    dtype = torch.int32 if out_scale is None else int_dtype_for_bits(out_bits)
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype)


def int8_linear(x_int8: Tensor, w_int8: Tensor, bias_int32: Tensor | None = None, *, in_scale=None,
                out_scale=None, out_bits: int = 8) -> Tensor:
    """int8 x int8 linear layer with int32 accumulation and a fused requantising epilogue.

    ``acc = x_int8 @ w_int8.T + bias_int32`` (exact int32 accumulation, K <= 2^17 - 1; adding the
    bias saturates at the int32 range). Without scales the int32 ``acc`` is returned. With
    ``in_scale`` (the scale of acc: x_scale * w_scale, per tensor or per output channel) and
    ``out_scale`` (per tensor or per output channel), acc is requantised exactly as
    :func:`requantize` does, to ``out_bits`` (int8 for <= 8, int16 for <= 16, else int32).

    Args:
        x_int8: int8 ``[..., K]``.
        w_int8: int8 ``[N, K]`` (F.linear layout).
        bias_int32: optional int32 ``[N]``, at the scale of acc.
    """
    i = None if in_scale is None else as_scale_tensor("int8_linear", "in_scale", in_scale)
    o = None if out_scale is None else as_scale_tensor("int8_linear", "out_scale", out_scale)
    return torch.ops.effkern.int8_linear(x_int8, w_int8, bias_int32, i, o, out_bits)


# --------------------------------------------------------------------------------------------
# Test cases (tests/test_registry.py runs them on every backend)
# --------------------------------------------------------------------------------------------


def _randint(gen: torch.Generator, shape, dtype: torch.dtype, device, lo=None, hi=None) -> Tensor:
    info = torch.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return torch.randint(lo, hi + 1, tuple(shape), generator=gen, dtype=torch.int64).to(dtype).to(device)


def _f32(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _attention_logits(gen, device, dtype, b=2, h=3, n=17) -> Tensor:
    """[B, H, N, N] logits, transposed in the last two dims: a non-contiguous view."""
    return _randint(gen, (b, h, n, n), dtype, device).transpose(-1, -2)


def _pick(gen: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _softmax_samples(gen, device):
    return [
        Sample((_randint(gen, (7, 197), torch.int8, device), _f32(0.05), 8, 15), "int8 rows of 197"),
        Sample((_randint(gen, (3, 1), torch.int16, device), _f32(3e-3), 16, 15), "rows of length 1"),
        Sample((_attention_logits(gen, device, torch.int16), _f32(2e-4), 8, 12), "transposed logits"),
        Sample((_randint(gen, (0, 5), torch.int32, device), _f32(0.1), 8, 15), "empty batch"),
    ]


def _softmax_random(gen, device):
    dtype = _pick(gen, INT_DTYPES)
    shape = [int(v) for v in torch.randint(1, 40, (_pick(gen, (1, 2, 3)),), generator=gen)]
    x = _randint(gen, shape, dtype, device, *( (-(2**20), 2**20) if dtype == torch.int32 else (None, None)))
    n = _pick(gen, (8, 12, 15))
    scale = _pick(gen, (0.5, 0.05, 3e-3, 2e-4)) * 2.0 ** (16 - n)  # keeps -x0 * 2^n within int32
    return Sample((x, _f32(scale), _pick(gen, (8, 16)), n))


def _softmax_invalid(gen, device):
    x = _randint(gen, (2, 5), torch.int8, device)
    return [
        Invalid((x.float(), _f32(0.1), 8, 15), TypeError, "int_softmax: x must have dtype"),
        Invalid((x, _f32(0.1), 4, 15), ValueError, "out_bits must be 8 or 16"),
        Invalid((x, torch.tensor([0.1, 0.2]), 8, 15), ValueError, "single value"),
        Invalid((x, _f32(-0.1), 8, 15), ValueError, "scale must be finite and > 0"),
        Invalid((x, _f32(1e-40), 8, 15), ValueError, "scale=.* is too small"),
        Invalid((x, torch.tensor(0.1, device="meta"), 8, 15), ValueError, "scale is on meta"),
        Invalid((x[:, :0], _f32(0.1), 8, 15), ValueError, "row length"),
    ]


INT_SOFTMAX.cases(samples=_softmax_samples, random=_softmax_random, invalid=_softmax_invalid, exact=True)


def _gelu_samples(gen, device):
    x = _randint(gen, (9, 385), torch.int8, device)
    x[1] = _randint(gen, (385,), torch.int8, device, -128, -1)  # negative row max
    return [
        Sample((x, _f32(0.05), 8, 23), "int8, a negative row"),
        Sample((_randint(gen, (4, 3, 5), torch.int16, device).permute(2, 0, 1), _f32(2e-3), 16, 20), "permuted"),
        Sample((_randint(gen, (1, 1), torch.int8, device), _f32(0.2), 2, 23), "one element, 2 bits"),
    ]


def _gelu_random(gen, device):
    dtype = _pick(gen, NARROW_INT_DTYPES)
    shape = [int(v) for v in torch.randint(1, 40, (_pick(gen, (1, 2, 3)),), generator=gen)]
    scale = _pick(gen, (0.2, 0.05, 0.01, 2.5e-3)) if dtype == torch.int8 else _pick(gen, (1e-2, 1e-3))
    out_bits = _pick(gen, (4, 8, 16) if dtype == torch.int8 else (4, 8))  # int16 x 16 bits: int32 overflow
    return Sample((_randint(gen, shape, dtype, device), _f32(scale), out_bits, 23))


def _gelu_invalid(gen, device):
    x = _randint(gen, (2, 5), torch.int8, device)
    return [
        Invalid((x.int(), _f32(0.1), 8, 23), TypeError, "int_gelu: x must have dtype"),
        Invalid((x, _f32(0.1), 17, 23), ValueError, "out_bits must be an integer in"),
        Invalid((x, _f32(0.1), 8, 0), ValueError, "n must be an integer in"),
        Invalid((x, _f32(3e38), 8, 23), ValueError, "1.702 \\* scale=.* is too large"),
        Invalid((x, _f32(1e-40), 8, 23), ValueError, "1.702 \\* scale=.* is too small"),
        Invalid((x, torch.tensor(0.1, device="meta"), 8, 23), ValueError, "scale is on meta"),
    ]


INT_GELU.cases(samples=_gelu_samples, random=_gelu_random, invalid=_gelu_invalid, exact=True)


def _affine(gen, c, device):
    weight = (torch.rand(c, generator=gen) + 0.5).to(device)
    bias = (torch.randn(c, generator=gen) * 0.1).to(device)
    return weight, bias


def _layernorm_samples(gen, device):
    x = _randint(gen, (5, 384), torch.int8, device)
    x[0] = 7  # an all-equal row: var = 0
    return [
        Sample((x, *_affine(gen, 384, device), 10), "int8, an all-equal row"),
        Sample((_randint(gen, (3, 1), torch.int16, device), *_affine(gen, 1, device), 16), "C = 1"),
        Sample((_randint(gen, (6, 2, 197), torch.int16, device).transpose(0, 1), *_affine(gen, 197, device), 10),
               "int16, transposed batch dims"),
    ]


def _layernorm_random(gen, device):
    dtype = _pick(gen, NARROW_INT_DTYPES)
    shape = [int(v) for v in torch.randint(1, 40, (_pick(gen, (1, 2, 3)),), generator=gen)]
    return Sample((_randint(gen, shape, dtype, device), *_affine(gen, shape[-1], device), _pick(gen, (0, 5, 10, 16))))


def _layernorm_invalid(gen, device):
    x = _randint(gen, (2, 5), torch.int8, device)
    w, b = _affine(gen, 5, device)
    return [
        Invalid((x.int(), w, b, 10), TypeError, "int_layernorm: x must have dtype"),
        Invalid((x, w[:4], b, 10), ValueError, "weight must have shape"),
        Invalid((x, w, b.to("meta"), 10), ValueError, "bias is on meta"),
        Invalid((x, w, b, 17), ValueError, "iters must be an integer in"),
        Invalid((x, torch.zeros_like(w), b, 10), ValueError, "channel 0"),
    ]


INT_LAYERNORM.cases(samples=_layernorm_samples, random=_layernorm_random, invalid=_layernorm_invalid, exact=True)


def _requantize_samples(gen, device):
    c = 33
    return [
        Sample((_randint(gen, (5, c), torch.int32, device), _f32(1e-4), _f32(0.02), 8), "per tensor, int32"),
        Sample((_randint(gen, (c, 4), torch.int16, device).T, (torch.rand(c, generator=gen) + 0.1) * 1e-3,
                _f32(0.05), 16), "per channel, transposed"),
        Sample((_randint(gen, (2, 3), torch.int8, device), _f32(2.0), _f32(1e-3), 32), "saturating, 32 bits"),
    ]


def _requantize_random(gen, device):
    c = int(torch.randint(1, 40, (1,), generator=gen))
    x = _randint(gen, (int(torch.randint(1, 20, (1,), generator=gen)), c), _pick(gen, INT_DTYPES), device)
    in_scale = (torch.rand(_pick(gen, (1, c)), generator=gen) + 0.01) * 10.0 ** float(_pick(gen, (-6, -3, 0)))
    out_scale = (torch.rand(_pick(gen, (1, c)), generator=gen) + 0.01) * 10.0 ** float(_pick(gen, (-3, -1)))
    return Sample((x, in_scale.reshape(-1) if in_scale.numel() > 1 else in_scale.reshape(()),
                   out_scale.reshape(-1) if out_scale.numel() > 1 else out_scale.reshape(()),
                   _pick(gen, (2, 8, 16, 32))))


def _requantize_invalid(gen, device):
    x = _randint(gen, (2, 5), torch.int32, device)
    return [
        Invalid((x.float(), _f32(1e-3), _f32(0.1), 8), TypeError, "requantize: x must have dtype"),
        Invalid((x, torch.ones(4), _f32(0.1), 8), ValueError, "in_scale must be per-tensor"),
        Invalid((x, _f32(1e-3), _f32(0.1), 1), ValueError, "out_bits must be an integer in"),
        Invalid((x, _f32(1e-3), _f32(0.0), 8), ValueError, "out_scale must be finite and > 0"),
        Invalid((x, _f32(1e-3), torch.tensor(0.1, device="meta"), 8), ValueError, "out_scale is on meta"),
    ]


REQUANTIZE.cases(samples=_requantize_samples, random=_requantize_random, invalid=_requantize_invalid, exact=True)


def _int8_linear_samples(gen, device):
    w = _randint(gen, (65, 48), torch.int8, device)
    return [
        Sample((_randint(gen, (3, 197, 48), torch.int8, device), w, None, None, None, 8), "int32 out"),
        Sample((_randint(gen, (48, 5), torch.int8, device).T, w, _randint(gen, (65,), torch.int32, device, -2**20, 2**20),
                _f32(1e-4), (torch.rand(65, generator=gen) + 0.5) * 0.05, 8), "transposed x, bias, per-channel out"),
        Sample((_randint(gen, (1, 3), torch.int8, device), _randint(gen, (1, 3), torch.int8, device),
                None, _f32(0.5), _f32(1e-3), 16), "1 x 1 x 3, 16 bits"),
    ]


def _int8_linear_random(gen, device):
    m, n, k = (int(v) for v in torch.randint(1, 48, (3,), generator=gen))
    x = _randint(gen, (m, k), torch.int8, device)
    w = _randint(gen, (n, k), torch.int8, device)
    bias = _pick(gen, (None, _randint(gen, (n,), torch.int32, device, -2**24, 2**24)))
    requant = bool(_pick(gen, (False, True)))
    in_scale = _f32(_pick(gen, (1e-5, 1e-3))) if requant else None
    out_scale = _f32(_pick(gen, (0.01, 0.5))) if requant else None
    return Sample((x, w, bias, in_scale, out_scale, _pick(gen, (4, 8, 16))))


def _int8_linear_invalid(gen, device):
    x = _randint(gen, (2, 5), torch.int8, device)
    w = _randint(gen, (3, 5), torch.int8, device)
    return [
        Invalid((x, w[:, :4], None, None, None, 8), ValueError, "x has 5 input features"),
        Invalid((x, w.float(), None, None, None, 8), TypeError, "w must be a 2-D int8"),
        Invalid((x, w, torch.zeros(3), None, None, 8), ValueError, "bias must be int32"),
        Invalid((x, w, None, _f32(1e-3), None, 8), ValueError, "give both in_scale and out_scale"),
        Invalid((x, w.to("meta"), None, None, None, 8), ValueError, "w is on meta"),
    ]


INT8_LINEAR.cases(samples=_int8_linear_samples, random=_int8_linear_random, invalid=_int8_linear_invalid, exact=True)
