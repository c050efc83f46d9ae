"""What the tests of the compiled CUDA library share (tests/test_<family>_cuda.py,
test_cuda_build.py, test_cuda_sanitize.py): whether the library
loaded, the CUDA kernels the Python side calls (from the op registry) and the check that each
library op's schema, read from torch, fits the Python call (the schemas are written once, in the
families' registration blocks in csrc/), the CPU-tensor check every family repeats, building a
family's host check (kernels/<family>/host_check.cpp) for ctypes, and poisoning the CUDA
allocator."""

import ctypes
import inspect
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


# --------------------------------------------------------------------------------------------
# the CUDA kernels the Python side calls, and their schemas
# --------------------------------------------------------------------------------------------

_PREFIX = "torch.ops.effkern."


def _ops():
    import effkern.ops  # noqa: F401  (declares every op)
    from effkern import _dispatch

    return _dispatch.OPS


def cuda_op_name(impl):
    """The ``torch.ops.effkern`` op a cuda Implementation calls: its ``cuda_op``, else parsed from
    its function's ``target`` / ``__name__`` ("torch.ops.effkern.<op>")."""
    name = getattr(impl, "cuda_op", None) or getattr(impl.fn, "cuda_op", None)
    if name:
        return name
    for attr in ("target", "__name__"):
        s = getattr(impl.fn, attr, None)
        if isinstance(s, str) and s.startswith(_PREFIX):
            return s[len(_PREFIX):]
    raise AssertionError(f"cannot tell which torch.ops.effkern op the cuda kernel {impl.fn!r} calls")


