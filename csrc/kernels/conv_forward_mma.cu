// Forward, tensor-core path for NHWC (channels_last) tensors, fp16/bf16 with C % 8 == 0 or fp32 in TF32 with
// C % 4 == 0 (MmaElem: the same bytes per slice and per mma either way): the raw x and W slices stream
// into a 3-stage shared-memory ring with 16-byte cp.async copies (run_ring); the BN affine + ReLU is
// applied on the way from shared memory to registers (ldmatrix -> transform -> mma.sync), so what sits in
// shared memory is exactly what is in HBM and the copies need no register round trip.
//
// GEMM view as in conv_forward.cu: rows = output pixels, columns = output channels, reduction =
// (tap, input channel), walked as one flattened loop of (tap, channel slice) steps -- 128-byte slices when C
// is a multiple of them, 32-byte ones when C is exactly that, else 64-byte ones (kChunks below). CTA tile
// 64x128, or 128 rows by 16, 32 or 64 columns (FwdMmaShared says which when), 4 warps. Each thread copies (part of) one tile row of A: its
// pixel's (n, oh, ow) is decomposed once per tile and every step only adds the tap's offset (no division
// in the main loop). A row whose tap falls into padding is flagged invalid for the step and its activation
// forced to 0 after the transform (the conv pads the activation, not x).
//
// The epilogue (bias, residual, the stored y, per-tile statistics of y) is forward_epilogue
// (conv_forward_mma.cuh), shared with conv_forward.cu.
#include "conv_forward_mma.cuh"

