// wgrad, tensor-core path for NHWC gy and x (fp16/bf16 with K and C multiples of 8; fp32 in TF32 with
// multiples of 4). Per tap (r, s) and split: dW[k, c] += sum over the split's output pixels of
// gy[pixel, k] * a[tap pixel, c], with the activation a = relu((x - mean)*scale + beta) rebuilt on the
// way from shared memory to registers, as the forward does. Both operands are pixel-major in HBM (NHWC),
// so both slices are stored [pixel][channel] and reach the mma through the transposing ldmatrix (32-bit
// loads for float); the raw bytes go HBM -> shared by 16-byte cp.async.
//
// 128 / kBK threads copy one pixel of the kBK-pixel slice (32 pixels of 16-bit elements, 16 of float; twice
// that in the "wide" kernels, kWide below);
// each keeps its pixel's (n, oh, ow) and advances it by kBK pixels per step with precomputed carries (no
// division in the loop). A pixel past the split, or whose
// tap falls into padding, has its activation forced to 0 (the conv pads the activation, not x).
// Output: the split's slab in dW's layout (conv_wgrad.cu's contract; column_sums adds the slabs).
#include <algorithm>

#include "mma_tile.cuh"

namespace fused_resnet {
namespace detail {
namespace {

constexpr int kStages = kMmaStages;

// Pixels per step: MmaElem's slice (kWide 1) for 128x64, twice it (kWide 2) for the tiles 64 output
// channels tall or less, whose warps get only 16 or 32 HMMAs per narrow step against the step's fixed cost
// (the pixel walk, the copies' addresses and predicates, wait and barrier): the wide step halves that cost
// per HMMA, for shared memory past 48 KB (dynamic) -- 4 CTAs per SM for 64x64, 2 for 64x128.
template <int kBM>
constexpr int wgrad_wide() {
  return kBM == 128 ? 1 : 2;
}

// Warp groups that divide each step's pixels among them (their sums added at the end): 1 for the 128x64 and
// 64x128 tiles (4 warps side by side along the columns), 2 for 64x64 (1x2 warps per group), 4 for the small tiles
// 32x32 and 16x16 (each warp the whole tile on a quarter of the pixels), so no two warps transform the same
// B columns and no MMA falls on a masked row or column of a small layer (CIFAR's 16 and 32 channels).
template <int kBM, int kBN>
__host__ __device__ constexpr int wgrad_pixel_groups() {
  return kBM * kBN == 64 * 64 ? 2 : kBM <= 32 ? 4 : 1;
}

template <class T, int kBM, int kBN, int kWide = wgrad_wide<kBM>()>
struct WgradMmaShared {
  static constexpr int kBK = kWide * MmaElem<T>::kBK;
  static constexpr int kLdA = kBM + 8, kLdB = kBN + 8, kLdC = kBN + 4;
  union {
    struct {
      T a[kStages][kBK][kLdA];  // gy: [pixel][output channel]
      T b[kStages][kBK][kLdB];  // x at the tap: [pixel][input channel]
    } ring;
    float c[kBM][kLdC];  // dW tile, once the ring is drained
  };
  // Per stage and pixel: all ones where the pixel counts and its tap lands inside x, else 0, one element's
  // width each -- a fragment register's elements are consecutive pixels, so one 32-bit load is its mask.
  ElemMask<T> valid[kStages][kBK];
};
static_assert(sizeof(WgradMmaShared<__half, 128, 64>) <= kStaticSharedBytes, "narrow ring");
static_assert(sizeof(WgradMmaShared<float, 128, 64>) <= kStaticSharedBytes, "narrow ring");
// A split's chunk of pixels is a multiple of every step (the launcher's kWgradChunk).
static_assert(kWgradChunk % WgradMmaShared<__half, 64, 64>::kBK == 0, "chunk");

// Registers for 4 CTAs per SM where shared memory allows 4 (the narrow 128x64 ring, 41 KB; the wide 64x64,
// 55 KB): left to itself ptxas gives the 128x64 kernel 167 registers (3 CTAs) for 7.0 instructions per HMMA
// instead of 7.8 -- the occupancy of before kept until a GPU says which is faster. The wide 64x128 (80 KB,
// 2 CTAs per SM by shared memory): ptxas's choice.
template <int kBM, int kBN>
constexpr int wgrad_min_ctas() {
  return kBN == 128 ? 0 : 4;
}

// kWhole: the tile lies wholly inside K and C (K % kBM == 0 and C % kBN == 0: every ResNet layer). Then every
// copy of a step's pixel is 16 bytes at a constant offset from the pixel's first channel of the tile, under
// the pixel's one predicate: one address per tensor and step, not a clamped address and a predicate per
// copy (bf16 64x64, sm_90: ~30 of the step's ~306 instructions).
template <class T, int kBM, int kBN, bool kWhole>
__global__ void __launch_bounds__(kMmaThreads, wgrad_min_ctas<kBM, kBN>()) conv_wgrad_mma_kernel(const ConvWgradParams p) {
  // Warps side by side along the columns (1x4: warp tiles 128x16 or 64x32; 1x2 in 64x64, 1x1 in 32x32 and
  // 16x16, per group of the step's pixels -- wgrad_pixel_groups), so each transformed fragment feeds every row
  // block of the tile.
  constexpr int kGroups = wgrad_pixel_groups<kBM, kBN>(), kTileWarps = 4 / kGroups;
  constexpr int kWarpsM = 1, kWarpsN = kTileWarps;
  constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN, kMI = kWM / 16, kNJ = kWN / 8;
  using Shared = WgradMmaShared<T, kBM, kBN>;
  constexpr int kBK = Shared::kBK, kVec = MmaElem<T>::kVec, kK = MmaElem<T>::kK, kPer = MmaElem<T>::kPer;
  constexpr int kPixThreads = kMmaThreads / kBK;  // threads copying one pixel
  constexpr int kChunksA = kBM / kVec / kPixThreads, kChunksB = kBN / kVec / kPixThreads;
  static_assert(kChunksA >= 1 && kChunksB >= 1 && kBK / kK % kGroups == 0, "a tile too small for its step");
  auto& sh = block_shared<Shared>();
  const ConvGeom& g = p.g;
  const int P = g.N * g.OH * g.OW;
  // Taps fastest in the grid: the blocks of one split (the same pixels, every tap) launch together and
  // share their gy and x rows in L2 instead of each tap re-reading them from HBM.
  const int taps = g.KH * g.KW, rs = blockIdx.z % taps, sp = blockIdx.z / taps, r = rs / g.KW, s = rs % g.KW;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int p_begin = sp * p.chunk, p_end = min(p_begin + p.chunk, P);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32 % kTileWarps;
  const int group = kGroups > 1 ? tid / 32 / kTileWarps : 0;  // this warp's group (a constant 0 without)
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int gq = lane / 4, tq = lane % 4;
  const T* gy = static_cast<const T*>(p.gy);
  const T* x = static_cast<const T*>(p.x);

  // This lane's columns (input channels) are fixed for the whole tile: their affine once, in registers.
  float mu[kNJ], sc[kNJ], be[kNJ];
  {
    const float* mean = static_cast<const float*>(p.mean);
    const float* scale = static_cast<const float*>(p.scale);
    const float* beta = static_cast<const float*>(p.beta);
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      const int c = n0 + wn * kWN + j * 8 + gq;
      const bool cok = c < g.C;  // past C: x is zero-filled and so is the activation
      mu[j] = cok ? mean[c] : 0.f;
      sc[j] = cok ? scale[c] : 0.f;
      be[j] = cok ? beta[c] : 0.f;
    }
  }

