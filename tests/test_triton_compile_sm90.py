"""Every Triton kernel launch that effkern's host wrappers make, compiled for Hopper (sm_90) on a
machine without a GPU.

Triton's interpreter (what the CPU suite runs) executes kernels as numpy code; it accepts some
programs that the real compiler rejects (a plain module-level int inside a kernel, for one). For
each Triton module, a launch file ``tests/sm90_launches_<family>.py`` (``MODULE`` and
``launch_all(T, g)``) calls the host wrappers on representative shapes; this test records the
launches instead of running them, binds each one with Triton's own binder as a real launch would
(the divisibility specialisation of pointers and integers included: bench/static.py, the same
code as the static performance report) and compiles it to a cubin for sm_90 with the installed
Triton (and the CUDA tools' ptxas when installed, else Triton's bundled one). On a machine with a
GPU the real runs cover this, so it is skipped there.
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
    from bench import static  # the binder of the static report: one place for the idea

    why = static.triton_missing()
    if why:
        print(f"SKIP: {why}")
        sys.exit(0)
    static.setup_environment()
    launches = importlib.import_module("tests." + sys.argv[1])
    T = importlib.import_module(launches.MODULE)
    kernels = {name for name in dir(T)
               if name.endswith("_kernel") and isinstance(getattr(T, name), triton.runtime.JITFunction)}
    with static.recording([T]) as recorded:
        launches.launch_all(T, torch.Generator().manual_seed(0))
    missing = kernels - {ln.name for ln in recorded}
    assert not missing, f"no launch of {sorted(missing)} was recorded"

    seen, failures = set(), 0
    for ln in recorded:
        bound = static.bind_launch(ln)  # Triton's own binder: a real launch's specialisation
        if bound.key in seen:
            continue
        seen.add(bound.key)
        try:
            static.compile_bound(bound)
            print("compiled", ln.name, bound.spec)
        except Exception as err:  # report every failing configuration, then fail
            failures += 1
            print("FAILED", ln.name, bound.spec, "\n", f"{type(err).__name__}: {err}"[-2000:])
    print(f"{len(seen)} configurations, {failures} failed")
    sys.exit(1 if failures else 0)
''')


@pytest.mark.parametrize("launch_file", LAUNCH_FILES)
def test_every_triton_launch_compiles_for_sm90(tmp_path, launch_file):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    root = os.path.dirname(HERE)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, launch_file], env=env, cwd=root,
                          capture_output=True, text=True, timeout=2400)  # a loaded machine compiles slowly; a hang still ends
    out = proc.stdout + proc.stderr
    if out.startswith("SKIP:"):
        pytest.skip(out.strip())
    assert proc.returncode == 0, out[-6000:]
    assert "configurations, 0 failed" in out
