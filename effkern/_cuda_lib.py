"""Loading of the compiled CUDA library effkern/_C*.so (built by setup.py + CMake).

``load()`` registers its ops (``torch.ops.effkern.cuda_*``) with torch once and
never raises; it says whether that worked and why not.  The library itself says
what it registered (its C function ``effkern_registered_ops``, filled in by each
family's registration block, csrc/common/registration.h): it loaded when it
defined at least one op, gave every op it defined a CUDA kernel, and torch sees
them all; ``registered_ops()`` lists them.  ``build_info()`` and ``arch_list()``
read the facts compiled into the library (its C function ``effkern_build_info``):
CUDA archs, CUDA version, the torch it was built against.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))
_LOCK = threading.Lock()
_STATE: tuple[bool, str] | None = None
_LOADED_PATH: str | None = None
_REGISTERED: tuple[str, ...] = ()


def library_path() -> str | None:
    """Path of the built library next to this file (the newest, should a stale build of
    another name linger), or None when not built."""
    paths = glob.glob(os.path.join(_HERE, "_C*.so"))
    return max(paths, key=os.path.getmtime) if paths else None


def _c_text(path: str, symbol: str) -> str | None:
    """The text returned by the library's C function ``symbol`` (None when it has none)."""
    try:
        fn = getattr(ctypes.CDLL(path), symbol)  # the same handle as load_library's
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _registration_problem(path: str) -> tuple[tuple[str, ...], str | None]:
    """The ops the library at ``path`` says it registered, and what is wrong with them (None
    when it registered at least one op, each with its CUDA kernel, all visible to torch)."""
    import torch

    text = _c_text(path, "effkern_registered_ops")
    if text is None:
        return (), f"{path} does not report its ops (no effkern_registered_ops: a stale build?)"
    rec = _parse(text)
    defined = tuple(n for n in rec.get("defined", "").split(",") if n)
    implemented = {n for n in rec.get("implemented", "").split(",") if n}
    if not defined:
        return defined, f"{path} registered no ops"
    no_kernel = [n for n in defined if n not in implemented]
    if no_kernel:
        return defined, f"{path} defined ops without a CUDA kernel: {', '.join(no_kernel)}"
    undefined = sorted(implemented.difference(defined))
    if undefined:
        return defined, f"{path} gave CUDA kernels to ops it did not define: {', '.join(undefined)}"
    unseen = [n for n in defined if not hasattr(torch.ops.effkern, n)]
    if unseen:
        return defined, f"torch does not see the ops {path} registered: {', '.join(unseen)}"
    return defined, None


def _load() -> tuple[bool, str]:
    global _LOADED_PATH, _REGISTERED
    path = library_path()
    if path is None:
        return False, (
            "not built: no effkern/_C*.so (install with nvcc available and "
            "EFFKERN_SKIP_CUDA unset: pip install --no-build-isolation -e .)"
        )
    try:
        import torch

        torch.ops.load_library(path)
        ops, problem = _registration_problem(path)
        if problem is not None:
            return False, f"failed to load: {problem}"
    except Exception as e:  # noqa: BLE001 - reported, never raised
        return False, f"failed to load: {type(e).__name__}: {e}"
    _LOADED_PATH = path
    _REGISTERED = ops
    return True, f"loaded {path}"


def load() -> tuple[bool, str]:
    """Load the CUDA library once; returns (loaded, reason). Never raises."""
    global _STATE
    with _LOCK:
        if _STATE is None:
            _STATE = _load()
        return _STATE


def registered_ops() -> tuple[str, ...]:
    """The ops the loaded library registered, each with its CUDA kernel, in registration order
    (names in ``torch.ops.effkern``, e.g. "cuda_int_softmax"); () when it is not loaded."""
    loaded, _ = load()
    return _REGISTERED if loaded else ()


def build_info() -> dict[str, str]:
    """Facts compiled into the loaded library ({} when it is not loaded): arch_list,
    cuda_version, torch_version (built against), torch_target_version (stable ABI)."""
    loaded, _ = load()
    if not loaded:
        return {}
    text = _c_text(_LOADED_PATH, "effkern_build_info")
    return {} if text is None else _parse(text)


def arch_list() -> list[str]:
    """CUDA archs the library was compiled for, e.g. ["8.0", "9.0a"] ([] if not loaded)."""
    archs = build_info().get("arch_list", "")
    return [a for a in archs.split(";") if a]
