"""What every op family shares: dtype groups, the accumulation dtype, argument-check helpers,
the epsilons of the normalisations and the packed-code word count.

Dependencies point one way: ``effkern.ops.<family>`` and ``effkern.triton.<family>`` import
this module; it imports nothing of effkern. The CUDA side keeps the same constants in
``kernels/common/`` (the tests check that the two agree).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch backend also runs float64, which gradcheck needs.
TORCH_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)
INT_DTYPES = (torch.int8, torch.int16, torch.int32)
INDEX_DTYPES = (torch.int64, torch.int32)
INT32_MAX = 2**31 - 1
# int8 products are at most 2^14 in magnitude, so int32 accumulation is exact for K < 2^17
# (every int8 GEMM: int8_linear and the families after it).
MAX_INT8_LINEAR_K = 2**17 - 1

# The 4-bit shift weights (effkern.ops.shift) pack two codes per byte in groups of this many
# weights along K: byte 32 g + j holds k = 64 g + j (low nibble) and 64 g + 32 + j (high).
SHIFT4_GROUP = 64

# x / max(||x||, NORM_EPS), as F.normalize: a zero row stays zero (ToMe's metric, the KSH hash,
# the shiftadd form of binary attention).
NORM_EPS = 1e-12


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, for error messages."""
    return str(dtype).removeprefix("torch.")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the float kernels: float32 for fp16/bf16/fp32, float64 for
    float64 (the torch backend runs float64 for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_words(nbits: int) -> int:
    """int32 words per packed binary code of ``nbits`` bits."""
    return (nbits + 31) // 32


def row_major(t: Tensor) -> Tensor:
    """``t`` with row-major strides, the strides a fake impl promises with ``new_empty``; copied
    only when needed (``.contiguous()`` keeps any stride of a size-1 dim, this does not)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    return t if t.stride() == tuple(reversed(expected)) else t.clone(memory_format=torch.contiguous_format)


def int_dtype_for_bits(bits: int) -> torch.dtype:
    """The narrowest signed integer dtype holding ``bits``-bit values."""
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


# --------------------------------------------------------------------------------------------
# Argument checks: each raises TypeError (wrong kind or dtype) or ValueError (wrong shape,
# device or value) naming the op and the argument.
# --------------------------------------------------------------------------------------------


def check_tensor(op: str, name: str, t, *, dims: tuple[int, ...] | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """``t`` is a tensor with one of ``dims`` dimensions and one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {' or '.join(dtype_name(d) for d in dtypes)}, "
                        f"got {dtype_name(t.dtype)}")


def check_same_device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` lives where ``ref`` does (a meta or CPU tensor beside a CUDA one is refused)."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_int(op: str, name: str, value, lo: int, hi: int) -> None:
    """``value`` is a Python int (not a bool) in [lo, hi]. Under torch.compile a symbolic int
    is specialised to its value here (a guard): such ints choose the kernel's code path."""
    if isinstance(value, torch.SymInt):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{op}: {name} must be an integer in [{lo}, {hi}], got {value!r}")


def check_choice(op: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def to_device_async(t: Tensor, device) -> Tensor:
    """``t`` on ``device``; a host tensor goes to a GPU through pinned memory, non-blocking, so
    the host does not wait for the device (torch's caching host allocator keeps the pinned copy
    alive until the transfer is done)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)  # a no-op when t is already there


# --------------------------------------------------------------------------------------------
# Value validation (index ranges, finiteness, plan consistency): it needs the data on the host,
# which on a GPU is a device synchronisation. Ops take ``validate=None`` by default: validated
# where that is free (CPU tensors), skipped on the GPU hot path unless asked for.
# --------------------------------------------------------------------------------------------

# Process-wide, like torch.backends flags; a plain dict (not a ContextVar) so that torch.compile
# traces the lookup in Python-level ops instead of breaking the graph.
_VALIDATION: dict[str, bool | None] = {"forced": None}
_ENV_ON, _ENV_OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ops called with ``validate=None`` (the default) validate their input
    values (``enabled=True``, one device sync per call on a GPU) or never do (False)."""
    previous = _VALIDATION["forced"]
    _VALIDATION["forced"] = bool(enabled)
    try:
        yield
    finally:
        _VALIDATION["forced"] = previous


def validation_enabled(device: torch.device) -> bool:
    """What ``validate=None`` means for an op on ``device``: ``effkern.validation(...)`` if set,
    else ``EFFKERN_VALIDATE`` (1/0), else True on CPU (a host read costs no device sync there)
    and False elsewhere (no synchronisation on the GPU hot path)."""
    forced = _VALIDATION["forced"]
    if forced is not None:
        return forced
    env = os.environ.get("EFFKERN_VALIDATE", "").strip().lower()
    if env in _ENV_ON or env in _ENV_OFF:
        return env in _ENV_ON
    if env == "":
        return device.type == "cpu"
    raise ValueError(f"EFFKERN_VALIDATE must be 1 or 0 (or true/false, on/off), got {env!r}")


def resolve_validate(validate: bool | None, t: Tensor) -> bool:
    """An op's ``validate`` argument, None resolved for the device of ``t``."""
    return validation_enabled(t.device) if validate is None else bool(validate)
