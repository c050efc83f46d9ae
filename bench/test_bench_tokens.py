"""bench/tokens.py under pytest-benchmark:

    pytest bench/test_bench_tokens.py --benchmark-json=out.json [--benchmark-group-by=group]

The same configs as ``python bench/tokens.py`` (``EFFKERN_BENCH_QUICK=1`` for its --quick set,
``EFFKERN_BENCH_OPS=token_gather,...`` for a subset). One benchmark per config and implementation,
grouped by config so pytest-benchmark compares them side by side: each baseline, then for each
non-reference effkern backend its primitives (``<backend>``: the "kernel µs" of bench/tokens.py)
and its public op (``<backend>:op``, validate=False: for token_scatter this includes the scatter
plan, for tome_match_merge the whole bipartite_matching + merge_tokens pipeline).

GPU time, never a host clock around asynchronous launches: pedantic mode with a timer
(:class:`bench.common.GpuClock`) that advances only by the CUDA-event time of each round (one call
on the next rotated input set, L2 flushed before it). ``extra_info`` holds the
``triton.testing.do_bench`` median that ``bench/tokens.py`` reports, GB/s and the speedup over
each baseline. Each backend is checked against the torch backend (bench/tokens.py's ``verify``)
before it is timed. Without CUDA every benchmark is skipped (the CPU self-check is
``python bench/tokens.py``). ``EFFKERN_BENCH_DEADLINE`` (Unix time) skips the benchmarks not
started by then.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from bench import runner, tokens  # noqa: E402

BENCH = runner.PytestBench(tokens)  # settings (EFFKERN_BENCH_*), GPU clock, case cache, measurement
pytestmark = BENCH.marks()


@pytest.mark.parametrize("cfg, impl", BENCH.params(BENCH.primitive_impls))  # the target shapes first (run_order)
def test_tokens(benchmark, cfg, impl):
    BENCH.bench_primitives(benchmark, cfg, impl)
