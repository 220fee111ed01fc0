// Backward w.r.t. the weight: dW[k, c, r, s] = sum over output pixels of gy[k] * a[c] at the tap's input
// pixel, with a = relu((x - mean)*scale + beta) rebuilt while gathering (the forward's prologue).
// GEMM view per tap: rows = output channels, columns = input channels, reduction = output pixels. The
// reduction is long and the output small, so pixels are split across blocks (split-K, grid z =
// taps x splits); each split writes its own slab and the slabs are summed afterwards: deterministic,
// no atomics. The general path (any dtype, any strides); fp16/bf16 NHWC tensors take the tensor-core path of
// conv_wgrad_mma.cu.
#include "mma_tile.cuh"

namespace fused_resnet {
namespace detail {
namespace {

template <class T>
struct WgradProblem {
  using Acc = acc_t<T>;
  const ConvWgradParams& p;
  const T* gy; const T* x; const Acc* mean; const Acc* scale; const Acc* beta;
  int* pix_n; int* pix_oh; int* pix_ow;  // shared: output pixel of each reduction index of the step
  int m0, n0, r, s, p_begin, p_end;
  bool a_kfast, b_kfast;

  __device__ int steps() const { return ceil_div(p_end - p_begin, kTileK); }
  __device__ void begin_step(int step) {
    if (threadIdx.x < kTileK) {
      const int q = p_begin + step * kTileK + threadIdx.x;
      const int t = q / p.g.OW;
      pix_n[threadIdx.x] = q < p_end ? t / p.g.OH : -1;
      pix_oh[threadIdx.x] = t % p.g.OH;
      pix_ow[threadIdx.x] = q % p.g.OW;
    }
  }
  __device__ T a(int row, int k) const {  // gy[pixel k][channel m0 + row]
    const int kout = m0 + row, nb = pix_n[k];
    if (nb < 0 || kout >= p.g.K) return zero<T>();
    return gy[offset4(p.sg, nb, kout, pix_oh[k], pix_ow[k])];
  }
  __device__ T b(int k, int col) const {  // a[pixel k][channel n0 + col] at tap (r, s)
    const int c = n0 + col, nb = pix_n[k];
    if (nb < 0 || c >= p.g.C) return zero<T>();
    const int ih = pix_oh[k] * p.g.stride_h - p.g.pad_h + r * p.g.dil_h;
    const int iw = pix_ow[k] * p.g.stride_w - p.g.pad_w + s * p.g.dil_w;
    if (ih < 0 || ih >= p.g.H || iw < 0 || iw >= p.g.W) return zero<T>();
    return Cvt<T>::from(act_nan(bn_affine(to_acc(x[offset4(p.sx, nb, c, ih, iw)]), mean[c], scale[c], beta[c]),
                                p.act_floor));
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads) conv_wgrad_kernel(const ConvWgradParams p) {
  using Acc = acc_t<T>;
  auto& sh = block_shared<ConvShared<T, kTileK>>();
  unsigned char* raw = sh.raw;
  int *pix_n = sh.idx_n, *pix_oh = sh.idx_h, *pix_ow = sh.idx_w;
  const ConvGeom& g = p.g;
  const int P = g.N * g.OH * g.OW;
  const int rs = blockIdx.z % (g.KH * g.KW), sp = blockIdx.z / (g.KH * g.KW);  // taps fastest: L2 shares a split's rows
  const int m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;
  const int p_begin = sp * p.chunk;
  const int p_end = min(p_begin + p.chunk, P);
  WgradProblem<T> prob{p, static_cast<const T*>(p.gy), static_cast<const T*>(p.x),
                       static_cast<const Acc*>(p.mean), static_cast<const Acc*>(p.scale),
                       static_cast<const Acc*>(p.beta),
                       pix_n, pix_oh, pix_ow, m0, n0, rs / g.KW, rs % g.KW, p_begin, p_end};
  prob.a_kfast = p.sg[3] <= p.sg[1];  // NCHW gy: pixels contiguous -> walk the reduction index
  prob.b_kfast = p.sx[3] <= p.sx[1];
  gemm_tile<T>(prob, raw);

  auto c = SharedTiles<T>::c(raw);
  Acc* part = static_cast<Acc*>(p.part) + static_cast<int64_t>(sp) * g.K * g.C * g.KH * g.KW;
  for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
    const int row = idx / kTileN, col = idx % kTileN;
    const int kout = m0 + row, ch = n0 + col;
    if (kout >= g.K || ch >= g.C) continue;
    part[offset4(p.sd, kout, ch, rs / g.KW, rs % g.KW)] = c[row][col];
  }
}

}  // namespace

bool conv_wgrad_mma_applies(const ConvWgradParams& p);
cudaError_t conv_wgrad_mma(const ConvWgradParams& p, cudaStream_t stream);

}  // namespace detail

cudaError_t conv_wgrad(const ConvWgradParams& p, cudaStream_t stream) {
  if (detail::conv_wgrad_mma_applies(p)) return detail::conv_wgrad_mma(p, stream);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(ceil_div(p.g.K, kTileM), ceil_div(p.g.C, kTileN), p.g.KH * p.g.KW * p.split);
    return detail::launch(detail::conv_wgrad_kernel<T>, grid, dim3(detail::kThreads), stream, p);
  });
}

}  // namespace fused_resnet
