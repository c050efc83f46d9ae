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

import importlib.util
import os
import time

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import common, integer  # noqa: E402

QUICK = os.environ.get("EFFKERN_BENCH_QUICK", "0") not in ("", "0")
OPS_SUBSET = [o for o in os.environ.get("EFFKERN_BENCH_OPS", "").split(",") if o.strip()] or None
DEADLINE = float(os.environ.get("EFFKERN_BENCH_DEADLINE", "inf"))
TIMING = common.QUICK_TIMING if QUICK else common.FULL_TIMING
ROUNDS, WARMUP_ROUNDS = (30, 3) if QUICK else (100, 5)

CLOCK = common.GpuClock()
_NO_GPU = ("GPU benchmarks need CUDA and triton; on CPU run `python bench/integer.py` for the correctness "
           "self-check")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason=_NO_GPU),
    pytest.mark.benchmark(timer=CLOCK, warmup=False, disable_gc=True),
]


def _params():
    params = []
    for cfg in integer.configs(QUICK, OPS_SUBSET):
        impls = [f"baseline:{b}" for b in integer.BASELINES[cfg.op]] + integer.registered_backends(cfg.op)
        for impl in impls:
            ident = f"{cfg.name}-{impl.replace('baseline:', 'base-').replace(' ', '_')}"
            params.append(pytest.param(cfg, impl, id=ident))
    return params


_cache: dict = {}  # the current config's case and baseline medians (params are config-major)


def _case(cfg):
    if _cache.get("cfg") != cfg:
        _cache.clear()
        torch.cuda.empty_cache()
        _cache.update(cfg=cfg, case=integer.build_case(cfg, "cuda"), baseline_us={})
    return _cache["case"]


def _flusher():
    if "flusher" not in _flusher.__dict__:
        _flusher.flusher = common.L2Flusher()
    return _flusher.flusher


@pytest.mark.parametrize("cfg, impl", _params())
def test_integer(benchmark, cfg, impl):
    if time.time() > DEADLINE:
        pytest.skip("time budget (EFFKERN_BENCH_DEADLINE) spent")
    case = _case(cfg)
    benchmark.group = f"{cfg.op} {cfg.model} B{cfg.batch} {cfg.shape_str} {cfg.in_dtype}"
    info = {"op": cfg.op, "model": cfg.model, "batch": cfg.batch, "shape": cfg.shape_str,
            "in_dtype": cfg.in_dtype, "impl": impl, "rot_sets": len(case.sets)}
    if impl.startswith("baseline:"):
        bl = next(b for b in case.baselines if b.name == impl.removeprefix("baseline:"))
        if bl.fn is None:
            pytest.skip(f"{bl.name}: {bl.na}")
        fn, nbytes, flops = bl.fn, bl.bytes, bl.flops
        if bl.note:
            info["note"] = bl.note
    else:
        chosen, why = integer.select(case, impl)
        if chosen is None:
            status, reason = why
            if status == "N/A":
                pytest.skip(f"{impl} not available: {reason}")
            pytest.fail(reason)
        ok, note = integer.verify(case, chosen, impl)
        assert ok, f"{impl} differs from the torch reference: {note}"
        args = common.Rotator([case.kernel_args(s) for s in case.sets])
        kernel = chosen.fn
        fn, nbytes, flops = (lambda: kernel(*args.next())), case.bytes, case.flops

    t = common.do_bench_us(fn, *TIMING)
    flush = _flusher()

    def one_round():
        CLOCK.advance(common.cuda_event_time_s(fn, flush))

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    info.update(do_bench_median_us=t.median_us, do_bench_p20_us=t.p20_us, do_bench_p80_us=t.p80_us,
                bytes=nbytes, gbps=nbytes / (t.median_us * 1e-6) / 1e9)
    if flops:
        info.update(flops=flops, tops=flops / (t.median_us * 1e-6) / 1e12)
    if impl.startswith("baseline:"):
        _cache["baseline_us"][impl.removeprefix("baseline:")] = t.median_us
    else:
        for name, b_us in _cache["baseline_us"].items():
            info[f"speedup_vs_{name}"] = b_us / t.median_us
    benchmark.extra_info.update(info)