namespace fused_resnet {
namespace detail {
namespace {

constexpr int kStages = kMmaStages;

// A step's reduction slice is kChunks 16-byte copies per row: 4 (64 bytes, MmaElem's slice) in general, 8
// (128 bytes) when C is a multiple of that wider slice ("whole" slices: none runs past C, so no copy needs
// a channel predicate or a clamped address), 2 (32 bytes: one mma's reduction) when C is exactly that
// (CIFAR's 16 channels), where a 64-byte slice would run half its MMAs on zero-filled channels. The wide
// step spreads its fixed cost -- copy issue, tap walk, wait and barrier -- over twice the MMAs, and takes
// 85 KB of shared memory (dynamic: 2 CTAs per SM, where the narrow ring's 48 KB allow 4).
constexpr int kHalfChunks = 2, kNarrowChunks = 4, kWideChunks = 8;

// CTA tile 64x128 when K > 64, else 128 rows by the smallest of 16, 32, 64 columns that holds K (so no
// MMA falls on a column block past K: CIFAR's 16- and 32-channel layers).
template <class T, int kBM, int kBN, int kChunks>
struct FwdMmaShared {
  static constexpr int kBK = kChunks * MmaElem<T>::kVec, kLdC = kBN + 4;
  // Row pitch: one 16-byte chunk past the slice keeps every ldmatrix row aligned and puts the 8 rows of
  // each 8x8 matrix on distinct bank groups (80 or 144 bytes).
  static constexpr int kLd = kBK + MmaElem<T>::kVec;
  union {
    struct {
      T a[kStages][kBM][kLd];
      T b[kStages][kBN][kLd];
    } ring;
    struct {
      float c[kBM][kLdC];            // the accumulator tile, once the ring is drained
      int n[kBM], oh[kBM], ow[kBM];  // each tile row's output pixel, decomposed once for the epilogue
    } epi;
  };
  alignas(16) float affine[kStages][3][kBK];  // per stage: mean, scale, beta of the slice's channels
  unsigned char valid[kStages][kBM];  // per stage: the row's tap lands inside x
};
// The narrow ring stays in static shared memory (4 CTAs per SM by shared memory).
static_assert(sizeof(FwdMmaShared<__half, 128, 64, kNarrowChunks>) <= kStaticSharedBytes, "narrow ring");
static_assert(sizeof(FwdMmaShared<__half, 64, 128, kNarrowChunks>) <= kStaticSharedBytes, "narrow ring");
static_assert(sizeof(FwdMmaShared<float, 128, 64, kNarrowChunks>) <= kStaticSharedBytes, "narrow ring");
static_assert(sizeof(FwdMmaShared<float, 64, 128, kNarrowChunks>) <= kStaticSharedBytes, "narrow ring");

// fp16/bf16: as many CTAs per SM as shared memory allows (4 narrow, 2 wide) -- left to itself ptxas spent up
// to 162 registers on the narrow ring (3 CTAs) or spilled, depending on the tile (benchmarks/NOTES.md).
// TF32: its choice (no spill).
template <class T, int kChunks>
constexpr int fwd_min_ctas() {
  return sizeof(T) != 2 ? 0 : kChunks == kWideChunks ? 2 : 4;
}

// kOneSlice: launched only when C is exactly one slice (always so for the half slice; the wide one at C = 64
// 16-bit channels, ResNet-50's first stage; the narrow one at C = 32, CIFAR's second stage, in the tiles 32
// columns wide or less): every step is a tap of its own with the same channels, whose affine stays in
// registers for the whole tile instead of a copy and shared-memory loads per step, and no copy runs past C.
// Not the narrow slice in the 64-column tiles: capped at 128 registers for 4 CTAs per SM, the 128x64 tile
// spilled on sm_80 with the affine in registers and the 64x128 on sm_90 with it in shared memory written
// once (the 128x32 / 128x16 tiles hold half the accumulators: 125 / 111 registers, no spill).
// One CTA tile (bx, by) of one conv: the kernel below is this for its own params; the pair kernel runs it for
// either of two convs (issue 30), so a projection pair's conv1 and shortcut share one launch.
template <class T, int kBM, int kBN, int kChunks, bool kOneSlice>
__device__ __forceinline__ void conv_forward_mma_tile(const ConvForwardParams& p, int bx, int by) {
  static_assert(kOneSlice || kChunks != kHalfChunks, "half slices are launched at C == slice only");
  // Warps stacked along the rows (4x1: warp tiles 32 x kBN or 16x128), so no two warps transform the same A
  // rows and each transformed fragment feeds every column block of the tile: 16 (128x64) or 8 (64x128)
  // transformed values per thread per 16 MMAs.
  constexpr int kWarpsN = 1, kWarpsM = 4;
  constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN, kMI = kWM / 16, kNJ = kWN / 8;
  using Shared = FwdMmaShared<T, kBM, kBN, kChunks>;
  constexpr int kBK = Shared::kBK, kVec = MmaElem<T>::kVec, kK = MmaElem<T>::kK, kPer = MmaElem<T>::kPer;
  // launched only when C is a multiple of the slice: no copy runs past C
  constexpr bool kWhole = kChunks == kWideChunks || kOneSlice;
  constexpr int kRowThreads = kMmaThreads / kBM;  // threads sharing one A row's kChunks copies of 16 bytes
  constexpr int kRowChunks = kChunks / kRowThreads;
  auto& sh = block_shared<Shared>();
  const ConvGeom& g = p.g;
  const int M = g.N * g.OH * g.OW;
  const int m0 = bx * kBM, n0 = by * kBN;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wm = warp / kWarpsN, wn = warp % kWarpsN;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const float* mean = static_cast<const float*>(p.mean);
  const float* scale = static_cast<const float*>(p.scale);
  const float* beta = static_cast<const float*>(p.beta);

  // This thread's A row (output pixel), decomposed once; it copies chunks c_first.. of it each step.
  const int arow = tid / kRowThreads, c_first = (tid % kRowThreads) * kRowChunks;
  const int m = m0 + arow;
  const bool row_in = m < M;
  const int ow = m % g.OW, t = m / g.OW, oh = t % g.OH, nb = t / g.OH;
  const int ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
  const T* x_img = x + static_cast<int64_t>(row_in ? nb : 0) * g.H * g.W * g.C;

  const int steps = g.KH * g.KW * ceil_div(g.C, kBK);

  // The B rows this thread copies (output channels n0 + tid / kChunks + kBRows j, chunk tid % kChunks) are
  // fixed for the whole tile: one base pointer (rows past K clamped to a real row, their copies
  // zero-filled) and the step's offset into the [K][KH][KW][C] weight, the same for every row.
  // A tile narrower than a pass of the block (16 or 32 columns) leaves the threads past its rows idle.
  constexpr int kBRows = kMmaThreads / kChunks, kBCopies = kBN >= kBRows ? kBN / kBRows : 1;
  const int b_row = tid / kChunks, b_chunk = tid % kChunks;
  const bool b_copies = kBN >= kBRows || b_row < kBN;
  const int64_t w_krow = static_cast<int64_t>(g.KH) * g.KW * g.C;  // elements per output channel
  const T* w_thread = w + static_cast<int64_t>(min(n0 + b_row, g.K - 1)) * w_krow + kVec * b_chunk;
  unsigned kout_ok = 0;
#pragma unroll
  for (int j = 0; j < kBCopies; ++j) kout_ok |= (n0 + b_row + kBRows * j < g.K ? 1u : 0u) << j;

  // Issues the copies of the next step into stage `st` (and the slice's affine and row flags). Steps are
  // issued in order: (s, c0) and the tap's input pixel and offsets advance by counting and adding, and
  // only a change of tap recomputes the A row's offset -- no division in the loop.
  int s = 0, c0 = 0, w_tap = 0, ih = ih0, iw = iw0;
  auto tap_offset = [&](bool& ok) {
    ok = row_in && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
    return ok ? (static_cast<int64_t>(ih) * g.W + iw) * g.C : int64_t(0);
  };
  bool tap_ok;
  int64_t x_tap = tap_offset(tap_ok);
  auto issue = [&](int st) {
    // The row's pixel (pixel 0 of the image when the tap is in padding: some valid address either way); a
    // chunk past C reads nothing and points at the pixel's last chunk, so every address stays inside x.
    const T* a_pix = x_img + x_tap;
    if constexpr (kWhole) {
      // one address for the row's chunks, the rest at constant offsets from it
      const T* a_src = a_pix + (c0 + kVec * c_first);
#pragma unroll
      for (int q = 0; q < kRowChunks; ++q)
        cp_async_16(&sh.ring.a[st][arow][kVec * (c_first + q)], a_src + kVec * q, tap_ok);
    } else {
#pragma unroll
      for (int q = 0; q < kRowChunks; ++q) {
        const int k = c0 + kVec * (c_first + q);
        cp_async_16(&sh.ring.a[st][arow][kVec * (c_first + q)], a_pix + min(k, g.C - kVec), tap_ok && k < g.C);
      }
    }
    if (c_first == 0) sh.valid[st][arow] = tap_ok;
    const bool cok = kWhole || c0 + kVec * b_chunk < g.C;
    const T* wsrc = w_thread + (cok ? w_tap + c0 : 0);
    if (b_copies) {
#pragma unroll
      for (int j = 0; j < kBCopies; ++j)
        cp_async_16(&sh.ring.b[st][b_row + kBRows * j][kVec * b_chunk],
                    wsrc + (((kout_ok >> j) & 1u) ? j * kBRows * w_krow : 0), cok && ((kout_ok >> j) & 1u));
    }
    if (!kOneSlice && tid < 3 * kBK / 4) {  // the slice's mean, scale, beta: 16-byte copies too (no register round trip)
      const int arr = tid / (kBK / 4), part = tid % (kBK / 4), c = c0 + 4 * part;
      const float* src = arr == 0 ? mean : arr == 1 ? scale : beta;
      // past C: zero-filled (so is the activation), the address kept inside the array
      if constexpr (kWhole)
        cp_async_16(&sh.affine[st][arr][4 * part], src + c, true);
      else
        cp_async_16(&sh.affine[st][arr][4 * part], src + min(c, g.C - 4), c < g.C);
    }
    c0 += kBK;
    if (kOneSlice || c0 >= g.C) {  // next tap
      c0 = 0;
      w_tap += g.C;
      if (++s == g.KW) {
        s = 0;
        iw = iw0;
        ih += g.dil_h;
      } else {
        iw += g.dil_w;
      }
      x_tap = tap_offset(tap_ok);
    }
  };

  WarpAcc<kMI, kNJ> acc;
  acc.zero();

  const int gq = lane / 4, tq = lane % 4;
  // kOneSlice: this lane's channels' affine, for the tile
  constexpr int kKs = kBK / kK;
  float mu1[kKs][2][kPer], sc1[kKs][2][kPer], be1[kKs][2][kPer];
  if constexpr (kOneSlice) {
#pragma unroll
    for (int q = 0; q < kKs; ++q)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
#pragma unroll
        for (int h = 0; h < kPer; ++h) {
          const int ch = q * kK + frag_k<T>(tq, hi, h);
          mu1[q][hi][h] = mean[ch];
          sc1[q][hi][h] = scale[ch];
          be1[q][hi][h] = beta[ch];
        }
  }
  // This lane's A fragment addresses: the stage's first element plus one offset plus constants (not in the
  // narrow ring's 64-column tiles, capped at 128 registers).
  constexpr bool kNarrowRing = kChunks == kNarrowChunks && !kOneSlice;
  const int a_lane = kNarrowRing ? 0 : wm * kWM * Shared::kLd + a_mk_lane_offset<T, Shared::kLd>();
  run_ring(steps, issue, [&](int st) {
    const T* a_st = &sh.ring.a[st][0][0] + a_lane;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += kK) {
      // This lane's channels of the slice (registers 0-1, then 2-3): their affine once, for all its rows.
      float mu[2][kPer], sc[2][kPer], be[2][kPer];
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
#pragma unroll
        for (int h = 0; h < kPer; ++h) {
          const int ch = kk + frag_k<T>(tq, hi, h);
          mu[hi][h] = kOneSlice ? mu1[kk / kK][hi][h] : sh.affine[st][0][ch];
          sc[hi][h] = kOneSlice ? sc1[kk / kK][hi][h] : sh.affine[st][1][ch];
          be[hi][h] = kOneSlice ? be1[kk / kK][hi][h] : sh.affine[st][2][ch];
        }
      // One A fragment at a time (transformed, then multiplied with every B fragment): one alive, not kMI;
      // the B fragments are loaded after the first is transformed.
      uint32_t fb[kNJ][2];
#pragma unroll
      for (int i = 0; i < kMI; ++i) {
        const int row = wm * kWM + i * 16;
        uint32_t fa[4];
        if constexpr (kNarrowRing)  // at 128 registers, a_lane held across the loop spilled (sm_90, 24 bytes)
          load_a_mk(fa, sh.ring.a[st], row, kk);
        else
          ldmatrix_x4(fa, a_st + i * 16 * Shared::kLd + kk);  // load_a_mk(fa, sh.ring.a[st], row, kk)
        const uint32_t k0 = sh.valid[st][row + gq] ? ~0u : 0u, k1 = sh.valid[st][row + gq + 8] ? ~0u : 0u;
        fa[0] = bn_relu_reg<T>(fa[0], k0, mu[0], sc[0], be[0]);
        fa[1] = bn_relu_reg<T>(fa[1], k1, mu[0], sc[0], be[0]);
        fa[2] = bn_relu_reg<T>(fa[2], k0, mu[1], sc[1], be[1]);
        fa[3] = bn_relu_reg<T>(fa[3], k1, mu[1], sc[1], be[1]);
        if (i == 0) {
#pragma unroll
          for (int jp = 0; jp < kNJ / 2; ++jp)
            load_b_nk(fb[2 * jp], fb[2 * jp + 1], sh.ring.b[st], wn * kWN + jp * 16, kk);
#pragma unroll
          for (int j = 0; j < kNJ; ++j) raw_operands<T>(fb[j]);
        }
        acc.template mma_row<T>(i, fa, fb);
      }
    }
  });
  acc.store(sh.epi.c, wm * kWM, wn * kWN);
  if (tid < kBM) {
    const int mm = m0 + tid, tt = mm / g.OW;
    sh.epi.n[tid] = mm < M ? tt / g.OH : -1;
    sh.epi.oh[tid] = tt % g.OH;
    sh.epi.ow[tid] = mm % g.OW;
  }
  __syncthreads();
  forward_epilogue<T, kBM, kBN, Shared::kLdC>(
      p, sh.epi.c, m0, n0, M, [&](int row, int& nb_, int& oh_, int& ow_) {
        nb_ = sh.epi.n[row];
        oh_ = sh.epi.oh[row];
        ow_ = sh.epi.ow[row];
        return nb_ >= 0;
      });
}

template <class T, int kBM, int kBN, int kChunks, bool kOneSlice>
__global__ void __launch_bounds__(kMmaThreads, fwd_min_ctas<T, kChunks>()) conv_forward_mma_kernel(const ConvForwardParams p) {
  conv_forward_mma_tile<T, kBM, kBN, kChunks, kOneSlice>(p, blockIdx.x, blockIdx.y);
}

// The pair (ConvForwardPairParams): columns [0, a's tiles) are a's, the rest b's; one output grid, so
// blockIdx.x is the same row tile for both and blocks of one row tile read the same rows of x. A block runs
// one conv's tile, the branch uniform across it (each side reads its own params at fixed offsets). The
// statistics epilogue indexes its partials by blockIdx.x / gridDim.x: a's row tiles, as in a's own launch.
template <class T, int kBM, int kBN, int kChunks, bool kOneSlice>
__global__ void __launch_bounds__(kMmaThreads, fwd_min_ctas<T, kChunks>())
    conv_forward_mma_pair_kernel(const ConvForwardPairParams pp) {
  const int tiles_a = ceil_div(pp.a.g.K, kBN);
  if (static_cast<int>(blockIdx.y) < tiles_a)
    conv_forward_mma_tile<T, kBM, kBN, kChunks, kOneSlice>(pp.a, blockIdx.x, blockIdx.y);
  else
    conv_forward_mma_tile<T, kBM, kBN, kChunks, kOneSlice>(pp.b, blockIdx.x, blockIdx.y - tiles_a);
}

}  // namespace

bool conv_forward_mma_applies(const ConvForwardParams& p) {
  const ConvGeom& g = p.g;
  const int64_t C = g.C;
  const bool x_nhwc = nhwc_dense(p.sx, g.N, C, g.H, g.W), w_nhwc = nhwc_dense(p.sw, g.K, C, g.KH, g.KW);
  // mean/scale/beta too: the slice's affine is copied 16 bytes at a time (C % 4 == 0 below)
  const bool aligned = aligned16(p.x) && aligned16(p.w) && aligned16(p.mean) && aligned16(p.scale) &&
                       aligned16(p.beta);
  // ReLU only (bn_relu_reg, mma_tile.cuh): the identity activation runs on the WMMA/FMA kernel
  return p.act_floor == 0.0f && mma_dtype(p.dtype, p.tf32) && x_nhwc && w_nhwc && aligned &&
         C % mma_vec(p.dtype) == 0;
}

int conv_forward_mma_tile_rows(const ConvForwardParams& p) { return p.g.K <= 64 ? 128 : 64; }

template <int kBM, int kBN, int kChunks, bool kOneSlice>
cudaError_t launch_mma_forward(const ConvForwardParams& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(static_cast<int64_t>(p.g.N) * p.g.OH * p.g.OW, kBM), ceil_div(p.g.K, kBN));
  return dispatch_mma_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_shared<FwdMmaShared<T, kBM, kBN, kChunks>>(conv_forward_mma_kernel<T, kBM, kBN, kChunks, kOneSlice>,
                                                            grid, dim3(kMmaThreads), stream, p);
  });
}

