"""The one benchmark runner: what a family declares, and everything done with it.

A family (``bench/<family>.py``) declares :class:`Case` s: for one op on one real ViT shape, an
input builder, the kernel call (the backend primitives, by kernel-argument name), the public op
call, the baselines a user would pick instead, the bytes and flops moved, how outputs are
compared with the torch backend and the targets. It defines

    TITLE                          "Integer-op benchmark": banner, markdown and plot title
    QUICK                          what --quick runs (its help)
    cases(check=False, quick=False) -> [Case]   the full set in report order; ``quick`` the
                                   smoke set; ``check`` small versions for the CPU self-check
    the module docstring           the command's description and the markdown's intro

This module owns the rest: the backends of each case (from the op registry), verification
against the torch backend, timing, the rows, the CSV and its markdown and plot (bench/report.py),
the CPU self-check, the command line (``python -m effkern bench``) and the pytest-benchmark
plumbing (bench/test_bench_<family>.py).

How a case is timed (bench/common.py; inputs rotated past L2, never zeros):
- *kernel µs*: the backend kernels' device time, the calls captured in a CUDA graph and replayed
  (back-to-back calls behind a GPU head start where capture fails; column kernel_timing);
- *op µs*: the public op in a loop of back-to-back calls on an idle GPU, events around the whole
  loop, so that host overhead (Python, dispatch, launches, syncs) counts as a user's loop sees it;
- each baseline both ways (baseline_us device time, baseline_op_us host-inclusive): speedup is
  baseline_us / kernel_us, op_speedup baseline_op_us / op_us. A baseline with ``variants`` (SDPA's
  backends) is the fastest of them (baseline_variant names it); ``compile=True`` wraps it in
  ``torch.compile`` (a compile failure is N/A with the reason, never a crash);
- bandwidth: GB/s over the large-copy ceiling (bw_frac) and over a copy of the case's own byte
  count measured in the same run (bw_frac_same, what a bandwidth target is judged on);
- every row records GPU, compute capability, SM count, driver, SM and memory clocks read after
  the case, torch / triton / CUDA / Python versions and the commit ($EFFKERN_COMMIT first).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import torch

import effkern
from effkern import _dispatch
from bench import common, report

BENCH_DIR = Path(__file__).resolve().parent
ENV_COLUMNS = ("date", "gpu", "cc", "sms", "l2_mb", "driver", "sm_mhz", "mem_mhz", "max_sm_mhz", "clock_source",
               "torch", "triton", "cuda", "python", "commit")
CLOCK_COLUMNS = ("sm_mhz", "mem_mhz", "clock_source")  # read again after each case's timings
REF_CHUNK_ELEMS = 2**22  # a chunked reference (Case.chunk) works on about this many input elements

# --------------------------------------------------------------------------------------------
# What a family declares
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What a user would run instead: ``fn(s)`` on one input set ``s`` (None: does not apply,
    ``na`` says why). ``check(got, ref)``, for a baseline computing the op's function, compares
    it with the torch op's output (the self-check; on the GPU a difference is noted);
    ``gpu_only``: on a CPU an error is N/A. ``variants``: ((name, fn), ...) a user could pick
    from (SDPA's backends): each is timed and the fastest is the baseline (``fn``, the default
    choice, is what the CPU self-check runs). ``compile``: the baseline is ``torch.compile(fn)``
    (GPU only; see :func:`compiled`)."""

    name: str
    fn: Callable[[dict], object] | None
    bytes: int = 0
    flops: int = 0
    note: str = ""
    na: str = ""
    check: Callable | None = None
    gpu_only: bool = False
    variants: tuple = ()
    compile: bool = False


def compiled(bl: Baseline, name: str | None = None) -> Baseline:
    """The torch.compile'd twin of an eager baseline (``<name> compiled``), as a user compiling
    the published code would run it: default mode, static shapes."""
    from dataclasses import replace

    return replace(bl, name=name or f"{bl.name} compiled", compile=True, gpu_only=True,
                   note=f"{bl.name} compiled: torch.compile(default mode, dynamic=False) of the eager baseline")


def pick_fastest(times_us: dict[str, float], failures: dict[str, str]) -> tuple[str | None, str]:
    """(the variant with the smallest time, or None when every one failed; a note listing each
    variant's time or why it failed). Ties go to the first listed."""
    ok = {k: v for k, v in times_us.items() if not math.isnan(v)}
    best = min(ok, key=lambda k: ok[k]) if ok else None
    parts = [f"{k} {common.fmt_num(v)} us" + (" (fastest)" if k == best else "") for k, v in ok.items()]
    parts += [f"{k} N/A ({why})" for k, why in failures.items()]
    return best, ", ".join(parts)


@dataclass(frozen=True)
class Target:
    """A goal, reported (PASS / MISS), never asserted: every given bound must hold: ``bw`` on
    the fraction of the bandwidth of a copy of the same byte count measured in the same run
    (bw_frac_same; the large-copy fraction where that is missing), ``speedup`` on baseline µs /
    kernel µs (device times), ``op_speedup`` on baseline op µs / op µs (host included)."""

    label: str
    bw: float | None = None
    speedup: float | None = None
    op_speedup: float | None = None

    def status(self, correct: bool, speedup: float, op_speedup: float, bw: float) -> str:
        if not correct:
            return "WRONG"
        pairs = [(v, b) for v, b in ((bw, self.bw), (speedup, self.speedup), (op_speedup, self.op_speedup))
                 if b is not None]
        if any(math.isnan(v) for v, _ in pairs):  # a baseline or a timing is missing
            return "-"
        return "PASS" if all(v >= b for v, b in pairs) else "MISS"


