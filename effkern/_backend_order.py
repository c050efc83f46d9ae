"""Which backend an op tries first on a GPU, and on what grounds.

The automatic order on CUDA tensors is per op: the backend predicted (later: measured) fastest
comes first. Until a GPU benchmark has been recorded the evidence is the static performance
report (``python -m effkern perf``, bench/results/static.md): registers, spills, load widths,
tensor-core use and a roofline estimate of each benchmark row, per backend. ``python -m effkern
info`` prints each op's order with the grounds written here, and tests/test_backend_order.py
checks that every entry names real backends and agrees with the committed static report.

An op not listed tries the hand-written CUDA kernel first (``DEFAULT``). Forcing a backend
(``effkern.backend(...)``, ``EFFKERN_BACKEND``) overrides this order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Order:
    """``backends``: the order tried on CUDA tensors; ``grounds``: why, in one sentence."""

    backends: tuple[str, ...]
    grounds: str


DEFAULT = Order(("cuda", "triton", "torch"), "default: no evidence recorded; hand-written CUDA first")

GPU_ORDER: dict[str, Order] = {}


def gpu_order(op: str) -> Order:
    """The backend order of ``op`` on CUDA tensors and its grounds."""
    return GPU_ORDER.get(op, DEFAULT)
