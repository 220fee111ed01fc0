"""Build: a pure-Python package everywhere; plus the CUDA extension fused_resnet._C where it can build.

The extension builds when the installed torch is a CUDA build and a CUDA toolchain is found
(torch.utils.cpp_extension's CUDA_HOME). Otherwise the install still succeeds, prints one line saying
why, and the Triton and reference backends are what runs; `fused_resnet.available_backends()` says so.

Environment:
  FUSED_RESNET_CUDA=1 / 0   force the extension (a missing toolchain is an error) / skip it
  FUSED_RESNET_CUDA_ARCH    arch list, e.g. "9.0" (else TORCH_CUDA_ARCH_LIST, else "8.0;9.0+PTX")
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build)
Sources: csrc/SOURCES (the same list CMakeLists.txt reads) plus the binding, csrc/binding.cpp.
"""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

BUILD_INFO = "_build_info.py"


def source_commit():
    """The commit this tree is at (with -dirty for uncommitted changes), or None outside a checkout."""
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fused_resnet", "csrc"], cwd=HERE,
                               stderr=subprocess.DEVNULL).returncode != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class BuildPyWithInfo(build_py):
    """Writes fused_resnet/_build_info.py into the build (never the source tree): the commit the
    package was built from, for bench headers, results file names and train.json."""

    def run(self):
        super().run()
        path = os.path.join(self.build_lib, "fused_resnet", BUILD_INFO)
        with open(path, "w") as f:
            f.write(f"COMMIT = {source_commit()!r}\n")

HERE = os.path.dirname(os.path.abspath(__file__))


def kernel_sources():
    with open(os.path.join(HERE, "csrc", "SOURCES")) as f:
        return [os.path.join("csrc", line.strip()) for line in f if line.strip() and not line.startswith("#")]


def cuda_extension():
    """(ext_modules, cmdclass, reason): the extension, or empty lists and why not."""
    mode = os.environ.get("FUSED_RESNET_CUDA", "auto")
    if mode == "0":
        return [], {}, "FUSED_RESNET_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable in the build environment (install with --no-build-isolation)"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return [], {}, "no CUDA toolchain found (set CUDA_HOME)"
    arch = os.environ.get("FUSED_RESNET_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    ext = CUDAExtension(
        "fused_resnet._C",
        kernel_sources() + [os.path.join("csrc", "binding.cpp")],
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, reason = cuda_extension()
if reason:
    if os.environ.get("FUSED_RESNET_CUDA") == "1":
        raise SystemExit(f"fused_resnet: FUSED_RESNET_CUDA=1 but the CUDA extension cannot build: {reason}")
    print(f"fused_resnet: installing without the CUDA extension ({reason}); backend='cuda' will be unavailable")

setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithInfo})
