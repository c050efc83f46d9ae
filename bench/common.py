"""Helpers of bench/runner.py: GPU timing, the two measured ceilings, input rotation, the run's
environment record and plain-text tables.

Timing rules (GUIDE.md section 5, device METHOD.md): GPU only; the median of
``triton.testing.do_bench`` (CUDA events; it also flushes L2 before every call); inputs rotated
among several sets whose total exceeds L2; never zeros; the two ceilings (a device-to-device
copy, counting bytes read + written, and an 8192^3 bf16 matmul) measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
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

# do_bench arguments, in milliseconds (warmup, rep).
FULL_TIMING = (25, 100)
QUICK_TIMING = (10, 30)


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """A do_bench measurement in microseconds: median and the 20th/80th percentiles."""

    median_us: float
    p20_us: float
    p80_us: float


def do_bench_us(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    """Median GPU time of ``fn`` in µs via ``triton.testing.do_bench`` (CUDA events, L2 flushed
    before every call). ``fn`` must only enqueue GPU work (no host synchronisation)."""
    from triton.testing import do_bench

    q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    if isinstance(q, (int, float)):
        q = [q, q, q]
    return Timing(*(float(v) * 1e3 for v in q))


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
    """The two ceilings of this GPU, measured now on random data:

    copy_gbps: a device-to-device copy of ``copy_bytes`` (GB/s counting bytes read + written);
    matmul_tflops: an ``mm_size``^3 bf16 matmul (TFLOP/s).
    """
    gen = torch.Generator(device="cuda").manual_seed(1234)

    def time_copy() -> Timing:
        src = torch.randint(-128, 128, (copy_bytes,), dtype=torch.int8, device="cuda", generator=gen)
        dst = torch.empty_like(src)
        return do_bench_us(lambda: dst.copy_(src), warmup_ms, rep_ms)

    def time_mm() -> Timing:
        a = torch.randn(mm_size, mm_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        b = torch.randn(mm_size, mm_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        return do_bench_us(lambda: torch.mm(a, b), warmup_ms, rep_ms)

    t_copy = time_copy()
    torch.cuda.empty_cache()
    t_mm = time_mm()
    torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * copy_bytes / (t_copy.median_us * 1e-6) / 1e9,
        "matmul_tflops": 2 * mm_size**3 / (t_mm.median_us * 1e-6) / 1e12,
    }


# --------------------------------------------------------------------------------------------
# Environment record
# --------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The checkout's commit (suffixed '+dirty' when the tree has changes), else $EFFKERN_COMMIT,
    else 'unknown' (the GPU machine gets a copy of the tree, usually without .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("EFFKERN_COMMIT", "").strip() or "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def environment() -> dict[str, str]:
    """What identifies a run: device, versions, commit, date."""
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
    else:
        env["gpu"] = "cpu"
        env["cc"] = ""
    return env


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
