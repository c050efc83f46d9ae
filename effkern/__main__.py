"""effkern's command line.

    python -m effkern info                 what is built and which backend can run each op
    python -m effkern bench FAMILY [...]   benchmark a kernel family (bench/FAMILY.py: integer, tokens,
                                           binary_hash; without a GPU: the correctness self-check)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

import effkern
from effkern import _cuda_lib, _dispatch


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def info_text() -> str:
    lines = [f"effkern {effkern.__version__}", f"torch {torch.__version__}", f"triton {_version('triton')}"]
    lines.append(f"CUDA (torch build) {torch.version.cuda or 'none: CPU-only torch'}")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        cc = torch.cuda.get_device_capability()
        lines.append(f"GPU {torch.cuda.get_device_name()} (compute capability {cc[0]}.{cc[1]})")
    else:
        device = torch.device("cpu")
        lines.append("GPU none")
    loaded, reason = _cuda_lib.load()
    lines.append(f"CUDA library: {'loaded' if loaded else reason}")
    lines.append(f"CUDA library arch list: {';'.join(_cuda_lib.arch_list()) or 'n/a'}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '') or 'unset'}")
    forced = _dispatch.forced_backends()
    lines.append(f"forced backends (EFFKERN_BACKEND): {','.join(forced) if forced else 'none (auto)'}")
    lines.append("")
    lines.append(f"ops on {device.type} tensors (auto order: {', '.join(_dispatch._PRIORITY.get(device.type, ()))}):")
    width = max(len(name) for name in _dispatch.OPS)
    for name, op in sorted(_dispatch.OPS.items()):
        for i, (backend, reasons) in enumerate(op.environment_reasons(device).items()):
            if reasons is None:
                status = "-  (not implemented)"
            elif reasons:
                status = "unavailable: " + "; ".join(reasons)
            else:
                status = "available"
            lines.append(f"  {name if i == 0 else '':<{width}}  {backend:<7} {status}")
    return "\n".join(lines)


def _bench(argv: list[str]) -> int:
    """``python -m effkern bench FAMILY [options]``: bench/runner.py's command line (the families
    are the bench/<family>.py modules of the checkout; bench/ is not installed)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "runner.py").exists():
        print("effkern bench: the bench/ directory of an effkern checkout is needed "
              f"(looked in {root})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench import runner

    return runner.cli(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m effkern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "bench"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        print(info_text())
        return 0
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