  // This thread's pixel of the slice, decomposed once, advanced by kBK pixels a step with precomputed
  // carries. It is walked as the tap's input coordinates (ih, iw), so that "inside x" is two unsigned
  // compares, and as byte addresses into gy and x, so that a copy's source is one 64-bit select (the
  // tensor's first pixel when the pixel is past the split or its tap in padding). The addresses are
  // integers: a tap in padding may point outside x, where pointer arithmetic would be undefined.
  const int prow = tid / kPixThreads, part_id = tid % kPixThreads;
  int q = p_begin + prow;
  const int ow0 = q % g.OW, oh0 = (q / g.OW) % g.OH;
  const int nb = q / (g.OW * g.OH);
  const int d_ow = kBK % g.OW, d_oh = (kBK / g.OW) % g.OH, d_n = kBK / (g.OW * g.OH);
  const int ih_t = r * g.dil_h - g.pad_h, iw_t = s * g.dil_w - g.pad_w;  // the tap's input offset
  int ih = oh0 * g.stride_h + ih_t, iw = ow0 * g.stride_w + iw_t;
  // ow >= OW (a carry into oh) is iw >= iw_end; oh >= OH (into n) is ih >= ih_end.
  const int iw_end = g.OW * g.stride_w + iw_t, ih_end = g.OH * g.stride_h + ih_t;
  const int64_t HW = static_cast<int64_t>(g.H) * g.W, rowpix = static_cast<int64_t>(g.stride_h) * g.W;
  constexpr int64_t kSz = sizeof(T);
  // x's address moves by these per step, per carry out of ow, per carry out of oh (bytes).
  const int64_t x_step = keep_computed((d_n * HW + d_oh * rowpix + static_cast<int64_t>(d_ow) * g.stride_w) * g.C * kSz);
  const int64_t x_c1 = keep_computed((rowpix - static_cast<int64_t>(g.OW) * g.stride_w) * g.C * kSz);
  const int64_t x_c2 = keep_computed((HW - g.OH * rowpix) * g.C * kSz);
  const int64_t g_step = keep_computed(static_cast<int64_t>(kBK) * g.K * kSz);
  const uintptr_t gy_first = reinterpret_cast<uintptr_t>(gy), x_first = reinterpret_cast<uintptr_t>(x);
  uintptr_t g_addr = gy_first + static_cast<uint64_t>(q) * g.K * kSz;
  uintptr_t x_addr = x_first + static_cast<uint64_t>((nb * HW + ih * static_cast<int64_t>(g.W) + iw) * g.C * kSz);
  const int steps = ceil_div(p_end - p_begin, kBK);

