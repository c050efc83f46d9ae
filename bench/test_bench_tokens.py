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

import importlib.util
import os
import time

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import effkern  # noqa: E402

from bench import common, tokens  # noqa: E402

QUICK = os.environ.get("EFFKERN_BENCH_QUICK", "0") not in ("", "0")
OPS_SUBSET = [o for o in os.environ.get("EFFKERN_BENCH_OPS", "").split(",") if o.strip()] or None
DEADLINE = float(os.environ.get("EFFKERN_BENCH_DEADLINE", "inf"))
TIMING = common.QUICK_TIMING if QUICK else common.FULL_TIMING
ROUNDS, WARMUP_ROUNDS = (30, 3) if QUICK else (100, 5)

CLOCK = common.GpuClock()
_NO_GPU = ("GPU benchmarks need CUDA and triton; on CPU run `python bench/tokens.py` for the correctness "
           "self-check")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason=_NO_GPU),
    pytest.mark.benchmark(timer=CLOCK, warmup=False, disable_gc=True),
]


def _params():
    params = []
    for cfg in tokens.run_order(tokens.configs(QUICK, OPS_SUBSET)):  # the target shapes first
        impls = [f"baseline:{b}" for b in tokens.BASELINES[cfg.op]]
        impls += [f"{b}{suffix}" for b in tokens.registered_backends(cfg.op) for suffix in ("", ":op")]
        for impl in impls:
            ident = f"{cfg.name}-{impl.replace('baseline:', 'base-').replace(' ', '_')}"
            params.append(pytest.param(cfg, impl, id=ident))
    return params


_cache: dict = {}  # the current config's case, baseline medians and verified backends


def _case(cfg):
    if _cache.get("cfg") != cfg:
        _cache.clear()
        torch.cuda.empty_cache()
        _cache.update(cfg=cfg, case=tokens.build_case(cfg, "cuda"), baseline_us={}, verified={})
    return _cache["case"]


def _flusher():
    if "flusher" not in _flusher.__dict__:
        _flusher.flusher = common.L2Flusher()
    return _flusher.flusher


def _verified_fns(case, backend: str):
    """The backend's primitives, checked once per config against the torch backend."""
    if backend not in _cache["verified"]:
        fns, why = tokens.select(case, backend)
        if fns is None:
            status, reason = why
            _cache["verified"][backend] = (None, status, reason)
        else:
            ok, note = tokens.verify(case, fns, backend)
            _cache["verified"][backend] = (fns, "ok" if ok else "WRONG", note)
    fns, status, reason = _cache["verified"][backend]
    if status == "N/A":
        pytest.skip(f"{backend} not available: {reason}")
    if status == "ERROR":
        pytest.fail(reason)
    assert status == "ok", f"{backend} differs from the torch backend: {reason}"
    return fns


@pytest.mark.parametrize("cfg, impl", _params())
def test_tokens(benchmark, cfg, impl):
    if time.time() > DEADLINE:
        pytest.skip("time budget (EFFKERN_BENCH_DEADLINE) spent")
    case = _case(cfg)
    benchmark.group = f"{cfg.op} {cfg.model} {cfg.shape_str} {cfg.dtype}"
    info = {"op": cfg.op, "model": cfg.model, "batch": cfg.batch, "shape": cfg.shape_str,
            "dtype": cfg.dtype, "impl": impl, "rot_sets": len(case.sets)}
    sets = common.Rotator(case.sets)
    if impl.startswith("baseline:"):
        bl = next(b for b in case.baselines if b.name == impl.removeprefix("baseline:"))
        fn, nbytes = bl.fn, bl.bytes
        if bl.note:
            info["note"] = bl.note
    else:
        backend, _, level = impl.partition(":")
        fns = _verified_fns(case, backend)
        nbytes = case.bytes
        if level == "op":
            def fn():
                with effkern.backend(backend):
                    return case.op(sets.next())
        else:
            def fn():
                return case.kernel(sets.next(), fns)

    t = common.do_bench_us(fn, *TIMING)
    flush = _flusher()

    def one_round():
        CLOCK.advance(common.cuda_event_time_s(fn, flush))

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    info.update(do_bench_median_us=t.median_us, do_bench_p20_us=t.p20_us, do_bench_p80_us=t.p80_us,
                bytes=nbytes, gbps=nbytes / (t.median_us * 1e-6) / 1e9)
    if impl.startswith("baseline:"):
        _cache["baseline_us"][impl.removeprefix("baseline:")] = t.median_us
    else:
        for name, b_us in _cache["baseline_us"].items():
            info[f"speedup_vs_{name}"] = b_us / t.median_us
    benchmark.extra_info.update(info)