def kernel_family(name):
    """The family of kernel dispatcher ``name``: the op registry's, else the effkern.ops module
    of its torch reference."""
    try:
        from effkern import _registry

        decl = _registry.OPS.get(name)
        if decl is not None:
            return decl.family
    except ImportError:
        pass
    module = getattr(_ops()[name].impls["torch"].fn, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if module.startswith("effkern.ops.") else None


def cuda_kernels(family=None):
    """{kernel dispatcher name: the torch.ops.effkern op its cuda backend calls}, for every
    dispatcher in ``effkern._dispatch.OPS`` with a cuda implementation (of ``family`` if given)."""
    return {name: cuda_op_name(d.impls["cuda"]) for name, d in _ops().items()
            if "cuda" in d.impls and (family is None or kernel_family(name) == family)}


def _adapter_params(fn):
    """Parameter names of the Python function between the dispatcher and the library op, or None
    when the kernel forwards its arguments to the op unchanged."""
    adapter = getattr(fn, "adapter", None)
    if adapter is not None:  # registry CudaKernel: adapter(op, *kernel_args)
        return list(inspect.signature(adapter).parameters)[1:]
    if getattr(fn, "cuda_op", None) is not None:
        return None
    params = inspect.signature(fn).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None  # a forwarder: call(*args) -> op(*args)
    return [p.name for p in params]


class _Arg:
    """Stands for one kernel argument in a recorded call. It equals everything, so that an
    adapter's lookups (``FORMS.index(form)``, ``form in FORMS``) convert it to some value."""

    def __init__(self, name):
        self.name = name

    def __eq__(self, other):
        return True

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<kernel argument {self.name}>"


def _record_call(impl, op_name, names):
    """(args, kwargs) the cuda kernel passes to torch.ops.effkern.<op_name> when called with one
    stand-in per kernel argument; None when it cannot run on stand-ins (an adapter computing an
    argument, e.g. packing codes) or does not look the op up at call time."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return _Arg("result")

    record.default = record
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.effkern, op_name, record)
        try:
            impl.fn(*[_Arg(n) for n in names])
        except Exception:  # noqa: BLE001 - e.g. FORMS.index(form) on a stand-in
            return None
    return calls[0] if len(calls) == 1 else None


_SCHEMA_TYPE = {"Tensor": "Tensor", "int": "int", "bool": "bool", "float": "float", "str": "str"}


def _type_name(annotation):
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    return _SCHEMA_TYPE.get(name)


def assert_cuda_op_matches_python(kernel):
    """The cuda backend of kernel dispatcher ``kernel`` calls a library op that is registered,
    whose schema (read from torch) fits the Python kernel signature
    (``inspect.signature(OPS[kernel].impls["torch"].fn)``): the same argument names, in order,
    of the same types, when the kernel forwards its arguments; through an adapter, the adapter
    takes the kernel arguments, calls the op with as many arguments as its schema has, and each
    kernel argument it passes on unchanged goes to the op argument of its name and type (the
    others it converts or computes, e.g. a form name to its index, or packs hashes to codes)."""
    d = _ops()[kernel]
    impl = d.impls["cuda"]
    op_name = cuda_op_name(impl)
    assert hasattr(torch.ops.effkern, op_name), f"{kernel}: the library registers no effkern::{op_name}"
    assert op_name in _cuda_lib.registered_ops(), f"{kernel}: effkern::{op_name} is not the library's"
    schema = getattr(torch.ops.effkern, op_name).default._schema
    op_args = [(a.name, str(a.type)) for a in schema.arguments]
    params = list(inspect.signature(d.impls["torch"].fn).parameters.values())
    names = [p.name for p in params]
    types = {p.name: _type_name(p.annotation) for p in params}
    where = f"{kernel}: effkern::{op_name} {schema} vs the kernel signature ({', '.join(names)})"
    assert [r.type.kind() for r in schema.returns] == ["TensorType"], where

    adapter = _adapter_params(impl.fn)
    if adapter is None:  # op(*kernel_args): names, count and types agree one to one
        assert [a for a, _ in op_args] == names, where
        for a, typ in op_args:
            assert types[a] in (None, typ), f"{where}: '{a}' is {types[a]} in Python, {typ} in C++"
    else:
        assert adapter == names, f"{where}: the adapter takes ({', '.join(adapter)})"

    recorded = _record_call(impl, op_name, names)
    if recorded is None:
        assert adapter is not None, f"{where}: the kernel does not call the op with its arguments"
        return
    args, kwargs = recorded
    bound = schema_bind(op_args, args, kwargs, where)
    for a, typ in op_args:
        v = bound[a]
        if isinstance(v, _Arg):  # passed through: it must be the kernel argument of that name
            assert v.name == a, f"{where}: kernel argument '{v.name}' passed as '{a}'"
            assert types[a] in (None, typ), f"{where}: '{a}' is {types[a]} in Python, {typ} in C++"


def schema_bind(op_args, args, kwargs, where):
    """{op argument name: value} of a call of an op with arguments ``op_args``."""
    names = [a for a, _ in op_args]
    assert len(args) <= len(names), f"{where}: called with {len(args)} positional arguments"
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        assert k in names and k not in bound, f"{where}: bad keyword argument '{k}'"
        bound[k] = v
    assert set(bound) == set(names), f"{where}: called without {sorted(set(names) - set(bound))}"
    return bound


def assert_cpu_tensors_refused(calls):
    """Each of ``calls`` (op name -> a call of that op on CPU tensors) raises an error naming it."""
    for name, call in calls.items():
        with pytest.raises((NotImplementedError, RuntimeError), match=name):
            call()


def host_compiler():
    """The host C++ compiler (skips the test without one)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    return cxx


def build_shared_library(src, out):
    """C++ source file ``src`` compiled into the shared library ``out`` (a path)."""
    subprocess.run([host_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", "-I", ROOT, str(src), "-o", str(out)],
                   check=True)
    return str(out)


def build_host_check(tmp_path_factory, family):
    """kernels/<family>/host_check.cpp compiled for the host and loaded with ctypes (skips the
    test without a host C++ compiler); the caller sets the functions' argtypes."""
    out = tmp_path_factory.mktemp(f"host_check_{family}") / f"libhost_check_{family}.so"
    # -I ROOT: kernel headers include each other as "kernels/<family or common>/..."
    return ctypes.CDLL(build_shared_library(os.path.join(ROOT, "kernels", family, "host_check.cpp"), out))


def poison_allocator(nbytes):
    """Leave a block of 0x5b bytes in the caching allocator so that an output allocated right
    after (same size) starts as garbage, not as zeros or an earlier correct result."""
    torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda").fill_(0x5B)