@dataclass(eq=False)
class Case:
    """One benchmarked op on one shape.

    inputs(r) -> dict: one input set from :class:`Rand` ``r`` (fresh random data, never zeros);
        sets are rotated so that the sets together exceed L2. ``setup(r)``: constants shared by
        every set (r.c in ``inputs``; merged into each set).
    kernel(s, k): the backend primitives alone, ``k.<kernel>(name=value, ...)`` by the torch
        kernel's argument names; ``kernels`` lists the ones it calls (default: the op).
    call(s): the public op (no validation pass), as a user calls it.
    check(got, ref, s=, level=) -> (ok, note): how kernel and op outputs compare with the torch
        backend's (``close()``, ``exact()`` or a custom rule); ``chunk``: compute the reference on
        slices of s[chunk] along dim 0 (row-wise ops whose reference needs a lot of memory).
    bytes, flops: the minimal traffic and the arithmetic of one call (GB/s, TOPS, rotation).
    targets: baseline name (or "*": every baseline) -> :class:`Target`.
    """

    op: str
    model: str
    batch: int
    shape: str
    dtype: str
    out_dtype: str
    inputs: Callable[["Rand"], dict]
    kernel: Callable[[dict, "Kernels"], object]
    call: Callable[[dict], object]
    bytes: int
    flops: int = 0
    setup: Callable[["Rand"], dict] | None = None
    baselines: Sequence[Baseline] = ()
    check: Callable = None  # default: close()
    kernels: tuple[str, ...] = ()
    chunk: str = ""
    targets: dict = field(default_factory=dict)

    def __post_init__(self):
        self.kernels = self.kernels or (self.op.split(".")[0],)
        self.check = self.check or close()

    @property
    def key(self) -> tuple:
        return (self.op, self.model, self.batch, self.shape, self.dtype)

    @property
    def name(self) -> str:
        return "-".join(str(p) for p in self.key).replace(" ", "-")

    def target(self, baseline: str) -> Target | None:
        return self.targets.get(baseline, self.targets.get("*"))

    def backends(self, include_reference: bool = False) -> list[str]:
        """The backends registered for every kernel the case calls, in effkern's order."""
        return [b for b in _dispatch.BACKENDS if (include_reference or b != "torch")
                and all(b in kernel_dispatcher(k).impls for k in self.kernels)]


def distinct(cases: Sequence[Case]) -> list[Case]:
    """The cases with the first of each key kept, in order (a family's self-check clips shapes,
    which can make two cases the same)."""
    seen = {}
    for c in cases:
        seen.setdefault(c.key, c)
    return list(seen.values())


class Rand:
    """Random inputs for one case on one device, seeded by the case's name."""

    def __init__(self, case: Case, device, seed: int = 0):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed * 1000003 + zlib.crc32(case.name.encode()))
        self.c: dict = {}

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, device=self.device, generator=self.gen).to(dtype)

    def rand(self, *shape):
        return torch.rand(*shape, device=self.device, generator=self.gen)

    def randint(self, shape, dtype, lo: int | None = None, hi: int | None = None):
        """Uniform over [lo, hi] (default: the dtype's whole range)."""
        info = torch.iinfo(dtype)
        lo, hi = info.min if lo is None else lo, info.max if hi is None else hi
        return torch.randint(lo, hi + 1, tuple(shape), dtype=dtype, device=self.device, generator=self.gen)

    def perm(self, b: int, n: int):
        """[b, n] int64: a random permutation of range(n) per row."""
        return self.rand(b, n).argsort(dim=1)


def no_validate(op: Callable) -> Callable:
    """The public op with ``validate=False`` where it has that option (the timed call)."""
    try:
        has = "validate" in inspect.signature(op).parameters
    except (TypeError, ValueError):
        has = False
    return (lambda *a, **kw: op(*a, validate=False, **kw)) if has else op


# --------------------------------------------------------------------------------------------
# Output comparison
# --------------------------------------------------------------------------------------------

# rtol, atol with the torch backend by output dtype (exact ops: torch.equal)
TOLERANCE = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-5), torch.float32: (1e-4, 1e-6),
             torch.float64: (1e-9, 1e-12)}


def leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in leaves(o)]


def mismatch(name: str, got: torch.Tensor, ref: torch.Tensor, exact: bool = False, rtol: float | None = None,
             atol_of_max: float = 0.0) -> str:
    """'' when ``got`` matches ``ref`` (bit for bit, or within the dtype's tolerance plus
    ``atol_of_max`` x max |ref|), else what differs."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    if exact or not ref.is_floating_point():
        bad = got != ref
    else:
        rt, at = TOLERANCE[ref.dtype]
        rt = rt if rtol is None else rtol
        if atol_of_max and ref.numel():
            at += atol_of_max * float(ref.float().abs().max())
        bad = ~torch.isclose(got.float(), ref.float(), rtol=rt, atol=at, equal_nan=True)
    if not bool(bad.any()):
        return ""
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{name}: {int(bad.sum())} of {got.numel()} elements differ{'' if exact else ' beyond tolerance'}; "
            f"first at {first}: {got[first].item()} vs {ref[first].item()}")


def close(exact: bool = False, **kw) -> Callable:
    """A check: every output tensor equal (``exact``) or within tolerance (see :func:`mismatch`)."""
    def check(got, ref, **_) -> tuple[bool, str]:
        g, r = leaves(got), leaves(ref)
        if len(g) != len(r):
            return False, f"{len(g)} outputs, expected {len(r)}"
        notes = [m for i, (a, b) in enumerate(zip(g, r)) if (m := mismatch(f"output {i}", a, b, exact, **kw))]
        return not notes, "; ".join(notes)
    return check


def exact() -> Callable:
    return close(exact=True)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def kernel_dispatcher(name: str) -> _dispatch.OpDispatcher:
    """The kernels of op ``name``: from the registry's declaration, else (families not yet on
    the registry) the dispatcher table."""
    from effkern import _registry

    decl = _registry.OPS.get(name)
    if decl is not None and decl.kernels is not None:
        return decl.kernels
    return _dispatch.OPS[name]


class Unavailable(Exception):
    """A backend declined a kernel call (status N/A), or its availability check broke (ERROR)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _import_reason(fn) -> str | None:
    """Why a lazily loaded backend function cannot be loaded (None: it can)."""
    try:
        if isinstance(fn, _dispatch.TritonKernel):
            getattr(importlib.import_module(f"effkern.triton.{fn.module}"), fn.name)
        elif isinstance(fn, _dispatch.CudaKernel):
            getattr(torch.ops.effkern, fn.cuda_op)
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"{getattr(fn, 'target', fn)} is not available: {common.short_exc(e)}"
    return None


