"""The op registry: one declaration per op, the single source of truth.

An op is declared once, beside its reference, with :func:`define_op`; the declaration holds

* the **kernels**: the torch reference, Triton (``"module:function"`` in ``effkern.triton``) and
  CUDA (a ``torch.ops.effkern`` op name and, when its arguments differ, an adapter), with each
  backend's dtype and shape limits, and the name of the argument the backend is chosen on;
* the **argument check**, run once per call by the op, and by its fake impl, so the two can
  never disagree (backends keep only the cheap asserts memory safety needs);
* the **implementation** (``@op.impl``): a typed function whose annotations give the custom
  op's schema (``effkern::<name>``); it prepares the kernel arguments and calls
  ``op.kernels(...)``;
* the **fake** (``@op.fake``), returning exactly the strides the real op returns;
* the **autograd** formula (``op.autograd(backward, setup_context)``) where differentiable;
* the **test cases** (``op.cases(...)``): fixed samples, a random-sample builder, invalid
  inputs and how outputs are compared (bit-exact, or a tolerance rule from the dtype).

From it come the custom op, the fake, the autograd, the dispatcher, and everything that
iterates :data:`OPS`: the generated tests (tests/test_registry.py), ``python -m effkern info``
and ``python -m effkern ops`` (which scripts/gpu_check.sh reads). Adding an op is described in
CONTRIBUTING.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from effkern._dispatch import BACKENDS, CudaKernel, OpDispatcher, TritonKernel, op_dispatcher


@dataclass(frozen=True)
class Kernel:
    """One backend's kernel, as declared: see :func:`torch_kernel`, :func:`triton_kernel`,
    :func:`cuda_kernel`."""

    backend: str
    fn: Callable
    dtypes: tuple[torch.dtype, ...]
    check: Callable[..., list[str]] | None = None


def torch_kernel(fn: Callable, *, dtypes: Iterable[torch.dtype], check=None) -> Kernel:
    """The pure-torch reference kernel; its signature is every backend's kernel signature."""
    return Kernel("torch", fn, tuple(dtypes), check)


def triton_kernel(target: str, *, dtypes: Iterable[torch.dtype], check=None) -> Kernel:
    """``target`` = ``"module:function"`` of ``effkern.triton`` (imported on first use)."""
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"triton kernel target must read 'module:function', got {target!r}")
    return Kernel("triton", TritonKernel(module, name), tuple(dtypes), check)


def cuda_kernel(cuda_op: str, *, dtypes: Iterable[torch.dtype], check=None,
                adapter: Callable | None = None) -> Kernel:
    """``torch.ops.effkern.<cuda_op>`` from the compiled library; ``adapter(op, *kernel_args)``
    calls it when its arguments differ from the kernel signature."""
    return Kernel("cuda", CudaKernel(cuda_op, adapter), tuple(dtypes), check)


# --------------------------------------------------------------------------------------------
# Test cases
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """Arguments of one call of the custom op ``torch.ops.effkern.<name>`` (schema order)."""

    args: tuple
    note: str = ""


@dataclass
class Invalid:
    """Arguments the op must refuse with ``error`` (an exception type) matching ``match``."""

    args: tuple
    error: type[Exception]
    match: str
    note: str = ""


@dataclass
class Cases:
    """How the generated tests exercise an op.

    samples(gen, device) -> [Sample]: fixed cases (odd sizes, permuted and non-contiguous
        layouts, edge values); every backend must agree with the torch backend on them.
    random(gen, device) -> Sample: a random valid call (shapes and values drawn from ``gen``);
        the property-based tests draw many.
    invalid(gen, device) -> [Invalid]: calls every backend must refuse with a clear error.
    exact: outputs compared bit for bit (integer ops); else float outputs are judged against
        the float64 torch result, allowed twice the error of the torch backend in the same
        dtype plus 1e-5 of the result's magnitude (tests/triton_helpers.py: check).
    grad_args: positions of the arguments that take gradients (differentiable ops), for the
        compiled forward + backward test.
    """

    samples: Callable[[torch.Generator, str], list[Sample]]
    random: Callable[[torch.Generator, str], Sample] | None = None
    invalid: Callable[[torch.Generator, str], list[Invalid]] | None = None
    exact: bool = False
    grad_args: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------
# The declaration
# --------------------------------------------------------------------------------------------


@dataclass
class OpDef:
    """One declared op. Build it with :func:`define_op`, then decorate its implementation
    (``@op.impl``) and fake (``@op.fake``); optionally ``op.autograd(...)`` and ``op.cases(...)``."""

    name: str
    family: str
    doc: str
    check: Callable[..., None] | None
    kernels: OpDispatcher | None
    public: bool = True
    custom_op: Any = None
    test_cases: Cases | None = None
    differentiable: bool = False

    @property
    def qualname(self) -> str:
        return f"effkern::{self.name}"

    @property
    def op(self):
        """``torch.ops.effkern.<name>`` (the OpOverloadPacket)."""
        return getattr(torch.ops.effkern, self.name)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if self.kernels is not None and b in self.kernels.impls)

    def _checked(self, fn: Callable) -> Callable:
        """``fn`` preceded by the op's argument check."""
        check = self.check
        if check is None:
            return fn

        @functools.wraps(fn)
        def checked(*args):
            check(*args)
            return fn(*args)

        return checked

    def impl(self, fn: Callable) -> Callable:
        """Registers ``fn`` (typed: its annotations give the schema) as the custom op's real
        implementation, preceded by the op's argument check."""
        if self.custom_op is not None:
            raise ValueError(f"{self.qualname} already has an implementation")
        # The schema from fn's own annotations (evaluated in fn's module, which imports Tensor).
        schema = torch.library.infer_schema(fn, mutates_args=())
        self.custom_op = torch.library.custom_op(self.qualname, self._checked(fn), mutates_args=(), schema=schema)
        return self.custom_op

    def fake(self, fn: Callable) -> Callable:
        """Registers ``fn`` as the fake (meta) impl, preceded by the same argument check."""
        self.custom_op.register_fake(self._checked(fn))
        return fn

    def autograd(self, backward: Callable, setup_context: Callable) -> None:
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        self.differentiable = True

    def cases(self, **kwargs) -> None:
        self.test_cases = Cases(**kwargs)


OPS: dict[str, OpDef] = {}


def define_op(
    name: str,
    *,
    family: str,
    doc: str,
    check: Callable[..., None] | None = None,
    kernels: Sequence[Kernel] = (),
    dispatch_on: str | None = None,
    public: bool = True,
) -> OpDef:
    """Declare op ``effkern::<name>`` of ``family``.

    ``kernels`` lists the backends, the torch reference first (its signature is the kernel
    signature); ``dispatch_on`` names the kernel argument whose device and dtype choose the
    backend. ``check`` takes the op's arguments and raises on invalid input; it runs in the op
    and in its fake. ``public=False`` marks internal ops (backward passes).
    """
    if name in OPS:
        raise ValueError(f"op {name!r} is already declared")
    dispatcher = None
    if kernels:
        if kernels[0].backend != "torch":
            raise ValueError(f"{name}: the torch reference kernel must come first")
        dispatcher = op_dispatcher(name, doc, dispatch_on)
        for k in kernels:
            dispatcher.register(k.backend, k.fn, dtypes=k.dtypes, check=k.check)
    OPS[name] = OpDef(name, family, doc, check, dispatcher, public)
    return OPS[name]


def families() -> list[str]:
    return sorted({d.family for d in OPS.values()})