template <int kBM, int kBN>
cudaError_t launch_mma_forward(const ConvForwardParams& p, cudaStream_t stream) {
  const int vec = mma_vec(p.dtype);
  if (p.g.C == kWideChunks * vec) return launch_mma_forward<kBM, kBN, kWideChunks, true>(p, stream);
  if (p.g.C % (kWideChunks * vec) == 0) return launch_mma_forward<kBM, kBN, kWideChunks, false>(p, stream);
  if (p.g.C == kHalfChunks * vec) return launch_mma_forward<kBM, kBN, kHalfChunks, true>(p, stream);
  if constexpr (kBN <= 32) {
    if (p.g.C == kNarrowChunks * vec) return launch_mma_forward<kBM, kBN, kNarrowChunks, true>(p, stream);
  }
  return launch_mma_forward<kBM, kBN, kNarrowChunks, false>(p, stream);
}

template <int kBM, int kBN, int kChunks, bool kOneSlice>
cudaError_t launch_mma_forward_pair(const ConvForwardPairParams& pp, cudaStream_t stream) {
  const ConvForwardParams& p = pp.a;
  const dim3 grid(ceil_div(static_cast<int64_t>(p.g.N) * p.g.OH * p.g.OW, kBM),
                  ceil_div(pp.a.g.K, kBN) + ceil_div(pp.b.g.K, kBN));
  return dispatch_mma_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_shared<FwdMmaShared<T, kBM, kBN, kChunks>>(
        conv_forward_mma_pair_kernel<T, kBM, kBN, kChunks, kOneSlice>, grid, dim3(kMmaThreads), stream, pp);
  });
}