class Kernels:
    """One backend's kernels for a case: ``k.<name>(**kwargs)`` binds the keywords by the torch
    kernel's signature and calls that backend's kernel, chosen (once, on the first call's
    arguments) by the op's dispatcher; a backend that declines raises :class:`Unavailable`."""

    def __init__(self, backend: str, names: Sequence[str]):
        self._backend, self._calls = backend, {n: None for n in names}

    @property
    def backend(self) -> str:
        """The backend these kernels run on (for a case that forces it on a whole module)."""
        return self._backend

    def __getattr__(self, name: str):
        calls = self.__dict__["_calls"]
        if name not in calls:
            raise AttributeError(f"kernel {name!r} is not among the case's kernels {sorted(calls)}")
        if calls[name] is None:
            calls[name] = self._bind(name)
        return calls[name]

    def _bind(self, name: str) -> Callable:
        disp, backend = kernel_dispatcher(name), self._backend
        params = [(p.name, p.default) for p in disp.signature.parameters.values()]
        empty, impl = inspect.Parameter.empty, None

        def call(**kw):
            nonlocal impl
            args = [kw.pop(p, d) for p, d in params]
            if kw or any(a is empty for a in args):
                raise TypeError(f"kernel {name}{disp.signature}: got {sorted(kw)} extra, "
                                f"{[p for (p, _), a in zip(params, args) if a is empty]} missing")
            if impl is None:
                try:
                    with effkern.backend(backend):
                        chosen = disp.select(*args)
                except effkern.BackendNotSupported as e:
                    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
                    raise Unavailable("N/A", f"{name}: " + (" ".join(lines) or str(e))) from None
                except Exception as e:  # a broken availability check is a failure, not "unavailable"
                    raise Unavailable("ERROR", f"{name} availability check raised {common.short_exc(e)}") from e
                why = _import_reason(chosen.fn)
                if why is not None:
                    raise Unavailable("N/A", why)
                impl = chosen
            return impl.fn(*args)

        return call


# --------------------------------------------------------------------------------------------
# Inputs, reference, verification
# --------------------------------------------------------------------------------------------


def input_sets(case: Case, device, rotate: bool = True) -> list[dict]:
    """Fresh random input sets; when ``rotate``, enough that their traffic exceeds L2."""
    r = Rand(case, device)
    r.c = case.setup(r) if case.setup else {}
    n = common.rotation_sets(case.bytes) if rotate else 1
    return [{**r.c, **case.inputs(r)} for _ in range(n)]


