"""The compiled CUDA library (effkern/_C*.so) as a whole, on CPU: it loads with this (possibly
CPU-only) torch, says itself which ops it registered (each with its CUDA kernel), registers
exactly the ops the Python side calls, each with a schema that fits the Python call, and
reports the facts it was built with. The families' kernels: tests/test_cuda_<family>.py.
"""

import re

import pytest

from effkern import _cuda_lib, _registry
from tests.cuda_lib_helpers import (assert_cuda_op_matches_python, build_shared_library, cuda_kernels, kernel_family,
                                    needs_lib)

FAMILIES = tuple(_registry.families())  # csrc/<family>, kernels/<family>, tests/test_<family>_cuda.py


def test_load_reports_reason():
    loaded, reason = _cuda_lib.load()
    assert isinstance(loaded, bool) and isinstance(reason, str) and reason
    assert _cuda_lib.load() == (loaded, reason)  # cached
    if not loaded:
        assert reason.startswith(("not built", "failed to load"))
        assert _cuda_lib.registered_ops() == ()


@needs_lib
def test_library_registers_what_python_calls():
    """The library's own list of registered ops (effkern_registered_ops) is the set of ops the
    Python side's cuda kernels call: nothing missing, nothing unused, nothing twice."""
    registered = _cuda_lib.registered_ops()
    assert len(set(registered)) == len(registered), registered
    assert sorted(registered) == sorted(set(cuda_kernels().values()))


@pytest.mark.parametrize(
    "records, problem",
    [
        (None, "does not report its ops"),
        ("defined=\\nimplemented=\\n", "registered no ops"),
        ("defined=cuda_int_gelu,cuda_int_softmax\\nimplemented=cuda_int_gelu\\n",
         "defined ops without a CUDA kernel: cuda_int_softmax"),
        ("defined=cuda_int_gelu\\nimplemented=cuda_int_gelu,cuda_zz\\n", "gave CUDA kernels to ops it did not define: cuda_zz"),
        ("defined=cuda_zz_never_registered\\nimplemented=cuda_zz_never_registered\\n", "torch does not see the ops"),
    ],
    ids=["no-report", "no-ops", "no-kernel", "kernel-only", "unseen"],
)
def test_load_decided_by_the_library_report(tmp_path, records, problem):
    """What a library reports through effkern_registered_ops decides whether it loaded."""
    src = tmp_path / "fake_lib.cpp"
    body = "" if records is None else (
        'extern "C" __attribute__((visibility("default"))) const char* effkern_registered_ops() '
        f'{{ return "{records}"; }}')
    src.write_text(body + "\nextern \"C\" int effkern_fake_lib() { return 0; }\n")
    path = build_shared_library(src, tmp_path / "fake_lib.so")
    ops, found = _cuda_lib._registration_problem(path)
    assert found is not None and problem in found, found


@needs_lib
@pytest.mark.parametrize("kernel", sorted(cuda_kernels()))
def test_cuda_op_schema_fits_python(kernel):
    assert_cuda_op_matches_python(kernel)


def test_every_cuda_kernel_has_a_family():
    """Each family's test file checks its own kernels (cuda_kernels(family)): together they
    cover every cuda kernel."""
    kernels = cuda_kernels()
    assert kernels, "no dispatcher has a cuda implementation"
    assert {k: kernel_family(k) for k in kernels} == {k: kernel_family(k) for k in kernels
                                                      if kernel_family(k) in FAMILIES}
    assert sorted(k for f in FAMILIES for k in cuda_kernels(f)) == sorted(kernels)


@needs_lib
def test_build_info():
    info = _cuda_lib.build_info()
    assert info["cuda_version"] and info["torch_version"] and info["torch_target_version"] == "2.10"
    archs = _cuda_lib.arch_list()
    assert archs and all(re.fullmatch(r"\d+\.\d[af]?(\+PTX)?", a) for a in archs), archs
