// Backward w.r.t. the input: conv dgrad with the recomputed ReLU mask and the BN-backward reductions in
// its epilogue. GEMM view: rows = input pixels (N*H*W), columns = input channels, reduction =
// (tap, output channel). For tap (r, s), input row h receives from output row
// oh = (h + pad - r*dil) / stride when that divides exactly and lands inside [0, OH).
//
// The general path (any dtype, any strides) on the shared gemm_tile; fp16/bf16 channels_last tensors take the
// tensor-core path of conv_dgrad_mma.cu. Epilogue (conv_dgrad.cuh): gm = ga masked by the recomputed ReLU,
// per-column S1 = sum gm, S2 = sum gm*xhat over the tile's rows. With running statistics dx = gm*scale is
// final here; with batch statistics dx needs the global sums, so gm (accumulation dtype) is stored and
// bn_backward_finish.cu completes it.
#include "conv_dgrad.cuh"

namespace fused_resnet {
namespace detail {
namespace {

template <class T>
struct DgradProblem {
  const ConvDgradParams& p;
  const T* gy; const T* w;
  const int* row_n; const int* row_h; const int* row_w;  // shared: input pixel of each tile row
  int n0, kchunks, r = 0, s = 0, k0 = 0;
  bool a_kfast, b_kfast;

  __device__ int steps() const { return p.g.KH * p.g.KW * kchunks; }
  __device__ void begin_step(int step) {
    const int rs = step / kchunks;
    k0 = (step % kchunks) * kTileK;
    r = rs / p.g.KW;
    s = rs % p.g.KW;
  }
  __device__ T a(int row, int k) const {
    const int kout = k0 + k, nb = row_n[row];
    if (nb < 0 || kout >= p.g.K) return zero<T>();
    const int th = row_h[row] + p.g.pad_h - r * p.g.dil_h;
    const int tw = row_w[row] + p.g.pad_w - s * p.g.dil_w;
    if (th < 0 || tw < 0 || th % p.g.stride_h != 0 || tw % p.g.stride_w != 0) return zero<T>();
    const int oh = th / p.g.stride_h, ow = tw / p.g.stride_w;
    if (oh >= p.g.OH || ow >= p.g.OW) return zero<T>();
    return gy[offset4(p.sg, nb, kout, oh, ow)];
  }
  __device__ T b(int k, int col) const {
    const int kout = k0 + k, c = n0 + col;
    if (kout >= p.g.K || c >= p.g.C) return zero<T>();
    return w[offset4(p.sw, kout, c, r, s)];
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads) conv_dgrad_kernel(const ConvDgradParams p) {
  auto& sh = block_shared<ConvShared<T, kTileM>>();
  unsigned char* raw = sh.raw;
  int *row_n = sh.idx_n, *row_h = sh.idx_h, *row_w = sh.idx_w;
  const ConvGeom& g = p.g;
  const int M = g.N * g.H * g.W;
  const int m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;
  decompose_rows(m0, M, g.H, g.W, row_n, row_h, row_w);

  DgradProblem<T> prob{p, static_cast<const T*>(p.gy), static_cast<const T*>(p.w), row_n, row_h, row_w, n0,
                       ceil_div(g.K, kTileK)};
  prob.a_kfast = p.sg[1] <= p.sg[3];
  prob.b_kfast = p.sw[0] <= p.sw[1];  // B[k=out channel][col=in channel]
  gemm_tile<T>(prob, raw);

  dgrad_epilogue<T, kTileM, kTileN, kTileN + kPadC>(p, SharedTiles<T>::c(raw), min(M - m0, kTileM), n0,
                                                    blockIdx.x, row_n, row_h, row_w);
}

}  // namespace
}  // namespace detail

int conv_dgrad_tiles(const ConvDgradParams& p) {
  return detail::conv_dgrad_mma_applies(p) ? detail::conv_dgrad_mma_tiles(p)
                                           : ceil_div(static_cast<int64_t>(p.g.N) * p.g.H * p.g.W, kTileM);
}

cudaError_t conv_dgrad(const ConvDgradParams& p, cudaStream_t stream) {
  if (detail::conv_dgrad_mma_applies(p)) return detail::conv_dgrad_mma(p, stream);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(ceil_div(static_cast<int64_t>(p.g.N) * p.g.H * p.g.W, kTileM), ceil_div(p.g.C, kTileN));
    return detail::launch(detail::conv_dgrad_kernel<T>, grid, dim3(detail::kThreads), stream, p);
  });
}

}  // namespace fused_resnet
