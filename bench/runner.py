"""The skeleton shared by the family benchmarks (bench/integer.py, bench/tokens.py,
bench/binary_hash.py) and their pytest-benchmark modules (bench/test_bench_<family>.py): the
command line, the GPU run loop (time budget, SIGTERM, the rows so far saved whatever happens),
the CPU self-check driver and the report-pipeline check. What is measured, and how each row is filled in, stays in the family.

A family is a module that defines:

    NAME              "integer": the script bench/<NAME>.py, the CSV bench/results/<NAME>.csv
    TITLE             what the banner calls the benchmark ("integer benchmark")
    QUICK_HELP        the help of --quick
    OPS_BENCHED       the ops --ops may name
    FAMILY_COLUMNS    columns every row carries between the environment's and "mode"
    REPORT_TEXT       the text bench/report.py renders the family's rows with
    REPORT_SAMPLE     one synthetic row for the report-pipeline check
    SELF_CHECK_TEXT   {"dtype": the self-check table's dtype header,
                       "summary": its last line, formatted with n_ok, n_na and failures}
    configs(quick, ops)                 the configs in report order
    run_order(cfgs)                     the order to run them in
    self_check_configs(quick, ops)      small versions for the CPU self-check
    build_case(cfg, device, rotate=)    inputs; the case has .sets and .baselines (common.Baseline)
    registered_backends(op, include_reference=False)
    select(case, backend)               (impl, None) or (None, (status, reason))
    verify(case, impl, backend)         (ok, note); raises if the backend raises
    backend_rows(case, base, baseline_t, ceilings, timing)   the rows of one config (GPU)
    check_baselines(case)               [(name, status, note)]: each baseline run once (CPU)

and its configs have op, model, batch, shape_str, in_dtype and name. The functions here look
these up on the module when they run, so a test can monkeypatch any of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import torch

import effkern
from bench import common, report

ENV_COLUMNS = ("date", "gpu", "cc", "torch", "triton", "cuda", "commit")

# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(fam: ModuleType, p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help=fam.QUICK_HELP)
    p.add_argument("--csv", type=Path, default=common.RESULTS_DIR / f"{fam.NAME}.csv",
                   help="results CSV to append to; .md and .png beside it are regenerated "
                        f"(default: bench/results/{fam.NAME}.csv)")
    p.add_argument("--out", type=Path, default=None, help="also copy the CSV, markdown and plot into this directory")
    p.add_argument("--ops", type=lambda s: [o.strip() for o in s.split(",") if o.strip()], default=None,
                   help=f"comma-separated subset of {','.join(fam.OPS_BENCHED)}")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; configs not started by then are skipped (the rows so far are saved)")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the CSV")
    return p


def only_ops(cfgs: list, ops: Sequence[str] | None, known: Sequence[str]) -> list:
    """The configs of the ops named by --ops (or EFFKERN_BENCH_OPS); all of them without a list."""
    if not ops:
        return cfgs
    unknown = set(ops) - set(known)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(known)}")
    return [c for c in cfgs if c.op in ops]


def main(fam: ModuleType, argv: Sequence[str] | None = None) -> int:
    """``python bench/<NAME>.py [argv]`` (also ``python -m effkern bench <NAME>``)."""
    p = argparse.ArgumentParser(prog=f"python bench/{fam.NAME}.py", description=fam.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(fam, add_arguments(fam, p).parse_args(argv))


def run(fam: ModuleType, args: argparse.Namespace) -> int:
    """The GPU benchmark where CUDA is available, else the CPU self-check; ``args`` from a parser
    set up by :func:`add_arguments` (missing attributes take their defaults). Returns the exit
    status."""
    defaults = add_arguments(fam, argparse.ArgumentParser()).parse_args([])
    for k, v in vars(defaults).items():
        if not hasattr(args, k) or getattr(args, k) is None and v is not None:
            setattr(args, k, v)
    args.csv = Path(args.csv)
    if not common.cuda_available():
        return self_check(fam, args)
    try:  # `timeout` sends SIGTERM: end through run_gpu's finally, which saves the rows so far
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        return run_gpu(fam, args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------
# GPU benchmark
# --------------------------------------------------------------------------------------------


def base_row(fam: ModuleType, env: dict, mode: str, cfg) -> dict:
    """The columns that say where a row comes from: environment, family, run mode, config."""
    row = {k: env.get(k, "") for k in ENV_COLUMNS}
    row.update(fam.FAMILY_COLUMNS)
    row.update(mode=mode, op=cfg.op, model=cfg.model, batch=cfg.batch, shape=cfg.shape_str, in_dtype=cfg.in_dtype)
    return row


def error_rows(base: dict, backends: Sequence[str], note: str) -> list[dict]:
    """One ERROR row per backend, for a config that could not be benchmarked at all."""
    return [dict(base, backend=b, status="ERROR", note=note) for b in backends]


def time_baselines(baselines: Sequence[common.Baseline], timing: tuple[float, float]) -> dict[str, tuple[float, str]]:
    """name -> (median µs, note) of each baseline; NaN and the reason where it does not apply or fails."""
    out: dict[str, tuple[float, str]] = {}
    for bl in baselines:
        if bl.fn is None:
            out[bl.name] = (math.nan, bl.na)
            continue
        try:
            out[bl.name] = (common.do_bench_us(bl.fn, *timing).median_us, bl.note)
        except Exception as e:
            out[bl.name] = (math.nan, f"baseline failed: {common.short_exc(e)}")
    return out


def bench_config(fam: ModuleType, cfg, env: dict, ceilings: dict, timing: tuple[float, float], mode: str) -> list[dict]:
    """All rows of one config: its inputs built on the GPU, its baselines timed, then the family's
    rows for every non-reference backend x every baseline."""
    base = base_row(fam, env, mode, cfg)
    base.update(copy_gbps=ceilings["copy_gbps"], matmul_tflops=ceilings["matmul_tflops"])
    try:
        case = fam.build_case(cfg, "cuda")
    except Exception as e:
        traceback.print_exc()
        return error_rows(base, fam.registered_backends(cfg.op), f"building inputs: {common.short_exc(e)}")
    baseline_t = time_baselines(case.baselines, timing)
    return fam.backend_rows(case, base, baseline_t, ceilings, timing)


def run_gpu(fam: ModuleType, args) -> int:
    timing = common.QUICK_TIMING if args.quick else common.FULL_TIMING
    mode = "quick" if args.quick else "full"
    deadline = time.monotonic() + args.time_budget if args.time_budget else math.inf
    env = common.environment()
    print(f"effkern {fam.TITLE} ({mode}) on {env['gpu']} (cc {env['cc']}, {env.get('sms')} SMs, "
          f"L2 {env.get('l2_mb')} MB); torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"commit {env['commit']}, {env['date']}", flush=True)
    ceilings = common.measure_ceilings(*timing)
    print(f"measured ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write), "
          f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s", flush=True)
    cfgs = fam.configs(args.quick, args.ops)
    rank = {c: i for i, c in enumerate(cfgs)}  # the rows are saved in report order, whatever the run order
    done: list[tuple[int, list[dict]]] = []
    interrupted = None
    try:
        for i, cfg in enumerate(fam.run_order(cfgs)):
            if time.monotonic() > deadline:
                print(f"time budget of {args.time_budget:.0f} s spent: skipping {len(cfgs) - i} configs", flush=True)
                mode = f"{mode}, stopped by time budget after {i} of {len(cfgs)} configs"
                break
            t0 = time.monotonic()
            try:
                new = bench_config(fam, cfg, env, ceilings, timing, mode)
            except Exception as e:  # e.g. a CUDA error that poisoned the context
                traceback.print_exc()
                new = error_rows(base_row(fam, env, mode, cfg), fam.registered_backends(cfg.op),
                                 f"benchmark raised {common.short_exc(e)}")
            done.append((rank[cfg], new))
            try:  # the config's tensors went with bench_config's frame
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # a sticky CUDA error: later configs will report it too
                traceback.print_exc()
            print(f"[{i + 1}/{len(cfgs)}] {cfg.name}: {time.monotonic() - t0:.1f} s", flush=True)
            print(report.table(new, compact=True).split("\n", 2)[-1], flush=True)
    except (KeyboardInterrupt, SystemExit) as e:
        interrupted = e
        mode = f"{mode}, interrupted"
    finally:
        rows = [r for _, new in sorted(done, key=lambda d: d[0]) for r in new]
        for r in rows:  # how the run ended, on every row
            r["mode"] = mode
        if rows:
            print()
            print(report.table(rows))
            print()
            print(common.text_table(report.speedup_summary(rows), report.SUMMARY_HEADER))
            if not args.no_save:
                save(rows, args.csv, args.out)
    if interrupted is not None:
        raise interrupted
    bad = [r for r in rows if r.get("correct") is False or r.get("status") in ("ERROR", "WRONG")]
    n_pass = sum(r.get("status") == "PASS" for r in rows)
    n_miss = sum(r.get("status") == "MISS" for r in rows)
    print(f"\ntargets: {n_pass} PASS, {n_miss} MISS; {len(bad)} rows wrong or failed")
    return 1 if bad else 0


def save(rows: list[dict], csv_path: Path, out_dir: Path | None) -> None:
    """Append ``rows`` to ``csv_path``, regenerate its markdown and plot, copy all to out_dir."""
    csv_path = Path(csv_path)
    report.append_rows(csv_path, rows)
    md, png = report.regenerate(csv_path)
    print(f"results: appended {len(rows)} rows to {csv_path}; regenerated {md}" + (f" and {png}" if png else ""))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in (csv_path, md, png):
            if p is not None and p.exists() and p.resolve().parent != out_dir.resolve():
                shutil.copy2(p, out_dir / p.name)
        print(f"results: copied to {out_dir}")


# --------------------------------------------------------------------------------------------
# CPU self-check
# --------------------------------------------------------------------------------------------


def self_check(fam: ModuleType, args) -> int:
    """Without CUDA nothing is timed: every backend usable on the CPU is checked against the
    torch backend on small versions of the configs, each baseline runs once, and the report
    pipeline is exercised. Exits non-zero if anything mismatches or fails."""
    cfgs = fam.self_check_configs(args.quick, args.ops)
    interp = effkern._dispatch.triton_interpreter_enabled()
    print(f"No CUDA device: nothing is timed (timings need a GPU). Running the correctness self-check on "
          f"small versions of the benchmark shapes: {len(cfgs)} cases, triton "
          f"{'under TRITON_INTERPRET=1' if interp else 'skipped (set TRITON_INTERPRET=1 to include it)'}.",
          flush=True)
    out, failures = [], 0
    for cfg in cfgs:
        t0 = time.monotonic()
        where = [cfg.op, cfg.shape_str, cfg.in_dtype]
        try:
            case = fam.build_case(cfg, "cpu", rotate=False)
        except Exception as e:
            traceback.print_exc()
            failures += 1
            out.append(where + ["-", "ERROR", f"building inputs: {common.short_exc(e)}"[:160]])
            continue
        for backend in fam.registered_backends(cfg.op, include_reference=True):
            impl, why = fam.select(case, backend)
            if impl is None:
                status, note = why
            else:
                try:
                    ok, note = fam.verify(case, impl, backend)
                    status = "ok" if ok else "MISMATCH"
                except Exception as e:
                    traceback.print_exc()
                    status, note = "ERROR", common.short_exc(e)
            failures += status in ("ERROR", "MISMATCH")
            out.append(where + [backend, status, note[:160]])
        for name, status, note in fam.check_baselines(case):
            failures += status in ("ERROR", "MISMATCH")
            out.append(where + [f"baseline {name}", status, note[:160]])
        print(f"  {' '.join(where)}: {time.monotonic() - t0:.1f} s", flush=True)
    print()
    print(common.text_table(out, ["op", "shape", fam.SELF_CHECK_TEXT["dtype"], "backend", "result", "note"]))
    rep_ok, rep_msg = check_report_pipeline(fam)
    failures += not rep_ok
    print(f"\nreport pipeline (synthetic rows in a temporary directory, deleted): {rep_msg}")
    n_ok = sum(r[4] == "ok" for r in out)
    n_na = sum(r[4] == "N/A" for r in out)
    print(f"\nself-check: {fam.SELF_CHECK_TEXT['summary'].format(n_ok=n_ok, n_na=n_na, failures=failures)}; "
          "timings need a GPU (run on a CUDA machine).")
    return 1 if failures else 0


def check_report_pipeline(fam: ModuleType) -> tuple[bool, str]:
    """CSV append -> markdown (with the family's report text) -> plot on two synthetic runs of
    ``fam.REPORT_SAMPLE``, in a temporary directory only."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "synthetic.csv"
            sample = dict(fam.REPORT_SAMPLE, mode="selfcheck", gpu="synthetic-gpu")
            report.append_rows(csv_path, [dict(sample, date="2000-01-01T00:00:00Z", speedup=1.5)])
            report.append_rows(csv_path, [dict(sample, date="2000-01-02T00:00:00Z", speedup=2.0)])
            rows = report.read_rows(csv_path)
            md, png = report.regenerate(csv_path)
            text = md.read_text()
            assert len(rows) == 2 and "2.00x" in text and "1.50x" not in text, "latest-run selection"
            assert fam.REPORT_TEXT["title"] in text, "the family's report text"
            return True, "ok" + ("" if png else " (no plot: matplotlib missing)")
    except Exception as e:
        traceback.print_exc()
        return False, f"FAILED: {common.short_exc(e)}"


# --------------------------------------------------------------------------------------------
# pytest-benchmark (bench/test_bench_<family>.py)
# --------------------------------------------------------------------------------------------


class PytestBench:
    """What a family's pytest-benchmark module shares: its settings from the environment, the GPU
    clock that pytest-benchmark times with, the current config's case (the params are
    config-major, so one case lives at a time), each backend verified once per config, and the
    measurement itself. pytest is imported only here, not by the command line."""

    def __init__(self, fam: ModuleType) -> None:
        self.fam = fam
        self.quick = os.environ.get("EFFKERN_BENCH_QUICK", "0") not in ("", "0")
        self.ops = [o for o in os.environ.get("EFFKERN_BENCH_OPS", "").split(",") if o.strip()] or None
        self.deadline = float(os.environ.get("EFFKERN_BENCH_DEADLINE", "inf"))
        self.timing = common.QUICK_TIMING if self.quick else common.FULL_TIMING
        self.rounds, self.warmup_rounds = (30, 3) if self.quick else (100, 5)
        self.clock = common.GpuClock()
        self._cache: dict = {}
        self._flusher: common.L2Flusher | None = None

    def marks(self) -> list:
        """The module's ``pytestmark``: skipped without CUDA and triton, timed by the GPU clock."""
        import pytest

        no_gpu = (f"GPU benchmarks need CUDA and triton; on CPU run `python bench/{self.fam.NAME}.py` for the "
                  "correctness self-check")
        return [
            pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                               reason=no_gpu),
            pytest.mark.benchmark(timer=self.clock, warmup=False, disable_gc=True),
        ]

    def params(self, impls: Callable[[object], list[str]]) -> list:
        """``pytest.param(cfg, impl)`` for every config, in the family's run order, and each of
        ``impls(cfg)`` ("baseline:<name>" or a backend)."""
        import pytest

        return [pytest.param(cfg, impl, id=f"{cfg.name}-{impl.replace('baseline:', 'base-').replace(' ', '_')}")
                for cfg in self.fam.run_order(self.fam.configs(self.quick, self.ops)) for impl in impls(cfg)]

    def case(self, cfg):
        """The config's case, built on the first of its params; skips once the deadline passed."""
        import pytest

        if time.time() > self.deadline:
            pytest.skip("time budget (EFFKERN_BENCH_DEADLINE) spent")
        if self._cache.get("cfg") != cfg:
            self._cache.clear()
            torch.cuda.empty_cache()
            self._cache.update(cfg=cfg, case=self.fam.build_case(cfg, "cuda"), baseline_us={}, verified={})
        return self._cache["case"]

    def baseline(self, case, impl: str, info: dict) -> common.Baseline:
        """The baseline that ``impl`` ("baseline:<name>") names; skips one that does not apply."""
        import pytest

        bl = next(b for b in case.baselines if b.name == impl.removeprefix("baseline:"))
        if bl.fn is None:
            pytest.skip(f"{bl.name}: {bl.na}")
        if bl.note:
            info["note"] = bl.note
        return bl

    def verified(self, case, backend: str):
        """The backend's implementation (the family's ``select``), checked once per config
        against the torch backend; skips a backend that is not available."""
        import pytest

        cache = self._cache["verified"]
        if backend not in cache:
            impl, why = self.fam.select(case, backend)
            if impl is None:
                cache[backend] = (None, *why)
            else:
                ok, note = self.fam.verify(case, impl, backend)
                cache[backend] = (impl, "ok" if ok else "WRONG", note)
        impl, status, reason = cache[backend]
        if status == "N/A":
            pytest.skip(f"{backend} not available: {reason}")
        if status == "ERROR":
            pytest.fail(reason)
        assert status == "ok", f"{backend} differs from the torch backend: {reason}"
        return impl

    def primitive_impls(self, cfg) -> list[str]:
        """For a family timed as a chain of primitives (bench/tokens.py, bench/binary_hash.py): each
        baseline, then for each non-reference effkern backend its primitives and its public op(s)."""
        return ([f"baseline:{b}" for b in self.fam.BASELINES[cfg.op]]
                + [f"{b}{suffix}" for b in self.fam.registered_backends(cfg.op) for suffix in ("", ":op")])

    def bench_primitives(self, benchmark, cfg, impl: str, baseline_flops: bool = False) -> None:
        """One param of :meth:`primitive_impls`: a baseline, ``<backend>`` (the case's kernel call
        on the backend's primitives) or ``<backend>:op`` (the public op(s) under the backend),
        timed by :meth:`measure`; ``baseline_flops``: report a baseline's FLOPs too."""
        case = self.case(cfg)
        benchmark.group = f"{cfg.op} {cfg.model} {cfg.shape_str} {cfg.dtype}"
        info = {"op": cfg.op, "model": cfg.model, "batch": cfg.batch, "shape": cfg.shape_str,
                "dtype": cfg.dtype, "impl": impl, "rot_sets": len(case.sets)}
        sets = common.Rotator(case.sets)
        flops = 0
        if impl.startswith("baseline:"):
            bl = self.baseline(case, impl, info)
            fn, nbytes = bl.fn, bl.bytes
            if baseline_flops:
                flops = bl.flops
        else:
            backend, _, level = impl.partition(":")
            fns = self.verified(case, backend)
            nbytes = case.bytes
            if level == "op":
                def fn():
                    with effkern.backend(backend):
                        return case.op(sets.next())
            else:
                def fn():
                    return case.kernel(sets.next(), fns)
        self.measure(benchmark, impl, fn, nbytes, info, flops=flops)

    def measure(self, benchmark, impl: str, fn: Callable[[], object], nbytes: int, info: dict,
                flops: int = 0) -> None:
        """Time ``fn`` (one call on the next rotated input set): pytest-benchmark's rounds on the
        GPU clock (CUDA events, L2 flushed before each), and in ``extra_info`` the do_bench median
        that the family's script reports, GB/s, TOPS and, for a backend, its speedup over the
        config's baselines (their params run first)."""
        t = common.do_bench_us(fn, *self.timing)
        if self._flusher is None:
            self._flusher = common.L2Flusher()
        flush = self._flusher

        def one_round():
            self.clock.advance(common.cuda_event_time_s(fn, flush))

        benchmark.pedantic(one_round, rounds=self.rounds, warmup_rounds=self.warmup_rounds, iterations=1)
        info.update(do_bench_median_us=t.median_us, do_bench_p20_us=t.p20_us, do_bench_p80_us=t.p80_us,
                    bytes=nbytes, gbps=nbytes / (t.median_us * 1e-6) / 1e9)
        if flops:
            info.update(flops=flops, tops=flops / (t.median_us * 1e-6) / 1e12)
        if impl.startswith("baseline:"):
            self._cache["baseline_us"][impl.removeprefix("baseline:")] = t.median_us
        else:
            for name, b_us in self._cache["baseline_us"].items():
                info[f"speedup_vs_{name}"] = b_us / t.median_us
        benchmark.extra_info.update(info)


