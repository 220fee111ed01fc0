// What the mma.sync kernels (forward, dgrad, wgrad) share: the cp.async ring's geometry, a warp's
// accumulator fragments and their trip into shared memory, and the ldmatrix loads of operand fragments
// for both ways an operand can sit in shared memory.
//
// Four warps, in a grid each kernel picks; warp tile kWM x kWN = kMI x kNJ mma blocks of 16x8. Fragment
// layouts are the PTX ISA's for m16n8k16 (16-bit) and m16n8k8 (TF32) (csrc/emu/emu_primitives.h spells
// them out): A row-major, B "col".
#pragma once

#include <type_traits>

#include "gemm_tile.cuh"
#include "layout.cuh"

namespace fused_resnet {
namespace detail {

constexpr int kMmaThreads = 128, kMmaStages = 3;

// Element geometry, the same in bytes for every T: a 64-byte reduction slice per stage, 16-byte copies,
// 32 bytes of the reduction per mma -- m16n8k16 for fp16/bf16, m16n8k8 TF32 for float (the element of an
// 8x8 b16 ldmatrix matrix is then half a float, so non-transposing ldmatrix still delivers TF32 fragments).
template <class T>
struct MmaElem {
  static constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte copy
  static constexpr int kBK = 4 * kVec;         // elements per stage's slice
  static constexpr int kK = 2 * kVec;          // reduction elements per mma
  static constexpr int kPer = 4 / sizeof(T);   // elements per fragment register
  // Row pitch of a slice stored reduction-fastest: 80 bytes keeps every ldmatrix row 16-byte aligned and
  // puts the 8 rows of each 8x8 matrix on distinct bank groups.
  static constexpr int kLd = kBK + kVec;
};

// The reduction index (within the mma's kK) of element h of a fragment register, for the lane's quad
// position tq: half_sel 0 for A registers 0-1 and B register 0, 1 for A registers 2-3 and B register 1.
template <class T>
__device__ __forceinline__ int frag_k(int tq, int half_sel, int h) {
  return MmaElem<T>::kPer * tq + (MmaElem<T>::kK / 2) * half_sel + h;
}

template <class T>
__device__ __forceinline__ void mma_step(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (sizeof(T) == 2)
    mma_16816<T>(d, a, b);
  else
    mma_1688_tf32(d, a, b);
}

// A raw operand register as the mma takes it: 16-bit pairs as they are, a float rounded to TF32.
template <class T>
__device__ __forceinline__ uint32_t raw_operand(uint32_t r) {
  if constexpr (sizeof(T) == 2) {
    return r;
  } else {
    float f;
    memcpy(&f, &r, 4);
    return cvt_tf32(f);
  }
}

// The cp.async ring every mma kernel runs: issue(stage) queues one step's copies, kMmaStages - 1 steps ahead,
// one commit group per step (empty past the end, so the wait count stays uniform); compute(stage) runs
// once that step's copies have landed for every thread and no thread still reads the stage about to be
// refilled. Returns drained and synchronized: the caller may reuse the ring's shared memory.
template <class Issue, class Compute>
__device__ __forceinline__ void run_ring(int steps, Issue&& issue, Compute&& compute) {
#pragma unroll
  for (int st = 0; st < kMmaStages - 1; ++st) {
    if (st < steps) issue(st);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kMmaStages - 2>();  // this thread's copies of `step` have landed
    __syncthreads();                  // everyone's have, and everyone is done with the stage refilled next
    if (step + kMmaStages - 1 < steps) issue((step + kMmaStages - 1) % kMmaStages);
    cp_async_commit();
    compute(step % kMmaStages);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// Each register of a raw (untransformed) fragment as the mma takes it (raw_operand).
template <class T, int N>
__device__ __forceinline__ void raw_operands(uint32_t (&f)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) f[e] = raw_operand<T>(f[e]);
}

template <int kMI, int kNJ>
struct WarpAcc {
  float v[kMI][kNJ][4];
  // The warp tile's products of one kK slice: every A fragment with every B fragment.
  template <class T>
  __device__ __forceinline__ void mma(const uint32_t (&fa)[kMI][4], const uint32_t (&fb)[kNJ][2]) {
#pragma unroll
    for (int i = 0; i < kMI; ++i) mma_row<T>(i, fa[i], fb);
  }
  // Row block i's products: one A fragment with every B fragment (a caller that builds its A fragments one
  // at a time keeps one alive, not kMI).
  template <class T>
  __device__ __forceinline__ void mma_row(int i, const uint32_t (&fa)[4], const uint32_t (&fb)[kNJ][2]) {
#pragma unroll
    for (int j = 0; j < kNJ; ++j) mma_step<T>(v[i][j], fa, fb[j]);
  }
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

// This lane's address for load_a_mk, in elements from &a[row0][kk]. A kernel that adds it to its stage's
// first element once per step and each fragment's (row0, kk) as a constant saves the per-step address
// arithmetic that ptxas otherwise redoes from the lane index (the forward: 5-29 instructions per step).
template <class T, int Ld>
__device__ __forceinline__ int a_mk_lane_offset() {
  const int lane = threadIdx.x % 32;
  return (lane % 16) * Ld + (lane / 16) * MmaElem<T>::kVec;
}

// A fragment (16 rows x kK of the reduction, raw bits) from a tile stored [row][k] (k fastest): &a[row0][kk].
template <class T, int Ld>
__device__ __forceinline__ void load_a_mk(uint32_t (&f)[4], const T (*a)[Ld], int row0, int kk) {
  ldmatrix_x4(f, &a[row0][kk] + a_mk_lane_offset<T, Ld>());
}

// The bits of one 32-bit element of shared memory.
template <class T>
__device__ __forceinline__ uint32_t bits32(const T& v) {
  static_assert(sizeof(T) == 4, "32-bit elements");
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// The same fragment from a tile stored [k][row] (rows fastest): the transposing ldmatrix for 16-bit
// elements; for float (which ldmatrix cannot transpose) one 32-bit load per register. As a_km_lane_offset
// (this lane's first element, from &a[kk][row0]) and load_a_km_at (the loads from there), so that a kernel
// keeps the offset across its main loop as the forward keeps a_mk_lane_offset.
template <class T, int Ld>
__device__ __forceinline__ int a_km_lane_offset() {
  const int lane = threadIdx.x % 32;
  if constexpr (sizeof(T) == 2)
    return ((lane / 16) * 8 + lane % 8) * Ld + ((lane / 8) % 2) * 8;
  else
    return (lane % 4) * Ld + lane / 4;
}
template <class T, int Ld>
__device__ __forceinline__ void load_a_km_at(uint32_t (&f)[4], const T* at) {
  if constexpr (sizeof(T) == 2) {
    ldmatrix_x4_trans(f, at);
  } else {
    f[0] = bits32(at[0]);
    f[1] = bits32(at[8]);
    f[2] = bits32(at[4 * Ld]);
    f[3] = bits32(at[4 * Ld + 8]);
  }
}

// Two B fragments (columns col0.. col0+15, kK of the reduction, raw bits) from a tile stored [col][k].
template <class T, int Ld>
__device__ __forceinline__ void load_b_nk(uint32_t (&f0)[2], uint32_t (&f1)[2], const T (*b)[Ld], int col0, int kk) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  ldmatrix_x4(r, &b[col0 + (lane / 16) * 8 + lane % 8][kk + ((lane / 8) % 2) * MmaElem<T>::kVec]);
  f0[0] = r[0]; f0[1] = r[1]; f1[0] = r[2]; f1[1] = r[3];
}

// The same two fragments from a tile stored [k][col] (columns fastest): the transposing ldmatrix for
// 16-bit elements, one 32-bit load per register for float; split in two as the [k][row] A fragment is
// (b_kn_lane_offset from &b[kk][col0], load_b_kn_at), load_b_kn putting them together.
template <class T, int Ld>
__device__ __forceinline__ int b_kn_lane_offset() {
  const int lane = threadIdx.x % 32;
  if constexpr (sizeof(T) == 2)
    return (((lane / 8) % 2) * 8 + lane % 8) * Ld + (lane / 16) * 8;
  else
    return (lane % 4) * Ld + lane / 4;
}
template <class T, int Ld>
__device__ __forceinline__ void load_b_kn_at(uint32_t (&f0)[2], uint32_t (&f1)[2], const T* at) {
  if constexpr (sizeof(T) == 2) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, at);
    f0[0] = r[0]; f0[1] = r[1]; f1[0] = r[2]; f1[1] = r[3];
  } else {
    f0[0] = bits32(at[0]);
    f0[1] = bits32(at[4 * Ld]);
    f1[0] = bits32(at[8]);
    f1[1] = bits32(at[4 * Ld + 8]);
  }
}
template <class T, int Ld>
__device__ __forceinline__ void load_b_kn(uint32_t (&f0)[2], uint32_t (&f1)[2], const T (*b)[Ld], int col0, int kk) {
  load_b_kn_at<T, Ld>(f0, f1, &b[kk][col0] + b_kn_lane_offset<T, Ld>());
}

// The values of one fragment register (two 16-bit ones, or one float): the BN affine + ReLU, rounded to T
// (the activation eager stores) and packed -- for float, then to TF32 as the mma takes it -- and ANDed
// with `keep` (all ones per element that is not padding). Element h has channel affine (m[h], s[h], b[h]).
// ReLU only: with the activation's floor as a kernel parameter (act_nan) ptxas no longer folds it into a
// max, and the loops grew by 1-3 SASS per HMMA (bf16 sm_90 wgrad 64x64 258 -> 354 per step), so the
// identity activation takes the WMMA/FMA kernels instead (conv_forward_mma_applies / conv_wgrad_mma_applies).
template <class T>
__device__ __forceinline__ uint32_t bn_relu_reg(uint32_t raw, uint32_t keep, const float (&m)[MmaElem<T>::kPer],
                                                const float (&s)[MmaElem<T>::kPer], const float (&b)[MmaElem<T>::kPer]) {
  T v[MmaElem<T>::kPer];
  memcpy(v, &raw, 4);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // A bf16 is a float's upper half: the pair widens with a shift and a mask (no byte permute per value).
    const uint32_t lo_bits = raw << 16, hi_bits = raw & 0xffff0000u;
    float lo, hi;
    memcpy(&lo, &lo_bits, 4);
    memcpy(&hi, &hi_bits, 4);
    return pack2<T>(relu_nan(bn_affine(lo, m[0], s[0], b[0])), relu_nan(bn_affine(hi, m[1], s[1], b[1]))) & keep;
  } else if constexpr (sizeof(T) == 2) {
    return pack2<T>(relu_nan(bn_affine(to_acc(v[0]), m[0], s[0], b[0])),
                    relu_nan(bn_affine(to_acc(v[1]), m[1], s[1], b[1]))) & keep;
  } else {
    return cvt_tf32(relu_nan(bn_affine(v[0], m[0], s[0], b[0]))) & keep;
  }
}

// A per-element keep flag stored in shared memory as the element's width of all ones or zeros: a fragment
// register's consecutive elements then read their keep mask (for bn_relu_reg) with one 32-bit load.
template <class T>
using ElemMask = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
template <class T>
__device__ __forceinline__ uint32_t keep_bits(const ElemMask<T>* first) {
  uint32_t bits;
  memcpy(&bits, first, 4);
  return bits;
}

// The dtypes the mma kernels take: fp16, bf16, and fp32 when TF32 is allowed (torch.backends.cudnn.allow_tf32).
__host__ __forceinline__ bool mma_dtype(DType d, bool tf32) {
  return d == DType::kF16 || d == DType::kBF16 || (d == DType::kF32 && tf32);
}
// Elements per 16-byte copy: the channel-count multiple the kernels' copies need.
__host__ __forceinline__ int mma_vec(DType d) { return d == DType::kF32 ? 4 : 8; }

// f(T{}) for the mma dtypes.
template <class F>
__host__ auto dispatch_mma_dtype(DType d, F&& f) {
  if (d == DType::kBF16) return f(__nv_bfloat16{});
  if (d == DType::kF16) return f(__half{});
  return f(float{});
}

}  // namespace detail
}  // namespace fused_resnet
