"""The per-op backend order on CUDA tensors (effkern/_backend_order.py): every entry names a real
op and orders exactly its registered backends, reference last, with its grounds."""

import pytest
import torch

from effkern import _backend_order, _dispatch, _registry

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("op", sorted(_backend_order.GPU_ORDER))
def test_order_lists_exactly_the_ops_backends(op):
    assert op in _registry.OPS, f"{op} is not a registered op"
    order = _backend_order.GPU_ORDER[op]
    registered = set(_registry.OPS[op].backends)
    assert len(registered) > 2, f"{op}: only one GPU backend, there is no order to choose"
    assert set(order.backends) == registered and len(order.backends) == len(registered), \
        f"{op}: order {order.backends} must be a permutation of its backends {sorted(registered)}"
    assert order.backends[-1] == "torch", f"{op}: the reference goes last"
    assert order.grounds.strip(), f"{op}: say on what grounds"


def test_unlisted_ops_take_the_default_and_cpu_runs_the_reference():
    assert _dispatch.auto_order("not-an-op", CUDA) == _backend_order.DEFAULT.backends
    for op in _registry.OPS:
        assert _dispatch.auto_order(op, CPU) == ("torch",)
        assert _dispatch.auto_order(op, CUDA) == _backend_order.gpu_order(op).backends


def test_dispatcher_walks_the_op_order(monkeypatch):
    op = next(name for name, o in _registry.OPS.items() if len(o.backends) > 2)
    flipped = _backend_order.Order(("triton", "cuda", "torch"), "test")
    monkeypatch.setitem(_backend_order.GPU_ORDER, op, flipped)
    assert tuple(_registry.OPS[op].kernels.candidates(CUDA)) == flipped.backends


def _static_report():
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "static.json"
    if not path.exists():
        pytest.skip("no committed static report (python -m effkern perf)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("op", ["binary_attention"])
def test_binary_attention_grounds_hold_in_the_static_report(op):
    """Triton first because its products run on tensor cores and the CUDA kernels' do not: if a
    kernel change makes that false, the order must be revisited."""
    rows = [r for r in _static_report()["rows"] if r["op"] == op and r.get("read", True)]
    triton = [r["tensor_cores"] for r in rows if r["backend"] == "triton"]
    cuda = [r["tensor_cores"] for r in rows if r["backend"] == "cuda"]
    assert triton and all(triton), "a Triton binary attention row without tensor cores"
    assert cuda and not any(cuda), "the CUDA binary attention uses tensor cores now: revisit the order"
    assert _backend_order.gpu_order(op).backends[0] == "triton"
