"""Backend selection for every effkern op.

Each op has up to three implementations ("backends"):

* ``cuda``   -- hand-written CUDA kernels from the compiled library ``effkern/_C*.so``;
* ``triton`` -- Triton kernels, compiled just in time (on CPU tensors only under
  ``TRITON_INTERPRET=1``, Triton's interpreter, which is for testing, not speed);
* ``torch``  -- the pure-PyTorch reference: the oracle every other backend is tested against.

Every implementation declares what it supports and, for a given call, *why* it declines
(device, dtype, shape limits, compute capability), the way xformers' ``not_supported_reasons``
does. :class:`OpDispatcher` walks a per-device priority list and calls the first backend that
accepts; when none does, or a forced backend declines, it raises :class:`BackendNotSupported`
listing every backend's reasons.

Users force backends with ``with effkern.backend("triton"): ...`` or the environment variable
``EFFKERN_BACKEND=triton`` (a comma-separated list gives a priority order, e.g.
``EFFKERN_BACKEND=cuda,torch``). The context manager wins over the environment variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from effkern import _backend_order

BACKENDS = ("cuda", "triton", "torch")

# Auto-selection order on devices other than CUDA (CUDA: per op, effkern/_backend_order.py).
# On CPU the Triton interpreter is a debugging tool, never the fastest choice, so it is only
# used when forced.
_PRIORITY = {"cpu": ("torch",)}
_DEFAULT_PRIORITY = ("torch",)

_forced: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "effkern_forced_backends", default=None
)


class BackendNotSupported(RuntimeError):
    """No allowed backend accepts this call; the message lists each backend's reasons."""


