"""The static performance report: what the compiled kernels show before any GPU runs them.

    python -m effkern perf [--family F ...] [--out bench/results/static.md] [--json PATH] [--quick]

It is an ESTIMATE read from the compiled code (GUIDE.md section 6); the GPU benchmark
(``python -m effkern bench``) stays the judge. Nothing here runs a kernel.

Why in bench/ and not in the effkern package: the report is built from bench/runner.py's
benchmark Cases (every row it predicts is a row the GPU benchmark measures) and writes into
bench/results/, like the benchmark; it is a tool of a checkout, not library code a user imports.
``python -m effkern perf`` finds it the way ``python -m effkern bench`` finds the runner.

What it reads
- Triton, at the benchmark shapes, bound as a real launch would be: for every Case of every
  family (bench.runner's full case list) the inputs are built on the CPU, every ``@triton.jit``
  ``*_kernel`` of the effkern.triton modules is replaced by a recorder, and ``case.kernel`` (the
  backend primitives) and ``case.call`` (the public op) run with the Triton backend forced, the
  dispatcher accepting CPU tensors as under TRITON_INTERPRET=1. Each recorded launch is bound
  by Triton's own binder for sm_90 (:func:`bind_launch`: the divisibility-by-16 specialisation
  of pointers and integers is the one a real launch gets), compiled once per specialisation
  (:func:`compile_bound`) and its cubin read with cuobjdump.
  Inputs too large to build on a CI machine are *shape-only*: an aten op whose inputs or output
  exceed ``SHAPE_ONLY_ELEMS`` elements is evaluated on the meta device and its output is an
  uninitialised CPU tensor of the real size, strides and alignment (never touched, so it costs
  no memory). Launches, grids, strides, dtypes and pointer alignment are exact; values in those
  tensors are not computed (a scalar read from one is flagged in the row's note).
- CUDA: every kernel instantiation in effkern/_C*.so, for each architecture in the fatbinary
  (sm_90a and sm_80): cuobjdump -res-usage, -sass and -elf (the block size from
  __launch_bounds__, when given). Which instantiation a benchmark row runs, and its grid, are
  decided at run time on the GPU: the CUDA rows list the instantiations matched by name and say
  n/a for grid, launches and syncs.

What it computes (per compiled kernel): registers, spills (STL/LDL in SASS: local-memory
traffic), shared memory, occupancy on Hopper (65536 registers/SM allocated per warp in units of
256, 228 KB shared/SM with 1 KB reserved per block, 2048 threads, 32 blocks), the grid against
132 SMs (waves), global load/store widths (128 = 16-byte vectors), tensor-core instructions
(HMMA/IMMA/HGMMA/IGMMA), the SASS instruction count. Per benchmark row (Case x backend): the
memory floor (Case.bytes at the copy bandwidth of an H100, 3.0 TB/s, and an H200, 4.3 TB/s),
the compute floor (Case.flops at the tensor-core peak when the row's kernels use tensor cores,
else at the CUDA-core peak), a straight-line issue floor (static SASS x warps launched at the
SM issue rate: loops make the real count higher), launches and host synchronisations per op
call, and a predicted verdict against the Case's targets: PASS (the floors allow the target and
nothing structural is in the way), AT RISK (spills, no tensor cores, no 16-byte I/O, a grid
under one wave, an instruction count above the memory floor, several launches or host syncs stand
in the way; or a speedup target is short even with the baseline at its own floor, which bounds
the baseline rather than predicting it), MISS (the row's own floors miss its bandwidth target).

Launches and syncs per op call (Triton rows) are counted while ``case.call`` runs: tensors that
would live on the GPU are tagged (the inputs, what the Rand builds with ``device=``, tensors a
Triton kernel writes, factories given a ``torch.device``, and every aten result of a tagged
input). A launch is a recorded Triton launch or a non-view aten op with a tagged input (other
than allocation); a sync is a scalar read of a tagged tensor (``.item()``, ``int()``,
``float()``, ``bool()``), ``.tolist()``, ``.numpy()`` or ``.cpu()`` of one, and a host-to-device
copy: ``torch.tensor``/``torch.as_tensor`` given a ``torch.device``, ``.to(device)``/``.cuda()``
of an untagged (host) tensor. A device named by a string ("cpu") is the host.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import functools
import hashlib
import importlib
import json
import math
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_MD = RESULTS / "static.md"

# ------------------------------------------------------------------------------------------
# Hardware model (GUIDE.md section 6; NVIDIA's H100 SXM / H200 data sheets, dense peaks)
# ------------------------------------------------------------------------------------------

SMS = 132
COPY_BW = {"H100": 3.0e12, "H200": 4.3e12}  # bytes/s, read + write, a device-to-device copy
VERDICT_GPU = "H200"  # the project's GPU machine; the memory floor is shorter there, so compute shows more
TC_PEAK = {"int8": 1979e12, "bf16": 989e12, "fp16": 989e12, "fp32": 494e12}  # tensor cores (fp32: tf32)
CUDA_CORE_PEAK = 67e12  # fp32 FMA (2 flops); integer ops counted at the same rate
ISSUE_RATE = 4 * SMS * 1.98e9  # warp instructions/s: 4 schedulers per SM at the boost clock
LAUNCH_GAP_S = 2e-6  # GPU-side gap between dependent launches (host overhead not counted)
SYNC_S = 10e-6  # a host synchronisation drains the queue (op-level targets only)
HOPPER = dict(regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024, threads=2048, blocks=32, max_regs=255)
AMPERE = dict(regs=65536, reg_unit=256, smem=164 * 1024, smem_reserved=1024, threads=2048, blocks=32, max_regs=255)
SHAPE_ONLY_ELEMS = 1 << 24  # aten ops on tensors above this many elements are evaluated for shape only

TC_RE = re.compile(r"^(HMMA|IMMA|HGMMA|IGMMA|QGMMA|BGMMA|DMMA|UTCHMMA|UTCIMMA)")
ESTIMATE = ("**An estimate read from the compiled code, not a measurement**: the GPU benchmark "
            "(`python -m effkern bench`) is the judge.")


# ------------------------------------------------------------------------------------------
# Tools (CUDA 13.x cuobjdump / ptxas from the nvidia-cuda-* wheels, else PATH)
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tool_dir() -> Path | None:
    """The directory holding cuobjdump and ptxas (EFFKERN_CUDA_BIN, the nvidia/cu13 wheels, PATH)."""
    cands = [os.environ.get("EFFKERN_CUDA_BIN", "")]
    try:
        import nvidia  # namespace package of the nvidia-cuda-* wheels

        cands += [str(Path(p) / sub / "bin") for p in nvidia.__path__ for sub in ("cu13", "cuda_nvcc", "cu12")]
    except ImportError:
        pass
    which = shutil.which("cuobjdump")
    cands.append(str(Path(which).parent) if which else "")
    for c in cands:
        if c and (Path(c) / "cuobjdump").exists() and (Path(c) / "ptxas").exists():
            return Path(c)
    return None


def triton_missing() -> str | None:
    """Why Triton cannot compile for sm_90 here (None: it can)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"this triton has no ASTSource/GPUTarget/create_function_from_signature: {e}"
    return None