# --------------------------------------------------------------------------------------------
# Families timed as a chain of backend primitives (bench/tokens.py, bench/binary_hash.py)
# --------------------------------------------------------------------------------------------
#
# Their cases have .cfg, .sets, .kernel(s, {primitive: fn}), .op(s) (the public op(s),
# validate=False), .bytes, .out_dtype and .baselines; the family's PRIMITIVES[op] names the
# primitives (OPS names) its kernel call uses.


def select_primitives(fam: ModuleType, case, backend: str, recorded: dict[str, tuple]):
    """({primitive: fn}, None) or (None, (status, reason)) with status N/A or ERROR: each of the
    op's primitives selected under ``backend`` with the arguments the kernel call gives it."""
    fns = {}
    for prim in fam.PRIMITIVES[case.cfg.op]:
        try:
            with effkern.backend(backend):
                impl = effkern._dispatch.OPS[prim].select(*recorded[prim])
        except effkern.BackendNotSupported as e:
            lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
            return None, ("N/A", f"{prim}: " + (" ".join(lines) or str(e)))
        except Exception as e:  # a broken availability check is a failure, not "unavailable"
            return None, ("ERROR", f"{prim} availability check raised {common.short_exc(e)}")
        why = common.import_reason(impl.fn)
        if why is not None:
            return None, ("N/A", why)
        fns[prim] = impl.fn
    return fns, None