def _chunked(case: Case, s: dict, fn: Callable[[dict], object]):
    """fn(s), or for a chunked case fn on slices of s[chunk] along dim 0, flattened and joined."""
    x = s.get(case.chunk) if case.chunk else None
    if x is None or x.numel() <= REF_CHUNK_ELEMS:
        return fn(s)
    step = max(1, REF_CHUNK_ELEMS // max(1, x[0].numel()))
    return torch.cat([fn({**s, case.chunk: x[a:a + step]}).reshape(-1) for a in range(0, x.shape[0], step)])


def reference(case: Case, s: dict) -> tuple[object, object]:
    """(kernel-level, op-level) outputs of the torch backend on set ``s``."""
    k = Kernels("torch", case.kernels)
    ref_kernel = _chunked(case, s, lambda t: case.kernel(t, k))
    with effkern.backend("torch"):
        ref_op = _chunked(case, s, case.call)
    return ref_kernel, ref_op


def verify(case: Case, s: dict, backend: str, refs: tuple) -> tuple[Kernels, bool, str]:
    """(the backend's kernels, ok, note): the backend once at kernel level and once through the
    public op, each compared with the torch backend. Raises Unavailable or the backend's error."""
    k = Kernels(backend, case.kernels)
    got_kernel = case.kernel(s, k)
    with effkern.backend(backend):
        got_op = case.call(s)
    ok, notes = True, []
    for level, got, ref in (("kernel", got_kernel, refs[0]), ("op", got_op, refs[1])):
        if case.chunk and isinstance(got, torch.Tensor) and got.numel() == ref.numel():
            ref = ref.reshape(got.shape)
        good, note = case.check(got, ref, s=s, level=level)
        ok &= good
        if note:
            notes.append(f"{level}: {note}")
    return k, ok, "; ".join(notes)


# --------------------------------------------------------------------------------------------
# Families and their case lists
# --------------------------------------------------------------------------------------------


def families() -> list[str]:
    """The families: each bench/<name>.py that declares cases."""
    return sorted(p.stem for p in BENCH_DIR.glob("*.py")
                  if not p.stem.startswith(("_", "test_")) and "\ndef cases(" in p.read_text())


def load(family: str | ModuleType) -> ModuleType:
    return family if isinstance(family, ModuleType) else importlib.import_module(f"bench.{family}")


def family_name(fam: ModuleType) -> str:
    return fam.__name__.rpartition(".")[2]


def op_names(fam: ModuleType) -> list[str]:
    """The ops --ops may name: every op of the family's cases, in report order."""
    return list(dict.fromkeys(c.op for c in fam.cases()))


def unbenched_ops(fam: ModuleType) -> list[str]:
    """The public ops the registry declares in this family that no case calls."""
    from effkern import _registry

    benched = {k for c in fam.cases() for k in c.kernels}
    return [n for n, d in _registry.OPS.items() if d.family == family_name(fam) and d.public and n not in benched]


def select_cases(fam: ModuleType, quick: bool, ops: Sequence[str] | None, check: bool = False) -> list[Case]:
    """The cases to run (report order), the --ops subset; the self-check's are deduplicated."""
    out, seen = [], set()
    for c in fam.cases(check=check, quick=quick):
        if (not ops or c.op in ops) and (not check or (c.op, c.shape, c.dtype) not in seen):
            seen.add((c.op, c.shape, c.dtype))
            out.append(c)
    return out


def run_order(fam: ModuleType, cases: list[Case]) -> list[Case]:
    """The --quick cases (the target shapes) first, so that a time budget cuts the rest."""
    first = {c.key for c in fam.cases(quick=True)}
    return [c for c in cases if c.key in first] + [c for c in cases if c.key not in first]


# --------------------------------------------------------------------------------------------
# GPU benchmark
# --------------------------------------------------------------------------------------------


def base_row(fam: ModuleType, env: dict, mode: str, case: Case) -> dict:
    row = {k: env.get(k, "") for k in ENV_COLUMNS}
    row.update(family=family_name(fam), mode=mode, op=case.op, model=case.model, batch=case.batch,
               shape=case.shape, in_dtype=case.dtype, out_dtype=case.out_dtype, bytes=case.bytes,
               flops=case.flops or "")
    return row


def _rotating(fn: Callable[[dict], object], sets: list[dict]) -> Callable[[], object]:
    rot = common.Rotator(sets)
    return lambda: fn(rot.next())


@dataclass
class Measured:
    """One implementation's timings in µs: device time (``us``, graph replay; ``how`` says
    "graph" or "loop (...)") and host-inclusive time (``op_us``); ``na``: why it was not timed."""

    us: float = math.nan
    p20: float = math.nan
    p80: float = math.nan
    op_us: float = math.nan
    how: str = ""
    variant: str = ""
    note: str = ""
    na: str = ""


def baseline_callables(bl: Baseline, compile_ok: bool = True) -> list[tuple[str, Callable]] | str:
    """[(variant name, fn of a set)] to time for ``bl`` (its variants, else its fn; wrapped in
    torch.compile when ``bl.compile``), or why it is not timed."""
    if bl.fn is None:
        return bl.na or "not applicable"
    if bl.compile and not compile_ok:
        return "torch.compile'd baselines skipped (--no-compile)"
    fns = list(bl.variants) or [("", bl.fn)]
    return [(v, common.compile_baseline(f) if bl.compile else f) for v, f in fns]


def time_baseline(bl: Baseline, sets: list[dict], timing: tuple, ref_op=None, compile_ok: bool = True) -> Measured:
    """A baseline's device time (the fastest variant's) and host-inclusive time, on the rotated
    sets; never raises: a failure (a torch.compile error included) is N/A with the reason."""
    try:
        fns = baseline_callables(bl, compile_ok)
    except Exception as e:  # torch.compile itself unavailable
        return Measured(na=f"torch.compile unavailable: {common.short_exc(e)}")
    if isinstance(fns, str):
        return Measured(na=fns)
    times, fails, found = {}, {}, {}
    for v, f in fns:
        try:
            t, how = common.device_us(_rotating(f, sets), len(sets), *timing)
            times[v], found[v] = t.median_us, (t, how, f)
        except Exception as e:
            fails[v or bl.name] = common.short_exc(e)
            _recover()
    best, listing = pick_fastest(times, fails)
    what = "torch.compile'd baseline" if bl.compile else "baseline"
    if best is None:
        return Measured(na=f"{what} failed: {listing if bl.variants else next(iter(fails.values()))}")
    t, how, f = found[best]
    m = Measured(t.median_us, t.p20_us, t.p80_us, how=how, variant=best,
                 note=f"{bl.name}: {listing}" if bl.variants else "")
    try:
        m.op_us = common.loop_us(_rotating(f, sets), *timing).median_us
        if ref_op is not None and bl.check is not None:
            ok, why = bl.check(f(sets[0]), ref_op)
            if not ok:
                m.note = "; ".join(x for x in (m.note, f"{bl.name} differs from the op: {why[:120]}") if x)
    except Exception as e:
        m.note = "; ".join(x for x in (m.note, f"{bl.name} op-level timing or check raised {common.short_exc(e)}") if x)
        _recover()
    return m


def _reset_dynamo() -> None:
    """One compiled shape at a time, as in a model: no guards or recompile counts left by the
    previous case (the on-disk compile caches stay)."""
    importlib.import_module("torch._dynamo").reset()


def _recover() -> None:
    """After a failed call: wait for the GPU (a sticky CUDA error raises here and ends the case)."""
    torch.cuda.synchronize()


def bench_case(case: Case, base: dict, ceilings: dict, timing: tuple[float, float],
               copy_meter: Callable[[int], common.Timing] | None = None, compile_ok: bool = True) -> list[dict]:
    """The rows of one case: its inputs built on the GPU, the torch backend's reference, each
    baseline timed, each non-reference backend verified against the reference, then timed
    (kernels: device time; public op: host-inclusive), a copy of the case's byte count timed;
    one row per backend and baseline."""
    nan = math.nan
    sets = input_sets(case, "cuda")
    base = dict(base, rot_sets=len(sets))
    if any(bl.compile for bl in case.baselines):
        _reset_dynamo()
    refs, ref_note = None, ""
    try:
        refs = reference(case, sets[0])
    except Exception as e:
        traceback.print_exc()
        ref_note = f"torch reference raised {common.short_exc(e)}"
    b_time = {bl.name: time_baseline(bl, sets, timing, refs[1] if refs else None, compile_ok)
              for bl in case.baselines}
    checked = {}  # backend -> (kernels | None, correct, status, note)
    for backend in case.backends():
        if refs is None:
            checked[backend] = (None, False, "ERROR", ref_note)
            continue
        try:
            k, ok, note = verify(case, sets[0], backend, refs)
            checked[backend] = (k, ok, "", note)
        except Unavailable as e:
            checked[backend] = (None, False, e.status, e.reason)
        except Exception as e:
            traceback.print_exc()
            checked[backend] = (None, False, "ERROR", f"{backend} raised {common.short_exc(e)}")
    del refs
    copy_us, copy_note = nan, ""
    try:
        copy_us = copy_meter(case.bytes).median_us if copy_meter is not None else nan
    except Exception as e:
        traceback.print_exc()
        copy_note = f"same-size copy raised {common.short_exc(e)}"
        _recover()
    rows = []
    for backend, (k, correct, status, note) in checked.items():
        kt, op = Measured(), Measured()
        if k is not None:
            try:
                t, how = common.device_us(_rotating(lambda s: case.kernel(s, k), sets), len(sets), *timing)
                kt = Measured(t.median_us, t.p20_us, t.p80_us, how=how)
                with effkern.backend(backend):  # entered once: its cost is no part of a user's call
                    t = common.loop_us(_rotating(case.call, sets), *timing)
                op = Measured(op_us=t.median_us, p20=t.p20_us, p80=t.p80_us)
            except Exception as e:
                traceback.print_exc()
                _recover()
                status = status if not math.isnan(kt.us) else "ERROR"  # the kernel untimed: an error; the op: a note
                note = "; ".join(x for x in (note, f"timing raised {common.short_exc(e)}") if x)
        gbps = case.bytes / (kt.us * 1e-6) / 1e9
        tops = case.flops / (kt.us * 1e-6) / 1e12 if case.flops else nan
        copy_gbps = case.bytes / (copy_us * 1e-6) / 1e9
        bw, bw_same = gbps / ceilings["copy_gbps"], gbps / copy_gbps
        for bl in case.baselines if k is not None else case.baselines[:1]:
            b = b_time[bl.name]
            speedup, op_speedup = b.us / kt.us, b.op_us / op.op_us
            target = case.target(bl.name)
            row_status = status or (target.status(correct, speedup, op_speedup, bw if math.isnan(bw_same) else bw_same)
                                    if target else "-" if correct else "WRONG")
            if row_status == "-" and b.na and target and (target.speedup or target.op_speedup):
                row_status = "N/A"  # the target's baseline could not run: say so, not "-"
            rows.append(dict(
                base, backend=backend, correct=correct if k is not None else "",
                kernel_us=kt.us, kernel_p20_us=kt.p20, kernel_p80_us=kt.p80, kernel_timing=kt.how,
                op_us=op.op_us, op_p20_us=op.p20, op_p80_us=op.p80,
                baseline=bl.name, baseline_variant=b.variant, baseline_us=b.us, baseline_timing=b.how,
                baseline_op_us=b.op_us, speedup=speedup, op_speedup=op_speedup,
                gbps=gbps, bw_frac=bw, copy_same_us=copy_us, copy_same_gbps=copy_gbps, bw_frac_same=bw_same,
                tops=tops, tops_frac=tops / ceilings["matmul_tflops"],
                baseline_gbps=bl.bytes / (b.us * 1e-6) / 1e9,
                baseline_tops=bl.flops / (b.us * 1e-6) / 1e12 if bl.flops else nan,
                target=target.label if target else "", status=row_status,
                note="; ".join(x for x in (note, f"N/A: {b.na}" if b.na else "", b.note, bl.note, copy_note) if x)))
    return rows


def run_plan(fams: Sequence[ModuleType], quick: bool, ops: Sequence[str] | None) -> list[tuple[ModuleType, Case]]:
    """(family, case) in run order: every family's --quick cases (the target shapes) first, in
    family order, then the rest, so that a time budget cuts the least informative."""
    per = [(fam, run_order(fam, select_cases(fam, quick, ops))) for fam in fams]
    first = [{c.key for c in fam.cases(quick=True)} for fam in fams]
    return ([(fam, c) for (fam, cs), q in zip(per, first) for c in cs if c.key in q]
            + [(fam, c) for (fam, cs), q in zip(per, first) for c in cs if c.key not in q])


def run_gpu(fams: ModuleType | Sequence[ModuleType], args) -> int:
    """Time the cases of one or more families; each case's rows are appended to its CSV as soon as
    they are measured (a timeout loses nothing already measured), the reports regenerated last."""
    fams = [fams] if isinstance(fams, ModuleType) else list(fams)
    speed = getattr(args, "timing", None) or ("quick" if args.quick else "full")
    timing = common.QUICK_TIMING if speed == "quick" else common.FULL_TIMING
    mode = ("quick" if args.quick else "full") + ("" if speed == ("quick" if args.quick else "full") else f", {speed} timing")
    deadline = time.monotonic() + args.time_budget if args.time_budget else math.inf
    compile_ok = not getattr(args, "no_compile", False)
    env = common.environment()
    title = " + ".join(f.TITLE for f in fams)
    print(f"effkern {title} ({mode}) on {env['gpu']} (cc {env['cc']}, {env.get('sms')} SMs, "
          f"L2 {env.get('l2_mb')} MB, driver {env.get('driver') or '?'}, clocks SM {env.get('sm_mhz') or '?'} / "
          f"mem {env.get('mem_mhz') or '?'} MHz via {env.get('clock_source')}); torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, {env['date']}", flush=True)
    ceilings = common.measure_ceilings(*timing)
    copy_meter = common.CopyMeter(*timing)
    print(f"measured ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write), "
          f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s", flush=True)
    plan = run_plan(fams, args.quick, args.ops)
    rows: list[dict] = []
    written: dict[Path, set] = {}  # csv -> families appended to it in this run
    interrupted = None
    try:
        for i, (fam, case) in enumerate(plan):
            if time.monotonic() > deadline:
                print(f"time budget of {args.time_budget:.0f} s spent: skipping {len(plan) - i} cases", flush=True)
                mode = f"{mode}, stopped by time budget after {i} of {len(plan)} cases"
                break
            t0 = time.monotonic()
            base = dict(base_row(fam, env, mode, case), copy_gbps=ceilings["copy_gbps"],
                        matmul_tflops=ceilings["matmul_tflops"])
            try:
                new = bench_case(case, base, ceilings, timing, copy_meter, compile_ok)
            except Exception as e:  # building inputs, or a CUDA error that poisoned the context
                traceback.print_exc()
                new = [dict(base, backend=b, status="ERROR", note=f"benchmark raised {common.short_exc(e)}")
                       for b in case.backends()]
            try:  # the case's tensors went with bench_case's frame
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # a sticky CUDA error: later cases will report it too
                traceback.print_exc()
            state = common.gpu_state(torch.cuda.current_device()) if common.cuda_available() else {}
            for r in new:  # the clocks the case ran at
                r.update({k: state[k] for k in CLOCK_COLUMNS if k in state})
            rows += new
            if not args.no_save:
                path = csv_path(args, fam)
                report.append_rows(path, new)
                written.setdefault(path, set()).add(family_name(fam))
                if args.out is not None:
                    copy_out(path, args.out)
            print(f"[{i + 1}/{len(plan)}] {family_name(fam)} {case.name}: {time.monotonic() - t0:.1f} s", flush=True)
            print(report.table(new, compact=True).split("\n", 2)[-1], flush=True)
    except (KeyboardInterrupt, SystemExit) as e:
        interrupted = e
        mode = f"{mode}, interrupted"
    finally:
        for r in rows:  # how the run ended, on every row
            r["mode"] = mode
        if rows:
            print()
            print(report.table(rows))
            print()
            print(common.text_table(report.speedup_summary(rows), report.SUMMARY_HEADER))
        for path, names in written.items():
            report.update_rows(path, {"date": env["date"]}, mode=mode)
            save(path, args.out, regenerate=not getattr(args, "no_report", False) and len(names) == 1)
    if interrupted is not None:
        raise interrupted
    bad = [r for r in rows if r.get("correct") is False or r.get("status") in ("ERROR", "WRONG")]
    n_pass = sum(r.get("status") == "PASS" for r in rows)
    n_miss = sum(r.get("status") == "MISS" for r in rows)
    print(f"\ntargets: {n_pass} PASS, {n_miss} MISS; {len(bad)} rows wrong or failed")
    return 1 if bad else 0


def csv_path(args, fam: ModuleType) -> Path:
    """The CSV a family's rows go to: --csv (every family into one), else bench/results/<family>.csv."""
    return Path(args.csv) if args.csv else common.RESULTS_DIR / f"{family_name(fam)}.csv"


def copy_out(path: Path, out_dir: Path | None) -> None:
    if out_dir is None or path is None or not path.exists():
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if path.resolve().parent != out_dir.resolve():
        shutil.copy2(path, out_dir / path.name)


def save(csv_path: Path, out_dir: Path | None, regenerate: bool = True) -> None:
    """The rows are in ``csv_path`` already: regenerate its markdown and plot (one family's CSV,
    unless --no-report) and copy all to out_dir."""
    csv_path = Path(csv_path)
    md = png = None
    if regenerate:
        md, png = report.regenerate(csv_path)
    print(f"results: rows in {csv_path}" + (f"; regenerated {md}" if md else "; no report regenerated (--no-report "
          "or several families in one CSV: bench/report.py --append-from splits it)") + (f" and {png}" if png else ""))
    if out_dir is not None:
        for p in (csv_path, md, png):
            copy_out(p, out_dir)
        print(f"results: copied to {out_dir}")


# --------------------------------------------------------------------------------------------
# CPU self-check
# --------------------------------------------------------------------------------------------


def self_check(fams: ModuleType | Sequence[ModuleType], args) -> int:
    """Without CUDA nothing is timed: on small versions of the cases every backend usable on the
    CPU is checked against the torch backend, each baseline runs once (checked where it computes
    the op's function; torch.compile'd ones are GPU-only) and the report pipeline is exercised.
    Non-zero exit on any failure."""
    fams = [fams] if isinstance(fams, ModuleType) else list(fams)
    return max(_self_check_one(fam, args) for fam in fams)


def _self_check_one(fam: ModuleType, args) -> int:
    cases = select_cases(fam, args.quick, args.ops, check=True)
    interp = _dispatch.triton_interpreter_enabled()
    print(f"No CUDA device: nothing is timed (timings need a GPU). Running the correctness self-check on "
          f"small versions of the benchmark shapes: {len(cases)} cases, triton "
          f"{'under TRITON_INTERPRET=1' if interp else 'skipped (set TRITON_INTERPRET=1 to include it)'}.",
          flush=True)
    out, failures = [], 0
    for case in cases:
        t0 = time.monotonic()
        where = [case.op, case.shape, case.dtype]
        try:
            s = input_sets(case, "cpu", rotate=False)[0]
            refs = reference(case, s)
        except Exception as e:
            traceback.print_exc()
            failures += 1
            out.append(where + ["-", "ERROR", f"inputs or torch reference: {common.short_exc(e)}"[:160]])
            continue
        for backend in case.backends(include_reference=True):
            try:
                _, ok, note = verify(case, s, backend, refs)
                status = "ok" if ok else "MISMATCH"
            except Unavailable as e:
                status, note = e.status, e.reason
            except Exception as e:
                traceback.print_exc()
                status, note = "ERROR", common.short_exc(e)
            failures += status in ("ERROR", "MISMATCH")
            out.append(where + [backend, status, note[:160]])
        for bl in case.baselines:
            status, note = _check_baseline(bl, s, refs[1])
            failures += status in ("ERROR", "MISMATCH")
            out.append(where + [f"baseline {bl.name}", status, note[:160]])
        print(f"  {' '.join(where)}: {time.monotonic() - t0:.1f} s", flush=True)
    print()
    print(common.text_table(out, ["op", "shape", "dtype", "backend", "result", "note"]))
    rep_ok, rep_msg = check_report_pipeline(fam)
    failures += not rep_ok
    print(f"\nreport pipeline (synthetic rows in a temporary directory, deleted): {rep_msg}")
    missing = unbenched_ops(fam)
    if missing:
        print(f"\nregistry ops of this family without a benchmark case: {', '.join(missing)}")
    n_ok = sum(r[4] == "ok" for r in out)
    n_na = sum(r[4] == "N/A" for r in out)
    print(f"\nself-check: {n_ok} backend checks passed, {n_na} unavailable, {failures} failed; "
          "timings need a GPU (run on a CUDA machine).")
    return 1 if failures else 0


def _check_baseline(bl: Baseline, s: dict, ref) -> tuple[str, str]:
    if bl.fn is None:
        return "N/A", bl.na
    if bl.compile:
        return "N/A on cpu", "torch.compile'd baselines run on the GPU only (the eager one is checked here)"
    try:
        got = bl.fn(s)
    except Exception as e:
        if bl.gpu_only:
            return "N/A on cpu", common.short_exc(e)
        traceback.print_exc()
        return "ERROR", common.short_exc(e)
    if bl.check is None:
        return "ran", "untimed" + (f"; {bl.note}" if bl.note else "")
    ok, note = bl.check(got, ref)
    return ("agrees", "with the torch op") if ok else ("MISMATCH", note)


def check_report_pipeline(fam: ModuleType) -> tuple[bool, str]:
    """CSV append -> markdown (with the family's text) -> plot on two synthetic runs of a row of
    the family's first case, in a temporary directory only."""
    try:
        case = fam.cases()[0]
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / f"{family_name(fam)}.csv"
            sample = dict(base_row(fam, {"gpu": "synthetic-gpu"}, "selfcheck", case), backend="triton",
                          correct=True, kernel_us=10.0, baseline=case.baselines[0].name, baseline_us=15.0,
                          gbps=100.0, bw_frac=0.05, copy_gbps=2000.0, matmul_tflops=700.0, status="-")
            report.append_rows(csv_path, [dict(sample, date="2000-01-01T00:00:00Z", speedup=1.5)])
            report.append_rows(csv_path, [dict(sample, date="2000-01-02T00:00:00Z", speedup=2.0)])
            rows = report.read_rows(csv_path)
            md, png = report.regenerate(csv_path)
            text = md.read_text()
            assert len(rows) == 2 and "2.00x" in text and "1.50x" not in text, "latest-run selection"
            assert fam.TITLE in text, "the family's report text"
            return True, "ok" + ("" if png else " (no plot: matplotlib missing)")
    except Exception as e:
        traceback.print_exc()
        return False, f"FAILED: {common.short_exc(e)}"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, fam: ModuleType | Sequence[ModuleType] | None = None
                  ) -> argparse.ArgumentParser:
    """The options of every family; with ``fam`` (one or several), its --ops choices and --quick set."""
    fams = [fam] if isinstance(fam, ModuleType) else list(fam or [])
    name = family_name(fams[0]) if len(fams) == 1 else "FAMILY"
    ops = [o for f in fams for o in op_names(f)] if fams else None
    quick = "; ".join(f"{family_name(f)}: {f.QUICK}" if len(fams) > 1 else f.QUICK for f in fams)

    def op_list(text: str) -> list[str]:
        names = [o.strip() for o in text.split(",") if o.strip()]
        unknown = [o for o in names if ops is not None and o not in ops]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown op(s) {unknown or [text]}; choose from {', '.join(ops or [])}")
        return names

    p.add_argument("--quick", action="store_true", help=(quick or "the family's smoke set") +
                   "; short timing. Without a GPU: fewer self-check cases")
    p.add_argument("--ops", type=op_list, default=None, metavar="OP[,OP...]",
                   help="comma-separated subset of the ops" + (f": {', '.join(ops)}" if ops else ""))
    p.add_argument("--csv", type=Path, default=None,
                   help=f"results CSV to append each case's rows to as they are measured (every family into "
                        f"this one file); .md and .png beside it are regenerated at the end "
                        f"(default: bench/results/{name}.csv)")
    p.add_argument("--out", type=Path, default=None,
                   help="also copy the CSV (after each case), markdown and plot into this directory")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are skipped (the rows so far are saved)")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the CSV")
    p.add_argument("--no-report", action="store_true",
                   help="append rows to the CSV only; no markdown or plot (bench/report.py makes them later)")
    p.add_argument("--timing", choices=("quick", "full"), default=None,
                   help="warm-up and repetition per measurement (default: quick with --quick, else full)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile'd baselines (reported N/A): their compilation takes seconds per case")
    return p


