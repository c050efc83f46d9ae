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

import effkern  # noqa: E402

from bench import binary_hash, common, runner  # noqa: E402

BENCH = runner.PytestBench(binary_hash)
pytestmark = BENCH.marks()


def _impls(cfg) -> list[str]:
    """Each baseline, then for each non-reference effkern backend its primitives and its public op."""
    return ([f"baseline:{b}" for b in binary_hash.BASELINES[cfg.op]]
            + [f"{b}{suffix}" for b in binary_hash.registered_backends(cfg.op) for suffix in ("", ":op")])


@pytest.mark.parametrize("cfg, impl", BENCH.params(_impls))  # the target shapes first (run_order)
def test_binary_hash(benchmark, cfg, impl):
    case = BENCH.case(cfg)
    benchmark.group = f"{cfg.op} {cfg.model} {cfg.shape_str} {cfg.dtype}"
    info = {"op": cfg.op, "model": cfg.model, "batch": cfg.batch, "shape": cfg.shape_str,
            "dtype": cfg.dtype, "impl": impl, "rot_sets": len(case.sets)}
    sets = common.Rotator(case.sets)
    flops = 0
    if impl.startswith("baseline:"):
        bl = BENCH.baseline(case, impl, info)
        fn, nbytes, flops = bl.fn, bl.bytes, bl.flops
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
    BENCH.measure(benchmark, impl, fn, nbytes, info, flops=flops)
