// Batch-statistics BN backward, elementwise: dx = invstd*gamma*(gm - S1/M - xhat*S2/M), once the
// dgrad epilogue's per-tile S1/S2 have been summed. Walks elements in memory order of x (channels
// fastest for channels_last, width fastest for NCHW) so loads and stores coalesce; where x, gm and dx are
// dense in one layout, by plain offset with the channel counted along (no per-element division).
#include <algorithm>

#include "device.cuh"
#include "dtype.cuh"
#include "layout.cuh"

namespace fused_resnet {
namespace detail {
namespace {

// dx of one element of channel c from its x and gm.
template <class T>
__device__ __forceinline__ T finish_one(const BnBackwardFinishParams& p, int c, T xv, T gmv) {
  using Acc = acc_t<T>;
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* invstd = static_cast<const Acc*>(p.invstd);
  const Acc* gamma = static_cast<const Acc*>(p.gamma);
  const Acc* s1 = static_cast<const Acc*>(p.s1);
  const Acc* s2 = static_cast<const Acc*>(p.s2);
  const Acc inv_count = static_cast<Acc>(p.inv_count);
  const Acc k = gamma ? invstd[c] * gamma[c] : invstd[c];
  const Acc xhat = (to_acc(xv) - mean[c]) * invstd[c];
  return Cvt<T>::from(k * (to_acc(gmv) - s1[c] * inv_count - xhat * (s2[c] * inv_count)));
}

// Any strides: each element's (n, c, h, w) decomposed from its index.
template <class T>
__global__ void __launch_bounds__(256) bn_backward_finish_kernel(const BnBackwardFinishParams p) {
  const T* gm = static_cast<const T*>(p.gm);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  const bool cfast = p.sx[1] <= p.sx[3];
  const int64_t total = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int n, c, h, w;
    int64_t t = i;
    if (cfast) {
      c = static_cast<int>(t % p.C); t /= p.C;
      w = static_cast<int>(t % p.W); t /= p.W;
      h = static_cast<int>(t % p.H); n = static_cast<int>(t / p.H);
    } else {
      w = static_cast<int>(t % p.W); t /= p.W;
      h = static_cast<int>(t % p.H); t /= p.H;
      c = static_cast<int>(t % p.C); n = static_cast<int>(t / p.C);
    }
    dx[offset4(p.sdx, n, c, h, w)] = finish_one(p, c, x[offset4(p.sx, n, c, h, w)], gm[offset4(p.sgm, n, c, h, w)]);
  }
}

// x, gm and dx dense in one memory format (what the launchers allocate): element i sits at offset i in all
// three, and its channel advances with i by a constant per grid stride -- one division per thread, not
// four 64-bit ones per element. inner = elements per channel step: 1 (channels_last), H*W (NCHW).
template <class T>
__global__ void __launch_bounds__(256) bn_backward_finish_dense_kernel(const BnBackwardFinishParams p, int64_t inner) {
  const T* gm = static_cast<const T*>(p.gm);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  const int64_t total = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  // i = (outer * C + c) * inner + r; the stride moves (c, r) by (d_c, d_r) plus carries.
  int64_t r = i % inner;
  int c = static_cast<int>((i / inner) % p.C);
  const int64_t d_r = stride % inner;
  const int d_c = static_cast<int>((stride / inner) % p.C);
  for (; i < total; i += stride) {
    dx[i] = finish_one(p, c, x[i], gm[i]);
    r += d_r;
    const bool carry = r >= inner;
    r -= carry ? inner : 0;
    c += d_c + (carry ? 1 : 0);
    c -= c >= p.C ? p.C : 0;
  }
}

}  // namespace
}  // namespace detail

cudaError_t bn_backward_finish(const BnBackwardFinishParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t total = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
    const int blocks = static_cast<int>(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    const bool same = std::equal(p.sx, p.sx + 4, p.sgm) && std::equal(p.sx, p.sx + 4, p.sdx);
    if (same && detail::nhwc_dense(p.sx, p.N, p.C, p.H, p.W))
      return detail::launch(detail::bn_backward_finish_dense_kernel<T>, blocks, dim3(256), stream, p, int64_t(1));
    if (same && detail::nchw_dense(p.sx, p.N, p.C, p.H, p.W))
      return detail::launch(detail::bn_backward_finish_dense_kernel<T>, blocks, dim3(256), stream, p,
                            static_cast<int64_t>(p.H) * p.W);
    return detail::launch(detail::bn_backward_finish_kernel<T>, blocks, dim3(256), stream, p);
  });
}

}  // namespace fused_resnet
