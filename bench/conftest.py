"""pytest configuration for the GPU benchmarks in bench/ (``pytest bench/``).

The CI test command is ``pytest tests/``, which never collects this directory; the benchmark
module skips itself without CUDA, so ``pytest bench/`` on a CPU machine reports a clean skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` and `effkern` importable from a plain checkout
    sys.path.insert(0, str(ROOT))


def pytest_report_header(config):
    try:
        import torch
    except ImportError:
        return "effkern bench: torch not installed"
    if not torch.cuda.is_available():
        return "effkern bench: no CUDA device, GPU benchmarks will be skipped"
    p = torch.cuda.get_device_properties(0)
    return f"effkern bench: {p.name} (cc {p.major}.{p.minor}), torch {torch.__version__}, CUDA {torch.version.cuda}"
