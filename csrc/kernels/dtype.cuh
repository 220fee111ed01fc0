// Element types, their accumulation types and conversions, and the dtype switch of every launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused_resnet/params.h"

namespace fused_resnet {
namespace detail {

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Round-to-nearest conversion from the accumulation type: what eager PyTorch's stored tensors hold.
template <class T> struct Cvt;
template <> struct Cvt<__half> { __device__ static __half from(float v) { return __float2half_rn(v); } };
template <> struct Cvt<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Cvt<float> { __device__ static float from(float v) { return v; } };
template <> struct Cvt<double> { __device__ static double from(double v) { return v; } };

template <class T> __device__ __forceinline__ T zero() { return Cvt<T>::from(acc_t<T>(0)); }

// The BN affine fma(x - mean, scale, beta): the mean subtracted first, as eager does, so a constant channel
// (x == mean) gives exactly beta -- 0 with beta == 0 -- where x*scale + shift keeps a rounding residual that
// flips the ReLU mask at random; then one fused multiply-add, as eager's CUDA BatchNorm ends (its
// gamma*(x - mean)*invstd + beta contracts into an fma) and as Triton's prologue compiles on a GPU -- one
// instruction less per activation value than a separate multiply and add, in the mma kernels' inner loops.
__device__ __forceinline__ float bn_affine(float x, float m, float s, float b) { return fma(__fsub_rn(x, m), s, b); }
__device__ __forceinline__ double bn_affine(double x, double m, double s, double b) {
  return fma(__dsub_rn(x, m), s, b);
}

// The BN affine as written, (x - mean)*scale + beta with every operation rounded (no contraction): what
// eager computes for a BN whose output is a stored tensor -- the post-activation block's end
// (bn_add_relu.cu), where the rounded BN outputs are added; bitwise the same as torch's (x - m)*s + b.
__device__ __forceinline__ float bn_affine_rn(float x, float m, float s, float b) {
  return __fadd_rn(__fmul_rn(__fsub_rn(x, m), s), b);
}
__device__ __forceinline__ double bn_affine_rn(double x, double m, double s, double b) {
  return __dadd_rn(__dmul_rn(__dsub_rn(x, m), s), b);
}

// torch.relu: NaN propagates (a > 0 ? a : 0 would map it to 0).
template <class A> __device__ __forceinline__ A relu_nan(A a) { return (a > A(0) || a != a) ? a : A(0); }
// The activation after the BN affine, as max(a, lo) NaN-propagating: lo = 0 is relu_nan (ReLU), lo = -inf
// the identity (every a, -inf included, passes): ConvForwardParams/ConvWgradParams::act_floor, in the
// WMMA/FMA kernels (the mma.sync ones keep relu_nan: mma_tile.cuh's bn_relu_reg says why).
template <class A> __device__ __forceinline__ A act_nan(A a, float lo) {
  return (a > A(lo) || a != a) ? a : A(lo);
}

// threshold_backward's rule: the gradient passes where NOT (pre <= 0) -- NaN included, as in eager.
template <class A> __device__ __forceinline__ bool relu_passes(A pre) { return !(pre <= A(0)); }

// 64-bit element offset of logical (n, c, h, w) under strides s.
__device__ __forceinline__ int64_t offset4(const int64_t* s, int n, int c, int h, int w) {
  return static_cast<int64_t>(n) * s[0] + static_cast<int64_t>(c) * s[1] + static_cast<int64_t>(h) * s[2] +
         static_cast<int64_t>(w) * s[3];
}

}  // namespace detail

// Calls f(T{}) with T the element type of dtype; an unknown dtype is an invalid value.
template <class F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF16: return f(__half{});
    case DType::kBF16: return f(__nv_bfloat16{});
    case DType::kF32: return f(float{});
    case DType::kF64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fused_resnet