// The slice choice of launch_mma_forward (C is the pair's one x).
template <int kBM, int kBN>
cudaError_t launch_mma_forward_pair(const ConvForwardPairParams& pp, cudaStream_t stream) {
  const int vec = mma_vec(pp.a.dtype), c = pp.a.g.C;
  if (c == kWideChunks * vec) return launch_mma_forward_pair<kBM, kBN, kWideChunks, true>(pp, stream);
  if (c % (kWideChunks * vec) == 0) return launch_mma_forward_pair<kBM, kBN, kWideChunks, false>(pp, stream);
  if (c == kHalfChunks * vec) return launch_mma_forward_pair<kBM, kBN, kHalfChunks, true>(pp, stream);
  if constexpr (kBN <= 32) {
    if (c == kNarrowChunks * vec) return launch_mma_forward_pair<kBM, kBN, kNarrowChunks, true>(pp, stream);
    return launch_mma_forward_pair<kBM, kBN, kNarrowChunks, false>(pp, stream);
  } else {
    // 64-byte slices in the 64- and 128-column tiles: the pair instances spilled 8-16 B at the 128-register cap
    // of 4 CTAs per SM (fp16/bf16, sm_80 and sm_90), so those pairs take 128x32 tiles (116-123 registers, no
    // spill): CIFAR's 32 -> 64 projection, widths that are not multiples of 64 channels.
    return launch_mma_forward_pair<128, 32>(pp, stream);
  }
}

