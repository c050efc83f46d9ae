"""bench/binary_hash.py under pytest-benchmark:

    pytest bench/test_bench_binary_hash.py --benchmark-json=out.json [--benchmark-group-by=group]

The same configs as ``python bench/binary_hash.py`` (``EFFKERN_BENCH_QUICK=1`` for its --quick
set, ``EFFKERN_BENCH_OPS=binary_attention,hash_attention`` for a subset). One benchmark per
config and implementation, grouped by config: each baseline (``SDPA flash``, ``torch linear
ref``), then for each non-reference effkern backend its primitives (``<backend>``: the "kernel
µs" of bench/binary_hash.py) and its public op(s) (``<backend>:op``, validate=False; for
hash_attention the chain ksh_hash x2, pack_bits x2, binary_attention).

GPU time only (pedantic mode, :class:`bench.common.GpuClock` advanced by CUDA events, L2 flushed
before each round); ``extra_info`` holds the do_bench median that bench/binary_hash.py reports,
GB/s at the floor bytes and the speedup over each baseline. Each backend is checked against the
torch backend (bench/binary_hash.py's ``verify``) before it is timed; a backend not yet
registered or importable is skipped. Without CUDA every benchmark is skipped (the CPU
self-check is ``python bench/binary_hash.py``). ``EFFKERN_BENCH_DEADLINE`` (Unix time) skips
the benchmarks not started by then.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from bench import binary_hash, runner  # noqa: E402

BENCH = runner.PytestBench(binary_hash)
pytestmark = BENCH.marks()


@pytest.mark.parametrize("cfg, impl", BENCH.params(BENCH.primitive_impls))  # the target shapes first (run_order)
def test_binary_hash(benchmark, cfg, impl):
    BENCH.bench_primitives(benchmark, cfg, impl, baseline_flops=True)
