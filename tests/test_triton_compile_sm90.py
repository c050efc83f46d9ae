"""Every Triton kernel launch that effkern's host wrappers make, compiled for Hopper (sm_90) on a
machine without a GPU.

Triton's interpreter (what the CPU suite runs) executes kernels as numpy code; it accepts some
programs that the real compiler rejects (a plain module-level int inside a kernel, for one). For
each Triton module, a launch file ``tests/sm90_launches_<family>.py`` (``MODULE`` and
``launch_all(T, g)``) calls the host wrappers on representative shapes; this test records the
launches instead of running them, then compiles each one to a cubin for sm_90 with the installed
Triton and its bundled ptxas. On a machine with a GPU the real runs cover this, so it is skipped
there.
"""

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "sm90_launches_*.py")))

SCRIPT = textwrap.dedent(r'''
    import importlib
    import sys
    import torch
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        print(f"SKIP: this triton has no ASTSource/GPUTarget: {err}")
        sys.exit(0)
    launches = importlib.import_module("tests." + sys.argv[1])
    T = importlib.import_module(launches.MODULE)

    class Recorder:
        """Stands in for a kernel: records kernel[grid](*args, **kwargs) instead of launching."""
        def __init__(self, fn):
            self.fn, self.calls = fn, []
        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((args, kwargs))

    kernels = {name: Recorder(getattr(T, name)) for name in dir(T)
               if name.endswith("_kernel") and isinstance(getattr(T, name), triton.runtime.JITFunction)}
    for name, rec in kernels.items():
        setattr(T, name, rec)

    launches.launch_all(T, torch.Generator().manual_seed(0))

    PTR = {torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
           torch.uint8: "*u8", torch.bool: "*i1", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.float32: "*fp32", torch.float64: "*fp64"}
    def arg_type(v):
        if isinstance(v, torch.Tensor):
            return PTR[v.dtype]
        if v is None:
            return "constexpr"
        if isinstance(v, bool):
            return "i1"
        if isinstance(v, float):
            return "fp32"
        return "i32" if -(2**31) <= v < 2**31 else "i64"

    target = GPUTarget("cuda", 90, 32)
    seen, failures = set(), 0
    for name, rec in kernels.items():
        assert rec.calls, f"no launch of {name} was recorded"
        for args, kwargs in rec.calls:
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            params = [p for p in rec.fn.arg_names if p not in kwargs]
            signature = {p: arg_type(v) for p, v in zip(params, args)}
            constexprs = dict(kwargs)
            constexprs.update({p: None for p, v in zip(params, args) if v is None})
            signature.update({k: "constexpr" for k in constexprs})
            key = (name, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
                   tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                src = ASTSource(fn=rec.fn, signature=signature, constexprs=constexprs)
            except TypeError as err:
                print(f"SKIP: ASTSource's signature changed in this triton: {err}")
                sys.exit(0)
            try:
                triton.compile(src, target=target, options=options)
                print("compiled", name, constexprs, options)
            except Exception as err:  # report every failing configuration, then fail
                failures += 1
                print("FAILED", name, constexprs, options, "\n", f"{type(err).__name__}: {err}"[-2000:])
    print(f"{len(seen)} configurations, {failures} failed")
    sys.exit(1 if failures else 0)
''')


@pytest.mark.parametrize("launch_file", LAUNCH_FILES)
def test_every_triton_launch_compiles_for_sm90(tmp_path, launch_file):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    root = os.path.dirname(HERE)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, launch_file], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if out.startswith("SKIP:"):
        pytest.skip(out.strip())
    assert proc.returncode == 0, out[-6000:]
    assert "configurations, 0 failed" in out
