// The small kernels that finish what the big ones leave in partials, one launch each, no ATen tails
// (the CUDA twins of fused_resnet/triton/finalize.py):
// - bn_finalize: per channel, (mean, var) merged from per-tile partials with Chan's formula in double
//   (tile means relative to the pivot x[0, c, 0, 0]) or taken as given; invstd = 1/sqrt(var + eps), the
//   prologue's scale = invstd * gamma and beta; the running buffers updated in place as nn.BatchNorm2d
//   does (EMA with momentum, unbiased variance).
// - column_sums: rows of up to two arrays summed in a fixed order (deterministic, no atomics): dgrad's
//   per-tile BN-backward partials [tiles, 2C] -> S1, S2, and wgrad's split-K slabs [split, L] -> dW in
//   the weight's dtype.
#include "device.cuh"
#include "dtype.cuh"

namespace fused_resnet {
namespace detail {
namespace {

constexpr int kFinalizeThreads = 128;  // one channel per thread
constexpr int kSumThreads = 256;       // one column per thread

// A value of the running buffers' dtype, read and written through the accumulation type.
template <class Acc>
__device__ Acc load_as(const void* p, DType t, int i) {
  switch (t) {
    case DType::kF16: return Acc(to_acc(static_cast<const __half*>(p)[i]));
    case DType::kBF16: return Acc(to_acc(static_cast<const __nv_bfloat16*>(p)[i]));
    case DType::kF32: return Acc(static_cast<const float*>(p)[i]);
    case DType::kF64: return Acc(static_cast<const double*>(p)[i]);
  }
  return Acc(0);
}

template <class Acc>
__device__ void store_as(void* p, DType t, int64_t i, Acc v) {
  switch (t) {
    case DType::kF16: static_cast<__half*>(p)[i] = Cvt<__half>::from(float(v)); break;
    case DType::kBF16: static_cast<__nv_bfloat16*>(p)[i] = Cvt<__nv_bfloat16>::from(float(v)); break;
    case DType::kF32: static_cast<float*>(p)[i] = float(v); break;
    case DType::kF64: static_cast<double*>(p)[i] = double(v); break;
  }
}

template <class T>
__global__ void __launch_bounds__(kFinalizeThreads) bn_finalize_kernel(const BnFinalizeParams p) {
  using Acc = acc_t<T>;
  const int c = blockIdx.x * kFinalizeThreads + threadIdx.x;
  if (c >= p.C) return;
  // nn.BatchNorm2d's num_batches_tracked += 1 in this launch, not an ATen add_ of its own (issue 30); one thread
  if (c == 0 && p.num_batches_tracked != nullptr) *p.num_batches_tracked += 1;
  Acc mean, var;
  if (p.part != nullptr) {
    const Acc* part = static_cast<const Acc*>(p.part);
    const double total = static_cast<double>(p.total), rows = static_cast<double>(p.tile_rows);
    const double last = total - static_cast<double>(p.tiles - 1) * rows;
    double s = 0;
    for (int t = 0; t < p.tiles; ++t)
      s += (t == p.tiles - 1 ? last : rows) * static_cast<double>(part[static_cast<int64_t>(t) * p.C + c]);
    double rel = s / total;
    double q = 0;
    for (int t = 0; t < p.tiles; ++t) {
      const double d = static_cast<double>(part[static_cast<int64_t>(t) * p.C + c]) - rel;
      q += static_cast<double>(part[static_cast<int64_t>(p.tiles + t) * p.C + c]) +
           (t == p.tiles - 1 ? last : rows) * d * d;
    }
    if (p.x != nullptr) rel += static_cast<double>(to_acc(static_cast<const T*>(p.x)[c * p.sxc]));
    mean = static_cast<Acc>(rel);
    var = static_cast<Acc>(q / total);
    if (p.mean_out != nullptr) {
      static_cast<Acc*>(p.mean_out)[c] = mean;
      static_cast<Acc*>(p.var_out)[c] = var;
    }
  } else {
    mean = load_as<Acc>(p.mean_in, p.in_dtype, c);
    var = load_as<Acc>(p.var_in, p.in_dtype, c);
  }
  const Acc invstd = Acc(1) / sqrt(var + static_cast<Acc>(p.eps));
  const Acc scale = p.gamma != nullptr ? invstd * load_as<Acc>(p.gamma, p.param_dtype, c) : invstd;
  const Acc beta = p.beta != nullptr ? load_as<Acc>(p.beta, p.param_dtype, c) : Acc(0);
  Acc* out = static_cast<Acc*>(p.out);
  out[c] = mean;
  out[p.C + c] = var;
  out[2 * p.C + c] = invstd;
  out[3 * p.C + c] = scale;
  out[4 * p.C + c] = beta;
  if (p.running_mean != nullptr) {
    const Acc m = static_cast<Acc>(p.momentum);
    const Acc rm = load_as<Acc>(p.running_mean, p.running_dtype, c);
    const Acc rv = load_as<Acc>(p.running_var, p.running_dtype, c);
    store_as<Acc>(p.running_mean, p.running_dtype, c, rm * (Acc(1) - m) + mean * m);
    store_as<Acc>(p.running_var, p.running_dtype, c, rv * (Acc(1) - m) + (var * static_cast<Acc>(p.unbiased)) * m);
  }
}

template <class Acc>
__global__ void __launch_bounds__(kSumThreads) column_sums_kernel(const ColumnSumsParams p) {
  const int64_t a_blocks = (p.a_len + kSumThreads - 1) / kSumThreads;
  if (static_cast<int64_t>(blockIdx.x) < a_blocks) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
    if (col >= p.a_len) return;
    const Acc* a = static_cast<const Acc*>(p.a);
    Acc s = 0;
    for (int r = 0; r < p.a_rows; ++r) s += a[r * p.a_len + col];
    if (col < p.a_split)
      static_cast<Acc*>(p.a_out0)[col] = s;
    else
      static_cast<Acc*>(p.a_out1)[col - p.a_split] = s;
    return;
  }
  const int64_t col = (static_cast<int64_t>(blockIdx.x) - a_blocks) * kSumThreads + threadIdx.x;
  if (col >= p.b_len) return;
  const Acc* b = static_cast<const Acc*>(p.b);
  Acc s = 0;
  for (int r = 0; r < p.b_rows; ++r) s += b[r * p.b_len + col];
  store_as<Acc>(p.b_out, p.b_dtype, col, s);
}

}  // namespace
}  // namespace detail

cudaError_t bn_finalize(const BnFinalizeParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(ceil_div(p.C, detail::kFinalizeThreads));
    return detail::launch(detail::bn_finalize_kernel<T>, grid, dim3(detail::kFinalizeThreads), stream, p);
  });
}

cudaError_t column_sums(const ColumnSumsParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.a_len + detail::kSumThreads - 1) / detail::kSumThreads +
                         (p.b_len + detail::kSumThreads - 1) / detail::kSumThreads;
  if (blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (p.f64) return detail::launch(detail::column_sums_kernel<double>, grid, dim3(detail::kSumThreads), stream, p);
  return detail::launch(detail::column_sums_kernel<float>, grid, dim3(detail::kSumThreads), stream, p);
}

}  // namespace fused_resnet
