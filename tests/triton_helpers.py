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
        raw = t.view(torch.uint8)
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