// The pair's tile: conv_forward_mma's choice for the narrower conv's K, so neither conv's tiles run MMAs on
// a column block past its K (a bottleneck's 64-channel conv1 beside its 256-channel shortcut: 128x64).
int conv_forward_mma_pair_k(const ConvForwardPairParams& pp) { return min(pp.a.g.K, pp.b.g.K); }

int conv_forward_mma_pair_tile_rows(const ConvForwardPairParams& pp) {
  const bool wide_or_half = pp.a.g.C % (kWideChunks * mma_vec(pp.a.dtype)) == 0 ||
                            pp.a.g.C == kHalfChunks * mma_vec(pp.a.dtype);
  return conv_forward_mma_pair_k(pp) <= 64 || !wide_or_half ? 128 : 64;  // narrow slices: 128x32 (above)
}

cudaError_t conv_forward_mma_pair(const ConvForwardPairParams& pp, cudaStream_t stream) {
  const int k = conv_forward_mma_pair_k(pp);
  if (k > 64) return launch_mma_forward_pair<64, 128>(pp, stream);
  if (k > 32) return launch_mma_forward_pair<128, 64>(pp, stream);
  return k > 16 ? launch_mma_forward_pair<128, 32>(pp, stream) : launch_mma_forward_pair<128, 16>(pp, stream);
}

cudaError_t conv_forward_mma(const ConvForwardParams& p, cudaStream_t stream) {
  if (p.g.K > 64) return launch_mma_forward<64, 128>(p, stream);
  if (p.g.K > 32) return launch_mma_forward<128, 64>(p, stream);
  return p.g.K > 16 ? launch_mma_forward<128, 32>(p, stream) : launch_mma_forward<128, 16>(p, stream);
}

}  // namespace detail
}  // namespace fused_resnet
