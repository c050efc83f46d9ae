"""What the Triton kernel tests (tests/test_triton_*_kernels.py) share: the module-level skip when
the kernels cannot run here, and the stand-ins for ``torch.empty`` that poison what the wrappers
allocate, so that an element a kernel fails to write shows up as a mismatch.

Import this module before the kernels: conftest.py has set TRITON_INTERPRET by then (without a
GPU), which triton reads when it is imported. The ``gen`` fixture is conftest.py's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_real_empty = torch.empty


def skip_module_unless_triton_runs() -> None:
    """Skips the calling test module unless triton is installed and its kernels can run: on a
    CUDA device, or under the interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)


class GarbageBytes:
    """A poison: overwrites a contiguous tensor's bytes with random ones from ``gen``, or with the
    byte ``pattern`` when that is set (NaNs, infinities and huge values in floats, garbage in
    integers). Only tensors of ``dtypes`` are touched (default: every dtype but bool)."""

    def __init__(self, gen: torch.Generator, pattern: int | None = None, dtypes=None):
        self.gen, self.pattern, self.dtypes = gen, pattern, dtypes

    def __call__(self, t: torch.Tensor) -> None:
        wanted = t.dtype != torch.bool if self.dtypes is None else t.dtype in self.dtypes
        if not (wanted and t.is_contiguous()):
            return
        raw = t.reshape(-1).view(torch.uint8)  # reshape: a 0-d tensor has no last dim to view
        if self.pattern is None:
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=self.gen).to(raw.device))
        else:
            raw.fill_(self.pattern)


def nan_or_garbage(t: torch.Tensor) -> None:
    """A poison: NaN in floating tensors, -(2**31) + 7 in the others."""
    t.fill_(math.nan if t.is_floating_point() else -(2**31) + 7)


class PoisonedEmpty:
    """Stands in for torch.empty: every non-empty tensor comes back passed through ``poison``."""

    def __init__(self, poison):
        self.poison = poison

    def __call__(self, *args, **kwargs):
        t = _real_empty(*args, **kwargs)
        if t.numel():
            self.poison(t)
        return t


@contextlib.contextmanager
def poisoned_empty(poison):
    """torch.empty poisoned with ``poison`` inside the block only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", PoisonedEmpty(poison))
        yield


# --------------------------------------------------------------------------------------------
# Comparison with the torch primitives (tests/test_{binary_hash,tokens}_triton*_kernels.py)
# --------------------------------------------------------------------------------------------

REL_TOL = 1e-5  # of the result's scale, on top of twice the torch primitive's own error


def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) with torch.empty poisoned: NaN (float) or garbage (integer) filled."""
    with poisoned_empty(nan_or_garbage):
        return fn(*args, **kwargs)


def randn(shape, gen, dtype=torch.float32, std: float = 1.0) -> torch.Tensor:
    """Standard normal values times ``std`` from ``gen`` (on the CPU), in ``dtype``, on DEVICE."""
    from tests.conftest import DEVICE

    return (torch.randn(shape, generator=gen) * std).to(dtype).to(DEVICE)


def f64(*ts):
    return tuple(t.double() for t in ts)


def check(out: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, what: str, scale: float = 0.0) -> None:
    """Triton's ``out`` against the float64 result ``exact``, allowed twice the error of the
    torch primitive's result ``lowp`` on the same inputs (and dtype), plus REL_TOL of the scale
    (the largest of ``scale`` and the result's magnitude); under the interpreter, one more
    bfloat16 ulp for bfloat16 results."""
    assert out.dtype == lowp.dtype, f"{what}: dtype {out.dtype} != {lowp.dtype}"
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    if out.numel() == 0:
        return
    exact = exact.double().cpu()
    err = (out.double().cpu() - exact).abs()
    err_torch = (lowp.double().cpu() - exact).abs().max().item()
    scale = max(scale, exact.abs().max().item())
    tol = torch.full_like(exact, 2 * err_torch + REL_TOL * scale + 1e-30)
    if INTERPRET and out.dtype == torch.bfloat16:
        # The interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest):
        # up to one more bfloat16 ulp.
        tol += 2.0**-7 * exact.abs()
    bad = ~(err <= tol)  # also catches NaN (unwritten elements)
    if bool(bad.any()):
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {out.numel()} elements off; first at {i}: got "
                             f"{out[i].item()}, expected {exact[i].item()}, error {err[i].item():.3g} > "
                             f"{tol[i].item():.3g} (torch {out.dtype} max error {err_torch:.3g})")
