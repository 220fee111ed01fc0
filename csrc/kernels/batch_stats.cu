// Per-channel batch statistics, numerically stable: each thread runs Welford's update over its rows
// after shifting by a per-channel pivot (the channel's first element x[0, c, 0, 0], so shifted values are of the order
// of the std), the 8 row groups of a block are merged with Chan's formula, and the per-block
// (mean, M2) go to the host-side merge (fused_resnet/_partials.py). No float32 sum of squares anywhere,
// so |mean| >> std keeps its variance. A plain sum rides along only to give eager's mean when the data holds
// inf (Welford's update turns inf into NaN; eager's sum/N keeps +-inf).
#include "device.cuh"
#include "dtype.cuh"

namespace fused_resnet {
namespace detail {
namespace {

constexpr int kChannels = 32;                    // channels per block: one warp's lanes
constexpr int kGroups = 8;                       // row groups per block: one warp each
constexpr int kRowsPerThread = kStatsRows / kGroups;

template <class Acc>
struct StatsShared {
  Acc mean[kGroups][kChannels], m2[kGroups][kChannels], sum[kGroups][kChannels];
  int cnt[kGroups];
};

template <class T>
__global__ void __launch_bounds__(kChannels * kGroups) batch_stats_kernel(const BatchStatsParams p) {
  using Acc = acc_t<T>;
  auto& sh = block_shared<StatsShared<Acc>>();
  auto& s_mean = sh.mean;
  auto& s_m2 = sh.m2;
  auto& s_sum = sh.sum;
  auto& s_cnt = sh.cnt;
  const T* x = static_cast<const T*>(p.x);
  const int lane = threadIdx.x % kChannels, grp = threadIdx.x / kChannels;
  const int c = blockIdx.y * kChannels + lane;
  const int M = p.N * p.H * p.W;
  const int m0 = blockIdx.x * kStatsRows;
  // The pivot: the channel's first element (the finalize kernel adds the same one back).
  const Acc pivot = c < p.C ? to_acc(x[static_cast<int64_t>(c) * p.sx[1]]) : Acc(0);
  Acc mean = 0, m2 = 0, sum = 0;
  int cnt = 0;
  // This thread's rows m0 + grp + kGroups*i: the first decomposed once, the rest reached by adding kGroups
  // with precomputed carries (no division per element).
  const int m_first = m0 + grp;
  int w = m_first % p.W, h = (m_first / p.W) % p.H, n = m_first / (p.W * p.H);
  const int d_w = kGroups % p.W, d_h = (kGroups / p.W) % p.H, d_n = kGroups / (p.W * p.H);
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int m = m_first + kGroups * i;
    if (m >= M) break;
    ++cnt;
    if (c < p.C) {
      const Acc v = to_acc(x[offset4(p.sx, n, c, h, w)]) - pivot;
      const Acc d = v - mean;
      sum += v;
      mean += d / Acc(cnt);
      m2 = fma(d, v - mean, m2);
    }
    w += d_w;
    const bool c1 = w >= p.W;
    w -= c1 ? p.W : 0;
    h += d_h + (c1 ? 1 : 0);
    const bool c2 = h >= p.H;
    h -= c2 ? p.H : 0;
    n += d_n + (c2 ? 1 : 0);
  }
  s_mean[grp][lane] = mean;
  s_m2[grp][lane] = m2;
  s_sum[grp][lane] = sum;
  if (lane == 0) s_cnt[grp] = cnt;
  __syncthreads();
  if (grp != 0 || c >= p.C) return;
  Acc n_a = 0, mean_a = 0, m2_a = 0, sum_a = 0;
  for (int j = 0; j < kGroups; ++j) {
    const Acc n_b = Acc(s_cnt[j]);
    if (n_b == Acc(0)) continue;
    const Acc n = n_a + n_b, delta = s_mean[j][lane] - mean_a;
    mean_a += delta * (n_b / n);
    m2_a += s_m2[j][lane] + delta * delta * (n_a * n_b / n);
    sum_a += s_sum[j][lane];
    n_a = n;
  }
  if (!isfinite(sum_a)) mean_a = sum_a / n_a;  // +-inf, or NaN (NaN, or both infinities), as eager's
  Acc* part = static_cast<Acc*>(p.part);
  part[static_cast<int64_t>(blockIdx.x) * p.C + c] = mean_a;
  part[static_cast<int64_t>(gridDim.x + blockIdx.x) * p.C + c] = m2_a;
}

}  // namespace
}  // namespace detail

cudaError_t batch_stats(const BatchStatsParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(ceil_div(static_cast<int64_t>(p.N) * p.H * p.W, kStatsRows), ceil_div(p.C, detail::kChannels));
    return detail::launch(detail::batch_stats_kernel<T>, grid, dim3(detail::kChannels * detail::kGroups), stream, p);
  });
}

}  // namespace fused_resnet
