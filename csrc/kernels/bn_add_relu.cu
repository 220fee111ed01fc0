// The end of a post-activation block (torchvision/timm ResNet): y = relu(bn3(z) + shortcut), the shortcut
// being the block input s or bn_d(s), in one elementwise launch; and its backward in two: a reduction of
// the BN-backward sums into per-row-group partials, then the elementwise pass whose blocks first finish
// those sums for their channels (fixed order, no atomics) and write dz / ds.
//
// Layout: blocks take a slice of channels x a range of rows (pixels, n-h-w order). Where channels are the
// tensor's fastest dimension (channels_last) a warp's 32 lanes take 32 consecutive channels and the 8 warps
// step through the rows; otherwise (NCHW) one channel per block and its 256 threads walk consecutive
// pixels (width fastest). Either way a warp's accesses are consecutive elements. Each thread's pixel
// advances by a fixed step with carries (no division per element); where every tensor shares one set of
// strides one offset serves all, and where the pixels are also evenly spaced (channels_last dense) the
// offset is advanced by one add.
#include <algorithm>

#include "device.cuh"
#include "dtype.cuh"

namespace fused_resnet {
namespace detail {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGroups = 64;        // row groups of the reduction's partials (the rows launch 2 sums)
constexpr int kGroupRowsMin = 1024;   // fewest rows per group, so a small tensor takes few groups
constexpr int kRowsChannelsFast = 1024;  // rows per elementwise block: channels fastest (32 channels)...
constexpr int kRowsPixelsFast = 2048;   // ... pixels fastest (one channel)
// A backward elementwise block first reads groups x 3 x its channels of partials (at most 64 x 3 x 32, from
// L2): against 1024 x 32 elements (three loads and up to two stores each), a few percent.

// How the element offsets are formed. kGeneral: each tensor by its own strides; kShared: one set of strides
// for all of them, from the carried (n, h, w); kLinear: shared strides and pixels evenly spaced by `unit`.
enum Addr : int { kGeneral = 0, kShared = 1, kLinear = 2 };

template <bool kCFast>
struct Shape {
  static constexpr int kCT = kCFast ? 32 : 1;   // channels per block
  static constexpr int kRT = kThreads / kCT;     // row lanes per block (a power of two)
  __device__ static int chan_lane() { return kCFast ? static_cast<int>(threadIdx.x) % kCT : 0; }
  __device__ static int row_lane() { return kCFast ? static_cast<int>(threadIdx.x) / kCT : static_cast<int>(threadIdx.x); }
};

// Pixel m = (n*H + h)*W + w advanced by a fixed step: (n, h, w) carried, no division per step.
struct PixelWalk {
  int n, h, w, d_n, d_h, d_w, H, W;
  __device__ PixelWalk(int m, int step, int H_, int W_) : H(H_), W(W_) {
    w = m % W; h = (m / W) % H; n = m / (W * H);
    d_w = step % W; d_h = (step / W) % H; d_n = step / (W * H);
  }
  __device__ __forceinline__ void next() {
    w += d_w;
    const bool c1 = w >= W;
    w -= c1 ? W : 0;
    h += d_h + (c1 ? 1 : 0);
    const bool c2 = h >= H;
    h -= c2 ? H : 0;
    n += d_n + (c2 ? 1 : 0);
  }
  __device__ __forceinline__ int64_t at(const int64_t* s) const {
    return static_cast<int64_t>(n) * s[0] + static_cast<int64_t>(h) * s[2] + static_cast<int64_t>(w) * s[3];
  }
};

// Three per-channel quantities summed over a block's row lanes: a fixed tree (deterministic).
template <class Acc, int kCT, int kRT>
struct Sum3 {
  Acc v[3][kRT][kCT];
};

// After it, v[q][0][cl] holds the block's sum of quantity q for channel lane cl (every thread may read it).
template <class Acc, int kCT, int kRT>
__device__ void tree_sum(Sum3<Acc, kCT, kRT>& sh, const Acc (&a)[3], int rl, int cl) {
#pragma unroll
  for (int q = 0; q < 3; ++q) sh.v[q][rl][cl] = a[q];
#pragma unroll
  for (int half = kRT / 2; half >= 1; half /= 2) {
    __syncthreads();
    if (rl < half) {
#pragma unroll
      for (int q = 0; q < 3; ++q) sh.v[q][rl][cl] += sh.v[q][rl + half][cl];
    }
  }
  __syncthreads();
}

// One channel's BN affines and the recomputation of the block's pre-activation.
template <class T>
struct Chan {
  using Acc = acc_t<T>;
  Acc mean, scale, beta, s_mean, s_scale, s_beta;
  bool bn_s;
  template <class P>
  __device__ Chan(const P& p, int c) : s_mean(0), s_scale(0), s_beta(0), bn_s(p.s_mean != nullptr) {
    mean = static_cast<const Acc*>(p.mean)[c];
    scale = static_cast<const Acc*>(p.scale)[c];
    beta = static_cast<const Acc*>(p.beta)[c];
    if (bn_s) {
      s_mean = static_cast<const Acc*>(p.s_mean)[c];
      s_scale = static_cast<const Acc*>(p.s_scale)[c];
      s_beta = static_cast<const Acc*>(p.s_beta)[c];
    }
  }
  // rnd(rnd(bn(z)) + t), t = rnd(bn_s(s)) or s: each BN output rounded to T as eager stores it, the sum
  // formed in Acc and rounded to T.
  __device__ __forceinline__ T pre(T zv, T sv) const {
    const Acc a = to_acc(Cvt<T>::from(bn_affine_rn(to_acc(zv), mean, scale, beta)));
    const Acc t = bn_s ? to_acc(Cvt<T>::from(bn_affine_rn(to_acc(sv), s_mean, s_scale, s_beta))) : to_acc(sv);
    return Cvt<T>::from(a + t);
  }
};

template <class T, bool kCFast, int kAddr>
__global__ void __launch_bounds__(kThreads) bn_add_relu_forward_kernel(const BnAddReluForwardParams p, int rows,
                                                                        int64_t unit) {
  using S = Shape<kCFast>;
  const int cl = S::chan_lane(), rl = S::row_lane();
  const int c = static_cast<int>(blockIdx.y) * S::kCT + cl;
  if (c >= p.C) return;
  const Chan<T> ch(p, c);
  const T* z = static_cast<const T*>(p.z);
  const T* s = static_cast<const T*>(p.s);
  T* y = static_cast<T*>(p.y);
  const int M = p.N * p.H * p.W;
  const int m0 = static_cast<int>(blockIdx.x) * rows + rl;
  const int m1 = min(M, static_cast<int>(blockIdx.x) * rows + rows);
  PixelWalk pw(min(m0, M - 1), S::kRT, p.H, p.W);
  int64_t off = kAddr == kLinear ? static_cast<int64_t>(m0) * unit + static_cast<int64_t>(c) * p.sz[1] : 0;
  for (int m = m0; m < m1; m += S::kRT) {
    int64_t oz, os, oy;
    if (kAddr == kLinear) {
      oz = os = oy = off;
      off += S::kRT * unit;
    } else if (kAddr == kShared) {
      oz = os = oy = pw.at(p.sz) + static_cast<int64_t>(c) * p.sz[1];
      pw.next();
    } else {
      oz = pw.at(p.sz) + static_cast<int64_t>(c) * p.sz[1];
      os = pw.at(p.ss) + static_cast<int64_t>(c) * p.ss[1];
      oy = pw.at(p.sy) + static_cast<int64_t>(c) * p.sy[1];
      pw.next();
    }
    const T pre = ch.pre(z[oz], s[os]);
    y[oy] = p.relu ? Cvt<T>::from(relu_nan(to_acc(pre))) : pre;
  }
}

// Launch 1: part[group, q, c] = sum over the group's rows of (gm, gm*xhat, gm*xhat_s).
template <class T, bool kCFast, int kAddr>
__global__ void __launch_bounds__(kThreads) bn_add_relu_reduce_kernel(const BnAddReluBackwardParams p, int rows,
                                                                       int64_t unit) {
  using S = Shape<kCFast>;
  using Acc = acc_t<T>;
  auto& sh = block_shared<Sum3<Acc, S::kCT, S::kRT>>();
  const int cl = S::chan_lane(), rl = S::row_lane();
  const int c = static_cast<int>(blockIdx.y) * S::kCT + cl;
  const bool valid = c < p.C;
  Acc a[3] = {Acc(0), Acc(0), Acc(0)};
  if (valid) {
    const Chan<T> ch(p, c);
    const Acc invstd = static_cast<const Acc*>(p.invstd)[c];
    const Acc s_invstd = ch.bn_s ? static_cast<const Acc*>(p.s_invstd)[c] : Acc(0);
    const T* g = static_cast<const T*>(p.g);
    const T* z = static_cast<const T*>(p.z);
    const T* s = static_cast<const T*>(p.s);
    const int M = p.N * p.H * p.W;
    const int m0 = static_cast<int>(blockIdx.x) * rows + rl;
    const int m1 = min(M, static_cast<int>(blockIdx.x) * rows + rows);
    PixelWalk pw(min(m0, M - 1), S::kRT, p.H, p.W);
    int64_t off = kAddr == kLinear ? static_cast<int64_t>(m0) * unit + static_cast<int64_t>(c) * p.sz[1] : 0;
    const bool need_s = p.relu || ch.bn_s;
    for (int m = m0; m < m1; m += S::kRT) {
      int64_t og, oz, os;
      if (kAddr == kLinear) {
        og = oz = os = off;
        off += S::kRT * unit;
      } else if (kAddr == kShared) {
        og = oz = os = pw.at(p.sz) + static_cast<int64_t>(c) * p.sz[1];
        pw.next();
      } else {
        og = pw.at(p.sg) + static_cast<int64_t>(c) * p.sg[1];
        oz = pw.at(p.sz) + static_cast<int64_t>(c) * p.sz[1];
        os = pw.at(p.ss) + static_cast<int64_t>(c) * p.ss[1];
        pw.next();
      }
      const T zv = z[oz];
      const T sv = need_s ? s[os] : zv;
      const Acc gv = to_acc(g[og]);
      const Acc gm = (!p.relu || relu_passes(to_acc(ch.pre(zv, sv)))) ? gv : Acc(0);
      a[0] += gm;
      a[1] = fma(gm, (to_acc(zv) - ch.mean) * invstd, a[1]);
      if (ch.bn_s) a[2] = fma(gm, (to_acc(sv) - ch.s_mean) * s_invstd, a[2]);
    }
  }
  tree_sum(sh, a, rl, cl);
  if (rl == 0 && valid) {
    Acc* part = static_cast<Acc*>(p.part);
#pragma unroll
    for (int q = 0; q < 3; ++q) part[(static_cast<int64_t>(blockIdx.x) * 3 + q) * p.C + c] = sh.v[q][0][cl];
  }
}

// Launch 2: the groups' partials summed for the block's channels (blocks of row group 0 write sums), then
// dz and ds elementwise.
template <class T, bool kCFast, int kAddr>
__global__ void __launch_bounds__(kThreads) bn_add_relu_grad_kernel(const BnAddReluBackwardParams p, int groups,
                                                                     int rows, int64_t unit) {
  using S = Shape<kCFast>;
  using Acc = acc_t<T>;
  auto& sh = block_shared<Sum3<Acc, S::kCT, S::kRT>>();
  const int cl = S::chan_lane(), rl = S::row_lane();
  const int c = static_cast<int>(blockIdx.y) * S::kCT + cl;
  const bool valid = c < p.C;
  Acc s1 = 0, s2 = 0, s2s = 0;
  if (p.part != nullptr) {
    Acc a[3] = {Acc(0), Acc(0), Acc(0)};
    if (valid) {
      const Acc* part = static_cast<const Acc*>(p.part);
      for (int r = rl; r < groups; r += S::kRT) {
#pragma unroll
        for (int q = 0; q < 3; ++q) a[q] += part[(static_cast<int64_t>(r) * 3 + q) * p.C + c];
      }
    }
    tree_sum(sh, a, rl, cl);
    s1 = sh.v[0][0][cl];
    s2 = sh.v[1][0][cl];
    s2s = sh.v[2][0][cl];
    if (blockIdx.x == 0 && rl == 0 && valid && p.sums != nullptr) {
      Acc* sums = static_cast<Acc*>(p.sums);
      sums[c] = s1;
      sums[p.C + c] = s2;
      sums[2 * p.C + c] = s2s;
    }
  }
  if (!valid || (p.dz == nullptr && p.ds == nullptr)) return;
  const Chan<T> ch(p, c);
  const Acc inv_count = static_cast<Acc>(p.inv_count);
  // dz = kz*(gm - a1 - xhat*a2z) (batch statistics) or gm*kz; likewise ds with the s statistics.
  const Acc invstd = static_cast<const Acc*>(p.invstd)[c];
  const Acc kz = p.dz_batch ? (p.gamma != nullptr ? invstd * static_cast<const Acc*>(p.gamma)[c] : invstd) : ch.scale;
  const Acc a1 = s1 * inv_count, a2z = s2 * inv_count;
  Acc s_invstd = 0, ks = 0, a2s = 0;
  if (ch.bn_s) {
    s_invstd = static_cast<const Acc*>(p.s_invstd)[c];
    ks = p.ds_batch ? (p.s_gamma != nullptr ? s_invstd * static_cast<const Acc*>(p.s_gamma)[c] : s_invstd) : ch.s_scale;
    a2s = s2s * inv_count;
  }
  const bool need_s = p.relu || (p.ds != nullptr && ch.bn_s && p.ds_batch);
  const bool need_z = p.relu || (p.dz != nullptr && p.dz_batch);
  const T* g = static_cast<const T*>(p.g);
  const T* z = static_cast<const T*>(p.z);
  const T* s = static_cast<const T*>(p.s);
  T* dz = static_cast<T*>(p.dz);
  T* ds = static_cast<T*>(p.ds);
  const int M = p.N * p.H * p.W;
  const int m0 = static_cast<int>(blockIdx.x) * rows + rl;
  const int m1 = min(M, static_cast<int>(blockIdx.x) * rows + rows);
  PixelWalk pw(min(m0, M - 1), S::kRT, p.H, p.W);
  int64_t off = kAddr == kLinear ? static_cast<int64_t>(m0) * unit + static_cast<int64_t>(c) * p.sz[1] : 0;
  for (int m = m0; m < m1; m += S::kRT) {
    int64_t og, oz, os, odz, ods;
    if (kAddr == kLinear) {
      og = oz = os = odz = ods = off;
      off += S::kRT * unit;
    } else if (kAddr == kShared) {
      og = oz = os = odz = ods = pw.at(p.sz) + static_cast<int64_t>(c) * p.sz[1];
      pw.next();
    } else {
      og = pw.at(p.sg) + static_cast<int64_t>(c) * p.sg[1];
      oz = pw.at(p.sz) + static_cast<int64_t>(c) * p.sz[1];
      os = pw.at(p.ss) + static_cast<int64_t>(c) * p.ss[1];
      odz = pw.at(p.sdz) + static_cast<int64_t>(c) * p.sdz[1];
      ods = pw.at(p.sds) + static_cast<int64_t>(c) * p.sds[1];
      pw.next();
    }
    const T gv = g[og];
    const T zv = need_z ? z[oz] : gv;
    const T sv = need_s ? s[os] : gv;
    const bool pass = !p.relu || relu_passes(to_acc(ch.pre(zv, sv)));
    const Acc gm = pass ? to_acc(gv) : Acc(0);
    if (dz != nullptr) {
      dz[odz] = p.dz_batch ? Cvt<T>::from(kz * (gm - a1 - ((to_acc(zv) - ch.mean) * invstd) * a2z))
                           : Cvt<T>::from(gm * kz);
    }
    if (ds != nullptr) {
      if (!ch.bn_s)
        ds[ods] = pass ? gv : zero<T>();
      else
        ds[ods] = p.ds_batch ? Cvt<T>::from(ks * (gm - a1 - ((to_acc(sv) - ch.s_mean) * s_invstd) * a2s))
                             : Cvt<T>::from(gm * ks);
    }
  }
}

// Rows of a tensor's pixels: the stride of the innermost pixel dimension of size > 1, and whether the
// pixels are evenly spaced by it.
int64_t pixel_unit(const int64_t (&s)[4], int H, int W) { return W > 1 ? s[3] : (H > 1 ? s[2] : s[0]); }
bool pixels_linear(const int64_t (&s)[4], int N, int H, int W) {
  const int64_t u = pixel_unit(s, H, W);
  return (W == 1 || s[3] == u) && (H == 1 || s[2] == static_cast<int64_t>(W) * u) &&
         (N == 1 || s[0] == static_cast<int64_t>(H) * W * u);
}

// Channels fastest in z's memory (channels_last): blocks take 32 channels.
bool channels_fast(const int64_t (&s)[4], int H, int W) { return s[1] <= pixel_unit(s, H, W); }

bool same4(const int64_t (&a)[4], const int64_t (&b)[4]) { return std::equal(a, a + 4, b); }

// Row groups of the reduction: at most kMaxGroups, at least kGroupRowsMin rows each, none empty.
int group_rows(int M) {
  if (M <= 0) return 1;
  const int groups = std::min(kMaxGroups, ceil_div(M, kGroupRowsMin));
  return ceil_div(M, groups);
}

}  // namespace
}  // namespace detail