  // The channels this thread copies are the same every step: their offsets within a pixel (clamped to the
  // pixel's last chunk past K or C, so every address stays inside the tensor) and which of them exist, once.
  int a_chan[kChunksA], b_chan[kChunksB];
  unsigned a_ok = 0, b_ok = 0;
#pragma unroll
  for (int u = 0; u < kChunksA; ++u) {
    const int k = m0 + kVec * (part_id + kPixThreads * u);
    a_chan[u] = min(k, g.K - kVec);
    a_ok |= (k < g.K ? 1u : 0u) << u;
  }
#pragma unroll
  for (int u = 0; u < kChunksB; ++u) {
    const int c = n0 + kVec * (part_id + kPixThreads * u);
    b_chan[u] = min(c, g.C - kVec);
    b_ok |= (c < g.C ? 1u : 0u) << u;
  }

  const uintptr_t a_first = static_cast<uintptr_t>(a_chan[0]) * kSz, b_first = static_cast<uintptr_t>(b_chan[0]) * kSz;
  auto issue = [&](int st) {
    const bool in = q < p_end;
    const bool tap_in = in && static_cast<unsigned>(ih) < static_cast<unsigned>(g.H) &&
                        static_cast<unsigned>(iw) < static_cast<unsigned>(g.W);
    if constexpr (kWhole) {
      // the step's one address per tensor: this thread's first channel of the tile in its pixel
      const T* g_chan = reinterpret_cast<const T*>((in ? g_addr : gy_first) + a_first);
      const T* x_chan = reinterpret_cast<const T*>((tap_in ? x_addr : x_first) + b_first);
#pragma unroll
      for (int u = 0; u < kChunksA; ++u)
        cp_async_16(&sh.ring.a[st][prow][kVec * (part_id + kPixThreads * u)], g_chan + kVec * kPixThreads * u, in);
#pragma unroll
      for (int u = 0; u < kChunksB; ++u)
        cp_async_16(&sh.ring.b[st][prow][kVec * (part_id + kPixThreads * u)], x_chan + kVec * kPixThreads * u,
                    tap_in);
    } else {
      const T* g_pix = reinterpret_cast<const T*>(in ? g_addr : gy_first);
      const T* x_pix = reinterpret_cast<const T*>(tap_in ? x_addr : x_first);
#pragma unroll
      for (int u = 0; u < kChunksA; ++u)
        cp_async_16(&sh.ring.a[st][prow][kVec * (part_id + kPixThreads * u)], g_pix + a_chan[u],
                    in && ((a_ok >> u) & 1u));
#pragma unroll
      for (int u = 0; u < kChunksB; ++u)
        cp_async_16(&sh.ring.b[st][prow][kVec * (part_id + kPixThreads * u)], x_pix + b_chan[u],
                    tap_in && ((b_ok >> u) & 1u));
    }
    if (part_id == 0) sh.valid[st][prow] = tap_in ? ElemMask<T>(~0u) : ElemMask<T>(0);
    q += kBK;
    g_addr += g_step;
    x_addr += x_step;
    iw += d_ow * g.stride_w;
    const bool c1 = iw >= iw_end;
    iw -= c1 ? g.OW * g.stride_w : 0;
    x_addr += c1 ? x_c1 : 0;
    ih += (d_oh + (c1 ? 1 : 0)) * g.stride_h;
    const bool c2 = ih >= ih_end;
    ih -= c2 ? g.OH * g.stride_h : 0;
    x_addr += c2 ? x_c2 : 0;
  };

