// Batch-statistics BN backward, elementwise: dx = invstd*gamma*(gm - S1/M - xhat*S2/M), once the
// dgrad epilogue's per-tile S1/S2 have been summed. Walks elements in memory order of x (channels
// fastest for channels_last, width fastest for NCHW) so loads and stores coalesce.
#include "device.cuh"
#include "dtype.cuh"

namespace fused_resnet {
namespace detail {
namespace {

template <class T>
__global__ void __launch_bounds__(256) bn_backward_finish_kernel(const BnBackwardFinishParams p) {
  using Acc = acc_t<T>;
  const T* gm = static_cast<const T*>(p.gm);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* invstd = static_cast<const Acc*>(p.invstd);
  const Acc* s1 = static_cast<const Acc*>(p.s1);
  const Acc* s2 = static_cast<const Acc*>(p.s2);
  const Acc* gamma = static_cast<const Acc*>(p.gamma);
  const Acc inv_count = static_cast<Acc>(p.inv_count);
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
    const Acc k = gamma ? invstd[c] * gamma[c] : invstd[c];
    const Acc xhat = (to_acc(x[offset4(p.sx, n, c, h, w)]) - mean[c]) * invstd[c];
    const Acc v = k * (to_acc(gm[offset4(p.sgm, n, c, h, w)]) - s1[c] * inv_count - xhat * (s2[c] * inv_count));
    dx[offset4(p.sdx, n, c, h, w)] = Cvt<T>::from(v);
  }
}

}  // namespace
}  // namespace detail

cudaError_t bn_backward_finish(const BnBackwardFinishParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t total = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
    const int blocks = static_cast<int>(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    return detail::launch(detail::bn_backward_finish_kernel<T>, blocks, dim3(256), stream, p);
  });
}

}  // namespace fused_resnet
