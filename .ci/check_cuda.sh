#!/usr/bin/env bash
# CPU CI's check of the CUDA backend (nothing built here can run: there is no GPU):
# 1. every kernel in csrc/SOURCES compiles for sm_80 and sm_90 (+PTX) with nvcc, warnings as errors,
#    through CMakeLists.txt (so the standalone build is exercised too);
# 2. the binding (csrc/binding.cpp) passes a C++ syntax/type check against the installed torch's
#    headers. The CPU torch wheel lacks the CUDA library headers ATen/cuda pulls in (cuBLAS, cuSPARSE,
#    cuSOLVER: ENVIRONMENT.md), so a scratch folder supplies opaque handle typedefs for exactly those;
#    nothing is linked, and the real build happens wherever a CUDA torch is installed;
# 3. benchmarks/cuda_static_report.py --check: zero spills in every kernel, both architectures, read from step 1's
#    object files (--objects: the same device code, not compiled a second time; about 2 of CI's minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build/ci-cuda}
if ! command -v nvcc > /dev/null; then
  echo "check_cuda: nvcc not found; the CUDA compile check cannot run" >&2
  exit 1
fi
mkdir -p "$(dirname "$BUILD")"
cmake -S . -B "$BUILD" -G Ninja -DFUSED_RESNET_WERROR=ON > "$BUILD.cmake.log" 2>&1 || { cat "$BUILD.cmake.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"

STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/c10/cuda/impl"
echo 'typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;' > "$STUB/cusparse.h"
echo 'typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;' > "$STUB/cublas_v2.h"
echo 'typedef struct cublasLtContext* cublasLtHandle_t;' > "$STUB/cublasLt.h"
echo 'typedef struct cusolverDnContext* cusolverDnHandle_t; typedef int cusolverStatus_t;' > "$STUB/cusolverDn.h"
touch "$STUB/cusolver_common.h"
[ -f "$(python -c 'import torch,os;print(os.path.dirname(torch.__file__))')/include/c10/cuda/impl/cuda_cmake_macros.h" ] \
  || echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
TORCH_INC=$(python -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')
PY_INC=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include  # /usr/local/bin/nvcc may be a wrapper script
# -isystem for torch: its own headers warn under -Wextra; ours must not (-Werror).
g++ -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Icsrc/include -isystem "$STUB" \
  $(echo "$TORCH_INC" | sed 's/-I/-isystem /g') -isystem "$CUDA_INC" -isystem "$PY_INC" \
  -DTORCH_EXTENSION_NAME=_C csrc/binding.cpp
# 3. the static report (registers, spills, shared memory, SASS per HMMA): no kernel may spill.
python benchmarks/cuda_static_report.py --check --objects "$BUILD"
echo "check_cuda: kernels compiled for sm_80/sm_90 with -Werror, no spills; binding type-checks against torch's headers"
