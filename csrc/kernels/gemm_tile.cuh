// The block-level GEMM every convolution kernel shares: a kTileM x kTileN accumulator tile, the
// reduction walked in kTileK slices whose operands a "problem" gathers (implicit GEMM: the conv's
// im2col view is never materialised, and the BN+ReLU prologue is applied as elements are gathered).
//
// Tensor cores (WMMA, 16x16x16, fp32 accumulate) for fp16/bf16; FMA on CUDA cores for fp32/fp64.
// The slice for step s+1 is gathered into registers while step s multiplies out of shared memory, so
// global latency overlaps the math (register double buffering; works for the gather + transform,
// which cp.async's raw copies cannot do without a second pass over shared memory).
#pragma once

#include "device.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fused_resnet's CUDA kernels need sm_80 or newer (bfloat16 tensor cores); set the arch list to 8.0+"
#endif

#include "dtype.cuh"

namespace fused_resnet {
namespace detail {

constexpr int kThreads = 128;  // 4 warps
constexpr int kPadA = 8;       // row padding (elements): keeps WMMA ldm a multiple of 16 bytes and
constexpr int kPadB = 8;       // staggers shared-memory banks across rows
constexpr int kPadC = 4;
constexpr int kLoadsA = kTileM * kTileK / kThreads;  // elements each thread gathers per step
constexpr int kLoadsB = kTileK * kTileN / kThreads;
static_assert(kTileM * kTileK % kThreads == 0 && kTileK * kTileN % kThreads == 0, "tile/threads");

template <class T>
struct Operands {
  T a[kTileM][kTileK + kPadA];
  T b[kTileK][kTileN + kPadB];
};

// Operand tiles and the accumulator tile never live at the same time: one buffer holds either.
template <class T>
struct SharedTiles {
  using Acc = acc_t<T>;
  static constexpr size_t kBytesAB = sizeof(Operands<T>);
  static constexpr size_t kBytesC = sizeof(Acc) * kTileM * (kTileN + kPadC);
  static constexpr size_t kBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;
  __device__ static Operands<T>& ab(unsigned char* raw) { return *reinterpret_cast<Operands<T>*>(raw); }
  __device__ static Acc (*c(unsigned char* raw))[kTileN + kPadC] {
    return reinterpret_cast<Acc(*)[kTileN + kPadC]>(raw);
  }
};

// A conv kernel's shared memory: the operand/accumulator buffer and the (n, h, w) of the tile's Rows pixels.
template <class T, int Rows>
struct ConvShared {
  alignas(128) unsigned char raw[SharedTiles<T>::kBytes];
  int idx_n[Rows], idx_h[Rows], idx_w[Rows];
};

// CUDA-core MMA: each thread owns a 4x8 sub-tile, rows ty + 16i, columns tx + 8j (strided so a warp
// reads consecutive columns of b and broadcasts rows of a).
template <class T>
struct SimtMma {
  using Acc = acc_t<T>;
  Acc acc[4][8];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = Acc(0);
  }
  __device__ void step(const Operands<T>& s) {
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      Acc av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = to_acc(s.a[ty + 16 * i][k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = to_acc(s.b[k][tx + 8 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ void store(Acc (*c)[kTileN + kPadC]) const {
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[ty + 16 * i][tx + 8 * j] = acc[i][j];
  }
};

// Tensor-core MMA: warp w owns the 32x32 quarter (w / 2, w % 2) as 2x2 WMMA fragments.
template <class T>
struct WmmaMma {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ void step(const Operands<T>& s) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &s.a[wm * 32 + i * 16][kk], kTileK + kPadA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &s.b[kk][wn * 32 + j * 16], kTileN + kPadB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(float (*c)[kTileN + kPadC]) const {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kTileN + kPadC,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <class T> struct MmaFor { using type = SimtMma<T>; };
template <> struct MmaFor<__half> { using type = WmmaMma<__half>; };
template <> struct MmaFor<__nv_bfloat16> { using type = WmmaMma<__nv_bfloat16>; };

// Element idx of a thread's share of an R x Kd tile: (row, col). "kfast" walks the reduction index
// fastest (coalesced when the operand's reduction dimension has stride 1), otherwise the row index.
template <int R, int Kd>
__device__ __forceinline__ void tile_coord(int idx, bool kfast, int& row, int& k) {
  if (kfast) { row = idx / Kd; k = idx % Kd; } else { row = idx % R; k = idx / R; }
}

// Pixel index m -> (n, h, w) of an [N, H, W] grid for the block's kTileM rows starting at m0, into
// shared arrays (n = -1 past the end); the gathers index them instead of dividing per element.
// Ends with a barrier.
__device__ __forceinline__ void decompose_rows(int m0, int total, int H, int W, int* row_n, int* row_h,
                                               int* row_w) {
  if (threadIdx.x < kTileM) {
    const int m = m0 + threadIdx.x;
    const int t = m / W;
    row_n[threadIdx.x] = m < total ? t / H : -1;
    row_h[threadIdx.x] = t % H;
    row_w[threadIdx.x] = m % W;
  }
  __syncthreads();
}

// Runs the whole reduction for the block's tile and leaves the accumulator in shared memory (the C
// view of `raw`), followed by a __syncthreads. Prob supplies:
//   int steps() const;                      number of kTileK slices
//   void begin_step(int step);              per-step state, the same in every thread (it may also
//                                           write per-step shared data: a barrier follows)
//   T a(int row, int k) const;              A[row][k] of the current step, prologue applied
//   T b(int k, int col) const;              B[k][col] of the current step
//   bool a_kfast, b_kfast;
// begin_step may write shared memory that a()/b() read: the loop separates the two by barriers.
template <class T, class Prob>
__device__ void gemm_tile(Prob& prob, unsigned char* raw) {
  using Tiles = SharedTiles<T>;
  typename MmaFor<T>::type mma;
  mma.zero();
  Operands<T>& s = Tiles::ab(raw);
  T ra[kLoadsA], rb[kLoadsB];
  const int steps = prob.steps();

  auto gather = [&](int step) {
    prob.begin_step(step);
    __syncthreads();  // per-step shared data written by begin_step is visible
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) {
      int row, k;
      tile_coord<kTileM, kTileK>(threadIdx.x + i * kThreads, prob.a_kfast, row, k);
      ra[i] = prob.a(row, k);
    }
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      int col, k;
      tile_coord<kTileN, kTileK>(threadIdx.x + i * kThreads, prob.b_kfast, col, k);
      rb[i] = prob.b(k, col);
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) {
      int row, k;
      tile_coord<kTileM, kTileK>(threadIdx.x + i * kThreads, prob.a_kfast, row, k);
      s.a[row][k] = ra[i];
    }
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      int col, k;
      tile_coord<kTileN, kTileK>(threadIdx.x + i * kThreads, prob.b_kfast, col, k);
      s.b[k][col] = rb[i];
    }
  };

  if (steps > 0) gather(0);
  for (int step = 0; step < steps; ++step) {
    __syncthreads();  // everyone is done reading the previous slice (and its per-step data)
    stash();
    __syncthreads();
    if (step + 1 < steps) gather(step + 1);  // in flight while the tensor cores work on `step`
    mma.step(s);
  }
  __syncthreads();  // the C view overwrites the operand tiles
  mma.store(Tiles::c(raw));
  __syncthreads();
}

}  // namespace detail
}  // namespace fused_resnet
