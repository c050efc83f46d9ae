"""Bit-shift linear layers (DeepShift, ShiftAddViT): weights that are signed powers of two.

A shift weight is ``W[n, k] = s * 2^p`` with a sign ``s`` in {-1, 0, +1} and an integer exponent
``p``. It is stored compressed, as a :class:`ShiftWeight`: one ``bits``-bit code per weight and one
exponent base per output channel (row ``n``). A code ``c`` holds a sign bit and a magnitude:

    sign = c >> (bits - 1),  mag = c & (2^(bits-1) - 1)
    W = 0 if mag == 0, else (-1)^sign * 2^(base[n] + mag - 1)

* ``bits = 5``: 15 exponents per channel, one code per byte (``codes`` uint8 ``[N, K]``). DeepShift's
  weights (``weight_bits = 5``: shifts in [-14, 0], ternary sign) are exactly the codes with
  ``base = -14``.
* ``bits = 4``: 7 exponents per channel, two codes per byte, packed in groups of
  ``SHIFT4_GROUP = 64`` along K: byte ``32 g + j`` of a row holds ``k = 64 g + j`` in its low
  nibble and ``k = 64 g + 32 + j`` in its high nibble (``codes`` uint8 ``[N, 32 * ceil(K / 64)]``;
  K is padded with zero codes). A kernel's K step of 64 then reads 32 bytes per row and feeds two
  dot products of 32 without any shuffle.

Why this form: the kernels decode a code into ``(-1)^sign * 2^(mag - 1)`` -- at most 2^14, exact
in bf16 and fp16, and in int8 for the 4-bit form (at most 2^6) -- and run the tile product on
tensor cores; ``2^base[n]`` scales the accumulator's column once, exactly (a power of two).

Ops (each with a torch reference and a Triton kernel):

* :func:`shift_linear`: ``y = x W^T + bias`` for fp16/bf16/fp32 ``x``, accumulated in float32;
  differentiable in x and bias (the weight gradient of training flows through the float
  parameters of :class:`effkern.nn.ShiftLinear`).
* :func:`shift_linear_int8`: int8 ``x`` times the 4-bit form decoded into int8, exact int32
  accumulation and the dyadic requantising epilogue of ``int8_linear`` (effkern/_requant.py).
* :func:`deepshift_linear`: DeepShift's integer shift-add semantics on 16.16 fixed-point inputs,
  ``y = bias + sum_k s * (x >> -p)`` (an arithmetic shift: floor), exact, zero weights contributing
  nothing; the CUDA-core form the benchmark compares the tensor-core path against.
"""

from __future__ import annotations

# The public API (effkern.ops re-exports it).
__all__ = ["ShiftWeight", "deepshift_linear", "shift_linear", "shift_linear_int8"]

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from effkern._common import (INT32_MAX, MAX_INT8_LINEAR_K, SHIFT4_GROUP, TORCH_FLOAT_DTYPES, acc_dtype,
                             check_int, check_same_device, check_tensor, dtype_name, int_dtype_for_bits,
                             resolve_validate)
from effkern._registry import Invalid, Sample, cuda_kernel, define_op, torch_kernel, triton_kernel
from effkern._requant import as_scale_tensor, check_gemm_requant, dyadic_columns, ref_int_gemm_rows

FAMILY = "shift"
SHIFT_BITS = (4, 5)
# base[n] keeps every 2^p of the channel a normal float32 (the kernels build 2^base exactly)
BASE_MIN, EXP_MAX = -126, 127
DEEPSHIFT_RANGE = (-14, 0)  # DeepShift's shift range at weight_bits = 5: (-(2^4 - 2), 0)


def num_exponents(bits: int) -> int:
    """The exponents one channel can hold: 2^(bits-1) - 1 magnitudes (magnitude 0 is zero)."""
    return 2 ** (bits - 1) - 1


def code_columns(in_features: int, bits: int) -> int:
    """The byte columns of the codes of one row."""
    return in_features if bits == 5 else SHIFT4_GROUP // 2 * math.ceil(in_features / SHIFT4_GROUP)


# --------------------------------------------------------------------------------------------
# The format: codes <-> (sign, exponent), and float weights -> nearest signed powers of two
# --------------------------------------------------------------------------------------------


def nearest_exponent(w: Tensor) -> tuple[Tensor, Tensor]:
    """(sign, p) as float64 tensors: ``sign * 2^p`` is the signed power of two nearest to ``w``
    in the log domain (DeepShift's rounding, ``round(log2|w|)``), computed exactly: p0 =
    floor(log2|w|) (corrected against 2^p0 exactly), then p = p0 + [|w|^2 > 2^(2 p0 + 1)]
    (|w| float32 or narrower: its square is exact in float64). No float equals 2^(k + 1/2), so
    there are no ties; DeepShift's float32 ``log(|w|) / log(2)`` can differ only within a
    rounding error of such a midpoint. p is 0 where w is zero. Float operations only (inductor's
    CPU code for frexp and int32 arithmetic does not compile), so it runs under torch.compile."""
    a = w.detach().abs().to(torch.float64)
    p0 = torch.floor(torch.log2(a))
    p0 = p0 - (torch.exp2(p0) > a).to(p0.dtype) + (torch.exp2(p0 + 1) <= a).to(p0.dtype)
    p = p0 + (a * a > torch.exp2(2 * p0 + 1)).to(p0.dtype)
    sign = torch.sign(w.detach()).to(torch.float64)
    return sign, torch.where(sign == 0, 0.0, p)