def tools_missing() -> str | None:
    """Why the report cannot run here (None: it can)."""
    if tool_dir() is None:
        return ("cuobjdump and ptxas not found (pip install nvidia-cuda-nvcc nvidia-cuda-cuobjdump "
                "nvidia-cuda-nvdisasm, or set EFFKERN_CUDA_BIN)")
    return triton_missing()


def _run(*args: str) -> str:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True).stdout


def tool_versions() -> dict:
    d = tool_dir()
    out = {}
    for t in ("cuobjdump", "ptxas"):
        try:
            out[t] = re.findall(r"release [\d.]+, V[\d.]+", _run(d / t, "--version"))[-1]
        except Exception:
            out[t] = "unknown"
    return out


def setup_environment() -> None:
    """Triton compiles with the tool directory's ptxas (sm_90a needs a CUDA 12+ ptxas)."""
    d = tool_dir()
    if d is not None:
        os.environ["TRITON_PTXAS_PATH"] = str(d / "ptxas")
        os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"


# ------------------------------------------------------------------------------------------
# Reading a cubin / fatbinary
# ------------------------------------------------------------------------------------------

_INSN = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_summary(sass: str) -> dict:
    """Counts from one function's SASS: instructions, tensor-core ops, local-memory (spill)
    traffic, global load/store widths in bits (``{"128": 3, "32": 10}``), async copies."""
    ops = collections.Counter(m.group(1) for line in sass.splitlines() if (m := _INSN.match(line)))

    def widths(prefix: str) -> dict:
        w = collections.Counter()
        for op, n in ops.items():
            if op.split(".")[0] == prefix:
                m = re.search(r"\.(128|64|U8|S8|U16|S16)\b", op)
                w[{"U8": "8", "S8": "8", "U16": "16", "S16": "16"}.get(m.group(1), m.group(1)) if m else "32"] += n
        return dict(sorted(w.items(), key=lambda kv: -int(kv[0])))

    return dict(n=sum(ops.values()),
                tc=sum(n for op, n in ops.items() if TC_RE.match(op)),
                tc_ops=sorted({op.split(".")[0] for op in ops if TC_RE.match(op)}),
                stl=sum(n for op, n in ops.items() if op.startswith("STL")),
                ldl=sum(n for op, n in ops.items() if op.startswith("LDL")),
                ldg=widths("LDG"), stg=widths("STG"),
                async_copies=sum(n for op, n in ops.items() if op.startswith(("LDGSTS", "UTMALDG", "UBLKCP"))),
                # 16-byte global -> shared copies (cp.async): wide loads as much as LDG.128 is
                async128=sum(n for op, n in ops.items() if op.startswith("LDGSTS") and ".128" in op))


def res_usage(path: Path) -> dict:
    """{(arch, mangled name): dict(regs, stack, smem, local)} from ``cuobjdump -res-usage``."""
    res, arch, fn = {}, None, None
    for line in _run(tool_dir() / "cuobjdump", "-res-usage", path).splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        if m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        if m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            res[(arch, fn)] = dict(zip(("regs", "stack", "smem", "local"), map(int, m.groups())))
    return res


def sass_by_function(path: Path) -> dict:
    """{(arch, mangled name): SASS text} from ``cuobjdump -sass``."""
    funcs, arch, cur, buf = {}, None, None, []
    for line in _run(tool_dir() / "cuobjdump", "-sass", path).splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            if cur:
                funcs[cur] = "\n".join(buf)
            cur, buf = (arch, m.group(1)), []
        elif cur:
            buf.append(line)
    if cur:
        funcs[cur] = "\n".join(buf)
    return funcs


def elf_block_size(path: Path) -> dict:
    """{(arch, mangled name): threads per block} where __launch_bounds__ (EIATTR_MAX_THREADS)
    or an exact block size (EIATTR_REQNTID) is recorded in the ELF."""
    out, arch, fn, attr = {}, None, None, None
    for line in _run(tool_dir() / "cuobjdump", "-elf", path).splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        if m := re.match(r"^\.nv\.info\.(\S+)", line):
            fn = m.group(1)
        if m := re.search(r"Attribute:\s+EIATTR_(MAX_THREADS|REQNTID)", line):
            attr = m.group(1)
        elif attr and fn and (m := re.search(r"Value:\s+((?:0x[0-9a-f]+\s*)+)", line)):
            out[(arch, fn)] = math.prod(int(v, 16) for v in m.group(1).split())
            attr = None
    return out


