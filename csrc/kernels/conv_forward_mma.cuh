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
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    int row, col;
    tile_coord<BM, BN>(idx, cfast, row, col);
    const int kout = n0 + col;
    int nb, oh, ow;
    if (!pixel(row, nb, oh, ow) || kout >= g.K) continue;
    Acc v = c[row][col];
    if (bias) v += bias[kout];
    if (res) v += to_acc(res[offset4(p.sr, nb, kout, oh, ow)]);
    const T out = Cvt<T>::from(v);
    y[offset4(p.sy, nb, kout, oh, ow)] = out;
    c[row][col] = to_acc(out);  // statistics of y as stored: what the next BN reads
  }
  if (p.part == nullptr) return;
  __syncthreads();
  const int col = threadIdx.x, kout = n0 + col;
  if (col < BN && kout < g.K) {
    const int cnt = min(M - m0, BM);
    Acc sum = 0;
    for (int row = 0; row < cnt; ++row) sum += c[row][col];
    const Acc mean = sum / Acc(cnt);
    Acc m2 = 0;
    for (int row = 0; row < cnt; ++row) {
      const Acc d = c[row][col] - mean;
      m2 = fma(d, d, m2);
    }
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

}  // namespace detail
}  // namespace fused_resnet