def nearest_power_of_two(w: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`nearest_exponent` as int32 tensors (sign in {-1, 0, 1}, p)."""
    sign, p = nearest_exponent(w)
    return sign.to(torch.int32), p.to(torch.int32)


def pack_codes(sign: Tensor, p: Tensor, base: Tensor, bits: int) -> Tensor:
    """The codes of weights ``sign * 2^p`` (int ``[N, K]``), p within each row's window
    [base, base + num_exponents(bits) - 1] where sign != 0 (unchecked: see ShiftWeight)."""
    half = 2 ** (bits - 1)
    mag = torch.where(sign == 0, 0, p.to(torch.int32) - base.to(torch.int32)[:, None] + 1)
    codes = (mag + torch.where(sign < 0, half, 0)).to(torch.uint8)
    if bits == 5:
        return codes.contiguous()
    n, k = codes.shape
    groups = math.ceil(k / SHIFT4_GROUP)
    padded = codes.new_zeros((n, groups * SHIFT4_GROUP))
    padded[:, :k] = codes
    halves = padded.view(n, groups, 2, SHIFT4_GROUP // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, groups * SHIFT4_GROUP // 2).contiguous()


def unpack_codes(codes: Tensor, in_features: int, bits: int) -> Tensor:
    """int32 ``[N, K]`` codes, one per weight (the inverse of pack_codes' packing)."""
    c = codes.to(torch.int32)
    if bits == 4:
        n = c.shape[0]
        halves = torch.stack([c & 0xF, c >> 4], dim=2).view(n, -1, SHIFT4_GROUP // 2, 2)
        c = halves.transpose(2, 3).reshape(n, -1)
    return c[:, :in_features]


def decode_weight(codes: Tensor, base: Tensor, in_features: int, bits: int, dtype: torch.dtype) -> Tensor:
    """The dense weight ``[N, K]`` in ``dtype`` (exact where dtype holds every 2^p)."""
    c = unpack_codes(codes, in_features, bits)
    half = 2 ** (bits - 1)
    mag = c & (half - 1)
    p = base.to(torch.int32)[:, None] + mag - 1
    w = torch.ldexp(torch.ones((), dtype=torch.float64, device=c.device), p.to(torch.float64))
    w = torch.where((c & half) != 0, -w, w)
    return torch.where(mag == 0, torch.zeros_like(w), w).to(dtype)


@dataclass(frozen=True)
class ShiftWeight:
    """Power-of-two weights ``[out_features, in_features]``, compressed (module docstring).

    ``codes`` uint8 (bits 5: ``[N, K]``; bits 4: ``[N, 32 * ceil(K / 64)]``), ``base`` int32
    ``[N]``. Build one with :meth:`from_float`, :meth:`from_deepshift` or :meth:`from_sign_exponent`;
    :meth:`decode` gives the dense weight back, exactly."""

    codes: Tensor
    base: Tensor
    in_features: int
    bits: int = 5

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return decode_weight(self.codes, self.base, self.in_features, self.bits, dtype)

    def to(self, device) -> "ShiftWeight":
        return ShiftWeight(self.codes.to(device), self.base.to(device), self.in_features, self.bits)

    @classmethod
    def from_sign_exponent(cls, sign: Tensor, p: Tensor, *, bits: int = 5,
                           exponent_range: tuple[int, int] | None = None) -> "ShiftWeight":
        """Weights ``sign * 2^p`` (int tensors ``[N, K]``, sign in {-1, 0, 1}), each exponent
        clamped into its channel's window as DeepShift clamps its shifts: ``exponent_range``
        (lo, hi) for every channel (at most num_exponents(bits) exponents), or, by default, the
        top num_exponents(bits) exponents of each channel's largest weight."""
        op = "ShiftWeight"
        check_int(op, "bits", bits, 4, 5)
        if sign.shape != p.shape or sign.dim() != 2:
            raise ValueError(f"{op}: sign and p must be 2-D of the same shape, got {tuple(sign.shape)} and {tuple(p.shape)}")
        if sign.numel() and not bool(((sign >= -1) & (sign <= 1)).all()):
            raise ValueError(f"{op}: sign must hold -1, 0 or 1")
        span = num_exponents(bits)
        sign, p = sign.to(torch.int32), p.to(torch.int64)
        if exponent_range is not None:
            lo, hi = (int(v) for v in exponent_range)
            if not (hi >= lo and hi - lo < span):
                raise ValueError(f"{op}: exponent_range {exponent_range} must span 1 to {span} exponents at bits={bits}")
            base = torch.full((sign.shape[0],), lo, dtype=torch.int64, device=sign.device)
            top = torch.full_like(base, hi)
        else:
            top = torch.where(sign != 0, p, torch.full_like(p, -(2**31))).amax(dim=1) if p.shape[1] else \
                torch.full((p.shape[0],), -(2**31), dtype=torch.int64, device=p.device)
            base = torch.where(top == -(2**31), torch.zeros_like(top), top - (span - 1))  # an all-zero row: base 0
            top = base + span - 1
        if base.numel() and not (int(base.min()) >= BASE_MIN and int(base.max()) + span - 1 <= EXP_MAX):
            raise ValueError(f"{op}: exponents beyond float32's normal range: the channel bases must lie in "
                             f"[{BASE_MIN}, {EXP_MAX - span + 1}] at bits={bits}, got [{int(base.min())}, {int(base.max())}]")
        p = torch.minimum(torch.maximum(p, base[:, None]), top[:, None])
        codes = pack_codes(sign, p, base, bits)
        return cls(codes, base.to(torch.int32), sign.shape[1], bits)

    @classmethod
    def from_float(cls, w: Tensor, *, bits: int = 5, exponent_range: tuple[int, int] | None = None) -> "ShiftWeight":
        """The nearest signed powers of two of float weights ``w`` ``[N, K]``
        (:func:`nearest_power_of_two`), clamped into each channel's window (from_sign_exponent).
        Zero weights stay zero."""
        check_tensor("ShiftWeight.from_float", "w", w, dims=(2,), dtypes=TORCH_FLOAT_DTYPES)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("ShiftWeight.from_float: w must be finite")
        sign, p = nearest_power_of_two(w)
        return cls.from_sign_exponent(sign, p, bits=bits, exponent_range=exponent_range)

    @classmethod
    def from_deepshift(cls, shift: Tensor, sign: Tensor, *, weight_bits: int = 5) -> "ShiftWeight":
        """DeepShift-PS parameters as its forward uses them: ``2^round(clamp(shift, range)) *
        sign(round(sign))`` with range (-(2^(weight_bits-1) - 2), 0); weight_bits <= 5 fits the
        5-bit form exactly (base = the range's low end)."""
        check_int("ShiftWeight.from_deepshift", "weight_bits", weight_bits, 2, 5)
        lo = -(2 ** (weight_bits - 1) - 2)
        p = torch.round(shift.detach().clamp(lo, 0)).to(torch.int64)
        s = torch.sign(torch.round(sign.detach())).to(torch.int32)
        return cls.from_sign_exponent(s, p, bits=5, exponent_range=(lo, lo + num_exponents(5) - 1))


def _check_weight(op: str, codes: Tensor, base: Tensor, in_features: int, bits: int, x: Tensor) -> int:
    """The codes and bases of a ShiftWeight for ``x``; returns N."""
    check_int(op, "bits", bits, 4, 5)
    check_tensor(op, "codes", codes, dims=(2,), dtypes=(torch.uint8,))
    check_tensor(op, "base", base, dims=(1,), dtypes=(torch.int32,))
    n = codes.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features but the weight has in_features={in_features}")
    if tuple(codes.shape) != (n, code_columns(in_features, bits)) or tuple(base.shape) != (n,):
        raise ValueError(f"{op}: codes {tuple(codes.shape)} and base {tuple(base.shape)} do not form a {bits}-bit "
                         f"weight of in_features={in_features} (codes [{n}, {code_columns(in_features, bits)}], base [{n}])")
    check_same_device(op, "codes", codes, "x", x)
    check_same_device(op, "base", base, "x", x)
    return n


def _validate_weight(op: str, codes: Tensor, base: Tensor, bits: int) -> None:
    """Value checks (a host read: see effkern.validation): every base keeps 2^p a normal
    float32, and 5-bit codes use their 5 bits only."""
    if base.numel():
        lo, hi = int(base.min()), int(base.max())
        if lo < BASE_MIN or hi + num_exponents(bits) - 1 > EXP_MAX:
            raise ValueError(f"{op}: base must lie in [{BASE_MIN}, {EXP_MAX - num_exponents(bits) + 1}] at bits={bits}, "
                             f"got [{lo}, {hi}]")
    if bits == 5 and codes.numel() and int(codes.max()) >= 32:
        raise ValueError(f"{op}: 5-bit codes must be < 32, got {int(codes.max())}")


def _check_bias(op: str, bias: Tensor | None, n: int, dtype: torch.dtype, x: Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor) or bias.dtype != dtype or tuple(bias.shape) != (n,):
        got = f"{dtype_name(bias.dtype)} {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must be {dtype_name(dtype)} with shape ({n},), got {got}")
    check_same_device(op, "bias", bias, "x", x)


# --------------------------------------------------------------------------------------------
# shift_linear (float)
# --------------------------------------------------------------------------------------------


def ref_shift_linear_rows(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                          bits: int) -> Tensor:
    """Reference: x [M, K] @ decode(W)^T + bias in the accumulation dtype (float32; float64 for
    float64), rounded once to x's dtype."""
    acc = acc_dtype(x.dtype)
    y = x.to(acc) @ decode_weight(codes, base, in_features, bits, acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def _check_shift_linear(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int, bits: int,
                        validate: bool | None) -> None:
    op = "shift_linear"
    check_tensor(op, "x", x, dtypes=TORCH_FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the features), got a 0-d tensor")
    n = _check_weight(op, codes, base, in_features, bits, x)
    _check_bias(op, bias, n, x.dtype, x)


def _cuda_shift_linear_limits(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                              bits: int) -> list[str]:
    """What the CUDA tensor-core kernel declines (the Triton kernel takes these): its copies are
    16 bytes wide, so rows of x and of 5-bit codes must be whole 16-byte chunks."""
    k = x.shape[-1]
    reasons = []
    if k % (16 if bits == 5 else 8):
        reasons.append(f"K={k} is not a multiple of {16 if bits == 5 else 8} (16-byte rows of x"
                       f"{' and of 5-bit codes' if bits == 5 else ''})")
    if x.data_ptr() % 16 or codes.data_ptr() % 16:
        reasons.append("x or codes is not 16-byte aligned")
    return reasons


SHIFT_LINEAR = define_op(
    "shift_linear", family=FAMILY, doc="x @ W^T + b with power-of-two weights decoded on the fly",
    check=_check_shift_linear, dispatch_on="x",
    kernels=[
        torch_kernel(ref_shift_linear_rows, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("shift:shift_linear_rows", dtypes=(torch.float16, torch.bfloat16, torch.float32)),
        cuda_kernel("cuda_shift_linear", dtypes=(torch.float16, torch.bfloat16), check=_cuda_shift_linear_limits),
    ],
)


@SHIFT_LINEAR.impl
def _shift_linear_op(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int, bits: int,
                     validate: bool | None) -> Tensor:
    if resolve_validate(validate, x):
        _validate_weight("shift_linear", codes, base, bits)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = SHIFT_LINEAR.kernels(x=rows, codes=codes.contiguous(), base=base.contiguous(),
                             bias=None if bias is None else bias.contiguous(), in_features=in_features, bits=bits)
    return y.reshape(*x.shape[:-1], codes.shape[0])


@SHIFT_LINEAR.fake
def _(x, codes, base, bias, in_features, bits, validate):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _shift_linear_setup(ctx, inputs, output):
    x, codes, base, bias, in_features, bits, _ = inputs
    ctx.save_for_backward(codes, base)
    ctx.in_features, ctx.bits, ctx.x_dtype, ctx.has_bias = in_features, bits, x.dtype, bias is not None


def _shift_linear_backward(ctx, grad):
    codes, base = ctx.saved_tensors
    grad_x = grad_bias = None
    acc = acc_dtype(grad.dtype)
    if ctx.needs_input_grad[0]:  # dL/dx = dL/dy @ W, W decoded exactly, float32 accumulation
        w = decode_weight(codes, base, ctx.in_features, ctx.bits, acc)
        grad_x = (grad.to(acc) @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.to(acc).reshape(-1, grad.shape[-1]).sum(0).to(ctx.x_dtype)
    return grad_x, None, None, grad_bias, None, None, None


SHIFT_LINEAR.autograd(_shift_linear_backward, _shift_linear_setup)


def shift_linear(x: Tensor, w: ShiftWeight, bias: Tensor | None = None, *, validate: bool | None = None) -> Tensor:
    """``y = x W^T + bias`` with power-of-two weights ``w`` (:class:`ShiftWeight`), exactly as a
    dense linear layer with the decoded weight computes it in float32 (then rounded to x's dtype).

    Args:
        x: fp16, bf16 or fp32 ``[..., K]`` (float64 on the torch backend).
        w: the weight, ``[N, K]``, on x's device.
        bias: optional ``[N]`` in x's dtype.
        validate: check the weight's values on the host (a device sync on a GPU); None: on CPU
            tensors only (see :func:`effkern.validation`).

    Returns ``[..., N]`` in x's dtype. Differentiable in x and bias.
    """
    if not isinstance(w, ShiftWeight):
        raise TypeError(f"shift_linear: w must be a ShiftWeight, got {type(w).__name__}")
    return torch.ops.effkern.shift_linear(x, w.codes, w.base, bias, w.in_features, w.bits, validate)


# --------------------------------------------------------------------------------------------
# shift_linear_int8
# --------------------------------------------------------------------------------------------


def decode_int8(codes: Tensor, in_features: int) -> Tensor:
    """The 4-bit codes as int8 ``(-1)^sign * 2^(mag - 1)`` (0 for mag 0): |value| <= 64."""
    c = unpack_codes(codes, in_features, 4)
    mag = c & 7
    v = torch.where(mag == 0, 0, torch.ones_like(mag) << (mag - 1).clamp(min=0))
    return torch.where((c & 8) != 0, -v, v).to(torch.int8)


def ref_shift_linear_int8_rows(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, m: Tensor | None,
                               e: Tensor | None, in_features: int, out_bits: int) -> Tensor:
    """Reference: int8_linear's GEMM and epilogue (ref_int_gemm_rows) on the codes decoded into
    int8; the per-channel 2^base is already in (m, e) (e per column, minus base)."""
    return ref_int_gemm_rows(x, decode_int8(codes, in_features), bias, m, e, out_bits)


def _check_shift_linear_int8(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_scale: Tensor | None,
                             out_scale: Tensor | None, in_features: int, out_bits: int) -> None:
    op = "shift_linear_int8"
    check_tensor(op, "x", x, dtypes=(torch.int8,))
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the features), got a 0-d tensor")
    n = _check_weight(op, codes, base, in_features, 4, x)
    if in_features > MAX_INT8_LINEAR_K:
        raise ValueError(f"{op}: in_features={in_features} exceeds {MAX_INT8_LINEAR_K}: int32 accumulation could overflow")
    _check_bias(op, bias, n, torch.int32, x)
    check_gemm_requant(op, in_scale, out_scale, out_bits, x, n, per_channel_in=False)


SHIFT_LINEAR_INT8 = define_op(
    "shift_linear_int8", family=FAMILY, doc="int8 x 4-bit power-of-two GEMM, int32 accumulation, requantised",
    check=_check_shift_linear_int8, dispatch_on="x",
    kernels=[
        torch_kernel(ref_shift_linear_int8_rows, dtypes=(torch.int8,)),
        triton_kernel("shift:shift_linear_int8_rows", dtypes=(torch.int8,)),
    ],
)


@SHIFT_LINEAR_INT8.impl
def _shift_linear_int8_op(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_scale: Tensor | None,
                          out_scale: Tensor | None, in_features: int, out_bits: int) -> Tensor:
    n = codes.shape[0]
    m = e = None
    if out_scale is not None:
        # The real weight is decode_int8 * 2^base[n]: the scale of column n's accumulator is
        # in_scale * 2^base[n], whose dyadic form is (m, e - base[n]) -- exact, a power of two.
        m, e = dyadic_columns("shift_linear_int8", in_scale, out_scale, n, x.device)
        e = e - base.to(torch.int64)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = SHIFT_LINEAR_INT8.kernels(x=rows, codes=codes.contiguous(), base=base.contiguous(),
                                  bias=None if bias is None else bias.contiguous(), m=m, e=e,
                                  in_features=in_features, out_bits=out_bits)
    return y.reshape(*x.shape[:-1], n)


@SHIFT_LINEAR_INT8.fake
def _(x, codes, base, bias, in_scale, out_scale, in_features, out_bits):
    dtype = torch.int32 if out_scale is None else int_dtype_for_bits(out_bits)
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=dtype)


def shift_linear_int8(x_int8: Tensor, w: ShiftWeight, bias_int32: Tensor | None = None, *, in_scale=None,
                      out_scale=None, out_bits: int = 8) -> Tensor:
    """int8 activations times 4-bit power-of-two weights: the integer-only (I-ViT style) shift
    layer.

    ``acc[:, n] = sum_k x[:, k] * d[n, k]`` with ``d = (-1)^sign * 2^(mag - 1)`` the int8 decode
    of the codes (the real weight is ``d * 2^base[n]``), exact in int32, plus ``bias_int32`` at
    the scale of acc (``in_scale * 2^base[n]`` for column n), saturating. Without scales the int32
    acc is returned; with ``in_scale`` (x's scale, per tensor) and ``out_scale`` (per tensor or per
    output channel), acc is requantised exactly as :func:`effkern.ops.int8_linear` does with the
    per-channel input scale ``in_scale * 2^base[n]``, to ``out_bits`` (int8 for <= 8, int16 for
    <= 16, else int32).

    Args:
        x_int8: int8 ``[..., K]``.
        w: a 4-bit :class:`ShiftWeight` (``ShiftWeight.from_float(w, bits=4)``).
        bias_int32: optional int32 ``[N]``.
    """
    if not isinstance(w, ShiftWeight):
        raise TypeError(f"shift_linear_int8: w must be a ShiftWeight, got {type(w).__name__}")
    if w.bits != 4:
        raise ValueError("shift_linear_int8: needs the 4-bit form (7 exponents per channel: the decoded weight fits "
                         f"int8), got bits={w.bits}; re-encode with ShiftWeight.from_float(weight, bits=4)")
    i = None if in_scale is None else as_scale_tensor("shift_linear_int8", "in_scale", in_scale)
    o = None if out_scale is None else as_scale_tensor("shift_linear_int8", "out_scale", out_scale)
    return torch.ops.effkern.shift_linear_int8(x_int8, w.codes, w.base, bias_int32, i, o, w.in_features, out_bits)


# --------------------------------------------------------------------------------------------
# deepshift_linear (integer shift-add, DeepShift's kernel semantics)
# --------------------------------------------------------------------------------------------


def ref_deepshift_linear_rows(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                              bits: int) -> Tensor:
    """Reference: ``bias + sum_k s * floor(x_k / 2^-p)`` (an arithmetic right shift by -p >= 0)
    in int64 (|sum| <= K * 2^31: exact), saturated to int32."""
    c = unpack_codes(codes, in_features, bits)
    half = 2 ** (bits - 1)
    mag = c & (half - 1)
    right = (1 - mag - base.to(torch.int64)[:, None]).clamp(0, 62)  # -p; floor(v / 2^62) = floor(v / 2^s) for s > 62
    shifted = x.to(torch.int64)[:, None, :] >> right[None]  # [M, N, K]
    signed = torch.where(((c & half) != 0)[None], -shifted, shifted)
    y = torch.where((mag == 0)[None], torch.zeros_like(signed), signed).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.int64)
    return y.clamp(-(2**31), INT32_MAX).to(torch.int32)


def _check_deepshift_linear(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                            bits: int, validate: bool | None) -> None:
    op = "deepshift_linear"
    check_tensor(op, "x", x, dtypes=(torch.int32,))
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the features), got a 0-d tensor")
    n = _check_weight(op, codes, base, in_features, bits, x)
    _check_bias(op, bias, n, torch.int32, x)


DEEPSHIFT_LINEAR = define_op(
    "deepshift_linear", family=FAMILY, doc="DeepShift's integer shift-add linear layer on fixed-point inputs",
    check=_check_deepshift_linear, dispatch_on="x",
    kernels=[
        torch_kernel(ref_deepshift_linear_rows, dtypes=(torch.int32,)),
        triton_kernel("shift:deepshift_linear_rows", dtypes=(torch.int32,)),
        cuda_kernel("cuda_deepshift_linear", dtypes=(torch.int32,)),
    ],
)


@DEEPSHIFT_LINEAR.impl
def _deepshift_linear_op(x: Tensor, codes: Tensor, base: Tensor, bias: Tensor | None, in_features: int,
                         bits: int, validate: bool | None) -> Tensor:
    if resolve_validate(validate, x) and codes.numel():
        mag = unpack_codes(codes, in_features, bits) & (2 ** (bits - 1) - 1)
        p = torch.where(mag > 0, base.to(torch.int32)[:, None] + mag - 1, torch.full_like(mag, -(2**30)))
        top = int(p.max())
        if top > 0:
            raise ValueError(f"deepshift_linear: every exponent must be <= 0 (right shifts, as DeepShift's range "
                             f"[-14, 0]); this weight holds 2^{top}")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = DEEPSHIFT_LINEAR.kernels(x=rows, codes=codes.contiguous(), base=base.contiguous(),
                                 bias=None if bias is None else bias.contiguous(), in_features=in_features, bits=bits)
    return y.reshape(*x.shape[:-1], codes.shape[0])


@DEEPSHIFT_LINEAR.fake
def _(x, codes, base, bias, in_features, bits, validate):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def deepshift_linear(x_fixed: Tensor, w: ShiftWeight, bias_fixed: Tensor | None = None, *,
                     validate: bool | None = None) -> Tensor:
    """DeepShift's integer shift-add layer: ``y = bias + sum_k s_k * shift(x_k, p_k)`` on int32
    fixed-point inputs (DeepShift uses 16.16: ``x_fixed = (x * 2^16).int()``). Every exponent
    p is <= 0, as in DeepShift's range [-14, 0]: ``shift(x, p)`` is an arithmetic right shift by
    -p (floor). A zero weight contributes nothing (DeepShift's kernel shifts by 32 instead, which
    C leaves undefined), and the sum is exact (int64) and then saturated to int32 (DeepShift's
    int32 accumulator wraps).

    Args:
        x_fixed: int32 ``[..., K]``; w: a :class:`ShiftWeight`; bias_fixed: optional int32 ``[N]``.
        validate: check on the host that every exponent is <= 0 (a device sync on a GPU); None:
            on CPU tensors only. Unchecked, a positive exponent counts as 0.

    Returns int32 ``[..., N]``. CUDA cores only: the benchmark shows why :func:`shift_linear`
    (tensor cores) is the default.
    """
    if not isinstance(w, ShiftWeight):
        raise TypeError(f"deepshift_linear: w must be a ShiftWeight, got {type(w).__name__}")
    return torch.ops.effkern.deepshift_linear(x_fixed, w.codes, w.base, bias_fixed, w.in_features, w.bits, validate)


# --------------------------------------------------------------------------------------------
# Test cases (tests/test_registry.py runs them on every backend)
# --------------------------------------------------------------------------------------------


def _random_weight(gen: torch.Generator, n: int, k: int, bits: int, device, zero_frac: float = 0.2,
                   base_lo: int = -14, base_hi: int = -3) -> ShiftWeight:
    """Random codes (every magnitude, both signs, some zeros) and per-channel bases."""
    span = num_exponents(bits)
    sign = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int32) * 2 - 1
    sign = torch.where(torch.rand(n, k, generator=gen) < zero_frac, 0, sign)
    base = torch.randint(base_lo, base_hi + 1, (n,), generator=gen, dtype=torch.int64)
    p = base[:, None] + torch.randint(0, span, (n, k), generator=gen, dtype=torch.int64)
    w = ShiftWeight.from_sign_exponent(sign, p, bits=bits)
    return w.to(device)


