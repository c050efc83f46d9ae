"""effkern: CUDA/Triton kernels for efficient Vision Transformers.

    pip install --no-build-isolation -e .        # builds effkern/_C*.so when nvcc is found
    EFFKERN_SKIP_CUDA=1 pip install ...          # pure Python (Triton / torch backends only)

The CUDA library is built by CMakeLists.txt (ninja, parallel) against the torch
already installed, hence --no-build-isolation.  TORCH_CUDA_ARCH_LIST picks the
archs (default "8.0;9.0a"); MAX_JOBS caps parallel compile jobs.  When nvcc
exists a failed build fails the install.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    homes = [h for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    candidates = [os.path.join(h, "bin", "nvcc") for h in homes]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


class CMakeBuild(build_ext):
    """Builds the one CMake target into the path setuptools expects for effkern._C."""

    def build_extension(self, ext):
        if shutil.which("cmake") is None:
            raise RuntimeError("effkern: nvcc found but cmake is missing (pip install cmake ninja), "
                               "or set EFFKERN_SKIP_CUDA=1 to skip the CUDA library")
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cfg = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            f"-DEFFKERN_OUTPUT_DIR={os.path.dirname(out)}",
            f"-DEFFKERN_OUTPUT_NAME={os.path.basename(out)}",
        ]  # fmt: skip
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"effkern: building the CUDA library with {NVCC}", flush=True)
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", build_dir, "--parallel", jobs], check=True)


NVCC = find_nvcc()
SKIP = os.environ.get("EFFKERN_SKIP_CUDA", "0") == "1"
# pip's default build isolation hides the installed torch, whose headers the library needs.
# Asked the way CMakeLists.txt asks it: in a child interpreter with this environment.
TORCH_VISIBLE = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
if SKIP or NVCC is None or not TORCH_VISIBLE:
    why = ("EFFKERN_SKIP_CUDA=1" if SKIP else "nvcc not found (set CUDA_HOME)" if NVCC is None
           else "torch is not importable while building; install with --no-build-isolation to build it")
    print(f"effkern: skipping the CUDA library ({why}); Triton/torch backends only", flush=True)
    ext_modules = []
else:
    ext_modules = [Extension("effkern._C", sources=[])]

setup(
    name="effkern",
    version="0.1.0",
    description="CUDA/Triton kernels for efficient Vision Transformers, as PyTorch ops",
    packages=find_packages(include=["effkern*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.10", "triton; platform_system == 'Linux'", "numpy"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
