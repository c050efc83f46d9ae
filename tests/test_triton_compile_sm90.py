"""Every Triton kernel launch that the integer ops make, compiled for Hopper (sm_90) on a machine
without a GPU.

Triton's interpreter (what the CPU suite runs) executes kernels as numpy code; it accepts some
programs that the real compiler rejects (a plain module-level int inside a kernel, for one). This
test records the launches the host wrappers make for representative shapes, then compiles each
one to a cubin for sm_90 with the installed Triton and its bundled ptxas, without launching.
On a machine with a GPU the real runs cover this, so it is skipped there.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")

SCRIPT = textwrap.dedent(r'''
    import sys
    import torch
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        print(f"SKIP: this triton has no ASTSource/GPUTarget: {err}")
        sys.exit(0)
    import effkern.triton.integer as T

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

    g = torch.Generator().manual_seed(0)
    def ints(shape, dtype, lo=-100, hi=100):
        return torch.randint(lo, hi, shape, generator=g).to(dtype)
    for dtype in (torch.int8, torch.int16, torch.int32):
        T.int_softmax_rows(ints((5, 197), dtype), -20, 15, 8)
        T.int_softmax_rows(ints((2, 5000), dtype), -20, 15, 16)
    T.int_softmax_rows(ints((2, 64), torch.int8), -(2**16) + 1, 15, 8)  # the largest x0 allowed
    for dtype in (torch.int8, torch.int16):
        T.int_gelu_rows(ints((5, 1536), dtype), -8, 23, 8)
        T.int_gelu_rows(ints((2, 5000), dtype), -8, 23, 16)
        T.int_layernorm_rows(ints((5, 768), dtype), ints((768,), torch.int32), 10)
        T.int_layernorm_rows(ints((2, 5000), dtype), ints((5000,), torch.int32), 10)
    T.int_gelu_rows(ints((3, 64), torch.int8), -(2**29), 23, 8)  # DIV32=False: int64 division
    for dtype, bits in ((torch.int32, 8), (torch.int16, 16), (torch.int8, 32)):
        T.requantize_rows(ints((7, 1536), dtype), ints((1536,), torch.int64, 2**30, 2**31), ints((1536,), torch.int64, 0, 70), bits)
    w = ints((384, 384), torch.int8)
    m, e = ints((384,), torch.int64, 2**30, 2**31), ints((384,), torch.int64, 20, 40)
    for rows in (197 * 4, 48, 1):
        T.int8_linear_rows(ints((rows, 384), torch.int8), w, ints((384,), torch.int32), m, e, 8)
        T.int8_linear_rows(ints((rows, 384), torch.int8), w, None, None, None, 32)
    T.int8_linear_rows(ints((33, 100), torch.int8), ints((17, 100), torch.int8), None, m[:17], e[:17], 16)

    PTR = {torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
    def arg_type(v):
        if isinstance(v, torch.Tensor):
            return PTR[v.dtype]
        return "i32" if -(2**31) <= v < 2**31 else "i64"

    target = GPUTarget("cuda", 90, 32)
    seen, failures = set(), 0
    for name, rec in kernels.items():
        assert rec.calls, f"no launch of {name} was recorded"
        for args, kwargs in rec.calls:
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            params = [p for p in rec.fn.arg_names if p not in kwargs]
            signature = {p: arg_type(v) for p, v in zip(params, args)}
            signature.update({k: "constexpr" for k in kwargs})
            key = (name, tuple(sorted(signature.items())), tuple(sorted(kwargs.items())), tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                src = ASTSource(fn=rec.fn, signature=signature, constexprs=dict(kwargs))
            except TypeError as err:
                print(f"SKIP: ASTSource's signature changed in this triton: {err}")
                sys.exit(0)
            try:
                triton.compile(src, target=target, options=options)
                print("compiled", name, kwargs, options)
            except Exception as err:  # report every failing configuration, then fail
                failures += 1
                print("FAILED", name, kwargs, options, "\n", f"{type(err).__name__}: {err}"[-2000:])
    print(f"{len(seen)} configurations, {failures} failed")
    sys.exit(1 if failures else 0)
''')


def test_every_triton_launch_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if out.startswith("SKIP:"):
        pytest.skip(out.strip())
    assert proc.returncode == 0, out[-6000:]
    assert "configurations, 0 failed" in out