def verify_levels(case, fns: dict, backend: str, torch_fns: dict,
                  compare: Callable[[str, object, object], tuple[bool, str]]) -> tuple[bool, str]:
    """Run the backend once at kernel level and once through the public op(s) and compare both
    (``compare(level, got, ref)``) with the torch backend. Raises if the backend raises."""
    s = case.sets[0]
    ref_kernel = case.kernel(s, torch_fns)
    with effkern.backend("torch"):
        ref_op = case.op(s)
    out_kernel = case.kernel(s, fns)
    with effkern.backend(backend):
        out_op = case.op(s)
    notes, ok = [], True
    for level, got, ref in (("kernel", out_kernel, ref_kernel), ("op", out_op, ref_op)):
        good, note = compare(level, got, ref)
        ok &= good
        if note:
            notes.append(f"{level}: {note}")
    return ok, "; ".join(notes)


def primitive_backend_rows(fam: ModuleType, case, base: dict, baseline_t: dict[str, tuple[float, str]],
                           ceilings: dict, timing: tuple[float, float],
                           status_for: Callable[..., str],
                           extra: Callable[[common.Baseline, float], dict] | None = None) -> list[dict]:
    """The rows of one config, whose baselines are timed: every non-reference backend (the
    family's ``select`` and ``verify``) x every baseline. ``status_for(cfg, target, correct,
    speedup, op_speedup, bw_frac)``; ``extra(baseline, baseline µs)``: columns after baseline_gbps."""
    cfg, nan = case.cfg, math.nan
    base.update(out_dtype=case.out_dtype, bytes=case.bytes, rot_sets=len(case.sets))
    rows = []
    for backend in fam.registered_backends(cfg.op):
        fns, why = fam.select(case, backend)
        correct, note, t_kernel, op_us, status = False, "", None, nan, ""
        if fns is None:
            status, note = why
        else:
            try:
                correct, note = fam.verify(case, fns, backend)
            except Exception as e:
                traceback.print_exc()
                status, note = "ERROR", f"{backend} raised {common.short_exc(e)}"
            if status != "ERROR":
                sets = common.Rotator(case.sets)
                try:
                    t_kernel = common.do_bench_us(lambda: case.kernel(sets.next(), fns), *timing)
                    with effkern.backend(backend):
                        op_us = common.do_bench_us(lambda: case.op(sets.next()), *timing).median_us
                except Exception as e:
                    traceback.print_exc()
                    note = "; ".join(x for x in (note, f"timing raised {common.short_exc(e)}") if x)
        k_us = t_kernel.median_us if t_kernel else nan
        gbps = case.bytes / (k_us * 1e-6) / 1e9 if t_kernel else nan
        bw_frac = gbps / ceilings["copy_gbps"]
        for bl in case.baselines if fns is not None else case.baselines[:1]:
            b_us, b_note = baseline_t[bl.name]
            speedup, op_speedup = b_us / k_us, b_us / op_us
            target = fam.target_for(cfg, bl.name)
            row_status = status or status_for(cfg, target, correct, speedup, op_speedup, bw_frac)
            rows.append(dict(
                base, backend=backend, correct=correct if fns is not None and status != "ERROR" else "",
                kernel_us=k_us, kernel_p20_us=t_kernel.p20_us if t_kernel else nan,
                kernel_p80_us=t_kernel.p80_us if t_kernel else nan, op_us=op_us,
                baseline=bl.name, baseline_us=b_us, speedup=speedup, op_speedup=op_speedup,
                gbps=gbps, bw_frac=bw_frac, baseline_gbps=bl.bytes / (b_us * 1e-6) / 1e9,
                **(extra(bl, b_us) if extra else {}),
                target=target, status=row_status, note="; ".join(x for x in (note, b_note) if x),
            ))
    return rows


def check_baselines_against_op(case, ran_note: str,
                               na_on: Callable[[common.Baseline, RuntimeError], str | None] | None = None
                               ) -> list[tuple[str, str, str]]:
    """(name, status, note) of each baseline run once, untimed; the ones with a check in
    ``case.baseline_checks`` are checked against the torch backend's public op(s), the others
    report ``ran_note``. ``na_on(baseline, error)``: a note where a RuntimeError means N/A."""
    with effkern.backend("torch"):
        ref = case.op(case.sets[0])
    out = []
    for bl in case.baselines:
        try:
            got = bl.fn()
            check = case.baseline_checks.get(bl.name)
            if check is None:
                status, note = "ran", ran_note
            else:
                ok, note = check(got, ref)
                status, note = ("agrees", "with the torch op") if ok else ("MISMATCH", note)
        except Exception as e:
            na = na_on(bl, e) if na_on is not None and isinstance(e, RuntimeError) else None
            if na is not None:
                status, note = "N/A", na
            else:
                traceback.print_exc()
                status, note = "ERROR", common.short_exc(e)
        out.append((bl.name, status, note))
    return out

