"""Helpers of bench/runner.py: GPU timing, the measured ceilings (and the copy of a case's own
byte count), input rotation, the run's environment record and plain-text tables.

Timing rules (GUIDE.md section 5, device METHOD.md, issue 9): GPU only; never zeros; inputs
rotated among several sets whose total exceeds L2. Two clocks, both reported:

- device time (:func:`graph_us`): the calls captured in a CUDA graph (one per input set, in
  rotation), the graph replayed many times behind a short GPU sleep, CUDA events around the
  replays; per call = elapsed / calls. No host overhead, no L2 flush (the rotation keeps L2
  cold). When a call cannot be captured, back-to-back calls behind the same head start
  (:func:`loop_us` with ``head_start``), marked "loop".
- host-inclusive op time (:func:`loop_us`): back-to-back public calls on an idle GPU, events
  around the whole loop, so that Python, dispatch, launch overhead and host syncs show.

The ceilings: a large device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul,
and per case a copy of the case's own byte count (:class:`CopyMeter`), all in the same run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Input sets of one benchmark are replicated until they total at least this many bytes, so that
# repeated calls cannot be served from L2 (50 MB on H100, 60 MB on H200).
ROTATE_BYTES = 256 * 2**20
MAX_ROTATION_SETS = 4096

# Timing arguments of the graph and loop timers, in milliseconds (warmup, rep).
FULL_TIMING = (25, 100)
QUICK_TIMING = (10, 30)
SAMPLES = 10  # timed samples per measurement (median, 20th and 80th percentiles over them)
MIN_GRAPH_CALLS = 8  # calls captured per graph at least (a multiple of the input sets)
MAX_LOOP_CALLS = 20000  # calls per timed loop sample at most
SLEEP_CYCLES_PER_US = 2000  # torch.cuda._sleep's unit is GPU cycles: about 2 GHz on H100/H200


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """A measurement in microseconds per call: median and the 20th/80th percentiles."""

    median_us: float
    p20_us: float
    p80_us: float


def timing_of(samples_us: Sequence[float]) -> Timing:
    """The median and the 20th/80th percentiles (nearest rank) of per-call samples in µs."""
    if not samples_us:
        raise ValueError("no timing samples")
    s = sorted(float(v) for v in samples_us)
    rank = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    return Timing(statistics.median(s), rank(0.2), rank(0.8))


def warm_up(fn: Callable[[], object], warmup_ms: float) -> float:
    """Calls ``fn`` (first twice on a side stream, as graph capture wants: compilation, kernel
    selection and library handles happen there), then until ``warmup_ms`` of wall time have
    passed; returns the synchronised wall time per call of that loop (seconds), an upper bound
    of both the device and the host time of a call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    n, k, t0 = 0, 1, time.perf_counter()
    while True:  # batches of doubling size, each synchronised: the host never runs far ahead of the GPU
        for _ in range(k):
            fn()
        n += k
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if (n >= 3 and elapsed >= warmup_ms * 1e-3) or n >= MAX_LOOP_CALLS:
            return elapsed / n
        k = min(2 * k, MAX_LOOP_CALLS - n)


def _head_start(us: float) -> None:
    """Keep the GPU busy for about ``us`` µs so that the host can enqueue what follows first."""
    torch.cuda._sleep(int(min(max(us, 20.0), 20000.0) * SLEEP_CYCLES_PER_US))


def loop_us(fn: Callable[[], object], warmup_ms: float, rep_ms: float, head_start: bool = False,
            samples: int = SAMPLES) -> Timing:
    """Per-call time of back-to-back calls of ``fn``, CUDA events around each sample's loop, no
    L2 flush. Without ``head_start`` the GPU is idle when a sample starts, so host overhead
    (Python, dispatch, launches, host syncs) counts whenever it exceeds the GPU time: the op as a
    user's loop sees it. With ``head_start`` a GPU sleep lets the host run ahead (device time,
    as long as the host keeps up)."""
    per_call = warm_up(fn, warmup_ms)
    n = int(max(1, min(MAX_LOOP_CALLS, round(rep_ms * 1e-3 / samples / max(per_call, 1e-7)))))
    out = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if head_start:
            _head_start(2 * n * per_call * 1e6 + 50)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / n)
    return timing_of(out)


