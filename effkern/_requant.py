"""Dyadic requantisation, shared by every integer GEMM family (int8_linear, the shift GEMMs,
the 2:4-sparse GEMM): the scale arguments and their checks, I-ViT's dyadic multiplier (m, e)
from a pair of scales, and the exact int64 reference of round-half-to-even(I * m / 2^e). The
Triton side of the same idea is effkern/triton/requant.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from effkern._common import INT32_MAX, dtype_name, int_dtype_for_bits, to_device_async, validation_enabled


def as_scale_tensor(op: str, name: str, scale) -> Tensor:
    """A Python number or a floating tensor -> float32 tensor (value checks happen later)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(float(scale), dtype=torch.float32)
    if not isinstance(scale, Tensor):
        raise TypeError(f"{op}: {name} must be a float or a floating-point tensor, got {type(scale).__name__}")
    if not scale.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {dtype_name(scale.dtype)}")
    return scale.to(torch.float32)


def check_scale_device(op: str, name: str, scale: Tensor, x: Tensor) -> None:
    """A scale lives on the host (free: no synchronisation) or beside x; anything else (a meta
    tensor, another GPU) is refused rather than read."""
    if scale.device.type != "cpu" and scale.device != x.device:
        raise ValueError(f"{op}: {name} is on {scale.device} but x is on {x.device}; "
                         f"give the scale on the CPU or on x's device")


def check_scalar_scale(op: str, name: str, scale: Tensor, x: Tensor) -> None:
    if scale.numel() != 1:
        raise ValueError(f"{op}: {name} must hold a single value (per-tensor scale), got shape {tuple(scale.shape)}")
    check_scale_device(op, name, scale, x)


def host_scale(op: str, name: str, scale: Tensor) -> list[float]:
    """The scale's float32 values as Python floats, checked finite and positive: one ``tolist``
    of a CPU tensor (free), or a read-back of a GPU scale (one synchronisation)."""
    values = scale.detach().to(torch.float32).reshape(-1)
    values = (values if values.device.type == "cpu" else values.cpu()).tolist()
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{op}: {name} must be finite and > 0, got {v}")
    return values


def ref_round_shift_half_even(v: Tensor, e: Tensor) -> Tensor:
    """round-half-to-even(v / 2^e) for int64 v with |v| <= 2^62 and int64 shifts e.

    e <= 0 multiplies by 2^-e. Callers clamp the result to at most 32 bits, and |v| >= 2^30 for
    every non-zero v they pass (v = I * m with m >= 2^30), so for e < 0 any non-zero v saturates:
    it is returned as +-2^62, a stand-in beyond every clamp range. e >= 63 gives 0 (|v| / 2^63 is
    at most 1/2, and a tie rounds to the even 0).
    """
    # Everything that depends on e alone is computed on e's own (broadcastable, usually [C])
    # shape, and there is no full-size branch: the CPU reference runs I-ViT's models.
    es = e.clamp(0, 62)
    shifted = es > 0
    # floor((v + 2^(es-1) - 1 + (floor(v / 2^es) & 1)) / 2^es): a remainder above one half
    # rounds up, exactly one half only from an odd quotient (|v| + 2^61 < 2^63); es = 0: v
    bias = torch.where(shifted, (torch.ones_like(es) << (es - 1).clamp(min=0)) - 1, 0)
    rounded = (v + bias + ((v >> es) & shifted.to(v.dtype))) >> es
    in_range = ((e >= 0) & (e <= 62)).to(v.dtype)
    return rounded * in_range + torch.sign(v) * ((e < 0).to(v.dtype) << 62)


def dyadic_params(in_scale: Tensor, out_scale: Tensor) -> tuple[Tensor, Tensor]:
    """I-ViT's dyadic multiplier: in_scale / out_scale ~ m / 2^e.

    The ratio is taken in float64 from the float32 scales; (mantissa, exponent) = frexp(ratio),
    m = round-half-up(mantissa * 2^31) in [2^30, 2^31], e = 31 - exponent. Returns int64
    tensors shaped like the broadcast of the scales.
    """
    ratio = in_scale.to(torch.float64) / out_scale.to(torch.float64)
    mantissa, exponent = torch.frexp(ratio)
    m = torch.floor(mantissa * 2.0**31 + 0.5).to(torch.int64)
    e = 31 - exponent.to(torch.int64)
    return m, e


def ref_requantize_rows(x: Tensor, m: Tensor, e: Tensor, out_bits: int) -> Tensor:
    """round-half-even(I * m / 2^e) clamped to signed out_bits; m, e int64 per column [C]."""
    v = x.to(torch.int64) * m.to(x.device)
    y = ref_round_shift_half_even(v, e.to(x.device))
    lo, hi = -(2 ** (out_bits - 1)), 2 ** (out_bits - 1) - 1
    return y.clamp(lo, hi).to(int_dtype_for_bits(out_bits))


