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
// Split-K wgrad: each split's chunk of output pixels is a multiple of this, which every wgrad kernel's
// pixel step divides (kTileK; the tensor-core kernels' 32- and 64-pixel steps).
constexpr int kWgradChunk = 64;
// Rows (pixels) reduced by one block of the batch-statistics kernel.
constexpr int kStatsRows = 512;

struct ConvGeom {
  int N, C, H, W;    // input
  int K, OH, OW;     // output channels and size
  int KH, KW;        // filter
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;  // pad = rows/cols of zero activation before index 0
};

// y = conv(act((x - mean)*scale + beta), w) + bias + residual; optional per-tile (mean, M2) of y as stored.
// act(a) = max(a, act_floor), NaN propagating: act_floor 0 is ReLU (the zero-initialized default), -inf the
// identity (activation="identity": BN -> conv).
struct ConvForwardParams {
  DType dtype;
  ConvGeom g;
  const void* x; int64_t sx[4];
  const void* w; int64_t sw[4];
  const void* residual; int64_t sr[4];  // dtype, may be null
  void* y; int64_t sy[4];
  const void* mean; const void* scale; const void* beta;  // acc [C]: the BN affine
  const void* bias;   // acc [K], may be null
  void* part;         // acc [2, tiles_m, K]: tile mean, tile M2; null = no statistics
  bool tf32;          // fp32: multiply in TF32 on the tensor cores (torch.backends.cudnn.allow_tf32)
  float act_floor;    // 0: ReLU; -inf: identity
};

// Two convs of one activation (a projection block's conv1 and its shortcut) in ONE launch (issue 30): the same
// x, dtype, BN affine and activation, the same output grid (N, OH, OW); their own weights, K, taps, strides,
// padding, dilation, y and bias. The grid's columns are a's column tiles, then b's: each block computes one
// conv's tile exactly as conv_forward's kernel would, so the rows of x the two convs' tiles load are read by
// blocks that run together. Statistics (part) only for a.
struct ConvForwardPairParams {
  ConvForwardParams a, b;
};

// ga = conv_transpose(gy, w) rounded to dtype; gm = ga where NOT ((x - mean)*scale + beta <= 0); per-tile
// S1 = sum gm, S2 = sum gm*xhat. beta is read for that mask only: the identity activation (no mask) passes
// beta = +inf, so every element passes (+inf, or NaN where (x - mean)*scale is -inf or NaN) at no cost here.
// batch_stats: out (dtype) receives gm, finished into dx by bn_backward_finish.
// otherwise:   out (dtype) receives dx = gm * scale directly.
struct ConvDgradParams {
  DType dtype;
  ConvGeom g;
  const void* gy; int64_t sg[4];
  const void* w; int64_t sw[4];
  const void* x; int64_t sx[4];
  const void* mean; const void* scale; const void* beta; const void* invstd;  // acc [C]
  void* out; int64_t so[4];
  void* part;  // acc [tiles_m, 2, C]: S1, S2 per tile; null = not needed
  // The other consumers' gradient w.r.t. the activation (dtype, out's strides), added to this conv's ga
  // (both rounded to dtype, as eager's autograd sums two gradients of one tensor); null = none. May be out
  // itself: each element is read before the same thread writes it.
  const void* addend;
  bool raw;  // store ga (+ addend) itself: no ReLU mask, no BN backward, no sums (a first consumer's share)
  bool batch_stats;
  bool tf32;  // as in ConvForwardParams
};

// dx = invstd*gamma*(gm - S1/M - xhat*S2/M), elementwise.
struct BnBackwardFinishParams {
  DType dtype;
  int N, C, H, W;
  const void* gm; int64_t sgm[4];  // dtype
  const void* x; int64_t sx[4];
  void* dx; int64_t sdx[4];
  const void* mean; const void* invstd; const void* s1; const void* s2;  // acc [C]
  const void* gamma;  // acc [C], may be null
  double inv_count;
};

// Split-K weight gradient: slab `split` of part (acc [split, K*C*KH*KW]) = sum over a chunk of output
// pixels of gy (x) relu((x - mean)*scale + beta) at the tap's input pixel, each slab laid out with dW's strides sd
// (so the sum over slabs lands in dW's own layout).
struct ConvWgradParams {
  DType dtype;
  ConvGeom g;
  const void* gy; int64_t sg[4];
  const void* x; int64_t sx[4];
  const void* mean; const void* scale; const void* beta;  // acc [C]
  void* part; int64_t sd[4];
  int chunk;  // output pixels per split (a multiple of kWgradChunk where the launcher picks it)
  int split;
  bool tf32;  // as in ConvForwardParams
  float act_floor;  // as in ConvForwardParams
};

// Per-tile (mean relative to the pivot x[0, c, 0, 0], M2) of x per channel: part acc [2, tiles, C], tiles
// of kStatsRows.
struct BatchStatsParams {
  DType dtype;
  int N, C, H, W;
  const void* x; int64_t sx[4];
  void* part;
};

// Per channel: (mean, var) merged from per-tile partials (Chan, in double; tile means relative to the pivot
// x[0, c, 0, 0] when x is given) or read from mean_in/var_in; invstd = 1/sqrt(var + eps); scale = invstd *
// gamma; out acc [5, C] = (mean, var, invstd, scale, beta). Running buffers, when given, updated in place:
// EMA with momentum, the variance times `unbiased`.
struct BnFinalizeParams {
  DType dtype;  // of x: the accumulation dtype is double for kF64, float otherwise
  int C;
  const void* part; int tiles; int64_t tile_rows, total;  // acc [2, tiles, C]; null: use mean_in / var_in
  const void* x; int64_t sxc;                             // the pivot's tensor (dtype), may be null
  const void* mean_in; const void* var_in; DType in_dtype;  // [C] (running buffers: any float dtype)
  void* mean_out; void* var_out;                          // acc [C], may be null: the merged moments
  void* out;                                              // acc [5, C]
  const void* gamma; const void* beta; DType param_dtype;  // [C], may be null
  void* running_mean; void* running_var; DType running_dtype;  // [C], may be null
  double momentum, eps, unbiased;
  long long* num_batches_tracked;  // int64 [1], may be null: a BN's counter, incremented once by the launch
};

