// dgrad, tensor-core path for NHWC gy and W (fp16/bf16 with K and C multiples of 8; fp32 in TF32 with
// multiples of 4): the 16-byte cp.async ring of conv_forward_mma.cu with raw gy as A (no transform: the
// ReLU mask and BN backward are the epilogue's) and W as B (rows are output channels: the transposing
// ldmatrix for 16-bit elements, 32-bit loads for float) -> mma.sync.
//
// Split by stride phase: input pixel (h, w) receives from tap (r, s) only when the stride divides
// h + pad_h - r*dil_h (and likewise for w). Pixels of one phase (h mod stride_h, w mod stride_w) share the
// set of taps that reach them, so each phase is its own GEMM (grid z) over its own pixels and its own taps:
// no MMA multiplies a tap the stride masks (at stride 2 that was three quarters of them), and the output
// row of a tap is the pixel's phase-grid row plus a per-tap constant -- no division in the main loop.
// Within a phase the valid r form an arithmetic progression (step stride_h / gcd(stride_h, dil_h)).
//
// GEMM per phase: rows = the phase's input pixels, columns = input channels, reduction = (valid tap,
// 64-byte slice of K; 32 bytes where K is exactly that, CIFAR's 16 channels, so no MMA runs on zero-filled
// output channels). CTA tile 64x128 when C > 64, else 128 rows by the smallest of 16, 32, 64 columns that
// holds C. The epilogue is conv_dgrad.cu's (conv_dgrad.cuh).
#include "conv_dgrad.cuh"

