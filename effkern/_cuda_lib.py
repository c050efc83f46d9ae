"""Loading of the compiled CUDA library effkern/_C*.so (built by setup.py + CMake).

``load()`` registers its ops (``torch.ops.effkern.cuda_*``) with torch once and
never raises; it says whether that worked and why not.  ``build_info()`` and
``arch_list()`` read the facts compiled into the library (its C function
``effkern_build_info``): CUDA archs, CUDA version, the torch it was built against.
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


def library_path() -> str | None:
    """Path of the built library next to this file (the newest, should a stale build of
    another name linger), or None when not built."""
    paths = glob.glob(os.path.join(_HERE, "_C*.so"))
    return max(paths, key=os.path.getmtime) if paths else None


def _load() -> tuple[bool, str]:
    global _LOADED_PATH
    path = library_path()
    if path is None:
        return False, (
            "not built: no effkern/_C*.so (install with nvcc available and "
            "EFFKERN_SKIP_CUDA unset: pip install --no-build-isolation -e .)"
        )
    try:
        import torch

        torch.ops.load_library(path)
        if not hasattr(torch.ops.effkern, "cuda_int_softmax"):
            return False, f"failed to load: {path} registered no effkern::cuda_int_softmax"
    except Exception as e:  # noqa: BLE001 - reported, never raised
        return False, f"failed to load: {type(e).__name__}: {e}"
    _LOADED_PATH = path
    return True, f"loaded {path}"


def load() -> tuple[bool, str]:
    """Load the CUDA library once; returns (loaded, reason). Never raises."""
    global _STATE
    with _LOCK:
        if _STATE is None:
            _STATE = _load()
        return _STATE


def build_info() -> dict[str, str]:
    """Facts compiled into the loaded library ({} when it is not loaded): arch_list,
    cuda_version, torch_version (built against), torch_target_version (stable ABI)."""
    loaded, _ = load()
    if not loaded:
        return {}
    try:
        fn = ctypes.CDLL(_LOADED_PATH).effkern_build_info  # same handle as load_library's
        fn.restype = ctypes.c_char_p
        text = fn().decode()
    except Exception:  # noqa: BLE001 - an older library without the symbol
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def arch_list() -> list[str]:
    """CUDA archs the library was compiled for, e.g. ["8.0", "9.0a"] ([] if not loaded)."""
    archs = build_info().get("arch_list", "")
    return [a for a in archs.split(";") if a]
