"""bench/integer.py under pytest-benchmark:

    pytest bench/ --benchmark-json=out.json [--benchmark-group-by=group]

The same configs as ``python bench/integer.py`` (``EFFKERN_BENCH_QUICK=1`` for its --quick set,
``EFFKERN_BENCH_OPS=int_softmax,...`` for a subset). One benchmark per config and implementation
(each baseline, then each non-reference effkern backend), grouped by config so pytest-benchmark
compares them side by side.

GPU time, never a host clock around asynchronous launches: pedantic mode with a timer
(:class:`bench.common.GpuClock`) that advances only by the CUDA-event time of each round (one call
on the next rotated input set, L2 flushed before it). ``extra_info`` holds the
``triton.testing.do_bench`` median that ``bench/integer.py`` reports, GB/s, TOPS and the speedup
over each baseline. Each backend is checked bit-exact against the torch reference before it is
timed. Without CUDA every benchmark is skipped (the CPU self-check is ``python bench/integer.py``).
``EFFKERN_BENCH_DEADLINE`` (Unix time) skips the benchmarks not started by then.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from bench import common, integer, runner  # noqa: E402

BENCH = runner.PytestBench(integer)  # settings (EFFKERN_BENCH_*), GPU clock, case cache, measurement
pytestmark = BENCH.marks()


def _impls(cfg) -> list[str]:
    """Each baseline, then each non-reference effkern backend."""
    return [f"baseline:{b}" for b in integer.BASELINES[cfg.op]] + integer.registered_backends(cfg.op)


@pytest.mark.parametrize("cfg, impl", BENCH.params(_impls))
def test_integer(benchmark, cfg, impl):
    case = BENCH.case(cfg)
    benchmark.group = f"{cfg.op} {cfg.model} B{cfg.batch} {cfg.shape_str} {cfg.in_dtype}"
    info = {"op": cfg.op, "model": cfg.model, "batch": cfg.batch, "shape": cfg.shape_str,
            "in_dtype": cfg.in_dtype, "impl": impl, "rot_sets": len(case.sets)}
    if impl.startswith("baseline:"):
        bl = BENCH.baseline(case, impl, info)
        fn, nbytes, flops = bl.fn, bl.bytes, bl.flops
    else:
        kernel = BENCH.verified(case, impl).fn
        args = common.Rotator([case.kernel_args(s) for s in case.sets])
        fn, nbytes, flops = (lambda: kernel(*args.next())), case.bytes, case.flops
    BENCH.measure(benchmark, impl, fn, nbytes, info, flops)