namespace fused_resnet {
namespace detail {
namespace {

constexpr int kStages = kMmaStages;

// 16-byte copies per gy row and step: 4 (MmaElem's 64-byte slice), or 2 (one mma's 32 bytes of the
// reduction) where K is exactly that.
constexpr int kHalfChunks = 2, kNarrowChunks = 4;

template <class T, int kBM, int kBN, int kChunks = kNarrowChunks>
struct DgradMmaShared {
  static constexpr int kBK = kChunks * MmaElem<T>::kVec, kLd = kBK + MmaElem<T>::kVec;
  // [k][col] rows: 16-byte aligned, rows of an ldmatrix on distinct bank groups; for float, whose B
  // fragments are 32-bit loads of 4 rows x 8 columns, a pitch of 8 banks mod 32 keeps those conflict-free.
  static constexpr int kLdB = kBN + 8;
  static constexpr int kLdC = kBN + 4;
  union {
    struct {
      T a[kStages][kBM][kLd];   // gy rows, output channels fastest
      T b[kStages][kBK][kLdB];  // W[k][r][s][c], input channels fastest
    } ring;
    float c[kBM][kLdC];  // ga, once the ring is drained
  };
  int row_n[kBM], row_h[kBM], row_w[kBM];  // each tile row's input pixel, for the epilogue
};
static_assert(sizeof(DgradMmaShared<__half, 128, 64>) <= 48 * 1024, "static shared memory");
static_assert(sizeof(DgradMmaShared<__half, 64, 128>) <= 48 * 1024, "static shared memory");
static_assert(sizeof(DgradMmaShared<float, 128, 64>) <= 48 * 1024, "static shared memory");
static_assert(sizeof(DgradMmaShared<float, 64, 128>) <= 48 * 1024, "static shared memory");

__host__ __device__ __forceinline__ int gcd_int(int a, int b) {
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// The taps of one dimension that reach phase `ph`: r = first, first + step, ... < taps; the output offset
// of tap `first` is off0 (output row = phase-grid row + off0), falling by off_step per further tap.
struct PhaseTaps {
  int first, step, count, off0, off_step;
  __host__ __device__ PhaseTaps(int ph, int stride, int pad, int dil, int taps) {
    step = stride / gcd_int(stride, dil);
    first = taps;  // none unless one of the first `step` taps lands on the stride
    for (int r = 0; r < step && r < taps; ++r)
      if (((ph + pad - r * dil) % stride + stride) % stride == 0) {
        first = r;
        break;
      }
    count = first < taps ? (taps - first + step - 1) / step : 0;
    off0 = (ph + pad - first * dil) / stride;  // exact: the stride divides it
    off_step = step * dil / stride;
  }
};

__host__ __device__ __forceinline__ int phase_extent(int size, int ph, int stride) {
  return size > ph ? (size - ph + stride - 1) / stride : 0;
}

template <class T, int kBM, int kBN, int kChunks>
__global__ void __launch_bounds__(kMmaThreads) conv_dgrad_mma_kernel(const ConvDgradParams p) {
  // 2x2 warps; 4x1 in the tiles narrower than 64 columns (a warp's 16 or 32 columns: whole B fragment pairs)
  constexpr int kWarpsM = kBN >= 64 ? 2 : 4, kWarpsN = 4 / kWarpsM;
  constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN, kMI = kWM / 16, kNJ = kWN / 8;
  using Shared = DgradMmaShared<T, kBM, kBN, kChunks>;
  constexpr int kBK = Shared::kBK, kVec = MmaElem<T>::kVec, kK = MmaElem<T>::kK;
  constexpr int kRowThreads = kMmaThreads / kBM, kRowChunks = kChunks / kRowThreads;
  // W copies per step (16 bytes each): fewer than the block's threads in the small tiles
  constexpr int kBCopies = kBK * kBN / kVec, kBPasses = (kBCopies + kMmaThreads - 1) / kMmaThreads;
  // Half slices are launched only when K is exactly one: every step is a tap of its own, no copy past K.
  constexpr bool kOneSlice = kChunks == kHalfChunks;
  auto& sh = block_shared<Shared>();
  const ConvGeom& g = p.g;
  const int ph = blockIdx.z / g.stride_w, pw = blockIdx.z % g.stride_w;
  const int Hp = phase_extent(g.H, ph, g.stride_h), Wp = phase_extent(g.W, pw, g.stride_w);
  const int M = g.N * Hp * Wp;  // this phase's pixels
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / kWarpsN, wn = warp % kWarpsN;
  const T* gy = static_cast<const T*>(p.gy);
  const T* w = static_cast<const T*>(p.w);
  const PhaseTaps th(ph, g.stride_h, g.pad_h, g.dil_h, g.KH), tw(pw, g.stride_w, g.pad_w, g.dil_w, g.KW);

  // Each tile row's pixel, decomposed once; the thread copying row `arow` keeps its phase-grid (hh, ww).
  if (tid < kBM) {
    const int m = m0 + tid, ww = m % max(Wp, 1), t = m / max(Wp, 1);
    sh.row_n[tid] = t / max(Hp, 1);
    sh.row_h[tid] = ph + g.stride_h * (t % max(Hp, 1));
    sh.row_w[tid] = pw + g.stride_w * ww;
  }
  const int arow = tid / kRowThreads, c_first = (tid % kRowThreads) * kRowChunks;
  const int m = m0 + arow;
  const bool row_in = m < M;
  const int ww = m % max(Wp, 1), t = m / max(Wp, 1), hh = t % max(Hp, 1), nb = t / max(Hp, 1);
  const T* gy_img = gy + static_cast<int64_t>(row_in ? nb : 0) * g.OH * g.OW * g.K;

  const int steps = th.count * tw.count * ceil_div(g.K, kBK);
  // Steps in order: (valid r, valid s, k0) advance by counting, the output offsets with them.
  int ri = 0, si = 0, k0 = 0, r = th.first, s = tw.first, oh_off = th.off0, ow_off = tw.off0;
  auto issue = [&](int st) {
    const int oh = hh + oh_off, ow = ww + ow_off;
    const bool ok = row_in && oh >= 0 && oh < g.OH && ow >= 0 && ow < g.OW;
    const T* src = gy_img + (static_cast<int64_t>(ok ? oh : 0) * g.OW + (ok ? ow : 0)) * g.K + k0;
#pragma unroll
    for (int q = 0; q < kRowChunks; ++q) {
      const int ch = c_first + q;
      cp_async_16(&sh.ring.a[st][arow][kVec * ch], src + kVec * ch, ok && (kOneSlice || k0 + kVec * ch < g.K));
    }
#pragma unroll
    for (int j = 0; j < kBPasses; ++j) {
      const int i = tid + j * kMmaThreads, row = i / (kBN / kVec), ch = i % (kBN / kVec);
      if (kBCopies % kMmaThreads != 0 && i >= kBCopies) break;
      const int kout = k0 + row, c = n0 + kVec * ch;
      const bool wok = kout < g.K && c < g.C;
      const T* wsrc = w + ((static_cast<int64_t>(wok ? kout : 0) * g.KH + r) * g.KW + s) * g.C + (wok ? c : 0);
      cp_async_16(&sh.ring.b[st][row][kVec * ch], wsrc, wok);
    }
    k0 += kBK;
    if (kOneSlice || k0 >= g.K) {
      k0 = 0;
      s += tw.step;
      ow_off -= tw.off_step;
      if (++si == tw.count) {
        si = 0;
        s = tw.first;
        ow_off = tw.off0;
        ++ri;
        r += th.step;
        oh_off -= th.off_step;
      }
    }
  };

  WarpAcc<kMI, kNJ> acc;
  acc.zero();
  run_ring(steps, issue, [&](int st) {
#pragma unroll
    for (int kk = 0; kk < kBK; kk += kK) {
      uint32_t fa[kMI][4], fb[kNJ][2];
#pragma unroll
      for (int i = 0; i < kMI; ++i) {
        load_a_mk(fa[i], sh.ring.a[st], wm * kWM + i * 16, kk);
        raw_operands<T>(fa[i]);
      }
#pragma unroll
      for (int jp = 0; jp < kNJ / 2; ++jp) load_b_kn(fb[2 * jp], fb[2 * jp + 1], sh.ring.b[st], wn * kWN + jp * 16, kk);
#pragma unroll
      for (int j = 0; j < kNJ; ++j) raw_operands<T>(fb[j]);
      acc.template mma<T>(fa, fb);
    }
  });
  acc.store(sh.c, wm * kWM, wn * kWN);
  __syncthreads();
  dgrad_epilogue<T, kBM, kBN, Shared::kLdC>(
      p, sh.c, min(M - m0, kBM), n0, blockIdx.z * gridDim.x + blockIdx.x, sh.row_n, sh.row_h, sh.row_w);
}

// Tiles of the largest phase (phase 0): every phase gets as many; those past a smaller phase's pixels
// write zero partials.
int rows_per_tile(const ConvDgradParams& p) { return p.g.C <= 64 ? 128 : 64; }
int phase0_tiles(const ConvDgradParams& p, int rows) {
  const ConvGeom& g = p.g;
  return ceil_div(static_cast<int64_t>(g.N) * phase_extent(g.H, 0, g.stride_h) * phase_extent(g.W, 0, g.stride_w),
                  rows);
}

template <int kBM, int kBN>
cudaError_t launch_mma_dgrad(const ConvDgradParams& p, cudaStream_t stream) {
  const dim3 grid(phase0_tiles(p, kBM), ceil_div(p.g.C, kBN), p.g.stride_h * p.g.stride_w);
  const bool half = p.g.K == kHalfChunks * mma_vec(p.dtype);
  return dispatch_mma_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (half) return launch(conv_dgrad_mma_kernel<T, kBM, kBN, kHalfChunks>, grid, dim3(kMmaThreads), stream, p);
    return launch(conv_dgrad_mma_kernel<T, kBM, kBN, kNarrowChunks>, grid, dim3(kMmaThreads), stream, p);
  });
}

}  // namespace

bool conv_dgrad_mma_applies(const ConvDgradParams& p) {
  const ConvGeom& g = p.g;
  const int vec = mma_vec(p.dtype);
  return mma_dtype(p.dtype, p.tf32) && nhwc_dense(p.sg, g.N, g.K, g.OH, g.OW) &&
         nhwc_dense(p.sw, g.K, g.C, g.KH, g.KW) && aligned16(p.gy) && aligned16(p.w) && g.K % vec == 0 &&
         g.C % vec == 0 && g.stride_h * g.stride_w <= 65535;
}

int conv_dgrad_mma_tiles(const ConvDgradParams& p) {
  return phase0_tiles(p, rows_per_tile(p)) * p.g.stride_h * p.g.stride_w;
}

cudaError_t conv_dgrad_mma(const ConvDgradParams& p, cudaStream_t stream) {
  if (rows_per_tile(p) == 64) return launch_mma_dgrad<64, 128>(p, stream);
  if (p.g.C > 32) return launch_mma_dgrad<128, 64>(p, stream);
  return p.g.C > 16 ? launch_mma_dgrad<128, 32>(p, stream) : launch_mma_dgrad<128, 16>(p, stream);
}

}  // namespace detail
}  // namespace fused_resnet
