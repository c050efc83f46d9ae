"""What the tests of the compiled CUDA library (tests/test_cuda_*.py) share: whether the library
loaded, the checks every op family repeats (schemas, CPU tensors refused), building a family's
host check (kernels/<family>/host_check.cpp) for ctypes, and poisoning the CUDA allocator."""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from effkern import _cuda_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADED, REASON = _cuda_lib.load()
needs_lib = pytest.mark.skipif(not LOADED, reason=f"effkern CUDA library {REASON}")
HAS_CUDA = torch.cuda.is_available()


def case_id(v):
    return str(v).replace("torch.", "").replace(" ", "")


def require_cuda():
    """Skips the test unless there is a GPU and the library loaded."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if not LOADED:
        pytest.skip(f"effkern CUDA library {REASON}")


def assert_schema(name, schemas):
    """torch.ops.effkern.<name> is registered with the schema ``schemas[name]``."""
    op = getattr(torch.ops.effkern, name)
    assert str(op.default._schema) == schemas[name]


def assert_cpu_tensors_refused(calls):
    """Each of ``calls`` (op name -> a call of that op on CPU tensors) raises an error naming it."""
    for name, call in calls.items():
        with pytest.raises((NotImplementedError, RuntimeError), match=name):
            call()


def build_host_check(tmp_path_factory, family):
    """kernels/<family>/host_check.cpp compiled for the host and loaded with ctypes (skips the
    test without a host C++ compiler); the caller sets the functions' argtypes."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip(f"no host C++ compiler to build kernels/{family}/host_check.cpp")
    out = tmp_path_factory.mktemp(f"host_check_{family}") / f"libhost_check_{family}.so"
    src = os.path.join(ROOT, "kernels", family, "host_check.cpp")
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", src, "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


def poison_allocator(nbytes):
    """Leave a block of 0x5b bytes in the caching allocator so that an output allocated right
    after (same size) starts as garbage, not as zeros or an earlier correct result."""
    torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda").fill_(0x5B)
