"""Build: a pure-Python package everywhere; plus the CUDA extension fused_resnet._C where it can build.

The extension builds only when csrc/ holds CUDA sources AND the installed torch is a CUDA build with a
CUDA toolchain (torch.utils.cpp_extension finds CUDA_HOME). Otherwise the install still succeeds and
the Triton and reference backends are what runs; `fused_resnet.available_backends()` says which.
Set FUSED_RESNET_NO_CUDA=1 to skip the extension on purpose.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
reason = None
if os.environ.get("FUSED_RESNET_NO_CUDA") == "1":
    reason = "FUSED_RESNET_NO_CUDA=1"
elif not any(s.endswith(".cu") for s in sources):
    reason = "no CUDA sources in csrc/ yet"
else:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not installed in the build environment (use --no-build-isolation)"
    else:
        if torch.version.cuda is None or CUDA_HOME is None:
            reason = "torch is a CPU build or no CUDA toolchain was found"
        else:
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
            ext_modules.append(CUDAExtension(
                "fused_resnet._C", sources,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))
            cmdclass["build_ext"] = BuildExtension
if reason:
    print(f"fused_resnet: building without the CUDA extension ({reason})")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
