"""Backend selection: forcing, the environment variable, error messages, `python -m effkern info`."""

import subprocess
import sys

import pytest
import torch

import effkern
from effkern import _dispatch
from effkern.ops import int_softmax

x8 = torch.randint(-128, 128, (3, 11), dtype=torch.int8)


def test_auto_dispatch_on_cpu_uses_the_reference():
    assert _dispatch.OPS["int_softmax"].select(x8, -20, 15, 8).backend == "torch"


def test_context_manager_forces_and_nests():
    assert _dispatch.forced_backends() is None
    with effkern.backend("torch"):
        assert _dispatch.forced_backends() == ("torch",)
        with effkern.backend("cuda", "torch"):
            assert _dispatch.forced_backends() == ("cuda", "torch")
            # cuda declines a CPU tensor, the next in the list takes it
            assert _dispatch.OPS["int_softmax"].select(x8, -20, 15, 8).backend == "torch"
        assert _dispatch.forced_backends() == ("torch",)
    assert _dispatch.forced_backends() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("EFFKERN_BACKEND", "cuda")
    with pytest.raises(effkern.BackendNotSupported) as err:
        int_softmax(x8, 0.1)
    assert "cuda:" in str(err.value) and "forced backend(s) cuda" in str(err.value)
    with effkern.backend("torch"):  # the context manager wins over the variable
        int_softmax(x8, 0.1)
    monkeypatch.setenv("EFFKERN_BACKEND", "auto")
    int_softmax(x8, 0.1)
    monkeypatch.setenv("EFFKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="EFFKERN_BACKEND: unknown backend"):
        int_softmax(x8, 0.1)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with effkern.backend("cudnn"):
            pass


def test_dtype_reason_is_reported():
    with effkern.backend("torch"), pytest.raises(effkern.BackendNotSupported, match="dtype int32 not in"):
        _dispatch.OPS["int_gelu"].select(x8.to(torch.int32), -20, 23, 8)


def test_triton_declines_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = _dispatch.OPS["int_softmax"].environment_reasons(torch.device("cpu"))["triton"]
    assert reasons and ("TRITON_INTERPRET" in reasons[0] or "not installed" in reasons[0])


@pytest.mark.parametrize("arch,cc,runs", [
    ("8.0", (8, 0), True), ("8.0", (8, 6), True), ("8.0", (9, 0), False),
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("10.0f", (10, 3), True), ("8.0+PTX", (12, 0), True), ("9.0", (8, 9), False),
])
def test_arch_compatibility(arch, cc, runs):
    assert _dispatch._arch_runs_on(arch, cc) is runs


def test_info_command_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "effkern", "info"], capture_output=True, text=True, check=True).stdout
    for op in _dispatch.OPS:
        assert op in out
    for word in ("torch", "triton", "cuda", "CUDA library", "available"):
        assert word in out
    if not torch.cuda.is_available():
        assert "GPU none" in out


def test_every_kernel_dispatcher_is_declared_in_the_registry():
    from effkern._registry import OPS

    assert set(_dispatch.OPS) == {name for name, op in OPS.items() if op.kernels is not None}
    for name, op in OPS.items():
        assert op.custom_op is not None, f"{name}: declared without an implementation"


def test_backend_is_chosen_on_the_named_argument():
    # binary_attention's kernels take (q_codes, k_codes, v, ...) and choose on v: int32 codes
    # first, so a positional rule would look at the wrong tensor.
    dispatcher = _dispatch.OPS["binary_attention"]
    assert dispatcher.dispatch_on == "v"
    codes = torch.zeros(1, 1, 3, 1, dtype=torch.int32)
    v = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    with effkern.backend("triton", "torch"):  # triton declines float64: the choice looked at v
        impl = dispatcher.select(codes, codes, v, 8, "ecoformer")
        assert impl.backend == "torch"
        assert dispatcher.select(v=v, q_codes=codes, k_codes=codes, nbits=8, form="ecoformer") is impl
