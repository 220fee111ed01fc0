// Plain parameter structs and launch entry points of the CUDA kernels.
//
// This header is the whole contract between the kernels (csrc/kernels/*.cu, CUDA headers only) and the
// binding (csrc/binding.cpp, the one file that sees PyTorch). Tensors travel as a data pointer plus
// four strides in elements, in logical NCHW order, so NCHW, channels_last and strided views need no copy.
// "acc" below is the accumulation dtype: double for kF64 tensors, float for every other dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define FUSED_RESNET_HD __host__ __device__
#else
#define FUSED_RESNET_HD
#endif

namespace fused_resnet {

enum class DType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// GEMM tile of the three convolution kernels (rows x columns x reduction slice). The binding sizes the
// per-tile statistics buffers from these, so they live here and nowhere else.
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
// Rows (pixels) reduced by one block of the batch-statistics kernel.
constexpr int kStatsRows = 512;

struct ConvGeom {
  int N, C, H, W;    // input
  int K, OH, OW;     // output channels and size
  int KH, KW;        // filter
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;  // pad = rows/cols of zero activation before index 0
};

// y = conv(relu(x*scale + shift), w) + bias + residual; optional per-tile (mean, M2) of y as stored.
struct ConvForwardParams {
  DType dtype;
  ConvGeom g;
  const void* x; int64_t sx[4];
  const void* w; int64_t sw[4];
  const void* residual; int64_t sr[4];  // dtype, may be null
  void* y; int64_t sy[4];
  const void* scale;  // acc [C]
  const void* shift;  // acc [C]
  const void* bias;   // acc [K], may be null
  void* part;         // acc [2, tiles_m, K]: tile mean, tile M2; null = no statistics
};

// ga = conv_transpose(gy, w); gm = ga * (x*scale+shift > 0); per-tile S1 = sum gm, S2 = sum gm*xhat.
// batch_stats: out (acc) receives gm, finished into dx by bn_backward_finish.
// otherwise:   out (dtype) receives dx = gm * scale directly.
struct ConvDgradParams {
  DType dtype;
  ConvGeom g;
  const void* gy; int64_t sg[4];
  const void* w; int64_t sw[4];
  const void* x; int64_t sx[4];
  const void* scale; const void* shift; const void* mean; const void* invstd;  // acc [C]
  void* out; int64_t so[4];
  void* part;  // acc [2, tiles_m, C]: S1, S2 per tile; null = not needed
  bool batch_stats;
};

// dx = invstd*gamma*(gm - S1/M - xhat*S2/M), elementwise.
struct BnBackwardFinishParams {
  DType dtype;
  int N, C, H, W;
  const void* gm; int64_t sgm[4];  // acc
  const void* x; int64_t sx[4];
  void* dx; int64_t sdx[4];
  const void* mean; const void* invstd; const void* s1; const void* s2;  // acc [C]
  const void* gamma;  // acc [C], may be null
  double inv_count;
};

// Split-K weight gradient: part[split, K, C, KH, KW] (acc) = sum over a chunk of output pixels of
// gy (x) relu(x*scale+shift) at the tap's input pixel.
struct ConvWgradParams {
  DType dtype;
  ConvGeom g;
  const void* gy; int64_t sg[4];
  const void* x; int64_t sx[4];
  const void* scale; const void* shift;  // acc [C]
  void* part;
  int chunk;  // output pixels per split (a multiple of kTileK)
  int split;
};

// Per-tile (mean relative to pivot, M2) of x per channel: part acc [2, tiles, C], tiles of kStatsRows.
struct BatchStatsParams {
  DType dtype;
  int N, C, H, W;
  const void* x; int64_t sx[4];
  const void* pivot;  // acc [C]
  void* part;
};

FUSED_RESNET_HD inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Each returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t conv_forward(const ConvForwardParams& p, cudaStream_t stream);
cudaError_t conv_dgrad(const ConvDgradParams& p, cudaStream_t stream);
cudaError_t bn_backward_finish(const BnBackwardFinishParams& p, cudaStream_t stream);
cudaError_t conv_wgrad(const ConvWgradParams& p, cudaStream_t stream);
cudaError_t batch_stats(const BatchStatsParams& p, cudaStream_t stream);

}  // namespace fused_resnet
