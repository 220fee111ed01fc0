// Forward: implicit-GEMM conv with the BN-affine+ReLU prologue and the bias/residual/statistics epilogue.
// The general path (any dtype, any strides) on the shared gemm_tile; fp16/bf16 channels_last tensors take
// the tensor-core path of conv_forward_mma.cu instead.
// GEMM view: rows = output pixels (N*OH*OW), columns = output channels, reduction = (tap, input channel).
// The activation a = relu((x - mean)*scale + beta) is formed while gathering A, is zero where a tap falls into
// padding (the conv pads a, not x), and is rounded to the input dtype as eager's stored activation is.
#include "conv_forward_mma.cuh"

namespace fused_resnet {
namespace detail {
namespace {

template <class T>
struct ForwardProblem {
  using Acc = acc_t<T>;
  const ConvForwardParams& p;
  const T* x; const T* w; const Acc* mean; const Acc* scale; const Acc* beta;
  const int* row_n; const int* row_oh; const int* row_ow;  // shared: output pixel of each tile row
  int n0, cchunks, r = 0, s = 0, c0 = 0;
  bool a_kfast, b_kfast;

  __device__ int steps() const { return p.g.KH * p.g.KW * cchunks; }
  __device__ void begin_step(int step) {
    const int rs = step / cchunks;
    c0 = (step % cchunks) * kTileK;
    r = rs / p.g.KW;
    s = rs % p.g.KW;
  }
  __device__ T a(int row, int k) const {
    const int c = c0 + k, nb = row_n[row];
    if (nb < 0 || c >= p.g.C) return zero<T>();
    const int ih = row_oh[row] * p.g.stride_h - p.g.pad_h + r * p.g.dil_h;
    const int iw = row_ow[row] * p.g.stride_w - p.g.pad_w + s * p.g.dil_w;
    if (ih < 0 || ih >= p.g.H || iw < 0 || iw >= p.g.W) return zero<T>();
    const Acc v = to_acc(x[offset4(p.sx, nb, c, ih, iw)]);
    return Cvt<T>::from(act_nan(bn_affine(v, mean[c], scale[c], beta[c]), p.act_floor));
  }
  __device__ T b(int k, int col) const {
    const int c = c0 + k, kout = n0 + col;
    if (c >= p.g.C || kout >= p.g.K) return zero<T>();
    return w[offset4(p.sw, kout, c, r, s)];
  }
};

// One tile (bx, by) of one conv: the kernel below for its own params, the pair kernel for either of two.
template <class T>
__device__ __forceinline__ void conv_forward_tile(const ConvForwardParams& p, int bx, int by) {
  using Acc = acc_t<T>;
  auto& sh = block_shared<ConvShared<T, kTileM>>();
  unsigned char* raw = sh.raw;
  int *row_n = sh.idx_n, *row_oh = sh.idx_h, *row_ow = sh.idx_w;
  const ConvGeom& g = p.g;
  const int M = g.N * g.OH * g.OW;
  const int m0 = bx * kTileM, n0 = by * kTileN;
  decompose_rows(m0, M, g.OH, g.OW, row_n, row_oh, row_ow);

  ForwardProblem<T> prob{p, static_cast<const T*>(p.x), static_cast<const T*>(p.w),
                         static_cast<const Acc*>(p.mean), static_cast<const Acc*>(p.scale),
                         static_cast<const Acc*>(p.beta),
                         row_n, row_oh, row_ow, n0, ceil_div(g.C, kTileK)};
  prob.a_kfast = p.sx[1] <= p.sx[3];  // channels contiguous (channels_last) -> walk channels
  prob.b_kfast = p.sw[1] <= p.sw[0];
  gemm_tile<T>(prob, raw);

  forward_epilogue<T, kTileM, kTileN, kTileN + kPadC>(
      p, SharedTiles<T>::c(raw), m0, n0, M, [&](int row, int& nb, int& oh, int& ow) {
        nb = row_n[row];
        oh = row_oh[row];
        ow = row_ow[row];
        return nb >= 0;
      });
}

template <class T>
__global__ void __launch_bounds__(kThreads) conv_forward_kernel(const ConvForwardParams p) {
  conv_forward_tile<T>(p, blockIdx.x, blockIdx.y);
}

// The pair: columns [0, a's tiles) are a's, the rest b's (one output grid: blockIdx.x one row tile for both).
template <class T>
__global__ void __launch_bounds__(kThreads) conv_forward_pair_kernel(const ConvForwardPairParams pp) {
  const int tiles_a = ceil_div(pp.a.g.K, kTileN);
  if (static_cast<int>(blockIdx.y) < tiles_a)
    conv_forward_tile<T>(pp.a, blockIdx.x, blockIdx.y);
  else
    conv_forward_tile<T>(pp.b, blockIdx.x, blockIdx.y - tiles_a);
}

}  // namespace
}  // namespace detail

bool conv_forward_pair_applies(const ConvForwardPairParams& pp) {
  const ConvForwardParams &a = pp.a, &b = pp.b;
  return a.dtype == b.dtype && a.x == b.x && a.g.N == b.g.N && a.g.C == b.g.C && a.g.H == b.g.H &&
         a.g.W == b.g.W && a.g.OH == b.g.OH && a.g.OW == b.g.OW && a.sx[0] == b.sx[0] && a.sx[1] == b.sx[1] &&
         a.sx[2] == b.sx[2] && a.sx[3] == b.sx[3] && a.mean == b.mean && a.scale == b.scale && a.beta == b.beta &&
         a.act_floor == b.act_floor && a.tf32 == b.tf32 && a.residual == nullptr && b.residual == nullptr &&
         b.part == nullptr &&
         // fp64 (gradcheck's dtype): the pair's general kernel spilled 40-48 B at 255 registers; two launches
         a.dtype != DType::kF64;
}

// Both convs on the tensor cores, or both on the general kernel: one kernel body for the launch.
static bool pair_on_mma(const ConvForwardPairParams& pp) {
  return detail::conv_forward_mma_applies(pp.a) && detail::conv_forward_mma_applies(pp.b);
}

int conv_forward_pair_tile_rows(const ConvForwardPairParams& pp) {
  return pair_on_mma(pp) ? detail::conv_forward_mma_pair_tile_rows(pp) : kTileM;
}

cudaError_t conv_forward_pair(const ConvForwardPairParams& pp, cudaStream_t stream) {
  if (!conv_forward_pair_applies(pp)) return cudaErrorInvalidValue;
  if (pair_on_mma(pp)) return detail::conv_forward_mma_pair(pp, stream);
  return dispatch_dtype(pp.a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 8) {  // not instantiated (conv_forward_pair_applies)
      return cudaErrorInvalidValue;
    } else {
      const dim3 grid(ceil_div(static_cast<int64_t>(pp.a.g.N) * pp.a.g.OH * pp.a.g.OW, kTileM),
                      ceil_div(pp.a.g.K, kTileN) + ceil_div(pp.b.g.K, kTileN));
      return detail::launch(detail::conv_forward_pair_kernel<T>, grid, dim3(detail::kThreads), stream, pp);
    }
  });
}

int conv_forward_tile_rows(const ConvForwardParams& p) {
  return detail::conv_forward_mma_applies(p) ? detail::conv_forward_mma_tile_rows(p) : kTileM;
}

cudaError_t conv_forward(const ConvForwardParams& p, cudaStream_t stream) {
  if (detail::conv_forward_mma_applies(p)) return detail::conv_forward_mma(p, stream);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(ceil_div(static_cast<int64_t>(p.g.N) * p.g.OH * p.g.OW, kTileM), ceil_div(p.g.K, kTileN));
    return detail::launch(detail::conv_forward_kernel<T>, grid, dim3(detail::kThreads), stream, p);
  });
}

}  // namespace fused_resnet