def family_parser(fam: ModuleType | Sequence[ModuleType], prog: str) -> argparse.ArgumentParser:
    doc = fam.__doc__ if isinstance(fam, ModuleType) else (
        "Several benchmark families in one run: every family's --quick cases first, then the rest.")
    return add_arguments(argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter), fam)


def run(fams: ModuleType | Sequence[ModuleType], args: argparse.Namespace) -> int:
    """The GPU benchmark where CUDA is available, else the CPU self-check."""
    for name, default in (("no_report", False), ("no_compile", False), ("timing", None)):  # older callers' namespaces
        if not hasattr(args, name):
            setattr(args, name, default)
    if not common.cuda_available():
        return self_check(fams, args)
    try:  # `timeout` sends SIGTERM: end through run_gpu's finally, which saves the rows so far
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except ValueError:  # not the main thread
        previous = None
    try:
        return run_gpu(fams, args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(family: str | ModuleType, argv: Sequence[str] | None = None) -> int:
    """``python bench/<family>.py [options]``."""
    fam = load(family)
    return run(fam, family_parser(fam, f"python bench/{family_name(fam)}.py").parse_args(argv))


def parse_families(text: str, names: Sequence[str]) -> list[str] | None:
    """FAMILY, FAMILY,FAMILY,... or all -> the family names (None: not a family argument)."""
    if text == "all":
        return list(names)
    parts = [t for t in text.split(",") if t]
    return parts if parts and all(t in names for t in parts) and len(set(parts)) == len(parts) else None


def cli(argv: Sequence[str], prog: str = "python -m effkern bench") -> int:
    """``python -m effkern bench FAMILY[,FAMILY...]|all [options]``: the family list is the bench
    modules present."""
    names = families()
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark a kernel family on a GPU: every available backend against the baselines a "
                    "user would pick instead, verified against the torch backend first; rows appended to "
                    "bench/results/FAMILY.csv as each case is measured (markdown and plot regenerated at the "
                    "end). Several families (a comma list, or all) run in one process: every family's --quick "
                    "cases first. Without a GPU: a correctness self-check, nothing timed.",
        epilog=f"`{prog} FAMILY --help` lists the family's ops and its --quick set. `{prog} models`: the ViT "
               "variants end to end (bench/models.py, its own options).")
    p.add_argument("family", choices=names + ["all"], metavar="FAMILY",
                   help=f"one of {', '.join(names)}, a comma-separated list of them, or all")
    add_arguments(p)
    first = next((a for a in argv if not a.startswith("-") and parse_families(a, names)), None)
    if first is None:
        p.parse_args(argv)  # --help, or a usage error naming the families
        p.error("no FAMILY given")
    chosen = [load(n) for n in parse_families(first, names)]
    fam = chosen[0] if len(chosen) == 1 else chosen
    fp = family_parser(fam, f"{prog} {first}")
    rest = list(argv)
    rest.remove(first)
    return run(fam, fp.parse_args(rest))


