// What the two dgrad kernels share: the epilogue, and the tensor-core path's entry points (conv_dgrad.cu
// picks the path; conv_dgrad_mma.cu holds the mma.sync kernel).
#pragma once

#include "mma_tile.cuh"

namespace fused_resnet {
namespace detail {

// The epilogue on a tile c[BM][LdC] of ga (visible to every thread) whose first `rows` rows are the input
// pixels (row_n, row_h, row_w): ga rounded to T (eager's conv backward returns it in the input dtype),
// gm = ga where NOT ((x - mean)*scale + beta <= 0) (eager's threshold_backward: NaN passes), stored as gm
// with batch statistics (half the bytes of a float32 buffer, and exactly eager's ReLU-backward output) or
// as dx = gm*scale otherwise, both in T (p.addend: ga is first summed with the other consumers' share, each
// rounded to T; p.raw: that ga itself is stored, nothing else); with p.part, the tile's per-column S1 = sum gm and S2 = sum
// gm*xhat into row `tile` of the [tiles, 2, C] partials (zeros for a tile without rows). Every thread of
// the block calls it.
template <class T, int BM, int BN, int LdC>
__device__ __forceinline__ void dgrad_epilogue(const ConvDgradParams& p, acc_t<T> (*c)[LdC], int rows, int n0,
                                               int tile, const int* row_n, const int* row_h, const int* row_w) {
  using Acc = acc_t<T>;
  const ConvGeom& g = p.g;
  const T* x = static_cast<const T*>(p.x);
  const Acc* scale = static_cast<const Acc*>(p.scale);
  const Acc* beta = static_cast<const Acc*>(p.beta);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* invstd = static_cast<const Acc*>(p.invstd);
  const bool cfast = p.sx[1] <= p.sx[3];
  // Channels fastest (channels_last x): the walk keeps each thread on one column (blockDim is a multiple of
  // BN), so its share of the column sums accrues on the way -- no second pass over x; otherwise gm stays in
  // c and a thread per column sums it afterwards.
  const bool own_col = cfast && blockDim.x % BN == 0;
  // x and out dense channels_last with the same strides (as the launchers allocate out): one offset,
  // pixel * C + ch, for both -- no 64-bit stride products per element.
  const bool dense = nhwc_dense(p.sx, g.N, g.C, g.H, g.W) && p.so[0] == p.sx[0] && p.so[1] == p.sx[1] &&
                     p.so[2] == p.sx[2] && p.so[3] == p.sx[3];
  const T* addend = static_cast<const T*>(p.addend);  // out's strides (the binding checks)
  Acc s1 = 0, s2 = 0;
  // One element: x read at ox, dx or gm (or ga, raw) stored at oo.
  // Where dense: the element offset of (tile row, channel) in x and out alike.
  auto dense_offset = [&](int row, int ch) {
    return (static_cast<int64_t>(row_n[row] * g.H + row_h[row]) * g.W + row_w[row]) * g.C + ch;
  };
  auto one = [&](int row, int col, int ch, int64_t ox, int64_t oo) {
    Acc ga = to_acc(Cvt<T>::from(c[row][col]));
    if (addend != nullptr) ga = to_acc(Cvt<T>::from(ga + to_acc(addend[oo])));
    if (p.raw) {  // part is null: no sums
      static_cast<T*>(p.out)[oo] = Cvt<T>::from(ga);
      return;
    }
    const Acc xv = to_acc(x[ox]);
    const Acc gm = relu_passes(bn_affine(xv, mean[ch], scale[ch], beta[ch])) ? ga : Acc(0);
    if (own_col) {
      s1 += gm;  // no skip of gm == 0: eager's 0 * inf (xhat of an inf x) is NaN
      s2 = fma(gm, (xv - mean[ch]) * invstd[ch], s2);
    } else {
      c[row][col] = gm;
    }
    static_cast<T*>(p.out)[oo] = Cvt<T>::from(p.batch_stats ? gm : gm * scale[ch]);
  };
  // 16 bytes of x and out per access -- kV consecutive channels of one input pixel -- where they are dense
  // channels_last, 16-byte aligned and C % kV == 0: each thread keeps the same kV columns for the whole
  // walk, so their BN affine is loaded once and their shares of S1, S2 accrue in registers. Not with an
  // addend (the pair op's conv1): with it in this loop, ptxas scheduled the 64x128 main loop above worse
  // (7.5 -> 8.1 instructions per HMMA, benchmarks/NOTES.md).
  constexpr int kV = Vec16<T>::kN, kCols = BN / kV;  // vectors per tile row
  // (Not for fp64: 2 elements per access gain little there, and its general kernel would spill on sm_80.)
  const bool vec = sizeof(T) < 8 && dense && own_col && g.C % kV == 0 && blockDim.x % kCols == 0 &&
                   aligned16(x) && aligned16(p.out) && addend == nullptr;
  Acc v1[kV], v2[kV];  // the vector walk's S1, S2 shares
  if (vec) {
    const int col = threadIdx.x % kCols * kV, ch0 = n0 + col;
    Acc mu[kV], sc[kV], be[kV], is[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      v1[e] = v2[e] = 0;
      const bool in = ch0 < g.C;  // C % kV == 0: the vector's channels are all in or all out
      mu[e] = in ? mean[ch0 + e] : Acc(0);
      sc[e] = in ? scale[ch0 + e] : Acc(0);
      be[e] = in ? beta[ch0 + e] : Acc(0);
      is[e] = in ? invstd[ch0 + e] : Acc(0);
    }
    T* out = static_cast<T*>(p.out);
    for (int row = threadIdx.x / kCols; row < rows && ch0 < g.C; row += blockDim.x / kCols) {
      const int64_t o = dense_offset(row, ch0);
      Vec16<T> xv{}, av{}, ov;
      if (!p.raw) xv = load16(x + o);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        Acc ga = to_acc(Cvt<T>::from(c[row][col + e]));
        if (p.raw) {
          ov.v[e] = Cvt<T>::from(ga);
          continue;
        }
        const Acc xe = to_acc(xv.v[e]);
        const Acc gm = relu_passes(bn_affine(xe, mu[e], sc[e], be[e])) ? ga : Acc(0);
        v1[e] += gm;  // no skip of gm == 0: eager's 0 * inf (xhat of an inf x) is NaN
        v2[e] = fma(gm, (xe - mu[e]) * is[e], v2[e]);
        ov.v[e] = Cvt<T>::from(p.batch_stats ? gm : gm * sc[e]);
      }
      store16(out + o, ov);
    }
  } else if (dense) {
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      const int row = idx / BN, col = idx % BN, ch = n0 + col;
      if (row >= rows || ch >= g.C) continue;
      const int64_t o = dense_offset(row, ch);
      one(row, col, ch, o, o);
    }
  } else {
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      int row, col;
      tile_coord<BM, BN>(idx, cfast, row, col);
      const int ch = n0 + col;
      if (row >= rows || ch >= g.C) continue;
      const int nb = row_n[row], h = row_h[row], w = row_w[row];
      one(row, col, ch, offset4(p.sx, nb, ch, h, w), offset4(p.so, nb, ch, h, w));
    }
  }
  if (p.part == nullptr) return;
  __syncthreads();  // every thread is done with c
  const int col = threadIdx.x, ch = n0 + col;
  if (own_col) {  // the threads sharing a column post their sums in c's first rows, then one adds them up
    const int cols = vec ? kCols : BN, shares = blockDim.x / cols, share = threadIdx.x / cols;
    if (vec) {
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        c[share][threadIdx.x % kCols * kV + e] = v1[e];
        c[shares + share][threadIdx.x % kCols * kV + e] = v2[e];
      }
    } else {
      c[share][threadIdx.x % BN] = s1;
      c[shares + share][threadIdx.x % BN] = s2;
    }
    __syncthreads();
    s1 = s2 = 0;
    if (col < BN)
      for (int j = 0; j < shares; ++j) {
        s1 += c[j][col];
        s2 += c[shares + j][col];
      }
  } else if (col < BN && ch < g.C) {
    for (int row = 0; row < rows; ++row) {
      const Acc gm = c[row][col];
      const Acc xhat = (to_acc(x[offset4(p.sx, row_n[row], ch, row_h[row], row_w[row])]) - mean[ch]) * invstd[ch];
      s1 += gm;
      s2 = fma(gm, xhat, s2);
    }
  }
  if (col < BN && ch < g.C) {
    Acc* part = static_cast<Acc*>(p.part);
    part[static_cast<int64_t>(2 * tile) * g.C + ch] = s1;  // [tiles, 2, C]: rows column_sums adds up
    part[static_cast<int64_t>(2 * tile + 1) * g.C + ch] = s2;
  }
}

// The tensor-core path (fp16/bf16, gy and W channels_last-dense, K % 8 == 0 and C % 8 == 0, 16-byte
// aligned), its number of tiles (which sizes the partials) and its launch.
bool conv_dgrad_mma_applies(const ConvDgradParams& p);
int conv_dgrad_mma_tiles(const ConvDgradParams& p);
cudaError_t conv_dgrad_mma(const ConvDgradParams& p, cudaStream_t stream);

}  // namespace detail
}  // namespace fused_resnet
