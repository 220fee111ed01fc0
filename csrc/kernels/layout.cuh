// Layout predicates on the binding's logical-NCHW strides (elements), for picking kernel paths.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fused_resnet {
namespace detail {

// Dense NHWC (channels_last) for an [n, c, h, w] tensor with strides s; the stride of a size-1 dimension
// never matters (a 1x1 weight is NHWC in either memory format).
__host__ __device__ __forceinline__ bool nhwc_dense(const int64_t (&s)[4], int64_t n, int64_t c, int64_t h, int64_t w) {
  return s[1] == 1 && (w == 1 || s[3] == c) && (h == 1 || s[2] == c * w) && (n == 1 || s[0] == c * w * h);
}

// Dense NCHW (contiguous), with the same rule for size-1 dimensions.
__host__ __device__ __forceinline__ bool nchw_dense(const int64_t (&s)[4], int64_t n, int64_t c, int64_t h, int64_t w) {
  return (w == 1 || s[3] == 1) && (h == 1 || s[2] == w) && (c == 1 || s[1] == h * w) && (n == 1 || s[0] == c * h * w);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace detail
}  // namespace fused_resnet