int bn_add_relu_groups(const BnAddReluBackwardParams& p) {
  const int M = p.N * p.H * p.W;
  return M > 0 ? ceil_div(M, detail::group_rows(M)) : 0;
}

cudaError_t bn_add_relu_forward(const BnAddReluForwardParams& p, cudaStream_t stream) {
  const int M = p.N * p.H * p.W;
  if (M == 0 || p.C == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using namespace detail;
    const bool cfast = channels_fast(p.sz, p.H, p.W);
    const int64_t unit = pixel_unit(p.sz, p.H, p.W);
    const int rows = cfast ? kRowsChannelsFast : kRowsPixelsFast;
    const dim3 grid(static_cast<unsigned>(ceil_div(M, rows)), static_cast<unsigned>(ceil_div(p.C, cfast ? 32 : 1)));
    const bool same = same4(p.sz, p.ss) && same4(p.sz, p.sy);
    const int addr = same ? (pixels_linear(p.sz, p.N, p.H, p.W) ? kLinear : kShared) : kGeneral;
    auto go = [&](auto kernel) { return launch(kernel, grid, dim3(kThreads), stream, p, rows, unit); };
    if (cfast) {
      if (addr == kLinear) return go(bn_add_relu_forward_kernel<T, true, kLinear>);
      if (addr == kShared) return go(bn_add_relu_forward_kernel<T, true, kShared>);
      return go(bn_add_relu_forward_kernel<T, true, kGeneral>);
    }
    if (addr == kLinear) return go(bn_add_relu_forward_kernel<T, false, kLinear>);
    if (addr == kShared) return go(bn_add_relu_forward_kernel<T, false, kShared>);
    return go(bn_add_relu_forward_kernel<T, false, kGeneral>);
  });
}