def scale_for_columns(op: str, name: str, scale: Tensor, x: Tensor, columns: int | None = None) -> None:
    check_scale_device(op, name, scale, x)
    columns = x.shape[-1] if columns is None else columns
    if scale.numel() != 1 and tuple(scale.shape) != (columns,):
        raise ValueError(
            f"{op}: {name} must be per-tensor (one value) or per-channel with shape ({columns},) "
            f"matching the last dim, got shape {tuple(scale.shape)}"
        )


def dyadic_host(i: float, o: float) -> tuple[int, int]:
    """dyadic_params for one pair of float32 scales, in Python: the float64 ratio, frexp, and
    m = floor(mantissa * 2^31 + 0.5) are all exact in Python floats, as in torch's float64."""
    mantissa, exponent = math.frexp(i / o)
    return math.floor(mantissa * 2.0**31 + 0.5), 31 - exponent


def dyadic_columns(op: str, in_scale: Tensor, out_scale: Tensor, columns: int,
                    device: torch.device | None) -> tuple[Tensor, Tensor]:
    """Checked (m, e) as contiguous int64 vectors of length ``columns`` on ``device``, with no
    synchronisation for host scales (per-tensor: two fills; per-channel: a pinned copy); with
    ``device=None`` host scales give host constants (the Triton kernels take those as scalars
    or copy them themselves). A scale on the GPU is turned into (m, e) on the device; its
    finite-and-positive check reads it back and runs only when validation is on (see the module
    docstring)."""
    if in_scale.device.type == "cpu" and out_scale.device.type == "cpu":
        i = host_scale(op, "in_scale", in_scale)
        o = host_scale(op, "out_scale", out_scale)
        if len(i) == 1 and len(o) == 1:
            m, e = dyadic_host(i[0], o[0])
            where = "cpu" if device is None else device
            return (torch.full((columns,), m, dtype=torch.int64, device=where),
                    torch.full((columns,), e, dtype=torch.int64, device=where))
        m, e = dyadic_params(in_scale.detach().to(torch.float32).reshape(-1), out_scale.detach().to(torch.float32).reshape(-1))
        m, e = m.expand(columns).contiguous(), e.expand(columns).contiguous()
        return (m, e) if device is None else (to_device_async(m, device), to_device_async(e, device))
    dev = in_scale.device if in_scale.device.type != "cpu" else out_scale.device
    if validation_enabled(dev):
        host_scale(op, "in_scale", in_scale)
        host_scale(op, "out_scale", out_scale)
    i = in_scale.detach().to(dev, torch.float32, non_blocking=True).reshape(-1)
    o = out_scale.detach().to(dev, torch.float32, non_blocking=True).reshape(-1)
    m, e = dyadic_params(i, o)
    return m.expand(columns).contiguous().to(device), e.expand(columns).contiguous().to(device)


def ref_int_gemm_rows(x: Tensor, w: Tensor, bias: Tensor | None, m: Tensor | None, e: Tensor | None,
                      out_bits: int) -> Tensor:
    """Reference integer GEMM: acc = saturate_int32(x @ w^T + bias), then, with (m, e), the
    requantisation of ref_requantize_rows.

    The products are summed in float64, exact here (|sum| < 2^31 < 2^53 for int8 operands and
    K < 2^17), because int64 matmul is not implemented on CUDA; this keeps the reference
    runnable on every device.
    """
    acc = (x.to(torch.float64) @ w.to(torch.float64).T).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    acc = acc.clamp(-(2**31), INT32_MAX)
    if m is None:
        return acc.to(torch.int32)
    return ref_requantize_rows(acc, m, e, out_bits)


def check_gemm_requant(op: str, in_scale: Tensor | None, out_scale: Tensor | None, out_bits: int, x: Tensor,
                       columns: int, per_channel_in: bool = True) -> None:
    """An integer GEMM's epilogue arguments: both scales (requantise) or neither (int32 out);
    in_scale per tensor or, if ``per_channel_in``, per output column; out_scale either."""
    if (in_scale is None) != (out_scale is None):
        raise ValueError(f"{op}: give both in_scale and out_scale to requantise, or neither for int32 output")
    if out_scale is not None:
        if per_channel_in:
            scale_for_columns(op, "in_scale", in_scale, x, columns)
        else:
            check_scalar_scale(op, "in_scale", in_scale, x)
        scale_for_columns(op, "out_scale", out_scale, x, columns)
        if isinstance(out_bits, bool) or not isinstance(out_bits, int) or not 2 <= out_bits <= 32:
            raise ValueError(f"{op}: out_bits must be an integer in [2, 32], got {out_bits!r}")
