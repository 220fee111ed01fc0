// What the mma.sync kernels (forward, dgrad, wgrad) share: the cp.async ring's geometry, a warp's
// accumulator fragments and their trip into shared memory, and the ldmatrix loads of operand fragments
// for both ways an operand can sit in shared memory.
//
// Four warps, in a grid each kernel picks; warp tile kWM x kWN = kMI x kNJ mma blocks of 16x8. Fragment
// layouts are the PTX ISA's for m16n8k16 (csrc/emu/emu_primitives.h spells them out): A row-major 16x16,
// B "col" 16x8.
#pragma once

#include "gemm_tile.cuh"

namespace fused_resnet {
namespace detail {

constexpr int kMmaThreads = 128, kMmaBK = 32, kMmaStages = 3;
// Shared row pitch of a slice stored reduction-fastest: 80 bytes keeps every ldmatrix row 16-byte aligned
// and puts the 8 rows of each 8x8 matrix on distinct bank groups.
constexpr int kMmaLd = kMmaBK + 8;

template <int kMI, int kNJ>
struct WarpAcc {
  float v[kMI][kNJ][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) v[i][j][e] = 0.f;
  }
  // Into the tile c (rows, columns of the CTA tile), this warp's block at (row0, col0): stored, or added
  // to what is there.
  template <int LdC>
  __device__ __forceinline__ void store(float (*c)[LdC], int row0, int col0) const {
    visit(c, row0, col0, [](float& dst, float val) { dst = val; });
  }
  template <int LdC>
  __device__ __forceinline__ void add_to(float (*c)[LdC], int row0, int col0) const {
    visit(c, row0, col0, [](float& dst, float val) { dst += val; });
  }
  template <int LdC, class Op>
  __device__ __forceinline__ void visit(float (*c)[LdC], int row0, int col0, Op op) const {
    const int lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNJ; ++j) {
        const int row = row0 + i * 16 + gq, col = col0 + j * 8 + 2 * tq;
        op(c[row][col], v[i][j][0]);
        op(c[row][col + 1], v[i][j][1]);
        op(c[row + 8][col], v[i][j][2]);
        op(c[row + 8][col + 1], v[i][j][3]);
      }
  }
};

// A fragment (16 rows x 16 of the reduction) from a tile stored [row][k] (k fastest): &a[row0][kk], pitch Ld.
template <class T, int Ld>
__device__ __forceinline__ void load_a_mk(uint32_t (&f)[4], const T (*a)[Ld], int row0, int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(f, &a[row0 + lane % 16][kk + (lane / 16) * 8]);
}

// The same fragment from a tile stored [k][row] (rows fastest): the transposing ldmatrix.
template <class T, int Ld>
__device__ __forceinline__ void load_a_km(uint32_t (&f)[4], const T (*a)[Ld], int row0, int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(f, &a[kk + (lane / 16) * 8 + lane % 8][row0 + ((lane / 8) % 2) * 8]);
}

// Two B fragments (columns col0.. col0+15, 16 of the reduction) from a tile stored [col][k] (k fastest).
template <class T, int Ld>
__device__ __forceinline__ void load_b_nk(uint32_t (&f0)[2], uint32_t (&f1)[2], const T (*b)[Ld], int col0, int kk) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  ldmatrix_x4(r, &b[col0 + (lane / 16) * 8 + lane % 8][kk + ((lane / 8) % 2) * 8]);
  f0[0] = r[0]; f0[1] = r[1]; f1[0] = r[2]; f1[1] = r[3];
}

// The same two fragments from a tile stored [k][col] (columns fastest): the transposing ldmatrix.
template <class T, int Ld>
__device__ __forceinline__ void load_b_kn(uint32_t (&f0)[2], uint32_t (&f1)[2], const T (*b)[Ld], int col0, int kk) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  ldmatrix_x4_trans(r, &b[kk + ((lane / 8) % 2) * 8 + lane % 8][col0 + (lane / 16) * 8]);
  f0[0] = r[0]; f0[1] = r[1]; f1[0] = r[2]; f1[1] = r[3];
}

// Two adjacent values of one fragment register: the BN affine + ReLU, rounded to T (the activation eager
// stores) and packed, then ANDed with `keep` (0xffff per half that is not padding). Element h has channel
// affine (m[h], s[h], b[h]).
template <class T>
__device__ __forceinline__ uint32_t bn_relu_pair(uint32_t raw, uint32_t keep, const float (&m)[2], const float (&s)[2],
                                                 const float (&b)[2]) {
  T v[2];
  memcpy(v, &raw, 4);
  return pack2<T>(relu_nan(bn_affine(to_acc(v[0]), m[0], s[0], b[0])),
                  relu_nan(bn_affine(to_acc(v[1]), m[1], s[1], b[1]))) & keep;
}

// The keep mask of bn_relu_pair for halves (lo, hi).
__device__ __forceinline__ uint32_t keep_mask(bool lo, bool hi) { return (lo ? 0xffffu : 0u) | (hi ? 0xffff0000u : 0u); }

// Dense NHWC in logical-NCHW strides s of an [n, c, h, w] tensor (the stride of a size-1 dimension never
// matters, so a 1x1 weight is NHWC in either memory format).
__host__ __forceinline__ bool nhwc_dense(const int64_t (&s)[4], int64_t n, int64_t c, int64_t h, int64_t w) {
  return s[1] == 1 && (w == 1 || s[3] == c) && (h == 1 || s[2] == c * w) && (n == 1 || s[0] == c * w * h);
}

__host__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace detail
}  // namespace fused_resnet
