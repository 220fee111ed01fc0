"""Build: a pure-Python package everywhere; plus the CUDA extension fused_resnet._C where it can build.

The extension builds when the installed torch is a CUDA build and a CUDA toolchain is found
(torch.utils.cpp_extension's CUDA_HOME). Otherwise the install still succeeds, prints one line saying
why, and the Triton and reference backends are what runs; `fused_resnet.available_backends()` says so.

Environment:
  FUSED_RESNET_CUDA=1 / 0   force the extension (a missing toolchain is an error) / skip it
  FUSED_RESNET_CUDA_ARCH    arch list, e.g. "9.0" (else TORCH_CUDA_ARCH_LIST, else "8.0;9.0+PTX")
  CUDA_HOME                 the toolkit root (found from nvcc when unset; the CUDA library headers that
                            torch's own headers need come from the nvidia-* wheels a CUDA torch brings)
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


def nvidia_wheel_includes():
    """Include folders of the CUDA library wheels a pip-installed CUDA torch brings (nvidia/*/include):
    torch's own headers include cusparse.h and friends, which a partial toolkit (nvcc only) lacks.
    Found here so that a user never has to set CPATH."""
    import glob

    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    return sorted(d for root in getattr(nvidia, "__path__", []) for d in glob.glob(os.path.join(root, "*", "include")))


def find_toolkit_root():
    """Where CUDA_HOME should point when it is not set: torch guesses the parent of nvcc's bin folder,
    which is wrong when nvcc on PATH is a wrapper (say /usr/local/bin/nvcc exec'ing the real one). The
    first candidate that has include/cuda_runtime_api.h wins; None leaves torch to its own guess."""
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    if nvcc:  # a wrapper script names the real nvcc
        try:
            with open(nvcc, errors="ignore") as f:
                head = f.read(4096)
            candidates += [os.path.dirname(os.path.dirname(w)) for w in head.split() if w.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    return next((c for c in candidates if os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h"))), None)


def cuda_extension():
    """(ext_modules, cmdclass, reason): the extension, or empty lists and why not."""
    mode = os.environ.get("FUSED_RESNET_CUDA", "auto")
    if mode == "0":
        return [], {}, "FUSED_RESNET_CUDA=0"
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        root = find_toolkit_root()
        if root:
            os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension at import, just below
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
    include_dirs = [os.path.join(HERE, "csrc", "include")] + nvidia_wheel_includes()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    ext = CUDAExtension(
        "fused_resnet._C",
        kernel_sources() + [os.path.join("csrc", "binding.cpp")],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, reason = cuda_extension()
if reason:
    if os.environ.get("FUSED_RESNET_CUDA") == "1":
        raise SystemExit(f"fused_resnet: FUSED_RESNET_CUDA=1 but the CUDA extension cannot build: {reason}")
    print(f"fused_resnet: installing without the CUDA extension ({reason}); backend='cuda' will be unavailable")

setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithInfo})
