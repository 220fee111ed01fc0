// Emulated <mma.h>: the WMMA API (nvcuda::wmma) for the 16x16x16 half/bfloat16 shapes the kernels use.
//
// The register layout of WMMA fragments is opaque by the API's contract (kernels may not rely on which
// lane holds which element), so the emulation picks one and is strict where the API is:
// - accumulator fragments are distributed: lane L of the warp holds elements 8L..8L+7 of the 16x16 tile
//   in row-major order, and store_matrix_sync writes only the calling lane's elements, so a warp in
//   which some lanes skipped the store leaves holes, as on the GPU;
// - matrix_a / matrix_b fragments are replicated (each lane holds the whole 16x16 operand): the multiply
//   of each lane needs its rows of A and columns of B, and nothing in the kernels indexes them;
// - load/store preconditions of the CUDA C++ guide are checked and abort with the offending value: the
//   pointer 256-bit (32-byte) aligned, ldm a multiple of 16 bytes;
// - mma_sync: exact products (half/bfloat16 products are exact in float) accumulated in float in k order.
//   The hardware's summation order is unspecified; a test that depends on it is wrong on the GPU too.
// Not checked: that all 32 lanes call with the same pointer and ldm (required on the GPU).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float widen(__half v) { return __half2float(v); }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float widen(float v) { return v; }

inline int lane() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear % 32);
}

inline void check(const void* ptr, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    std::fprintf(stderr, "fused_resnet emulation: wmma::%s pointer %p is not 256-bit aligned\n", what, ptr);
    std::abort();
  }
  if ((ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "fused_resnet emulation: wmma::%s ldm %u (%zu-byte elements) is not a multiple of 16 bytes\n",
                 what, ldm, elem);
    std::abort();
  }
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment;

// Operand: the whole 16x16 matrix in every lane, logical [row][col] (A: [m][k], B: [k][n]).
template <class Use, class T, class Layout>
class fragment<Use, 16, 16, 16, T, Layout> {
 public:
  static constexpr int num_elements = 256;
  T x[256];
};

template <>
class fragment<accumulator, 16, 16, 16, float, void> {
 public:
  static constexpr int num_elements = 8;  // this lane's share: row-major elements 8*lane .. 8*lane+7
  float x[8];
};

using acc_fragment = fragment<accumulator, 16, 16, 16, float, void>;

inline void fill_fragment(acc_fragment& f, float v) {
  for (float& e : f.x) e = v;
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  detail::check(ptr, ldm, sizeof(T), "load_matrix_sync");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  static_assert(row || std::is_same_v<Layout, col_major>, "operand fragments need a layout");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = row ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <class T, class LA, class LB>
inline void mma_sync(acc_fragment& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const acc_fragment& c) {
  const int base = detail::lane() * 8;
  float out[8];
  for (int e = 0; e < 8; ++e) {
    const int i = (base + e) / 16, j = (base + e) % 16;
    float acc = c.x[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(detail::widen(a.x[i * 16 + k]), detail::widen(b.x[k * 16 + j]), acc);
    out[e] = acc;
  }
  for (int e = 0; e < 8; ++e) d.x[e] = out[e];
}

inline void store_matrix_sync(float* ptr, const acc_fragment& f, unsigned ldm, layout_t layout) {
  detail::check(ptr, ldm, sizeof(float), "store_matrix_sync");
  const int base = detail::lane() * 8;
  for (int e = 0; e < 8; ++e) {
    const int i = (base + e) / 16, j = (base + e) % 16;
    (layout == mem_row_major ? ptr[i * ldm + j] : ptr[j * ldm + i]) = f.x[e];
  }
}

}  // namespace wmma
}  // namespace nvcuda
