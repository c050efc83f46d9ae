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
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")

# Auto-selection order per device type. On CPU the Triton interpreter is a debugging tool,
# never the fastest choice, so it is only used when forced.
_PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
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
    """One backend's implementation of one op.

    ``dtypes`` are the accepted dtypes of the op's main input; ``devices`` the accepted device
    types (None: any); ``check`` returns extra reasons to decline a particular call (shape
    limits and the like), given the same arguments as ``fn``.
    """

    backend: str
    fn: Callable
    dtypes: frozenset[torch.dtype]
    devices: frozenset[str] | None = None
    check: Callable[..., list[str]] | None = None

    def reasons(self, main: torch.Tensor, *args, **kwargs) -> list[str]:
        reasons = _device_reasons(self.backend, main.device)
        if self.devices is not None and main.device.type not in self.devices:
            reasons.append(f"device type {main.device.type!r} not in {sorted(self.devices)}")
        if main.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(main.dtype).removeprefix('torch.')} not in {names}")
        if not reasons and self.check is not None:
            reasons.extend(self.check(main, *args, **kwargs))
        return reasons


@dataclass
class OpDispatcher:
    """The backends of one public op, and the choice between them for each call."""

    name: str
    doc: str = ""
    impls: dict[str, Implementation] = field(default_factory=dict)

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
        self.impls[backend_name] = Implementation(
            backend_name, fn, frozenset(dtypes), None if devices is None else frozenset(devices), check
        )

    def candidates(self, device: torch.device) -> Sequence[str]:
        forced = forced_backends()
        if forced is not None:
            return forced
        return _PRIORITY.get(device.type, _DEFAULT_PRIORITY)

    def select(self, main: torch.Tensor, *args, **kwargs) -> Implementation:
        """The implementation to use for this call, or BackendNotSupported with every reason."""
        declined: list[str] = []
        for name in self.candidates(main.device):
            impl = self.impls.get(name)
            if impl is None:
                declined.append(f"  {name}: {self.name} has no {name} implementation")
                continue
            reasons = impl.reasons(main, *args, **kwargs)
            if not reasons:
                return impl
            declined.append(f"  {name}: " + "; ".join(reasons))
        forced = forced_backends()
        how = f"forced backend(s) {', '.join(forced)}" if forced else "every backend"
        raise BackendNotSupported(
            f"effkern.{self.name}: {how} declined a {main.device.type} "
            f"{str(main.dtype).removeprefix('torch.')} input of shape {tuple(main.shape)}:\n"
            + "\n".join(declined)
        )

    def __call__(self, main: torch.Tensor, *args, **kwargs):
        return self.select(main, *args, **kwargs).fn(main, *args, **kwargs)

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


OPS: dict[str, OpDispatcher] = {}


def op_dispatcher(name: str, doc: str = "") -> OpDispatcher:
    """Create (once) and return the dispatcher of the public op ``name``."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = OpDispatcher(name, doc)
    return OPS[name]


def triton_impl(module: str, name: str) -> Callable:
    """A backend function that imports ``effkern.triton.<module>`` on first use, so that
    importing effkern never requires triton."""

    def call(*args, **kwargs):
        mod = importlib.import_module(f"effkern.triton.{module}")
        return getattr(mod, name)(*args, **kwargs)

    call.__name__ = f"triton.{module}.{name}"
    return call


def cuda_impl(op_name: str) -> Callable:
    """A backend function calling ``torch.ops.effkern.<op_name>`` from the compiled library."""

    def call(*args, **kwargs):
        return getattr(torch.ops.effkern, op_name)(*args, **kwargs)

    call.__name__ = f"torch.ops.effkern.{op_name}"
    return call