def _floats(gen, shape, dtype, device, layout="contiguous"):
    x = torch.randn(*shape, generator=gen)
    if layout == "transposed" and len(shape) >= 2:  # the same values, a non-contiguous view
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.to(dtype).to(device)


def _linear_args(w: ShiftWeight):
    return w.codes, w.base


def _float_samples(gen, device):
    out = []
    for (m, k, n, bits, dtype, bias, note) in [
        (7, 197, 33, 5, torch.float32, True, "odd K and N, 5-bit"),
        (3, 64, 16, 4, torch.bfloat16, False, "one 4-bit group"),
        (5, 200, 24, 4, torch.float16, True, "4-bit, K padded to 256"),
        (0, 32, 8, 5, torch.float32, True, "empty batch"),
        (1, 384, 48, 5, torch.bfloat16, True, "one row"),
    ]:
        w = _random_weight(gen, n, k, bits, device)
        x = _floats(gen, (m, k), dtype, device)
        b = _floats(gen, (n,), dtype, device) if bias else None
        out.append(Sample((x, *_linear_args(w), b, k, bits, True), note))
    w = _random_weight(gen, 20, 40, 5, device)
    x = _floats(gen, (2, 40, 3), torch.float32, device).transpose(1, 2)  # [2, 3, 40], permuted
    out.append(Sample((x, *_linear_args(w), None, 40, 5, True), "permuted 3-D input"))
    return out