def graph_calls(n_sets: int, min_calls: int = MIN_GRAPH_CALLS) -> int:
    """Calls captured in one graph: every input set once, repeated up to ``min_calls``."""
    n_sets = max(1, int(n_sets))
    return n_sets * max(1, math.ceil(min_calls / n_sets))


def graph_us(fn: Callable[[], object], n_sets: int, warmup_ms: float, rep_ms: float,
             samples: int = SAMPLES, warmed: bool = False) -> Timing:
    """Device time per call of ``fn``: :func:`graph_calls` calls (``fn`` rotates the input
    sets) captured in one CUDA graph, replayed back to back behind a GPU sleep, CUDA events
    around each sample. Raises if ``fn`` cannot be captured (a host sync, a CPU tensor, ...)."""
    if not warmed:
        warm_up(fn, warmup_ms)
    calls = graph_calls(n_sets)
    g = torch.cuda.CUDAGraph()
    try:
        # a fresh capture stream each time: a failed capture leaves nothing on a stream used again
        with torch.cuda.graph(g, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()  # the first replay uploads the graph
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        t_replay_ms = max(start.elapsed_time(end), 1e-4)
        reps = int(max(1, min(1000, round(rep_ms / samples / t_replay_ms))))
        t0 = time.perf_counter()  # the host's time to launch one replay, for the head start
        g.replay()
        host_us = (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        out = []
        for _ in range(samples):
            _head_start(2 * reps * host_us + 50)
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / (reps * calls))
        return timing_of(out)
    finally:
        del g


def device_us(fn: Callable[[], object], n_sets: int, warmup_ms: float, rep_ms: float) -> tuple[Timing, str]:
    """(device time per call, how): :func:`graph_us`, else (capture failed) back-to-back calls
    behind a head start; ``how`` is "graph" or "loop (<why the capture failed>)". An error of
    ``fn`` itself (in the warm-up) propagates."""
    warm_up(fn, warmup_ms)
    try:
        return graph_us(fn, n_sets, warmup_ms, rep_ms, warmed=True), "graph"
    except Exception as e:  # capture refused: a host sync, a CPU tensor, an uncapturable library call
        why = short_exc(e)
        torch.cuda.synchronize()  # raises again if the failure was a real (sticky) CUDA error
    return loop_us(fn, warmup_ms, rep_ms, head_start=True), f"loop ({why[:120]})"


class Rotator:
    """Cycles through a list of argument sets; ``next()`` returns the following one."""

    def __init__(self, items: Sequence):
        if not items:
            raise ValueError("Rotator needs at least one item")
        self.items = list(items)
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item

    def __len__(self) -> int:
        return len(self.items)


def rotation_sets(set_bytes: int, min_total: int = ROTATE_BYTES, max_sets: int = MAX_ROTATION_SETS) -> int:
    """How many distinct input sets of ``set_bytes`` bytes to cycle through."""
    if set_bytes <= 0:
        return 1
    return int(min(max_sets, max(1, math.ceil(min_total / set_bytes))))


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class GpuClock:
    """A clock for pytest-benchmark that advances only by measured GPU time.

    pytest-benchmark reads ``timer()`` before and after the target; a target that times its GPU
    work with CUDA events and calls :meth:`advance` makes pytest-benchmark's statistics GPU times
    instead of host times around asynchronous launches.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.seconds += seconds

    def __repr__(self) -> str:  # shown in pytest-benchmark's JSON as the timer
        return "bench.common.GpuClock(cuda events)"


class L2Flusher:
    """Overwrites a 256 MiB buffer so that the next kernel starts with a cold L2."""

    def __init__(self, device="cuda", nbytes: int = 256 * 2**20) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def cuda_event_time_s(fn: Callable[[], object], flush: Callable[[], None] | None = None) -> float:
    """One call of ``fn`` timed with CUDA events (after an optional L2 flush), in seconds."""
    if flush is not None:
        flush()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


# --------------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------------


def measure_ceilings(warmup_ms: float, rep_ms: float, copy_bytes: int = 2 * 2**30,
                     mm_size: int = 8192) -> dict[str, float]:
    """The two ceilings of this GPU, measured now on random data (device time, :func:`device_us`):

    copy_gbps: a device-to-device copy of ``copy_bytes`` (GB/s counting bytes read + written);
    matmul_tflops: an ``mm_size``^3 bf16 matmul (TFLOP/s).
    """
    gen = torch.Generator(device="cuda").manual_seed(1234)

    def time_copy() -> Timing:
        src = torch.randint(-128, 128, (copy_bytes,), dtype=torch.int8, device="cuda", generator=gen)
        dst = torch.empty_like(src)
        return device_us(lambda: dst.copy_(src), 1, warmup_ms, rep_ms)[0]

    def time_mm() -> Timing:
        a = torch.randn(mm_size, mm_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        b = torch.randn(mm_size, mm_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        return device_us(lambda: torch.mm(a, b), 1, warmup_ms, rep_ms)[0]

    t_copy = time_copy()
    torch.cuda.empty_cache()
    t_mm = time_mm()
    torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * copy_bytes / (t_copy.median_us * 1e-6) / 1e9,
        "matmul_tflops": 2 * mm_size**3 / (t_mm.median_us * 1e-6) / 1e12,
    }


def same_bytes_copy_plan(nbytes: int, min_total: int = ROTATE_BYTES) -> tuple[int, int]:
    """(bytes per source buffer, buffer pairs) of the device-to-device copy that moves
    ``nbytes`` (read + written, as a case counts its traffic): half of it read and half written,
    rounded up to 16 bytes (a copy's vector width), rotated among as many pairs as a case of
    that size rotates input sets (:func:`rotation_sets`), so that both meet the same L2."""
    half = max(16, -(-max(0, int(nbytes)) // 2 // 16) * 16)
    return half, rotation_sets(2 * half, min_total)


class CopyMeter:
    """Device time of a copy of a given byte count, measured once per size in this run: a
    3-10 µs kernel is judged against what a copy of its own bytes achieves (launch latency, a
    grid too small to fill the GPU), besides the large-copy ceiling."""

    def __init__(self, warmup_ms: float, rep_ms: float, device="cuda") -> None:
        self.timing, self.cache, self.device = (warmup_ms, rep_ms), {}, device

    def __call__(self, nbytes: int) -> Timing:
        half, pairs = same_bytes_copy_plan(nbytes)
        if half not in self.cache:
            gen = torch.Generator(device=self.device).manual_seed(4321)
            bufs = [(torch.randint(-128, 128, (half,), dtype=torch.int8, device=self.device, generator=gen),
                     torch.empty(half, dtype=torch.int8, device=self.device)) for _ in range(pairs)]
            rot = Rotator(bufs)

            def copy():
                src, dst = rot.next()
                dst.copy_(src)

            self.cache[half] = device_us(copy, pairs, *self.timing)[0]
            del bufs, rot
        return self.cache[half]


# --------------------------------------------------------------------------------------------
# Environment record
# --------------------------------------------------------------------------------------------


SOURCE_GLOBS = ("effkern/**/*.py", "csrc/**/*", "kernels/**/*", "bench/*.py", "scripts/*", "tests/*.py",
                "setup.py", "pyproject.toml", "CMakeLists.txt")


def tree_digest(root: Path = REPO_ROOT) -> str:
    """A digest of the source files (not build outputs) of the tree: names a copied tree that
    has neither git nor EFFKERN_COMMIT, so that its rows can still be matched to a checkout."""
    h = hashlib.sha256()
    files = sorted({p for g in SOURCE_GLOBS for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts
                    and p.suffix not in (".so", ".o", ".pyc")})
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_commit() -> str:
    """The commit of this tree: $EFFKERN_COMMIT first (the GPU machine gets a copy of the tree
    without .git; whoever sends it passes the commit), else git's HEAD (suffixed '+dirty' when
    tracked files changed), else 'nogit-tree-<digest>' (:func:`tree_digest`), never a bare
    'unknown'."""
    env = os.environ.get("EFFKERN_COMMIT", "").strip()
    if env and env != "unknown":
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"nogit-tree-{tree_digest()}"
    except OSError as e:
        return f"unknown ({type(e).__name__}: no EFFKERN_COMMIT, no git, tree unreadable)"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


NVSMI_FIELDS = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem")


def parse_nvidia_smi(text: str) -> dict[str, str]:
    """The first GPU's line of ``nvidia-smi --query-gpu=<NVSMI_FIELDS> --format=csv,noheader,nounits``
    as {driver, sm_mhz, mem_mhz, max_sm_mhz, max_mem_mhz}; '[N/A]' and the like become ''."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != len(NVSMI_FIELDS):
        raise ValueError(f"nvidia-smi answered {line!r}, expected {len(NVSMI_FIELDS)} fields")
    keys = ("driver", "sm_mhz", "mem_mhz", "max_sm_mhz", "max_mem_mhz")
    return {k: ("" if c.startswith("[") or c.upper() in ("N/A", "") else c) for k, c in zip(keys, cells)}


def gpu_state(device: int = 0) -> dict[str, str]:
    """Driver version and the current (and maximum) SM and memory clocks, from NVML
    (nvidia-ml-py), else nvidia-smi: {driver, sm_mhz, mem_mhz, max_sm_mhz, max_mem_mhz,
    clock_source}; where neither answers, the clocks are empty and clock_source says why.
    Read right after a case's timings, the current clocks are the ones it ran at."""
    why = []
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device)
        drv = pynvml.nvmlSystemGetDriverVersion()
        clk = lambda f, t: str(f(h, t))  # noqa: E731
        return {"driver": drv.decode() if isinstance(drv, bytes) else str(drv),
                "sm_mhz": clk(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM),
                "mem_mhz": clk(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM),
                "max_sm_mhz": clk(pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM),
                "max_mem_mhz": clk(pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM),
                "clock_source": "nvml"}
    except Exception as e:  # not installed, no driver library, an unsupported query
        why.append(f"nvml: {short_exc(e)}")
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device}", f"--query-gpu={','.join(NVSMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True)
        return dict(parse_nvidia_smi(out.stdout), clock_source="nvidia-smi")
    except Exception as e:
        why.append(f"nvidia-smi: {short_exc(e)}")
    return {"driver": "", "sm_mhz": "", "mem_mhz": "", "max_sm_mhz": "", "max_mem_mhz": "",
            "clock_source": "unavailable (" + "; ".join(why)[:200] + ")"}


def environment() -> dict[str, str]:
    """What identifies a run: device (name, compute capability, SM count, L2, driver, clocks),
    versions (torch, triton, CUDA, Python), commit, date."""
    env = {
        "date": utc_now(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "commit": git_commit(),
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    if cuda_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["cc"] = f"{p.major}.{p.minor}"
        env["sms"] = str(p.multi_processor_count)
        l2 = getattr(p, "L2_cache_size", 0)
        env["l2_mb"] = f"{l2 / 1e6:.0f}" if l2 else ""
        env.update(gpu_state(torch.cuda.current_device()))
    else:
        env.update(gpu="cpu", cc="", sms="", l2_mb="", driver="", sm_mhz="", mem_mhz="", max_sm_mhz="",
                   max_mem_mhz="", clock_source="no GPU")
    return env


def compile_baseline(fn: Callable) -> Callable:
    """``torch.compile(fn)`` as a user compiling the model at a fixed shape would (default mode,
    static shapes). Each case compiles afresh (the runner resets dynamo between cases); the
    recompile limit fails loudly rather than falling back to eager in silence."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(cfg, name) and getattr(cfg, name) < value:
            setattr(cfg, name, value)
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    cfg.suppress_errors = False
    return torch.compile(fn, dynamic=False)


def fmt_num(v, digits: int = 3) -> str:
    """A compact number: 3 significant digits, no exponent for ordinary magnitudes."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):
        return v
    v = float(v)
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - mag)
    return f"{v:.{decimals}f}"


def text_table(rows: Iterable[Sequence[str]], header: Sequence[str], markdown: bool = False, sep: str = "  ") -> str:
    """A plain aligned table (or a markdown one) without third-party packages."""
    rows = [[str(c) for c in r] for r in rows]
    header = [str(h) for h in header]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: sep.join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def short_exc(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