def _parse_backends(names: Iterable[str], origin: str) -> tuple[str, ...]:
    parsed = tuple(n.strip().lower() for n in names if n.strip())
    if not parsed:
        raise ValueError(f"{origin}: no backend named; choose from {', '.join(BACKENDS)}")
    unknown = [n for n in parsed if n not in BACKENDS]
    if unknown:
        raise ValueError(f"{origin}: unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    return parsed


@contextlib.contextmanager
def backend(*names: str) -> Iterator[None]:
    """Force effkern ops inside the block onto the named backend(s).

    ``with effkern.backend("triton"):`` runs every op on Triton or raises
    :class:`BackendNotSupported` explaining why Triton declined. Several names form a
    priority list: ``with effkern.backend("cuda", "torch"):``.
    """
    token = _forced.set(_parse_backends(names, "effkern.backend()"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backends() -> tuple[str, ...] | None:
    """The backends forced by ``effkern.backend(...)`` or ``EFFKERN_BACKEND``, else None."""
    forced = _forced.get()
    if forced is not None:
        return forced
    env = os.environ.get("EFFKERN_BACKEND", "").strip()
    if env and env.lower() != "auto":
        return _parse_backends(env.split(","), "EFFKERN_BACKEND")
    return None


# --------------------------------------------------------------------------------------------
# Backend-level availability (the same for every op)
# --------------------------------------------------------------------------------------------


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_library_reason() -> str | None:
    from effkern import _cuda_lib

    loaded, reason = _cuda_lib.load()
    return None if loaded else reason


def _arch_runs_on(arch: str, cc: tuple[int, int]) -> bool:
    """Does code compiled for TORCH_CUDA_ARCH_LIST entry ``arch`` (e.g. "8.0", "9.0a") run on a
    device of compute capability ``cc``? SASS (plain or family-specific "f") runs on the same
    major at an equal or higher minor; arch-specific ("a") code only on exactly that capability;
    "+PTX" runs on anything newer."""
    arch = arch.strip()
    ptx = arch.endswith("+PTX")
    arch = arch.removesuffix("+PTX")
    specific = arch.endswith("a")
    major, minor = (int(p) for p in arch.rstrip("af").split("."))
    if ptx:
        return cc >= (major, minor)
    if specific:
        return cc == (major, minor)
    return cc[0] == major and cc[1] >= minor  # plain and family ("f") code: same major


def _device_reasons(backend_name: str, device: torch.device) -> list[str]:
    """Why ``backend_name`` cannot run at all on ``device`` (empty list: it can)."""
    if backend_name == "torch":
        return []
    if backend_name == "triton":
        if not triton_installed():
            return ["triton is not installed"]
        if device.type == "cuda":
            return []
        if device.type == "cpu":
            return [] if triton_interpreter_enabled() else [
                "CPU tensors run on Triton only under its interpreter (set TRITON_INTERPRET=1 "
                "before importing effkern)"
            ]
        return [f"device type {device.type!r} is not supported"]
    # cuda
    reason = _cuda_library_reason()
    if reason is not None:
        return [reason]
    if device.type != "cuda":
        return [f"needs a CUDA tensor, got a {device.type} tensor"]
    from effkern import _cuda_lib

    cc = torch.cuda.get_device_capability(device)
    arches = _cuda_lib.arch_list()
    if arches and not any(_arch_runs_on(a, cc) for a in arches):
        return [f"the library was compiled for {';'.join(arches)}, which does not run on a "
                f"device of compute capability {cc[0]}.{cc[1]}"]
    return []


# --------------------------------------------------------------------------------------------
# Per-op dispatch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """One backend's kernel of one op.

    ``fn`` takes the op's kernel arguments (see :class:`OpDispatcher`); ``dtypes`` are the
    accepted dtypes of the argument the backend is chosen on; ``devices`` the accepted device
    types (None: any); ``check`` returns extra reasons to decline a particular call (shape
    limits and the like), given the same arguments as ``fn``. These are the backend's *limits*,
    never argument validation: the op checks its arguments once, before dispatch.
    """

    backend: str
    fn: Callable
    dtypes: frozenset[torch.dtype]
    devices: frozenset[str] | None = None
    check: Callable[..., list[str]] | None = None

    @property
    def target(self) -> str:
        """What runs: ``effkern.triton.integer.int_softmax_rows``, ``torch.ops.effkern.cuda_...``."""
        return getattr(self.fn, "target", f"{self.fn.__module__}.{self.fn.__qualname__}")

    @property
    def cuda_op(self) -> str | None:
        """The ``torch.ops.effkern`` op a CUDA kernel calls (None for the other backends)."""
        return getattr(self.fn, "cuda_op", None)

    def reasons(self, main: torch.Tensor, args: tuple) -> list[str]:
        reasons = _device_reasons(self.backend, main.device)
        if self.devices is not None and main.device.type not in self.devices:
            reasons.append(f"device type {main.device.type!r} not in {sorted(self.devices)}")
        if main.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(main.dtype).removeprefix('torch.')} not in {names}")
        if not reasons and self.check is not None:
            reasons.extend(self.check(*args))
        return reasons


@dataclass
class OpDispatcher:
    """The backends (kernels) of one op, and the choice between them for each call.

    Every backend's kernel takes the same arguments, in the order and with the names of the
    torch kernel's signature (the first one registered must be the torch reference). The
    backend is chosen on the tensor argument named ``dispatch_on``: its device and dtype.
    Calls may pass arguments by position or by name.
    """

    name: str
    doc: str = ""
    dispatch_on: str | None = None
    impls: dict[str, Implementation] = field(default_factory=dict)
    signature: inspect.Signature | None = None

    def register(
        self,
        backend_name: str,
        fn: Callable,
        *,
        dtypes: Iterable[torch.dtype],
        devices: Iterable[str] | None = None,
        check: Callable[..., list[str]] | None = None,
    ) -> None:
        if backend_name not in BACKENDS:
            raise ValueError(f"unknown backend {backend_name!r}")
        if self.signature is None:
            if backend_name != "torch":
                raise ValueError(f"{self.name}: register the torch kernel first (it fixes the signature)")
            self.signature = inspect.signature(fn)
            params = list(self.signature.parameters)
            if self.dispatch_on is None:
                self.dispatch_on = params[0]
            if self.dispatch_on not in params:
                raise ValueError(f"{self.name}: dispatch_on={self.dispatch_on!r} is not an argument of {params}")
        self.impls[backend_name] = Implementation(
            backend_name, fn, frozenset(dtypes), None if devices is None else frozenset(devices), check
        )

    def bind(self, *args, **kwargs) -> tuple[torch.Tensor, tuple]:
        """(the tensor the backend is chosen on, every argument in signature order)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments[self.dispatch_on], tuple(bound.arguments.values())

    def candidates(self, device: torch.device) -> Sequence[str]:
        forced = forced_backends()
        if forced is not None:
            return forced
        return auto_order(self.name, device)

    def select(self, *args, **kwargs) -> Implementation:
        """The implementation to use for this call, or BackendNotSupported with every reason."""
        main, ordered = self.bind(*args, **kwargs)
        return self._select(main, ordered)

    def _select(self, main: torch.Tensor, ordered: tuple) -> Implementation:
        declined: list[str] = []
        for name in self.candidates(main.device):
            impl = self.impls.get(name)
            if impl is None:
                declined.append(f"  {name}: {self.name} has no {name} implementation")
                continue
            reasons = impl.reasons(main, ordered)
            if not reasons:
                return impl
            declined.append(f"  {name}: " + "; ".join(reasons))
        forced = forced_backends()
        how = f"forced backend(s) {', '.join(forced)}" if forced else "every backend"
        raise BackendNotSupported(
            f"effkern.{self.name}: {how} declined a {main.device.type} "
            f"{str(main.dtype).removeprefix('torch.')} {self.dispatch_on} of shape {tuple(main.shape)}:\n"
            + "\n".join(declined)
        )

    def __call__(self, *args, **kwargs):
        main, ordered = self.bind(*args, **kwargs)
        return self._select(main, ordered).fn(*ordered)

    def environment_reasons(self, device: torch.device) -> dict[str, list[str] | None]:
        """For `python -m effkern info`: per backend, None when not implemented, else the
        reasons it cannot run on ``device`` at all ([] means available)."""
        out: dict[str, list[str] | None] = {}
        for name in BACKENDS:
            impl = self.impls.get(name)
            if impl is None:
                out[name] = None
                continue
            reasons = _device_reasons(name, device)
            if impl.devices is not None and device.type not in impl.devices:
                reasons.append(f"device type {device.type!r} not in {sorted(impl.devices)}")
            out[name] = reasons
        return out


def auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    """The backends tried, in order, for ``op`` on ``device`` when none is forced."""
    if device.type == "cuda":
        return _backend_order.gpu_order(op).backends
    return _PRIORITY.get(device.type, _DEFAULT_PRIORITY)


OPS: dict[str, OpDispatcher] = {}


def op_dispatcher(name: str, doc: str = "", dispatch_on: str | None = None) -> OpDispatcher:
    """Create (once) and return the kernel dispatcher of op ``name``; the backend is chosen on
    the argument named ``dispatch_on`` (default: the torch kernel's first argument)."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = OpDispatcher(name, doc, dispatch_on)
    return OPS[name]


class TritonKernel:
    """A backend function ``effkern.triton.<module>.<name>``, imported on first use so that
    importing effkern never requires triton."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.target = f"effkern.triton.{module}.{name}"
        self._fn: Callable | None = None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            self._fn = getattr(importlib.import_module(f"effkern.triton.{self.module}"), self.name)
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<triton kernel {self.target}>"


class CudaKernel:
    """A backend function calling ``torch.ops.effkern.<cuda_op>`` from the compiled library;
    ``adapter(op, *kernel_args)`` maps the kernel arguments onto the C++ op's when they differ."""

    def __init__(self, cuda_op: str, adapter: Callable | None = None):
        self.cuda_op, self.adapter = cuda_op, adapter
        self.target = f"torch.ops.effkern.{cuda_op}"

    def __call__(self, *args):
        op = getattr(torch.ops.effkern, self.cuda_op)
        return op(*args) if self.adapter is None else self.adapter(op, *args)

    def __repr__(self) -> str:
        return f"<cuda kernel {self.target}>"


def triton_impl(module: str, name: str) -> TritonKernel:
    """``"module:function"`` style shorthand kept for the families not yet on the registry."""
    return TritonKernel(module, name)


def cuda_impl(op_name: str, adapter: Callable | None = None) -> CudaKernel:
    return CudaKernel(op_name, adapter)