def _float_random(gen, device):
    bits = int(torch.randint(4, 6, (1,), generator=gen))
    m, k, n = (int(v) for v in torch.randint(1, 90, (3,), generator=gen))
    dtype = (torch.float16, torch.bfloat16, torch.float32)[int(torch.randint(3, (1,), generator=gen))]
    w = _random_weight(gen, n, k, bits, device)
    bias = _floats(gen, (n,), dtype, device) if bool(torch.rand(1, generator=gen) < 0.5) else None
    return Sample((_floats(gen, (m, k), dtype, device), *_linear_args(w), bias, k, bits, True))


def _float_invalid(gen, device):
    w = _random_weight(gen, 8, 16, 5, device)
    x = _floats(gen, (2, 16), torch.float32, device)
    bad_base = w.base.clone()
    bad_base[0] = 120
    return [
        Invalid((x.to(torch.int32), w.codes, w.base, None, 16, 5, True), TypeError, "shift_linear: x must have dtype"),
        Invalid((x[:, :15], w.codes, w.base, None, 16, 5, True), ValueError, "x has 15 input features"),
        Invalid((x, w.codes, w.base, None, 16, 4, True), ValueError, "do not form a 4-bit weight"),
        Invalid((x, w.codes, w.base, None, 16, 6, True), ValueError, "bits must be an integer in"),
        Invalid((x, w.codes, w.base, x[0, :8].double(), 16, 5, True), ValueError, "bias must be float32"),
        Invalid((x, w.codes.to(torch.int8), w.base, None, 16, 5, True), TypeError, "codes must have dtype uint8"),
        Invalid((x, w.codes, bad_base, None, 16, 5, True), ValueError, "base must lie in"),
        Invalid((x, w.codes | 32, w.base, None, 16, 5, True), ValueError, "5-bit codes must be < 32"),
    ]