def occupancy(regs: int, smem: int, threads: int | None, arch: str = "sm_90a") -> dict:
    """Resident blocks and warps per SM (and what limits them) for a block of ``threads``."""
    if not threads:
        return dict(blocks_sm=None, warps_sm=None, limiter="block size unknown")
    lim = AMPERE if arch.startswith("sm_8") else HOPPER
    warps = math.ceil(threads / 32)
    regs_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by = {"registers": (lim["regs"] // regs_warp) // warps,
          "shared memory": lim["smem"] // (smem + lim["smem_reserved"]) if smem else lim["blocks"],
          "threads": lim["threads"] // (warps * 32), "blocks": lim["blocks"]}
    limiter = min(by, key=by.get)
    return dict(blocks_sm=by[limiter], warps_sm=by[limiter] * warps, limiter=limiter)


def _demangle(names: Iterable[str]) -> dict:
    names = list(names)
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    except FileNotFoundError:
        out = names
    clean = [re.sub(r"\(anonymous namespace\)::|effkern::|\[clone [^\]]*\]", "", o).strip() for o in out]
    return dict(zip(names, clean))


def read_cuda_library(path: Path) -> list[dict]:
    """Every kernel instantiation of the CUDA library, per architecture."""
    res, sass, bs = res_usage(path), sass_by_function(path), elf_block_size(path)
    names = _demangle(fn for _, fn in res)
    out = []
    for (arch, fn), r in sorted(res.items(), key=lambda kv: (kv[0][0], names[kv[0][1]])):
        s = sass_summary(sass.get((arch, fn), ""))
        threads = bs.get((arch, fn))
        src = re.search(r"_\d+_(\w+?)_cu_", fn)
        out.append(dict(backend="cuda", arch=arch, kernel=names[fn], mangled=fn,
                        source=src.group(1) if src else "", threads=threads, **r, **s,
                        **occupancy(r["regs"], r["smem"], threads, arch)))
    return out


# ------------------------------------------------------------------------------------------
# Triton: recording launches, binding them as a real launch would, compiling
# ------------------------------------------------------------------------------------------


def triton_modules() -> list:
    """The effkern.triton modules, imported with the interpreter off so that their kernels are
    JITFunctions (the dispatcher's own check reads TRITON_INTERPRET at call time)."""
    import effkern.triton as pkg

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return [importlib.import_module(f"effkern.triton.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    finally:
        _restore_env("TRITON_INTERPRET", saved)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    module: str
    name: str
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` is recorded, not launched."""

    def __init__(self, module: str, name: str, fn, sink: list, on_launch: Callable | None = None):
        self.module, self.name, self.fn, self.sink, self.on_launch = module, name, fn, sink, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):
                g = grid({**dict(zip(self.fn.arg_names, args)), **kwargs})
            else:
                g = grid
            g = tuple(int(v) for v in (g if isinstance(g, (tuple, list)) else (g,)))
            self.sink.append(Launch(self.module, self.name, self.fn, g, args, dict(kwargs)))
            if self.on_launch is not None:
                self.on_launch(args, kwargs)
        return launch


@contextlib.contextmanager
def recording(modules: Iterable, on_launch: Callable | None = None):
    """Replace every ``*_kernel`` JITFunction of ``modules`` by a :class:`Recorder`; yields the
    list that collects the launches."""
    import triton

    sink: list[Launch] = []
    saved = []
    for mod in modules:
        for name in dir(mod):
            fn = getattr(mod, name)
            if name.endswith("_kernel") and isinstance(fn, triton.runtime.JITFunction):
                saved.append((mod, name, fn))
                setattr(mod, name, Recorder(mod.__name__.rpartition(".")[2], name, fn, sink, on_launch))
    try:
        yield sink
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


@functools.lru_cache(maxsize=None)
def _target_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    return target, make_backend(target)


@functools.lru_cache(maxsize=None)
def _binder(fn):
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(fn.signature, fn.params, _target_backend()[1])


@dataclass(frozen=True)
class Bound:
    """A launch bound by Triton's binder: what a real launch on sm_90 would compile."""

    module: str
    name: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    key: str  # one compiled specialisation
    spec: str  # readable: constexprs, divisibility, warps / stages


def bind_launch(launch: Launch) -> Bound:
    """Bind ``launch`` with Triton's own binder (``create_function_from_signature`` and
    ``JITFunction._pack_args``): the divisibility-by-16 specialisation of pointer and integer
    arguments is the one a real launch on the GPU gets."""
    fn, backend = launch.fn, _target_backend()[1]
    kwargs = dict(launch.kwargs)
    bound, spec, opts = _binder(fn)(*launch.args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    names = fn.arg_names
    cx = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1 and v is not None}
    div = sorted(names[k[0]] for k, v in attrs.items() if len(k) == 1 and any("divisibility" in str(a) for a in v))
    spec_text = (", ".join(f"{k}={v}" for k, v in cx.items())
                 + f"; div16: {','.join(div) or '-'}; warps={options.num_warps} stages={options.num_stages}")
    key = hashlib.sha1(repr((launch.module, launch.name, sorted(sig.items(), key=str), sorted(map(str, constexprs.items())),
                             sorted(map(str, attrs.items())), str(options))).encode()).hexdigest()[:12]
    return Bound(launch.module, launch.name, fn, sig, constexprs, attrs, options, key, spec_text)


def compile_bound(b: Bound):
    """Compile one bound launch for sm_90a (the interpreter off); the CompiledKernel."""
    import triton
    from triton.compiler import ASTSource

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return triton.compile(ASTSource(b.fn, b.signature, b.constexprs, b.attrs), target=_target_backend()[0],
                              options=b.options.__dict__)
    finally:
        _restore_env("TRITON_INTERPRET", saved)


def read_cubin(cubin: bytes, shared: int, num_warps: int, workdir: Path) -> dict:
    """Resource usage and SASS counts of a compiled Triton kernel."""
    path = workdir / "k.cubin"
    path.write_bytes(cubin)
    r = next(iter(res_usage(path).values()))
    s = sass_summary(next(iter(sass_by_function(path).values()), ""))
    r["smem"] = max(r["smem"], shared)  # Triton's shared memory is dynamic: from its metadata
    threads = num_warps * 32
    return dict(**r, **s, threads=threads, **occupancy(r["regs"], r["smem"], threads))


def _compile_job(job: tuple) -> tuple:
    """(cubin, shared bytes, warps) or an error text: one specialisation, in a worker process
    (the kernel looked up by module and name: a JITFunction does not pickle)."""
    module, name, sig, constexprs, attrs, options = job
    try:
        fn = getattr(triton_modules_by_name()[module], name)
        b = Bound(module, name, fn, sig, constexprs, attrs, _Options(options), "", "")
        ck = compile_bound(b)
        return ck.asm["cubin"], int(getattr(ck.metadata, "shared", 0) or 0), int(ck.metadata.num_warps)
    except Exception as e:
        return f"compile failed: {type(e).__name__}: {str(e)[-300:]}"


class _Options:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def triton_modules_by_name() -> dict:
    return {m.__name__.rpartition(".")[2]: m for m in triton_modules()}


def compile_all(bounds: list[Bound], jobs: int = 1) -> dict:
    """{key: kernel record}: each bound specialisation compiled for sm_90a (``jobs`` worker
    processes) and read."""
    jobs_in = [(b.module, b.name, b.signature, b.constexprs, b.attrs, dict(b.options.__dict__)) for b in bounds]
    if jobs > 1 and len(bounds) > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(bounds)),
                                                    mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_compile_job, jobs_in))
    else:
        results = [_compile_job(j) for j in jobs_in]
    out = {}
    with tempfile.TemporaryDirectory(prefix="effkern-perf-") as tmp:
        for b, res in zip(bounds, results):
            rec = dict(backend="triton", arch="sm_90a", kernel=f"{b.module}.{b.name}", key=b.key, spec=b.spec)
            if isinstance(res, str):
                rec["error"] = res
            else:
                rec.update(read_cubin(*res, Path(tmp)))
            out[b.key] = rec
    return out


# ------------------------------------------------------------------------------------------
# Running a Case on the CPU: shape-only large tensors, launch and sync counting
# ------------------------------------------------------------------------------------------

_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
              "resize_", "set_", "lift_fresh", "lift_fresh_copy", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}


def _dev(t) -> bool:
    return bool(getattr(t, "_ek_dev", False))


def _tag(obj, value: bool = True, shape_only: bool | None = None):
    import torch

    for t in _tensors(obj):
        try:
            t._ek_dev = value
            if shape_only is not None:
                t._ek_shape_only = shape_only
        except (AttributeError, RuntimeError):
            pass
    return obj


def _tensors(obj) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _tensors(getattr(obj, f))]
    return []


class Counter:
    """Counts, while ``active``, the aten kernels and host synchronisations of a call."""

    def __init__(self):
        self.active = False
        self.launches: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.notes: set[str] = set()
        self.quiet = 0  # inside a patched method: its own aten calls are not the user's

    def reset(self):
        self.launches.clear()
        self.syncs.clear()
        self.notes.clear()

    def sync(self, what: str):
        if self.active and not self.quiet:
            self.syncs[f"{what} at {_caller()}"] += 1


def _caller() -> str:
    """The innermost effkern frame outside this module (where a sync is written)."""
    import traceback as tb

    for fr in reversed(tb.extract_stack()[:-2]):
        path = Path(fr.filename).resolve()
        if path.is_relative_to(REPO / "effkern"):
            return f"{path.relative_to(REPO).as_posix()}:{fr.lineno}"
    return "?"


def _make_mode(counter: Counter):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

    def numel(t) -> int:
        return math.prod(t.shape)

    def to_meta(x):
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        if isinstance(x, (list, tuple)):
            return type(x)(to_meta(v) for v in x)
        return x

    def materialise(x):
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            t = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
            if x.numel() * x.element_size() <= 2**20:  # small (host logic may read it): zeros
                t.zero_()
            t._ek_shape_only = True
            return t
        if isinstance(x, (list, tuple)):
            return type(x)(materialise(v) for v in x)
        return x

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            ins = _tensors(list(args) + list(kwargs.values()))
            dev = any(_dev(t) for t in ins)
            name = func.overloadpacket.__name__
            if func.namespace not in ("aten", "prims"):  # an effkern custom op: look inside it
                with self:
                    out = func.redispatch(cpu_only, *args, **kwargs)
                return out
            if name == "_local_scalar_dense":
                if dev and not counter.quiet:
                    counter.sync(".item()/int()/float()/bool()")
                if any(getattr(t, "_ek_shape_only", False) for t in ins) and counter.active:
                    counter.notes.add("a scalar was read from a shape-only tensor (its value is not computed)")
                return func(*args, **kwargs)
            if func.is_view or name in _NO_KERNEL:
                out = func(*args, **kwargs)
                if func.is_view and any(getattr(t, "_ek_shape_only", False) for t in ins):
                    _tag(out, dev, shape_only=True)
            else:
                if dev and counter.active and not counter.quiet:
                    counter.launches[f"aten.{name}"] += 1
                out = self._maybe_shape_only(func, args, kwargs, ins)
            if dev:
                _tag(out)
            return out

        def _maybe_shape_only(self, func, args, kwargs, ins):
            # large, or derived from a shape-only tensor (its values were never computed)
            big = any(numel(t) > SHAPE_ONLY_ELEMS or getattr(t, "_ek_shape_only", False) for t in ins)
            meta_out = None
            if not big:  # an output may still be large (a factory, an expand + copy)
                try:
                    mkw = dict(kwargs)
                    if "device" in mkw:
                        mkw["device"] = torch.device("meta")
                    if "generator" in mkw:
                        mkw["generator"] = None  # a CPU generator cannot drive a meta factory
                    if not ins and "device" in kwargs:
                        meta_out = func(*to_meta(list(args)), **mkw)
                        big = any(numel(t) > SHAPE_ONLY_ELEMS for t in _tensors(meta_out))
                except Exception:
                    meta_out = None
            if not big:
                return func(*args, **kwargs)
            if func._schema.is_mutable:  # in-place on a shape-only tensor: nothing to compute
                return kwargs.get("out", args[0])
            if meta_out is None:
                mkw = {k: (torch.device("meta") if k == "device" else None if k == "generator" else to_meta(v))
                       for k, v in kwargs.items()}
                try:
                    meta_out = func(*to_meta(list(args)), **mkw)
                except Exception as e:
                    raise RuntimeError(f"aten.{func.overloadpacket.__name__} on a shape-only tensor "
                                       f"(> {SHAPE_ONLY_ELEMS} elements) has no shape function: {e}") from e
            return materialise(meta_out)

    return Mode()


@contextlib.contextmanager
def host_patches(counter: Counter):
    """Python-level hooks for what the dispatch mode cannot see on a CPU-only machine: copies
    between host and device and tensor-to-Python conversions (see the module docstring)."""
    import torch

    T = torch.Tensor
    saved = {}

    def patch(owner, name, make):
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, make(saved[(owner, name)]))

    def quiet(orig, self, *a, **kw):
        counter.quiet += 1
        try:
            return orig(self, *a, **kw)
        finally:
            counter.quiet -= 1

    def d2h(what):
        def make(orig):
            def f(self, *a, **kw):
                if _dev(self):
                    counter.sync(what)
                out = quiet(orig, self, *a, **kw)
                if what == ".cpu()" and isinstance(out, T):
                    out = out.clone() if out is self else out  # a host copy, not the device tensor
                    _tag(out, False)
                return out
            return f
        return make

    def names_device(a, kw) -> bool:
        vals = list(a) + [kw.get("device")]
        return any(isinstance(v, torch.device) or (isinstance(v, T) and _dev(v)) for v in vals)

    def to_make(orig):
        def f(self, *a, **kw):
            # non_blocking: the host does not wait (effkern issues such copies only from pinned
            # memory, effkern._common.to_device_async); a launch, not a sync
            if not _dev(self) and names_device(a, kw):
                if not kw.get("non_blocking", False):
                    counter.sync("host-to-device .to(device)")
                out = quiet(orig, self, *a, **kw)
                out = out[...] if out is self else out  # the device copy is a new tensor
                return _tag(out)
            return orig(self, *a, **kw)
        return f

    def cuda_make(orig):
        def f(self, *a, **kw):
            if not _dev(self):
                counter.sync("host-to-device .cuda()")
            return _tag(self[...])
        return f

    def factory(copy: bool):
        def make(orig):
            def f(*a, **kw):
                dev = isinstance(kw.get("device"), torch.device)
                if dev and copy and not any(isinstance(v, T) and _dev(v) for v in a):
                    counter.sync("host-to-device torch.tensor(..., device=)")
                counter.quiet += copy
                try:
                    out = orig(*a, **kw)
                finally:
                    counter.quiet -= copy
                if dev and isinstance(out, T):
                    if not copy and counter.active and orig.__name__ not in ("empty", "empty_like", "empty_strided"):
                        counter.launches[f"torch.{orig.__name__}(device=)"] += 1
                    _tag(out)
                return out
            return f
        return make

    patch(T, "tolist", d2h(".tolist()"))
    patch(T, "numpy", d2h(".numpy()"))
    patch(T, "cpu", d2h(".cpu()"))
    patch(T, "to", to_make)
    patch(T, "cuda", cuda_make)
    for name in ("tensor", "as_tensor"):
        patch(torch, name, factory(True))
    for name in ("empty", "zeros", "ones", "full", "arange", "randn", "rand", "randint", "randperm", "eye",
                 "linspace", "empty_strided"):
        patch(torch, name, factory(False))
    try:
        yield
    finally:
        for (owner, name), orig in saved.items():
            setattr(owner, name, orig)


# ------------------------------------------------------------------------------------------
# One benchmark Case on the Triton backend
# ------------------------------------------------------------------------------------------


@dataclass
class CaseRead:
    """What running one Case (Triton backend) on the CPU recorded; ``error``: the kernels could
    not be read, ``op_error``: the op call could not (its launches and syncs are then unknown)."""

    kernel_launches: list = field(default_factory=list)
    op_launches: list = field(default_factory=list)
    aten_launches: dict = field(default_factory=dict)
    syncs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    error: str = ""
    op_error: str = ""


def _why(e: Exception) -> str:
    from bench import runner

    if isinstance(e, runner.Unavailable):
        return f"{e.status}: {e.reason}"
    if os.environ.get("EFFKERN_PERF_DEBUG"):
        traceback.print_exc()
    text = str(e).splitlines()[0][:240] if str(e) else ""
    return f"not read: {type(e).__name__}: {text}"


def _gpu_validation_default():
    """Value validation as the op does it on a GPU by default (off where effkern has the switch:
    on CPU tensors it is on, and would read the recorded kernels' unwritten outputs)."""
    from effkern import _common

    gpu_default = getattr(_common, "validation", None)
    return gpu_default(False) if gpu_default is not None else contextlib.nullcontext()


def read_case(case, modules) -> CaseRead:
    """Build the case's inputs on the CPU, run its kernels and its op on the Triton backend with
    every kernel recorded; the launches of each, the aten kernels and syncs of the op call.
    Recorded kernels write nothing: host code that needs their results' values fails, and is
    reported as not read."""
    import effkern
    from bench import runner

    counter, out = Counter(), CaseRead()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the dispatcher accepts CPU tensors for Triton
    try:
        with host_patches(counter), _make_mode(counter), \
                recording(modules, on_launch=lambda a, kw: _tag(list(a) + list(kw.values()))) as sink:
            try:
                # residency comes from how each input was made (the Rand's device=, .cpu() for
                # host constants such as a host scale), not from being in the set
                s = runner.input_sets(case, "cpu", rotate=False)[0]
            except Exception as e:
                out.error = out.op_error = "inputs " + _why(e)
                return out
            try:
                case.kernel(s, runner.Kernels("triton", case.kernels))
            except Exception as e:
                out.error = _why(e)
            out.kernel_launches = list(sink)
            sink.clear()
            counter.active = True
            try:
                with effkern.backend("triton"), _gpu_validation_default():
                    case.call(s)
            except Exception as e:
                out.op_error = _why(e)
            counter.active = False
            out.op_launches = list(sink)
            out.aten_launches, out.syncs = dict(counter.launches), dict(counter.syncs)
            out.notes = sorted(counter.notes)
    finally:
        counter.active = False
        _restore_env("TRITON_INTERPRET", saved)
    return out


# ------------------------------------------------------------------------------------------
# Roofline and verdict
# ------------------------------------------------------------------------------------------


def _tc_peak(dtype: str) -> float:
    return TC_PEAK.get(dtype, TC_PEAK["bf16"])


def floors(nbytes: int, flops: int, dtype: str, tc: bool, issue_warp_insns: float, launches: int) -> dict:
    f = {f"mem_us_{g}": nbytes / bw * 1e6 for g, bw in COPY_BW.items()}
    f["compute_us"] = flops / (_tc_peak(dtype) if tc else CUDA_CORE_PEAK) * 1e6 if flops else 0.0
    f["compute_peak"] = ("tensor cores" if tc else "CUDA cores") if flops else "-"
    f["issue_us"] = issue_warp_insns / ISSUE_RATE * 1e6
    f["launch_us"] = max(0, launches - 1) * LAUNCH_GAP_S * 1e6
    return f


def verdict(case, fl: dict, flags: list[str], syncs: int, kernels_read: bool) -> tuple[str, str]:
    """PASS / AT RISK / MISS against the Case's targets at the floors (``VERDICT_GPU``)."""
    if not case.targets:
        return "-", "no target for this row"
    mem = fl[f"mem_us_{VERDICT_GPU}"]
    ours = max(mem, fl["compute_us"]) + fl["launch_us"]  # the issue floor is a straight-line guess: a flag
    ours_op = ours + syncs * SYNC_S * 1e6
    misses, short, why = [], [], []
    for bl_name, tgt in case.targets.items():
        if tgt.bw is not None:
            frac = mem / ours if ours else 1.0
            why.append(f"{frac:.0%} of copy BW at the floors (target {tgt.bw:.0%})")
            if frac < tgt.bw:
                misses.append("bandwidth")
        for attr, t_ours in (("speedup", ours), ("op_speedup", ours_op)):
            want = getattr(tgt, attr)
            if want is None:
                continue
            bls = [b for b in case.baselines if (bl_name == "*" or b.name == bl_name)]
            for bl in bls:
                if bl.fn is None:
                    continue
                b_floor = max(bl.bytes / COPY_BW[VERDICT_GPU], bl.flops / _tc_peak(case.dtype)) * 1e6
                ratio = b_floor / t_ours if t_ours else math.inf
                why.append(f"{'op ' if attr == 'op_speedup' else ''}{ratio:.2f}x {bl.name} at both floors (target {want}x)")
                if ratio < want:  # the baseline at its floor is a bound, not a prediction: at risk
                    short.append(f"short of {want}x {bl.name} unless it runs above its floor")
    if not kernels_read:
        return "?", "kernels not read"
    if misses:
        return "MISS", "; ".join(why + flags)
    if flags or short:
        return "AT RISK", "; ".join(flags + short + why)
    return "PASS", "; ".join(why)


def structural_flags(kernels: list[dict], case, fl: dict, launches: int, syncs: int) -> list[str]:
    flags = []
    if any(k["stl"] or k["ldl"] for k in kernels):
        flags.append("spills: " + ", ".join(sorted({k["kernel"] for k in kernels if k["stl"] or k["ldl"]})))
    if case.flops and not any(k["tc"] for k in kernels):
        flags.append("no tensor cores")
    mem_bound = fl[f"mem_us_{VERDICT_GPU}"] >= fl["compute_us"]
    if mem_bound and kernels and not any("128" in k["ldg"] or k.get("async128") for k in kernels):
        flags.append("no 16-byte loads")
    small = [k["kernel"] for k in kernels if k.get("blocks") is not None and k["blocks"] < SMS]
    if small:
        flags.append("grid < 1 wave: " + ", ".join(sorted(set(small))))
    if fl["issue_us"] > fl[f"mem_us_{VERDICT_GPU}"] and fl["issue_us"] > fl["compute_us"]:
        flags.append("instruction-bound (straight-line estimate)")
    if launches > 1 and fl["launch_us"] > 0.5 * fl[f"mem_us_{VERDICT_GPU}"]:
        flags.append(f"{launches} launches")
    if syncs:
        flags.append(f"{syncs} host syncs")
    return flags


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def cuda_library() -> Path | None:
    libs = sorted((REPO / "effkern").glob("_C*.so"))
    return libs[0] if libs else None


def _widths(d: dict) -> str:
    return " ".join(f"{w}x{n}" for w, n in d.items()) or "-"


def build(families: list[str] | None = None, quick: bool = False, jobs: int = 1, log=print) -> dict:
    """Read every kernel and predict every benchmark row; the report as a dict (the JSON)."""
    setup_environment()
    sys.path.insert(0, str(REPO))
    from bench import runner

    modules = triton_modules()
    import torch
    import triton

    t_start = time.monotonic()
    fams = families or runner.families()
    report = dict(
        meta=dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=_git("rev-parse", "--short", "HEAD"),
                  dirty=bool(_git("status", "--porcelain", "--untracked-files=no", "--", "effkern", "kernels", "csrc")),
                  torch=torch.__version__, triton=triton.__version__, **tool_versions(), families=fams, quick=quick,
                  target="sm_90a (Triton: GPUTarget cuda 90), CUDA library: every arch in its fatbinary",
                  estimate=ESTIMATE),
        triton=[], cuda=[], rows=[])
    # CUDA library
    lib = cuda_library()
    cuda_kernels = read_cuda_library(lib) if lib else []
    report["cuda"] = cuda_kernels
    if not lib:
        report["meta"]["cuda_note"] = "no effkern/_C*.so built: CUDA kernels not read"
    # Triton: record every case's launches and bind them; then compile each specialisation once
    pending: dict[str, Bound] = {}
    reads = []
    for fam_name in fams:
        fam = runner.load(fam_name)
        cases = fam.cases(quick=quick)
        log(f"{fam_name}: {len(cases)} cases")
        for case in cases:
            t0 = time.monotonic()
            read = read_case(case, modules)
            kernels = []
            for phase, launches in (("kernel", read.kernel_launches), ("op", read.op_launches)):
                for ln in launches:
                    try:
                        b = bind_launch(ln)
                    except Exception as e:
                        msg = f"not read: binding {ln.name}: {type(e).__name__}: {e}"
                        if phase == "kernel":
                            read.error = read.error or msg
                        else:
                            read.op_error = read.op_error or msg
                        continue
                    pending.setdefault(b.key, b)
                    kernels.append(dict(phase=phase, key=b.key, grid=list(ln.grid), blocks=math.prod(ln.grid)))
            read.kernel_launches = read.op_launches = None  # the tensors go (shape-only ones included)
            reads.append((case, fam_name, read, kernels))
            log(f"  {case.name}: {sum(k['phase'] == 'kernel' for k in kernels)} kernel / "
                f"{sum(k['phase'] == 'op' for k in kernels)} op launches, {time.monotonic() - t0:.1f} s"
                + "".join(f"  [{x}]" for x in (read.error, read.op_error) if x))
    log(f"compiling {len(pending)} Triton specialisations for sm_90a ({jobs} jobs)")
    t0 = time.monotonic()
    compiled = compile_all(list(pending.values()), jobs)
    log(f"  {time.monotonic() - t0:.1f} s")
    for case, fam_name, read, kernels in reads:
        report["rows"].extend(_rows(case, fam_name, read, kernels, compiled, cuda_kernels))
    report["triton"] = sorted(compiled.values(), key=lambda r: (r["kernel"], r["spec"]))
    report["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
    return report


def _rows(case, fam_name: str, read: CaseRead, launches: list[dict], compiled: dict, cuda_kernels: list) -> list[dict]:
    base = dict(family=fam_name, op=case.op, model=case.model, batch=case.batch, shape=case.shape, dtype=case.dtype,
                bytes=case.bytes, flops=case.flops, targets={k: v.label for k, v in case.targets.items()})
    rows = []
    for backend in case.backends():
        if backend == "triton":
            kl = [dict(compiled[x["key"]], **x) for x in launches if x["phase"] == "kernel"]
            ok = not read.error and kl and not any("error" in k for k in kl)
            op_l = [x for x in launches if x["phase"] == "op"]
            op_ok = not read.op_error
            n_launch = len(op_l) + sum(read.aten_launches.values()) if op_ok else None
            n_sync = sum(read.syncs.values()) if op_ok else None
            issue = sum(k.get("n", 0) * k["blocks"] * math.ceil(k.get("threads", 32) / 32) for k in kl)
            tc = any(k.get("tc") for k in kl)
            fl = floors(case.bytes, case.flops, case.dtype, tc, issue, len(kl))
            flags = structural_flags(kl, case, fl, n_launch or 0, n_sync or 0) if ok else []
            v, why = verdict(case, fl, flags, n_sync or 0, bool(ok))
            error = "; ".join(x for x in (read.error and f"kernels {read.error}",
                                          read.op_error and f"op call {read.op_error}") if x)
            rows.append(dict(base, backend="triton", read=bool(ok), error=error, notes=read.notes,
                             kernels=[dict(kernel=k["kernel"], key=k["key"], grid=k["grid"], blocks=k["blocks"],
                                           waves=(round(k["blocks"] / (SMS * k["blocks_sm"]), 2)
                                                  if k.get("blocks_sm") else None)) for k in kl],
                             kernel_launches=len(kl), op_launches=n_launch, triton_op_launches=len(op_l),
                             aten_launches=read.aten_launches, syncs=n_sync, sync_sites=read.syncs,
                             tensor_cores=tc, **fl, flags=flags, verdict=v, why=why))
        elif backend == "cuda":
            stems = [d.impls["cuda"].cuda_op.removeprefix("cuda_") for d in map(_kernel_dispatcher, case.kernels)
                     if "cuda" in d.impls]
            mk = [k for k in cuda_kernels if k["arch"] == "sm_90a"
                  and any(st in k["kernel"] or st == k["source"] for st in stems)]
            tc = any(k["tc"] for k in mk)
            fl = floors(case.bytes, case.flops, case.dtype, tc, 0, 0)
            flags = [f for f in structural_flags(mk, case, fl, 0, 0) if not f.startswith("grid")]
            v, why = verdict(case, fl, flags, 0, bool(mk))
            why += "; floors and the instantiations' properties only (grid, loop trip counts: n/a without a GPU)"
            rows.append(dict(base, backend="cuda", read=bool(mk), error="" if mk else "no CUDA kernel matched by name",
                             notes=["instantiations matched by name (the one that runs is chosen at run time); "
                                    "grid, launches and syncs need a GPU"],
                             kernels=[dict(kernel=k["kernel"]) for k in mk], kernel_launches=None, op_launches=None,
                             syncs=None, tensor_cores=tc, **fl, flags=flags, verdict=v, why=why))
    return rows


def _kernel_dispatcher(name: str):
    from bench import runner

    return runner.kernel_dispatcher(name)


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return out


def _kernel_cells(k: dict) -> list:
    occ = f"{k['blocks_sm']} / {k['warps_sm']} ({k['limiter']})" if k.get("blocks_sm") is not None else k.get("limiter", "-")
    return [k.get("regs", "-"), f"{k.get('stl', 0)}/{k.get('ldl', 0)}" + (f" L{k['local']}" if k.get("local") else ""),
            k.get("smem", "-"), k.get("threads") or "-", occ, _widths(k.get("ldg", {})), _widths(k.get("stg", {})),
            ",".join(k.get("tc_ops", [])) or "no", k.get("n", "-")]


KERNEL_HEADER = ["regs", "spill st/ld", "smem B", "threads", "blocks/SM / warps/SM", "LDG bits x n", "STG bits x n",
                 "tensor cores", "SASS n"]


def markdown(rep: dict, title: str = "Static performance report", preface: str = "") -> str:
    m = rep["meta"]
    lines = [f"# {title}", "", "Generated by `python -m effkern perf`; do not edit by hand.", ""]
    if preface:
        lines += [preface, ""]
    lines += [ESTIMATE, "",
              f"- date {m['date']}, commit {m['commit']}{' (with uncommitted kernel changes)' if m.get('dirty') else ''}",
              f"- torch {m['torch']}, triton {m['triton']}, cuobjdump {m.get('cuobjdump')}, ptxas {m.get('ptxas')}",
              f"- families: {', '.join(m['families'])}{' (--quick)' if m.get('quick') else ''}; {m.get('seconds', '?')} s",
              f"- floors on {VERDICT_GPU} for the verdict: copy {COPY_BW['H200'] / 1e12:.1f} TB/s (H100 "
              f"{COPY_BW['H100'] / 1e12:.1f}), tensor cores bf16 {TC_PEAK['bf16'] / 1e12:.0f} / int8 "
              f"{TC_PEAK['int8'] / 1e12:.0f} TOPS, CUDA cores {CUDA_CORE_PEAK / 1e12:.0f} TFLOP/s, issue "
              f"{ISSUE_RATE / 1e12:.2f} T warp-instr/s, {LAUNCH_GAP_S * 1e6:.0f} us per extra launch, "
              f"{SYNC_S * 1e6:.0f} us per host sync (op-level targets); {SMS} SMs",
              "- verdict: PASS = the floors allow every target and nothing structural is in the way; AT RISK = a "
              "listed flag stands in the way, or a speedup target is short with the baseline at its own floor "
              "(a bound: eager baselines run above theirs); MISS = our own floors miss a bandwidth target; "
              "? = not read. Issue floor = static SASS x warps launched (loops make it higher).",
              "- method: bench/static.py's docstring.", ""]
    lines += ["## Benchmark rows", ""]
    hdr = ["family", "op", "model", "B", "shape", "dtype", "backend", "mem us H100/H200", "compute us (peak)",
           "issue us", "launches kernel/op", "syncs/op", "TC", "verdict", "why"]
    body = []
    for r in rep["rows"]:
        body.append([r["family"], r["op"], r["model"], r["batch"], r["shape"], r["dtype"], r["backend"],
                     f"{r['mem_us_H100']:.1f} / {r['mem_us_H200']:.1f}",
                     f"{r['compute_us']:.1f} ({r['compute_peak']})" if r["flops"] else "-",
                     f"{r['issue_us']:.1f}" if r["backend"] == "triton" else "n/a",
                     f"{r['kernel_launches']}/{r['op_launches'] if r['op_launches'] is not None else '?'}"
                     if r["kernel_launches"] is not None else "n/a",
                     (r["syncs"] if r["syncs"] is not None else "?" if r["backend"] == "triton" else "n/a"), "yes" if r["tensor_cores"] else "no",
                     r["verdict"], (r["error"] + "; " if r["error"] else "") + r["why"]
                     + ("; " + "; ".join(r["notes"]) if r["notes"] and r["backend"] == "triton" else "")])
    lines += _table(hdr, body) + [""]
    syncs = collections.Counter()
    for r in rep["rows"]:
        for site, n in (r.get("sync_sites") or {}).items():
            syncs[(r["op"], site)] = max(syncs[(r["op"], site)], n)
    if syncs:
        lines += ["## Host synchronisations per op call (Triton backend)", ""]
        lines += _table(["op", "what, where", "per call"], [[op, s, n] for (op, s), n in sorted(syncs.items())]) + [""]
    lines += ["## Triton kernels (sm_90a, per specialisation at the benchmark shapes)", ""]
    grids = collections.defaultdict(list)
    for r in rep["rows"]:
        for k in r.get("kernels", []):
            if "key" in k:
                grids[k["key"]].append(k)
    body = []
    for k in rep["triton"]:
        g = grids.get(k["key"], [])
        waves = [x["waves"] for x in g if x.get("waves") is not None]
        blocks = [x["blocks"] for x in g]
        body.append([k["kernel"], k["spec"]] + (_kernel_cells(k) if "error" not in k else [k["error"]] + [""] * 8)
                    + [f"{min(blocks)}-{max(blocks)}" if blocks else "-",
                       f"{min(waves)}-{max(waves)}" if waves else "-"])
    lines += _table(["kernel", "specialisation"] + KERNEL_HEADER + ["grid blocks", "waves"], body) + [""]
    lines += ["## CUDA kernels (every instantiation in the library)", ""]
    body = [[k["arch"], k["kernel"]] + _kernel_cells(k) for k in rep["cuda"]]
    lines += _table(["arch", "kernel"] + KERNEL_HEADER, body) + [""]
    if rep["meta"].get("cuda_note"):
        lines += [rep["meta"]["cuda_note"], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Comparison with a committed report (the CI test)
# ------------------------------------------------------------------------------------------


def properties(rep: dict) -> dict:
    """{(backend, where, kernel): dict(tc, io128, spill, specs)}: Triton per benchmark row and
    kernel (specialisations change as kernels are tuned; the row is stable), CUDA per arch and
    instantiation."""
    out = {}
    trit = {k["key"]: k for k in rep["triton"]}
    for r in rep["rows"]:
        if r["backend"] != "triton":
            continue
        where = f"{r['op']} {r['model']} B{r['batch']} {r['shape']} {r['dtype']}"
        for k in r["kernels"]:
            kk = trit.get(k.get("key"))
            if not kk or "error" in kk:
                continue
            p = out.setdefault(("triton", where, kk["kernel"]), dict(tc=False, io128=False, spill=0, specs=set()))
            p["tc"] |= bool(kk["tc"])
            p["io128"] |= "128" in kk["ldg"] or "128" in kk["stg"] or bool(kk.get("async128"))
            p["spill"] = max(p["spill"], kk["stl"] + kk["ldl"])
            p["specs"].add(kk["spec"])
    for k in rep["cuda"]:
        out[("cuda", k["arch"], k["kernel"])] = dict(tc=bool(k["tc"]), io128="128" in k["ldg"] or "128" in k["stg"]
                                                     or bool(k.get("async128")),
                                                     spill=k["stl"] + k["ldl"], specs={k["kernel"]})
    return out


def regressions(old: dict, new: dict, spill_allow: dict[str, str]) -> list[str]:
    """What ``new`` lost against ``old`` (tensor cores, 16-byte global I/O) and every spill not
    allowed by ``spill_allow`` (kernel-name substring -> reason); messages name the kernel, its
    specialisation and the property."""
    po, pn = properties(old), properties(new)
    msgs = []
    for key, p in sorted(pn.items(), key=str):
        backend, where, kernel = key
        spec = "; ".join(sorted(p["specs"]))
        if p["spill"] and not any(a in kernel for a in spill_allow):
            msgs.append(f"{backend} {kernel} [{spec}] at {where}: spills ({p['spill']} STL/LDL instructions)")
        q = po.get(key)
        if q is None:
            continue
        if q["tc"] and not p["tc"]:
            msgs.append(f"{backend} {kernel} [{spec}] at {where}: lost tensor cores (had HMMA/IMMA/GMMA)")
        if q["io128"] and not p["io128"]:
            msgs.append(f"{backend} {kernel} [{spec}] at {where}: lost 16-byte global loads/stores")
    return msgs


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def cli(argv: list[str] | None = None, prog: str = "python -m effkern perf") -> int:
    sys.path.insert(0, str(REPO))
    from bench import runner

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=runner.families(), help="only this family (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_MD, help=f"markdown report (default {DEFAULT_MD.relative_to(REPO)})")
    p.add_argument("--json", type=Path, default=None, help="machine-readable report (default: beside --out, .json)")
    p.add_argument("--quick", action="store_true", help="each family's --quick cases only")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                   help="processes compiling Triton specialisations (default: the CPU count, at most 8)")
    p.add_argument("--title", default="Static performance report", help=argparse.SUPPRESS)
    p.add_argument("--preface", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    why = tools_missing()
    if why:
        print(f"effkern perf: {why}", file=sys.stderr)
        return 2
    rep = build(args.family, args.quick, args.jobs, log=lambda s: print(s, flush=True))
    js = args.json or args.out.with_suffix(".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rep, args.title, args.preface))
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    counts = collections.Counter(r["verdict"] for r in rep["rows"])
    print(f"\n{ESTIMATE}\nwrote {args.out} and {js}: {len(rep['triton'])} Triton specialisations, "
          f"{len(rep['cuda'])} CUDA instantiations, {len(rep['rows'])} rows ("
          + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + f") in {rep['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
