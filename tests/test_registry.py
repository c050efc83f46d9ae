"""Tests generated from the op registry (effkern/_registry.py): every declared op with test cases
gets them, so a new op is tested the moment it is declared.

Per op and backend:
* samples: each backend agrees with the torch backend (bit for bit for integer ops, else
  within twice the torch backend's own low-precision error, tests/triton_helpers.check);
  outputs the op allocates are poisoned first, so an unwritten element fails;
* fake: the fake impl returns exactly the real op's shapes, dtypes and strides, on every backend;
* opcheck (torch.library's contract: schema, fake, autograd registration, aot dispatch);
* invalid input: the declared calls raise the declared error, whatever backend is forced;
* property-based (hypothesis): random valid calls agree across backends; random corruptions of
  a valid call (dtype, rank, device, sign) either raise a clear error naming the op or agree
  with the torch backend, never crash or return garbage;
* inductor: differentiable ops compile (torch.compile, inductor, fullgraph) forward and
  backward on their samples (permuted and non-contiguous included) and match eager.

Hypothesis runs few examples by default; `--hypothesis-profile=exhaustive` runs many
(see tests/conftest.py).
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import effkern
from effkern._dispatch import BACKENDS
from effkern._registry import OPS
from tests.conftest import DEVICE, backend_reasons
from tests.triton_helpers import GarbageBytes, check, poisoned_empty

DECLARED = sorted(name for name, d in OPS.items() if d.test_cases is not None)
OP_BACKENDS = [(name, b) for name in DECLARED for b in OPS[name].backends]
OTHER_BACKENDS = [(name, b) for name, b in OP_BACKENDS if b != "torch"]


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def _require(name: str, backend: str) -> None:
    reasons = backend_reasons(name, backend)
    if reasons:
        pytest.skip(f"{name}/{backend} unavailable on {DEVICE}: {'; '.join(reasons)}")


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(name: str, backend: str, args: tuple):
    poison = GarbageBytes(torch.Generator().manual_seed(7))  # random bytes: NaNs, huge values
    with effkern.backend(backend), poisoned_empty(poison):
        return _outputs(OPS[name].op(*args))


def _to_float64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _assert_agree(name: str, backend: str, args: tuple, what: str) -> None:
    got = _run(name, backend, args)
    ref = _run(name, "torch", args)
    assert len(got) == len(ref), f"{what}: {len(got)} outputs, torch gives {len(ref)}"
    exact = OPS[name].test_cases.exact
    ref64 = None
    for i, (g, r) in enumerate(zip(got, ref)):
        label = f"{what}, output {i}"
        assert g.dtype == r.dtype and g.shape == r.shape, f"{label}: {g.dtype} {tuple(g.shape)} != {r.dtype} {tuple(r.shape)}"
        assert g.stride() == r.stride(), f"{label}: strides {g.stride()} != torch backend's {r.stride()}"
        if r.device.type == "meta":  # a meta input runs the fake: only metadata to compare
            continue
        if exact or not r.is_floating_point():
            assert torch.equal(g.cpu(), r.cpu()), f"{label}: not bit-exact with the torch backend"
        else:
            if ref64 is None:
                ref64 = _run(name, "torch", _to_float64(args))
            check(g, ref64[i], r, label)


# --------------------------------------------------------------------------------------------
# Samples: every backend against the torch backend; fake strides; opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,backend", OTHER_BACKENDS)
def test_backend_matches_torch_on_samples(name, backend):
    _require(name, backend)
    ran = 0
    for sample in OPS[name].test_cases.samples(_gen(name, "samples"), DEVICE):
        try:
            _assert_agree(name, backend, sample.args, f"{name}[{backend}] {sample.note}")
            ran += 1
        except effkern.BackendNotSupported:
            continue  # outside this backend's declared limits (e.g. CUDA head dims)
    if not ran:
        pytest.skip(f"{name}/{backend} declined every sample")


def _fake_outputs(name: str, backend: str, args: tuple) -> list:
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode, effkern.backend(backend):
        return _outputs(OPS[name].op(*fake_args))


@pytest.mark.parametrize("name,backend", OP_BACKENDS)
def test_fake_returns_the_real_strides(name, backend):
    _require(name, backend)
    for sample in OPS[name].test_cases.samples(_gen(name, "fake"), DEVICE):
        try:
            real = _run(name, backend, sample.args)
        except effkern.BackendNotSupported:
            continue  # outside this backend's declared limits
        fake = _fake_outputs(name, backend, sample.args)
        for i, (r, f) in enumerate(zip(real, fake, strict=True)):
            what = f"{name}[{backend}] {sample.note}, output {i}"
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), (
                f"{what}: fake {tuple(f.shape)} {f.dtype} strides {f.stride()} != real "
                f"{tuple(r.shape)} {r.dtype} strides {r.stride()}")


@pytest.mark.parametrize("name", DECLARED)
def test_opcheck(name):
    sample = OPS[name].test_cases.samples(_gen(name, "opcheck"), DEVICE)[0]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and i in OPS[name].test_cases.grad_args else a
                 for i, a in enumerate(sample.args))
    torch.library.opcheck(OPS[name].custom_op, args)


# --------------------------------------------------------------------------------------------
# Invalid input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,backend", [(n, b) for n in DECLARED if OPS[n].test_cases.invalid for b in BACKENDS])
def test_invalid_input_is_refused_on_every_backend(name, backend):
    # The argument check runs before dispatch, so even a backend that cannot run here must
    # give the same error: force each one.
    for bad in OPS[name].test_cases.invalid(_gen(name, "invalid"), DEVICE):
        with effkern.backend(backend), pytest.raises(bad.error, match=bad.match):
            OPS[name].op(*bad.args)


# --------------------------------------------------------------------------------------------
# Property-based: random valid calls, and random corruptions of them
# --------------------------------------------------------------------------------------------

_PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_SEEDS = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("name,backend", [(n, b) for n, b in OTHER_BACKENDS if OPS[n].test_cases.random])
@_PROPERTY
@given(seed=_SEEDS)
def test_random_calls_agree_with_torch(name, backend, seed):
    _require(name, backend)
    sample = OPS[name].test_cases.random(torch.Generator().manual_seed(seed), DEVICE)
    try:
        _assert_agree(name, backend, sample.args, f"{name}[{backend}] seed {seed}")
    except effkern.BackendNotSupported:
        pass  # outside this backend's declared limits


def _corrupt(args: tuple, choice: int, which: int) -> tuple:
    """One corruption of one tensor or int argument of a valid call."""
    slots = [i for i, a in enumerate(args) if isinstance(a, (torch.Tensor, int)) and not isinstance(a, bool)]
    i = slots[which % len(slots)]
    a = args[i]
    if isinstance(a, int):
        new = (-1 - abs(a), 0, 2**40)[choice % 3]
    else:
        corruptions = (
            lambda t: t.to(torch.float64 if not t.is_floating_point() else torch.int32),
            lambda t: t.reshape(-1)[:1].reshape(()) if t.numel() else t.unsqueeze(0),
            lambda t: t.unsqueeze(0).expand(2, *t.shape),
            lambda t: t.to("meta"),
            lambda t: t[..., :0] if t.dim() else t,
            lambda t: -t if t.dtype != torch.bool else t,
        )
        new = corruptions[choice % len(corruptions)](a)
    return args[:i] + (new,) + args[i + 1:]


_CLEAR_ERRORS = (TypeError, ValueError, IndexError, effkern.BackendNotSupported)


@pytest.mark.parametrize("name", [n for n in DECLARED if OPS[n].test_cases.random])
@_PROPERTY
@given(seed=_SEEDS, choice=st.integers(0, 5), which=st.integers(0, 7))
def test_corrupted_calls_raise_clearly_or_agree(name, seed, choice, which):
    sample = OPS[name].test_cases.random(torch.Generator().manual_seed(seed), DEVICE)
    args = _corrupt(sample.args, choice, which)
    results = {}
    for backend in OPS[name].backends:
        if backend_reasons(name, backend):
            continue
        try:
            results[backend] = _run(name, backend, args)
        except _CLEAR_ERRORS as e:
            assert isinstance(e, effkern.BackendNotSupported) or re.match(rf"{name}\b", str(e)), (
                f"{name}[{backend}]: the error does not name the op: {type(e).__name__}: {e}")
            results[backend] = e
    ref = results.get("torch")
    for backend, out in results.items():
        if backend == "torch" or isinstance(out, effkern.BackendNotSupported):
            continue
        # The argument check runs before dispatch: every backend refuses, or none does.
        assert isinstance(out, Exception) == isinstance(ref, Exception), (
            f"{name}: torch gives {ref!r:.200} but {backend} gives {out!r:.200}")
        if not isinstance(out, Exception):
            _assert_agree(name, backend, args, f"{name}[{backend}] corrupted seed {seed}")


# --------------------------------------------------------------------------------------------
# torch.compile with inductor, forward and backward
# --------------------------------------------------------------------------------------------


def _same_layout_leaf(t: torch.Tensor) -> torch.Tensor:
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return leaf.copy_(t.detach()).requires_grad_()


@pytest.mark.parametrize("name", [n for n in DECLARED if OPS[n].test_cases.grad_args])
def test_inductor_forward_and_backward(name):
    torch._dynamo.reset()
    grad_args = OPS[name].test_cases.grad_args
    op = OPS[name].op

    def loss(*args):
        # Summed in float64: eager and compiled code may sum in other orders.
        return sum((o.double() * (k + 1)).sum() for k, o in enumerate(_outputs(op(*args))) if o.is_floating_point())

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    for sample in OPS[name].test_cases.samples(_gen(name, "inductor"), DEVICE):
        # Leaf copies with the sample's strides (permuted, non-contiguous layouts stay so).
        def leaves():
            return [_same_layout_leaf(a) if i in grad_args and isinstance(a, torch.Tensor) else a
                    for i, a in enumerate(sample.args)]

        eager_args, comp_args = leaves(), leaves()
        expected = loss(*eager_args)
        expected.backward()
        with torch._inductor.config.patch(force_disable_caches=True):  # no graph compiled for an older fake
            got = compiled(*comp_args)
        got.backward()
        what = f"{name} {sample.note}"
        torch.testing.assert_close(got, expected, msg=lambda m: f"{what}: loss: {m}")
        for i in grad_args:
            if not isinstance(sample.args[i], torch.Tensor):
                continue
            torch.testing.assert_close(comp_args[i].grad, eager_args[i].grad, msg=lambda m: f"{what}: grad {i}: {m}")
