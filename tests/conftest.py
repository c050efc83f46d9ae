"""Shared test setup.

Without a GPU, Triton kernels run under Triton's interpreter; it must be switched on before
triton is imported, hence here. CUDA tests are marked ``cuda`` and skip without a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import effkern  # noqa: E402  (after TRITON_INTERPRET)
from effkern import _dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh, different inputs per case, reproducible."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def backend_reasons(op: str, name: str, device: str = DEVICE) -> list[str] | None:
    """Why backend ``name`` cannot run op ``op`` on ``device`` (None: not implemented)."""
    return _dispatch.OPS[op].environment_reasons(torch.device(device))[name]


def require_backend(op: str, name: str, device: str = DEVICE) -> None:
    reasons = backend_reasons(op, name, device)
    if reasons is None:
        pytest.skip(f"{op} has no {name} backend")
    if reasons:
        pytest.skip(f"{op}/{name} unavailable on {device}: {'; '.join(reasons)}")


# Property-based tests (tests/test_registry.py): a few examples per test in the default suite;
# `python -m pytest tests/test_registry.py --hypothesis-profile=exhaustive` runs many.
from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=6, derandomize=True)
settings.register_profile("exhaustive", max_examples=300)
settings.load_profile("default")