# --------------------------------------------------------------------------------------------
# pytest-benchmark (bench/test_bench_<family>.py)
# --------------------------------------------------------------------------------------------


class PytestBench:
    """A family under pytest-benchmark: one benchmark per case and implementation (each baseline,
    each variant of one that has them, ``baseline:<name>@<variant>``; then per non-reference
    backend its kernels, ``<backend>``, and its public op, ``<backend>:op``), grouped by case.
    Pedantic rounds on a clock advanced by CUDA events: kernels and baselines after an L2 flush
    (device time), the public op on an idle GPU without a flush (host overhead included), as the
    command line times them; ``extra_info`` holds the command line's median (graph replay, or the
    host-inclusive loop for ``:op``), GB/s, TOPS and the speedups. Settings from the environment:
    EFFKERN_BENCH_QUICK=1 (the --quick set), EFFKERN_BENCH_OPS=a,b, EFFKERN_BENCH_DEADLINE (Unix
    time: later benchmarks skip), EFFKERN_BENCH_COMPILE=0 (skip the torch.compile'd baselines).
    Without CUDA every benchmark skips."""

    def __init__(self, family: str) -> None:
        self.fam = load(family)
        self.quick = os.environ.get("EFFKERN_BENCH_QUICK", "0") not in ("", "0")
        self.ops = [o for o in os.environ.get("EFFKERN_BENCH_OPS", "").split(",") if o.strip()] or None
        self.deadline = float(os.environ.get("EFFKERN_BENCH_DEADLINE", "inf"))
        self.compile_ok = os.environ.get("EFFKERN_BENCH_COMPILE", "1") not in ("", "0")
        self.timing = common.QUICK_TIMING if self.quick else common.FULL_TIMING
        self.rounds, self.warmup_rounds = (30, 3) if self.quick else (100, 5)
        self.clock = common.GpuClock()
        self._cache: dict = {}
        self._flusher: common.L2Flusher | None = None

    def marks(self) -> list:
        import pytest

        no_gpu = (f"GPU benchmarks need CUDA and triton; on CPU `python -m effkern bench {family_name(self.fam)}` "
                  "runs the correctness self-check")
        return [pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                   reason=no_gpu),
                pytest.mark.benchmark(timer=self.clock, warmup=False, disable_gc=True)]

    def params(self) -> list:
        import pytest

        return [pytest.param(case, impl, id=f"{case.name}-{impl.replace('baseline:', 'base-').replace(' ', '_')}")
                for case in run_order(self.fam, select_cases(self.fam, self.quick, self.ops))
                for impl in [f"baseline:{b.name}" + (f"@{v}" if v else "") for b in case.baselines
                             for v, _ in (b.variants or [("", None)])]
                + [f"{b}{suffix}" for b in case.backends() for suffix in ("", ":op")]]

    def _sets(self, case: Case) -> list[dict]:
        import pytest

        if time.time() > self.deadline:
            pytest.skip("time budget (EFFKERN_BENCH_DEADLINE) spent")
        if self._cache.get("case") is not case:  # params are case-major: one case lives at a time
            self._cache.clear()
            torch.cuda.empty_cache()
            if any(bl.compile for bl in case.baselines):
                _reset_dynamo()
            self._cache.update(case=case, sets=input_sets(case, "cuda"), baseline_us={}, verified={})
        return self._cache["sets"]

    def _verified(self, case: Case, backend: str) -> Kernels:
        import pytest

        cache = self._cache["verified"]
        if backend not in cache:
            s = self._cache["sets"][0]
            try:
                k, ok, note = verify(case, s, backend, reference(case, s))
                cache[backend] = (k, "ok" if ok else "WRONG", note)
            except Unavailable as e:
                cache[backend] = (None, e.status, e.reason)
        k, status, note = cache[backend]
        if status == "N/A":
            pytest.skip(f"{backend} not available: {note}")
        if status == "ERROR":
            pytest.fail(note)
        assert status == "ok", f"{backend} differs from the torch backend: {note}"
        return k

    def run(self, benchmark, case: Case, impl: str) -> None:
        import pytest

        sets = self._sets(case)
        benchmark.group = f"{case.op} {case.model} B{case.batch} {case.shape} {case.dtype}"
        info = {"op": case.op, "model": case.model, "batch": case.batch, "shape": case.shape,
                "dtype": case.dtype, "impl": impl, "rot_sets": len(sets)}
        nbytes, flops, host = case.bytes, case.flops, False
        if impl.startswith("baseline:"):
            name, _, variant = impl.removeprefix("baseline:").partition("@")
            bl = next(b for b in case.baselines if b.name == name)
            fns = baseline_callables(bl, self.compile_ok)
            if isinstance(fns, str):
                pytest.skip(f"{bl.name}: {fns}")
            fn, nbytes, flops = _rotating(dict(fns)[variant], sets), bl.bytes, bl.flops
            if bl.note:
                info["note"] = bl.note
        else:
            backend, _, level = impl.partition(":")
            k = self._verified(case, backend)
            host = level == "op"
            fn = _rotating(case.call, sets) if host else _rotating(lambda s: case.kernel(s, k), sets)
        if self._flusher is None:
            self._flusher = common.L2Flusher()
        flush = None if host else self._flusher

        def one_round():
            if host:
                torch.cuda.synchronize()  # an idle GPU: the host's time shows
            self.clock.advance(common.cuda_event_time_s(fn, flush))

        # the public op on the backend under test, entered once (its cost is no part of a user's call)
        with effkern.backend(impl.partition(":")[0]) if host else contextlib.nullcontext():
            if host:
                t, how = common.loop_us(fn, *self.timing), "host loop"
            else:
                t, how = common.device_us(fn, len(sets), *self.timing)
            benchmark.pedantic(one_round, rounds=self.rounds, warmup_rounds=self.warmup_rounds, iterations=1)
        info.update(median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, timing=how,
                    bytes=nbytes, gbps=nbytes / (t.median_us * 1e-6) / 1e9)
        if flops:
            info.update(flops=flops, tops=flops / (t.median_us * 1e-6) / 1e12)
        if impl.startswith("baseline:"):
            self._cache["baseline_us"][impl.removeprefix("baseline:")] = t.median_us
        elif not host:
            for name, b_us in self._cache["baseline_us"].items():
                info[f"speedup_vs_{name}"] = b_us / t.median_us
        benchmark.extra_info.update(info)


if __name__ == "__main__":  # python -m bench.runner FAMILY[,FAMILY...]|all [options]
    sys.exit(cli(sys.argv[1:], prog="python -m bench.runner"))
