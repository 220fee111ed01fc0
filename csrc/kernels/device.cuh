// The device primitives the kernels use, in one place: the tensor-core API (WMMA today), block shared
// memory and the kernel launch. The emulated CPU build (csrc/emu, -DFUSED_RESNET_EMULATED) supplies host twins of exactly
// these, so the kernel files are the same bytes in the GPU build and the emulated one; a new primitive
// (cp.async, ldmatrix, mma.sync) enters here and in csrc/emu together.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

namespace fused_resnet {
namespace detail {

// The block's one object of type S in shared memory, the same for all its threads. Kernels declare their
// shared memory through this rather than with __shared__ in their own bodies, so that the emulated build
// can give each block a fresh copy filled with 0xFF bytes (a read before any write shows as NaN / -1).
template <class S>
__device__ __forceinline__ S& block_shared() {
#ifdef FUSED_RESNET_EMULATED
  return fused_resnet_emu::block_shared<S>();
#else
  __shared__ S storage;
  return storage;
#endif
}

// Queues kernel<<<grid, block, 0, stream>>>(args...) and returns the launch error.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
#ifdef FUSED_RESNET_EMULATED
  (void)stream;  // the emulation runs each launch to completion, in order
  return fused_resnet_emu::launch([&] { kernel(args...); }, grid, block);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

}  // namespace detail
}  // namespace fused_resnet