SHIFT_LINEAR.cases(samples=_float_samples, random=_float_random, invalid=_float_invalid, grad_args=(0, 3))


def _int8(gen, shape, device):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int32).to(torch.int8).to(device)


def _f32(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _int8_samples(gen, device):
    out = []
    for (m, k, n, bias, scales, note) in [
        (7, 197, 33, True, (0.02, 0.5), "odd K and N, requantised"),
        (3, 64, 16, False, None, "int32 out"),
        (5, 200, 24, True, (0.01, torch.rand(24, generator=gen) + 0.1), "per-channel out_scale"),
        (0, 32, 8, True, (0.02, 0.5), "empty batch"),
        (2, 384, 40, True, (1.0, 1e-4), "saturating"),
    ]:
        w = _random_weight(gen, n, k, 4, device, base_lo=-10, base_hi=2)
        x = _int8(gen, (m, k), device)
        b = torch.randint(-2**20, 2**20, (n,), generator=gen, dtype=torch.int32).to(device) if bias else None
        i, o = (None, None) if scales is None else (_f32(scales[0]), torch.as_tensor(scales[1], dtype=torch.float32))
        out.append(Sample((x, w.codes, w.base, b, i, o, k, 8), note))
    w = _random_weight(gen, 16, 48, 4, device)
    x = _int8(gen, (2, 48, 3), device).transpose(1, 2)
    out.append(Sample((x, w.codes, w.base, None, _f32(0.05), _f32(0.3), 48, 16), "permuted 3-D input, int16 out"))
    return out


def _int8_random(gen, device):
    m, k, n = (int(v) for v in torch.randint(1, 90, (3,), generator=gen))
    w = _random_weight(gen, n, k, 4, device, base_lo=-12, base_hi=4)
    bias = torch.randint(-2**16, 2**16, (n,), generator=gen, dtype=torch.int32).to(device) \
        if bool(torch.rand(1, generator=gen) < 0.5) else None
    if bool(torch.rand(1, generator=gen) < 0.2):
        return Sample((_int8(gen, (m, k), device), w.codes, w.base, bias, None, None, k, 8))
    i = _f32(float(torch.rand(1, generator=gen)) * 0.05 + 1e-3)
    o = _f32(float(torch.rand(1, generator=gen)) * 2 + 0.01)
    return Sample((_int8(gen, (m, k), device), w.codes, w.base, bias, i, o, k, (8, 16, 32)[int(torch.randint(3, (1,), generator=gen))]))


def _int8_invalid(gen, device):
    w = _random_weight(gen, 8, 16, 4, device)
    x = _int8(gen, (2, 16), device)
    return [
        Invalid((x.float(), w.codes, w.base, None, None, None, 16, 8), TypeError, "shift_linear_int8: x must have dtype"),
        Invalid((x, w.codes, w.base, None, _f32(0.1), None, 16, 8), ValueError, "give both in_scale and out_scale"),
        Invalid((x, w.codes, w.base, None, torch.tensor([0.1, 0.2]), _f32(0.1), 16, 8), ValueError, "single value"),
        Invalid((x, w.codes, w.base, torch.zeros(8, device=device), None, None, 16, 8), ValueError, "bias must be int32"),
        Invalid((x, w.codes[:, :4], w.base, None, None, None, 16, 8), ValueError, "do not form a 4-bit weight"),
        Invalid((x, w.codes, w.base, None, _f32(0.1), _f32(0.1), 16, 1), ValueError, "out_bits must be an integer"),
    ]


SHIFT_LINEAR_INT8.cases(samples=_int8_samples, random=_int8_random, invalid=_int8_invalid, exact=True)


def _fixed(gen, shape, device, bound=2**22):
    return torch.randint(-bound, bound, shape, generator=gen, dtype=torch.int32).to(device)


def _deepshift_samples(gen, device):
    out = []
    for (m, k, n, bits, bias, note) in [
        (7, 197, 33, 5, True, "odd K and N, DeepShift's range"),
        (3, 64, 16, 4, False, "4-bit form"),
        (0, 32, 8, 5, True, "empty batch"),
    ]:
        w = _random_weight(gen, n, k, bits, device, base_lo=-20, base_hi=1 - num_exponents(bits))
        out.append(Sample((_fixed(gen, (m, k), device), w.codes, w.base, _fixed(gen, (n,), device) if bias else None,
                           k, bits, True), note))
    w = _random_weight(gen, 12, 40, 5, device, base_lo=-60, base_hi=-14)  # shifts past 31 bits: 0 or -1
    out.append(Sample((_fixed(gen, (2, 40, 3), device).transpose(1, 2), w.codes, w.base, None, 40, 5, True),
                      "long shifts, permuted"))
    big = torch.full((1, 64), 2**31 - 1, dtype=torch.int32, device=device)
    w = ShiftWeight.from_sign_exponent(torch.ones(4, 64, dtype=torch.int32), torch.zeros(4, 64, dtype=torch.int64),
                                       exponent_range=DEEPSHIFT_RANGE).to(device)
    out.append(Sample((big, w.codes, w.base, None, 64, 5, True), "saturates at int32"))
    return out


def _deepshift_random(gen, device):
    bits = int(torch.randint(4, 6, (1,), generator=gen))
    m, k, n = (int(v) for v in torch.randint(1, 60, (3,), generator=gen))
    w = _random_weight(gen, n, k, bits, device, base_lo=-24, base_hi=1 - num_exponents(bits))
    bias = _fixed(gen, (n,), device) if bool(torch.rand(1, generator=gen) < 0.5) else None
    return Sample((_fixed(gen, (m, k), device, 2**24), w.codes, w.base, bias, k, bits, True))


def _deepshift_invalid(gen, device):
    w = _random_weight(gen, 8, 16, 5, device, base_lo=-14, base_hi=-14)
    x = _fixed(gen, (2, 16), device)
    left = ShiftWeight.from_sign_exponent(torch.ones(8, 16, dtype=torch.int32), torch.ones(8, 16, dtype=torch.int64),
                                          exponent_range=(-2, 1), bits=5).to(device)
    return [
        Invalid((x.to(torch.int64), w.codes, w.base, None, 16, 5, True), TypeError, "deepshift_linear: x must have dtype"),
        Invalid((x, w.codes, w.base.to(torch.int64), None, 16, 5, True), TypeError, "base must have dtype int32"),
        Invalid((x, w.codes, w.base, x[0, :4], 16, 5, True), ValueError, r"bias must be int32 with shape \(8,\)"),
        Invalid((x, left.codes, left.base, None, 16, 5, True), ValueError, "every exponent must be <= 0"),
    ]


DEEPSHIFT_LINEAR.cases(samples=_deepshift_samples, random=_deepshift_random, invalid=_deepshift_invalid, exact=True)