// Column sums in a fixed row order: a (acc [a_rows, a_len]) -> columns < a_split to a_out0, the rest to
// a_out1 (acc); b (acc [b_rows, b_len]) -> b_out (b_dtype). Either may be absent (len 0).
struct ColumnSumsParams {
  bool f64;  // the accumulation dtype of a and b
  const void* a; int a_rows; int64_t a_len, a_split; void* a_out0; void* a_out1;
  const void* b; int b_rows; int64_t b_len; void* b_out; DType b_dtype;
};

// The end of a post-activation block, forward: y = act(rnd(rnd((z - mean)*scale + beta) + t)) with
// t = rnd((s - s_mean)*s_scale + s_beta) (a BN'd downsample shortcut) or t = s (s_mean null: identity
// shortcut). rnd = round to dtype (eager stores each BN's output, then the sum); the affine is computed as
// written, subtract, multiply, add, each rounded (no contraction); the add in acc; act = NaN-propagating
// ReLU (relu) or the identity.
struct BnAddReluForwardParams {
  DType dtype;
  int N, C, H, W;
  const void* z; int64_t sz[4];
  const void* s; int64_t ss[4];
  void* y; int64_t sy[4];
  const void* mean; const void* scale; const void* beta;        // acc [C]
  const void* s_mean; const void* s_scale; const void* s_beta;  // acc [C]; s_mean null: identity shortcut
  bool relu;
};

// Its backward, two launches at most: pre recomputed as the forward forms it, gm = g where relu passes it
// (NOT pre <= 0, threshold_backward's rule: NaN passes) else 0, or g itself without relu.
// Launch 1 (part non-null): per row group r < bn_add_relu_groups(p), part acc [groups, 3, C] =
//   (sum gm, sum gm*(z - mean)*invstd, sum gm*(s - s_mean)*s_invstd (0 for the identity shortcut)).
// Launch 2: every block first sums the groups' rows for its channels (fixed order: deterministic, no
//   atomics; the blocks of row group 0 write sums acc [3, C] when non-null), then, elementwise:
//   dz (non-null): dz_batch ? invstd*gamma*(gm - S1/M - xhat*S2/M) : gm*scale, in dtype;
//   ds (non-null): identity shortcut: gm; else as dz with the s statistics and S2s (ds_batch).
struct BnAddReluBackwardParams {
  DType dtype;
  int N, C, H, W;
  const void* g; int64_t sg[4];
  const void* z; int64_t sz[4];
  const void* s; int64_t ss[4];
  const void* mean; const void* scale; const void* beta; const void* invstd; const void* gamma;  // acc [C]; gamma may be null
  const void* s_mean; const void* s_scale; const void* s_beta; const void* s_invstd; const void* s_gamma;  // s_mean null: identity
  bool relu;
  void* part;  // acc [groups, 3, C]; null: no sums are needed (launch 2 only)
  void* sums;  // acc [3, C], may be null
  void* dz; int64_t sdz[4]; bool dz_batch;  // dtype, may be null
  void* ds; int64_t sds[4]; bool ds_batch;  // dtype, may be null
  double inv_count;  // 1 / (N*H*W)
};

FUSED_RESNET_HD inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Each returns the launch error (cudaSuccess when the kernel was queued on `stream`).
cudaError_t conv_forward(const ConvForwardParams& p, cudaStream_t stream);
// Rows per tile of conv_forward's statistics partials for these params (the path it takes decides).
int conv_forward_tile_rows(const ConvForwardParams& p);
// One launch for both convs of the pair (a.part null-or-sized by conv_forward_pair_tile_rows); requires
// conv_forward_pair_applies (same x, dtype, affine, activation, output grid; no residual).
cudaError_t conv_forward_pair(const ConvForwardPairParams& p, cudaStream_t stream);
int conv_forward_pair_tile_rows(const ConvForwardPairParams& p);
bool conv_forward_pair_applies(const ConvForwardPairParams& p);
cudaError_t conv_dgrad(const ConvDgradParams& p, cudaStream_t stream);
// Rows of conv_dgrad's [tiles, 2, C] partials for these params (the path it takes decides).
int conv_dgrad_tiles(const ConvDgradParams& p);
cudaError_t bn_backward_finish(const BnBackwardFinishParams& p, cudaStream_t stream);
cudaError_t conv_wgrad(const ConvWgradParams& p, cudaStream_t stream);
cudaError_t batch_stats(const BatchStatsParams& p, cudaStream_t stream);
cudaError_t bn_finalize(const BnFinalizeParams& p, cudaStream_t stream);
cudaError_t column_sums(const ColumnSumsParams& p, cudaStream_t stream);
cudaError_t bn_add_relu_forward(const BnAddReluForwardParams& p, cudaStream_t stream);
// Row groups of bn_add_relu_backward's partials (the rows of part) for these params.
int bn_add_relu_groups(const BnAddReluBackwardParams& p);
cudaError_t bn_add_relu_backward(const BnAddReluBackwardParams& p, cudaStream_t stream);

}  // namespace fused_resnet