  WarpAcc<kMI, kNJ> acc;
  acc.zero();
  // This lane's fragment addresses: the stage's first element plus one offset per operand plus constants.
  const int a_lane = wm * kWM + a_km_lane_offset<T, Shared::kLdA>();
  const int b_lane = wn * kWN + b_kn_lane_offset<T, Shared::kLdB>();
  run_ring(steps, issue, [&](int st) {
    const T* a_st = &sh.ring.a[st][0][0] + a_lane;
    const T* b_st = &sh.ring.b[st][0][0] + b_lane;
#pragma unroll
    for (int kq = 0; kq < kBK / kK / kGroups; ++kq) {
      const int kk = kK * (kq * kGroups + group);
      // This lane's pixels of the kK: those of B fragment registers 0 and 1 (frag_k).
      const uint32_t k0 = keep_bits<T>(&sh.valid[st][kk + frag_k<T>(tq, 0, 0)]);
      const uint32_t k1 = keep_bits<T>(&sh.valid[st][kk + frag_k<T>(tq, 1, 0)]);
      uint32_t fa[kMI][4], fb[kNJ][2];
#pragma unroll
      for (int i = 0; i < kMI; ++i) {
        load_a_km_at<T, Shared::kLdA>(fa[i], a_st + kk * Shared::kLdA + i * 16);
        raw_operands<T>(fa[i]);
      }
#pragma unroll
      for (int jp = 0; jp < kNJ / 2; ++jp)
        load_b_kn_at<T, Shared::kLdB>(fb[2 * jp], fb[2 * jp + 1], b_st + kk * Shared::kLdB + jp * 16);
#pragma unroll
      for (int j = 0; j < kNJ; ++j) {
        float m2[kPer], s2[kPer], b2[kPer];
#pragma unroll
        for (int h = 0; h < kPer; ++h) {
          m2[h] = mu[j];
          s2[h] = sc[j];
          b2[h] = be[j];
        }
        fb[j][0] = bn_relu_reg<T>(fb[j][0], k0, m2, s2, b2);
        fb[j][1] = bn_relu_reg<T>(fb[j][1], k1, m2, s2, b2);
      }
      acc.template mma<T>(fa, fb);
    }
  });
  if (group == 0) acc.store(sh.c, wm * kWM, wn * kWN);
  __syncthreads();
#pragma unroll
  for (int q = 1; q < kGroups; ++q) {  // the other groups' sums, one at a time
    if (group == q) acc.add_to(sh.c, wm * kWM, wn * kWN);
    __syncthreads();
  }
  float* part = static_cast<float*>(p.part) + static_cast<int64_t>(sp) * g.K * g.C * g.KH * g.KW;
  const bool cfast = p.sd[1] <= p.sd[0];
  for (int idx = tid; idx < kBM * kBN; idx += kMmaThreads) {
    int row, col;
    tile_coord<kBM, kBN>(idx, cfast, row, col);
    const int kout = m0 + row, ch = n0 + col;
    if (kout < g.K && ch < g.C) part[offset4(p.sd, kout, ch, r, s)] = sh.c[row][col];
  }
}

template <int kBM, int kBN>
cudaError_t launch_mma_wgrad(const ConvWgradParams& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.g.K, kBM), ceil_div(p.g.C, kBN), p.g.KH * p.g.KW * p.split);
  const bool whole = p.g.K % kBM == 0 && p.g.C % kBN == 0;
  return dispatch_mma_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = whole ? conv_wgrad_mma_kernel<T, kBM, kBN, true> : conv_wgrad_mma_kernel<T, kBM, kBN, false>;
    return launch_shared<WgradMmaShared<T, kBM, kBN>>(kernel, grid, dim3(kMmaThreads), stream, p);
  });
}

}  // namespace

bool conv_wgrad_mma_applies(const ConvWgradParams& p) {
  const ConvGeom& g = p.g;
  const int vec = mma_vec(p.dtype);
  return p.act_floor == 0.0f && mma_dtype(p.dtype, p.tf32) && nhwc_dense(p.sg, g.N, g.K, g.OH, g.OW) &&  // ReLU only
         nhwc_dense(p.sx, g.N, g.C, g.H, g.W) && aligned16(p.gy) && aligned16(p.x) && g.K % vec == 0 &&
         g.C % vec == 0;
}

// 128 output channels x 64 input channels when K > 64, 64 x 128 when C > 64 >= K, else the smallest square
// tile both fit in -- 16, 32 or 64 (no half of the MMAs on masked rows or columns).
cudaError_t conv_wgrad_mma(const ConvWgradParams& p, cudaStream_t stream) {
  const int kc = std::max(p.g.K, p.g.C);
  if (p.g.K > 64) return launch_mma_wgrad<128, 64>(p, stream);
  if (p.g.C > 64) return launch_mma_wgrad<64, 128>(p, stream);
  if (kc <= 16) return launch_mma_wgrad<16, 16>(p, stream);
  return kc <= 32 ? launch_mma_wgrad<32, 32>(p, stream) : launch_mma_wgrad<64, 64>(p, stream);
}

}  // namespace detail
}  // namespace fused_resnet
