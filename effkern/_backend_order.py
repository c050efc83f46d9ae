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

_BINARY_ATTENTION = Order(
    ("triton", "cuda", "torch"),
    "static report: Triton's products run on tensor cores (tensor-core instructions in its SASS), its issue floor near the memory "
    "floor at N >= 785; the CUDA kernels are FP32-core FMA loops (about 1.8 SASS instructions per token, "
    "column and code bit in the first pass, estimated about 2x the memory time) and the output pass loads "
    "v element by element")
_INTEGER_ROWS = ("static report: the CUDA kernels move rows in 16-byte chunks at every row length and take "
                 "fewer SASS instructions per element ({cuda} against Triton's {triton})")

GPU_ORDER: dict[str, Order] = {
    "binary_attention": _BINARY_ATTENTION,
    "hashed_attention": _BINARY_ATTENTION,  # the same kernels after the hash
    "int_softmax": Order(("cuda", "triton", "torch"), _INTEGER_ROWS.format(
        cuda="about 19", triton="32-38, with byte loads at odd row lengths such as 197 and 785")),
    "int_gelu": Order(("cuda", "triton", "torch"), _INTEGER_ROWS.format(cuda="about 39", triton="about 55")),
    "int_layernorm": Order(("cuda", "triton", "torch"), _INTEGER_ROWS.format(cuda="6-9", triton="about 21")),
    "token_gather": Order(("cuda", "triton", "torch"),
                          "static report: both backends 16-byte I/O, no spills, memory-bound; no evidence "
                          "either way yet, hand-written CUDA first until a GPU measures them"),
    "token_scatter": Order(("cuda", "triton", "torch"),
                           "static report: both backends 16-byte I/O, no spills, memory-bound; no evidence "
                           "either way yet, hand-written CUDA first until a GPU measures them"),
    "shift_linear": Order(("triton", "cuda", "torch"),
                          "static report: both decode the codes in registers into tensor-core products; Triton's "
                          "are wgmma (HGMMA) on sm_90a, the CUDA kernel's mma.sync (HMMA) with 64 x 128 tiles, so "
                          "Triton first until a GPU measures them"),
}


def gpu_order(op: str) -> Order:
    """The backend order of ``op`` on CUDA tensors and its grounds."""
    return GPU_ORDER.get(op, DEFAULT)
