// Per-channel batch statistics, numerically stable: each thread takes its rows in chunks, forms each chunk's
// (mean, M2) two-pass in registers and merges it into its running (mean, M2) with Chan's formula, all after
// shifting by a per-channel pivot (the channel's first element x[0, c, 0, 0], so shifted values are of the
// order of the std); the 8 row groups of a block are merged with Chan's formula too, and the per-block
// (mean, M2) go to bn_finalize. No float32 sum of squares anywhere, so |mean| >> std keeps its variance. A
// plain sum rides along only to give eager's mean when the data holds inf (the update turns inf into NaN;
// eager's sum/N keeps +-inf).
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

// kPixelsLinear: x's pixels (n, h, w) sit at one stride `unit` (channels_last dense: C), so moving kGroups
// rows is one add; otherwise (n, h, w) are carried along.
template <class T, bool kPixelsLinear>
__global__ void __launch_bounds__(kChannels * kGroups) batch_stats_kernel(const BatchStatsParams p, int64_t unit) {
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
  // with precomputed carries (no division per element). They are taken kChunk at a time: the chunk's
  // (mean, M2) two-pass in registers, then one Chan merge into the running (mean, M2) -- two divisions per
  // chunk where Welford's update divides per element, and no sum of squares.
  constexpr int kChunk = 8;
  static_assert(kRowsPerThread % kChunk == 0, "whole chunks");
  const int m_first = m0 + grp;
  int w = m_first % p.W, h = (m_first / p.W) % p.H;
  const int d_w = kGroups % p.W, d_h = (kGroups / p.W) % p.H, d_n = kGroups / (p.W * p.H);
  // The element's offset advances with (n, h, w): by `step` per row, and by c_w / c_h per carry.
  // A lane past C reads channel C - 1's elements (no bounds test per element) and writes nothing.
  int64_t off = offset4(p.sx, m_first / (p.W * p.H), c < p.C ? c : p.C - 1, h, w);
  const int64_t step = kPixelsLinear ? kGroups * unit : d_n * p.sx[0] + d_h * p.sx[2] + d_w * p.sx[3];
  const int64_t c_w = p.sx[2] - p.W * p.sx[3], c_h = p.sx[0] - p.H * p.sx[2];
  for (int i0 = 0; i0 < kRowsPerThread; i0 += kChunk) {
    Acc v[kChunk];
    // Rows of the chunk inside x: a prefix (rows only grow), all of them but in the block's last chunks.
    const int k = max(0, min(kChunk, ceil_div(M - (m_first + kGroups * i0), kGroups)));
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      v[j] = j < k ? to_acc(x[off]) - pivot : Acc(0);
      off += step;
      if (kPixelsLinear) continue;
      w += d_w;
      const bool c1 = w >= p.W;
      w -= c1 ? p.W : 0;
      off += c1 ? c_w : 0;
      h += d_h + (c1 ? 1 : 0);
      const bool c2 = h >= p.H;
      h -= c2 ? p.H : 0;
      off += c2 ? c_h : 0;
    }
    if (k == 0) break;
    Acc cs = 0;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) cs += v[j];  // rows past x hold 0
    const Acc cm = cs / Acc(k);
    Acc cm2 = 0;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const Acc d = j < k ? v[j] - cm : Acc(0);
      cm2 = fma(d, d, cm2);
    }
    const Acc n_a = Acc(cnt), n_ab = n_a + Acc(k), delta = cm - mean;
    mean += delta * (Acc(k) / n_ab);
    m2 += cm2 + delta * delta * (n_a * Acc(k) / n_ab);
    sum += cs;
    cnt += k;
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
    const dim3 block(detail::kChannels * detail::kGroups);
    // The stride of the innermost pixel dimension of size > 1; the pixels are linear if the others follow.
    const int64_t unit = p.W > 1 ? p.sx[3] : (p.H > 1 ? p.sx[2] : p.sx[0]);
    const bool linear = (p.W == 1 || p.sx[3] == unit) && (p.H == 1 || p.sx[2] == p.W * unit) &&
                        (p.N == 1 || p.sx[0] == static_cast<int64_t>(p.H) * p.W * unit);
    if (linear) return detail::launch(detail::batch_stats_kernel<T, true>, grid, block, stream, p, unit);
    return detail::launch(detail::batch_stats_kernel<T, false>, grid, block, stream, p, unit);
  });
}

}  // namespace fused_resnet