cudaError_t bn_add_relu_backward(const BnAddReluBackwardParams& p, cudaStream_t stream) {
  const int M = p.N * p.H * p.W;
  if (M == 0 || p.C == 0) return cudaSuccess;
  if (p.part == nullptr && p.dz == nullptr && p.ds == nullptr) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using namespace detail;
    const bool cfast = channels_fast(p.sz, p.H, p.W);
    const int64_t unit = pixel_unit(p.sz, p.H, p.W);
    const unsigned ctiles = static_cast<unsigned>(ceil_div(p.C, cfast ? 32 : 1));
    bool same = same4(p.sz, p.sg) && same4(p.sz, p.ss);
    const bool same_in = same;
    if (p.dz != nullptr) same = same && same4(p.sz, p.sdz);
    if (p.ds != nullptr) same = same && same4(p.sz, p.sds);
    const bool linear = pixels_linear(p.sz, p.N, p.H, p.W);
    cudaError_t err = cudaSuccess;
    const int groups = bn_add_relu_groups(p);
    if (p.part != nullptr) {
      const int rows = group_rows(M);
      const int addr = same_in ? (linear ? kLinear : kShared) : kGeneral;
      const dim3 grid(static_cast<unsigned>(groups), ctiles);
      auto go = [&](auto kernel) { return launch(kernel, grid, dim3(kThreads), stream, p, rows, unit); };
      if (cfast) {
        err = addr == kLinear   ? go(bn_add_relu_reduce_kernel<T, true, kLinear>)
              : addr == kShared ? go(bn_add_relu_reduce_kernel<T, true, kShared>)
                                : go(bn_add_relu_reduce_kernel<T, true, kGeneral>);
      } else {
        err = addr == kLinear   ? go(bn_add_relu_reduce_kernel<T, false, kLinear>)
              : addr == kShared ? go(bn_add_relu_reduce_kernel<T, false, kShared>)
                                : go(bn_add_relu_reduce_kernel<T, false, kGeneral>);
      }
      if (err != cudaSuccess) return err;
    }
    // Only the sums wanted: one block per channel slice finishes them.
    const int rows = cfast ? kRowsChannelsFast : kRowsPixelsFast;
    const bool elementwise = p.dz != nullptr || p.ds != nullptr;
    const dim3 grid(elementwise ? static_cast<unsigned>(ceil_div(M, rows)) : 1u, ctiles);
    const int addr = same ? (linear ? kLinear : kShared) : kGeneral;
    auto go = [&](auto kernel) { return launch(kernel, grid, dim3(kThreads), stream, p, groups, rows, unit); };
    if (cfast) {
      return addr == kLinear   ? go(bn_add_relu_grad_kernel<T, true, kLinear>)
             : addr == kShared ? go(bn_add_relu_grad_kernel<T, true, kShared>)
                               : go(bn_add_relu_grad_kernel<T, true, kGeneral>);
    }
    return addr == kLinear   ? go(bn_add_relu_grad_kernel<T, false, kLinear>)
           : addr == kShared ? go(bn_add_relu_grad_kernel<T, false, kShared>)
                             : go(bn_add_relu_grad_kernel<T, false, kGeneral>);
  });
}

}  // namespace fused_resnet
