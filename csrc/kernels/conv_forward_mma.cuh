// What the two forward kernels share: the epilogue, and the tensor-core path's entry points
// (conv_forward.cu picks the path; conv_forward_mma.cu holds the mma.sync kernel).
#pragma once

#include "mma_tile.cuh"

namespace fused_resnet {
namespace detail {

// The epilogue on an accumulator tile c[BM][LdC] in shared memory (visible to every thread): bias and
// residual added, y stored in its dtype, and with p.part the per-tile (mean, M2) of y as stored -- two
// passes per column, merged across tiles by bn_finalize; never a float32 sum of squares.
// pixel(row, nb, oh, ow) gives the output pixel of tile row `row` and returns false past the end.
// Every thread of the block calls it (it ends with a barrier when statistics are wanted).
template <class T, int BM, int BN, int LdC, class PixelOf>
__device__ __forceinline__ void forward_epilogue(const ConvForwardParams& p, acc_t<T> (*c)[LdC], int m0, int n0,
                                                 int M, PixelOf pixel) {
  using Acc = acc_t<T>;
  const ConvGeom& g = p.g;
  const Acc* bias = static_cast<const Acc*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const bool cfast = p.sy[1] <= p.sy[3];
  // y (and the residual) dense channels_last, as the launchers allocate y for a channels_last x: element
  // (row, col) sits at (m0 + row) * K + kout, no pixel decomposition or 64-bit stride products.
  const bool dense = nhwc_dense(p.sy, g.N, g.K, g.OH, g.OW) &&
                     (res == nullptr || (p.sr[0] == p.sy[0] && p.sr[1] == p.sy[1] && p.sr[2] == p.sy[2] &&
                                         p.sr[3] == p.sy[3]));
  // One element: its value stored at offset oy of y, with the residual's element at orr.
  auto finish = [&](int row, int col, int kout, int64_t oy, int64_t orr) {
    Acc v = c[row][col];
    if (bias) v += bias[kout];
    if (res) v += to_acc(res[orr]);
    const T out = Cvt<T>::from(v);
    y[oy] = out;
    c[row][col] = to_acc(out);  // statistics of y as stored: what the next BN reads
  };
  // 16 bytes of y (and of the residual) per access -- kV consecutive output channels of one pixel -- where
  // the rows of y allow it: one store per kV elements instead of one each, and no per-element addressing.
  // Without a conv bias (a pre-activation ResNet's convs have none): with the bias in this loop, ptxas
  // scheduled the main loop above worse (up to +0.7 instructions per HMMA, benchmarks/NOTES.md).
  constexpr int kV = Vec16<T>::kN;
  // (Not for fp64: 2 elements per access gain little there, and its general kernel would spill on sm_80.)
  const bool vec = sizeof(T) < 8 && dense && bias == nullptr && g.K % kV == 0 && aligned16(y) &&
                   (res == nullptr || aligned16(res));
  if (vec) {
    for (int idx = threadIdx.x; idx < BM * BN / kV; idx += blockDim.x) {
      const int row = idx / (BN / kV), col = idx % (BN / kV) * kV, kout = n0 + col;
      if (kout >= g.K || m0 + row >= M) continue;  // K % kV == 0: a vector is wholly inside or outside
      const int64_t o = static_cast<int64_t>(m0 + row) * g.K + kout;
      Vec16<T> r{}, out;
      if (res) r = load16(res + o);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        Acc v = c[row][col + e];
        if (res) v += to_acc(r.v[e]);
        out.v[e] = Cvt<T>::from(v);
        c[row][col + e] = to_acc(out.v[e]);  // statistics of y as stored
      }
      store16(y + o, out);
    }
  } else if (dense) {
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      const int row = idx / BN, col = idx % BN, kout = n0 + col;
      if (kout >= g.K || m0 + row >= M) continue;
      const int64_t o = static_cast<int64_t>(m0 + row) * g.K + kout;
      finish(row, col, kout, o, o);
    }
  } else {
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      int row, col;
      tile_coord<BM, BN>(idx, cfast, row, col);
      const int kout = n0 + col;
      int nb, oh, ow;
      if (kout >= g.K || !pixel(row, nb, oh, ow)) continue;
      finish(row, col, kout, offset4(p.sy, nb, kout, oh, ow), res ? offset4(p.sr, nb, kout, oh, ow) : 0);
    }
  }
  if (p.part == nullptr) return;
  __syncthreads();
  // Every thread of the block on the statistics, not one per column: blockDim / BN threads share a column
  // (8 in a 16-column tile, where one thread per column left warp 0 two passes over all 128 rows -- as long
  // as the tile's main loop -- and the other warps idle), each two passes over its own run of rows; their
  // (count, mean, M2) are merged by Chan's formula.
  const int col = threadIdx.x % BN, share = threadIdx.x / BN, kout = n0 + col;
  const int shares = max(static_cast<int>(blockDim.x) / BN, 1);
  const int cnt = min(M - m0, BM), per = ceil_div(cnt, shares);
  const int r0 = min(share * per, cnt), r1 = min(r0 + per, cnt);
  Acc mean = 0, m2 = 0;
  const bool mine = share < shares && kout < g.K;
  if (mine && r1 > r0) {
    Acc sum = 0;
    for (int row = r0; row < r1; ++row) sum += c[row][col];
    mean = sum / Acc(r1 - r0);
    for (int row = r0; row < r1; ++row) {
      const Acc d = c[row][col] - mean;
      m2 = fma(d, d, m2);
    }
  }
  if (shares > 1) {
    __syncthreads();  // every thread is done reading c: its first rows take the shares' (mean, M2)
    if (mine) {
      c[share][col] = mean;
      c[shares + share][col] = m2;
    }
    __syncthreads();
    if (share == 0 && mine) {
      Acc n = Acc(r1 - r0);  // share 0's rows
      for (int j = 1; j < shares; ++j) {
        const int b0 = min(j * per, cnt), nb = min(b0 + per, cnt) - b0;
        if (nb <= 0) break;  // the shares past the tile's rows hold nothing
        const Acc n_ab = n + Acc(nb), delta = c[j][col] - mean;
        mean += delta * (Acc(nb) / n_ab);
        m2 += c[shares + j][col] + delta * delta * (n * Acc(nb) / n_ab);
        n = n_ab;
      }
    }
  }
  if (share == 0 && mine) {
    Acc* part = static_cast<Acc*>(p.part);
    part[static_cast<int64_t>(blockIdx.x) * g.K + kout] = mean;
    part[static_cast<int64_t>(gridDim.x + blockIdx.x) * g.K + kout] = m2;
  }
}

// The tensor-core path (fp16/bf16, x and W channels_last-dense, C % 8 == 0, 16-byte aligned) and its
// rows per tile, which size the statistics partials.
bool conv_forward_mma_applies(const ConvForwardParams& p);
int conv_forward_mma_tile_rows(const ConvForwardParams& p);
cudaError_t conv_forward_mma(const ConvForwardParams& p, cudaStream_t stream);
// The pair (issue 30) on the same kernel body: taken where conv_forward_mma_applies holds for both convs.
int conv_forward_mma_pair_tile_rows(const ConvForwardPairParams& pp);
cudaError_t conv_forward_mma_pair(const ConvForwardPairParams& pp, cudaStream_t stream);

}  // namespace detail
}  // namespace fused_resnet
