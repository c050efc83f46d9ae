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

import effkern  # noqa: E402

from bench import common, runner, tokens  # noqa: E402

BENCH = runner.PytestBench(tokens)  # settings (EFFKERN_BENCH_*), GPU clock, case cache, measurement
pytestmark = BENCH.marks()


def _impls(cfg) -> list[str]:
    """Each baseline, then for each non-reference effkern backend its primitives and its public op."""
    return ([f"baseline:{b}" for b in tokens.BASELINES[cfg.op]]
            + [f"{b}{suffix}" for b in tokens.registered_backends(cfg.op) for suffix in ("", ":op")])


@pytest.mark.parametrize("cfg, impl", BENCH.params(_impls))  # the target shapes first (run_order)
def test_tokens(benchmark, cfg, impl):
    case = BENCH.case(cfg)
    benchmark.group = f"{cfg.op} {cfg.model} {cfg.shape_str} {cfg.dtype}"
    info = {"op": cfg.op, "model": cfg.model, "batch": cfg.batch, "shape": cfg.shape_str,
            "dtype": cfg.dtype, "impl": impl, "rot_sets": len(case.sets)}
    sets = common.Rotator(case.sets)
    if impl.startswith("baseline:"):
        bl = BENCH.baseline(case, impl, info)
        fn, nbytes = bl.fn, bl.bytes
    else:
        backend, _, level = impl.partition(":")
        fns = BENCH.verified(case, backend)
        nbytes = case.bytes
        if level == "op":
            def fn():
                with effkern.backend(backend):
                    return case.op(sets.next())
        else:
            def fn():
                return case.kernel(sets.next(), fns)
    BENCH.measure(benchmark, impl, fn, nbytes, info)
