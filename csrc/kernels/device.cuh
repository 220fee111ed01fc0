// The device primitives the kernels use, in one place: tensor cores (WMMA; mma.sync m16n8k16 with
// ldmatrix; m16n8k8 TF32), cp.async copies, packed and TF32 conversion, block shared memory and the kernel launch. The emulated CPU build (csrc/emu, -DFUSED_RESNET_EMULATED) supplies host twins of exactly
// these (mma.h, emu_primitives.h, cuda_runtime.h), so the kernel files are the same bytes in the GPU build
// and the emulated one; a new primitive enters here and in csrc/emu together, with a test of its twin.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>

#ifdef FUSED_RESNET_EMULATED
#include "emu_primitives.h"  // csrc/emu: host twins of cp_async_*, ldmatrix_*, mma_16816 below
#endif

namespace fused_resnet {
namespace detail {

#ifndef FUSED_RESNET_EMULATED
// 16 bytes global -> shared without a register round trip (cp.async.cg: cached in L2 only). pred false:
// the 16 bytes are zero-filled and nothing is read (src-size 0), which is how padding and tails load.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix .m8n8 .b16: lane L gives the shared address of row L % 8 of matrix L / 8; register j receives
// matrix j's (row L / 4, columns 2(L % 4) and +1) -- of the transpose with .trans.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}

// d += A B, mma.sync m16n8k16, A row-major / B column-major fragments as the PTX ISA lays them out
// (csrc/emu/emu_primitives.h spells the table out), fp32 accumulators.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A float rounded to TF32 (10 mantissa bits), to nearest with ties away from zero (cvt.rna.tf32.f32),
// as the 32-bit pattern mma.sync's .tf32 operands take.
__device__ __forceinline__ uint32_t cvt_tf32(float v) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(v));
  return out;
}

// d += A B, mma.sync m16n8k8 with TF32 A (row-major) and B ("col") fragments, fp32 accumulators. Same
// accumulator layout as m16n8k16; A: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4];
// B: b[0] = B[t][g], b[1] = B[t+4][g] (g = lane / 4, t = lane % 4).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // !FUSED_RESNET_EMULATED

// v as it is, through an empty asm statement: ptxas sees a value it cannot take apart, so a loop-invariant
// product computed once before a loop stays computed once. Without it ptxas rematerialized the wgrad
// kernels' 64-bit step sizes inside the main loop where registers were plentiful (16x16 tile, bf16 sm_90:
// 135 instructions per step instead of 117). A plain copy in the emulated build.
__device__ __forceinline__ int64_t keep_computed(int64_t v) {
#ifndef FUSED_RESNET_EMULATED
  asm volatile("" : "+l"(v));
#endif
  return v;
}

// Two floats rounded to nearest-even in T and packed, lo in the low 16 bits: one F2FP.PACK_AB on sm_80+
// (converting one at a time costs a conversion each and a PRMT to pack).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
#ifdef FUSED_RESNET_EMULATED
  const uint16_t h[2] = {__float2bfloat16_rn(lo).bits, __float2bfloat16_rn(hi).bits};
#else
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
#endif
  uint32_t out;
  memcpy(&out, &h, 4);
  return out;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
#ifdef FUSED_RESNET_EMULATED
  const uint16_t h[2] = {__float2half_rn(lo).bits, __float2half_rn(hi).bits};
#else
  const __half2 h = __floats2half2_rn(lo, hi);
#endif
  uint32_t out;
  memcpy(&out, &h, 4);
  return out;
}

// 16 bytes of global memory at a 16-byte aligned address, read or written as one access (LDG/STG.128),
// holding 16 / sizeof(T) elements.
template <class T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};
template <class T>
__device__ __forceinline__ Vec16<T> load16(const T* src) {
  return *reinterpret_cast<const Vec16<T>*>(src);
}
template <class T>
__device__ __forceinline__ void store16(T* dst, const Vec16<T>& val) {
  *reinterpret_cast<Vec16<T>*>(dst) = val;
}

// Shared memory a static declaration may hold; past it, the object lives in dynamic shared memory, which
// the launch reserves (launch_shared). The ceiling is the least per-block limit of the GPUs the build
// targets (sm_86/sm_89: 99 KB; sm_80 163 KB, sm_90 227 KB).
constexpr size_t kStaticSharedBytes = 48 * 1024, kMaxSharedBytes = 99 * 1024;

// The block's one object of type S in shared memory, the same for all its threads. Kernels declare their
// shared memory through this rather than with __shared__ in their own bodies, so that the emulated build
// can give each block a fresh copy filled with 0xFF bytes (a read before any write shows as NaN / -1).
// An S past 48 KB is placed in dynamic shared memory: launch such a kernel with launch_shared<S>.
template <class S>
__device__ __forceinline__ S& block_shared() {
  static_assert(sizeof(S) <= kMaxSharedBytes, "shared memory past what every sm_80+ GPU gives one block");
#ifdef FUSED_RESNET_EMULATED
  return fused_resnet_emu::block_shared<S>();
#else
  if constexpr (sizeof(S) <= kStaticSharedBytes) {
    __shared__ S storage;
    return storage;
  } else {
    extern __shared__ __align__(16) unsigned char dynamic_shared[];
    return *reinterpret_cast<S*>(dynamic_shared);
  }
#endif
}

// Queues kernel<<<grid, block, 0, stream>>>(args...) and returns the launch error.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
#ifdef FUSED_RESNET_EMULATED
  (void)stream;  // the emulation runs each launch to completion, in order
  return fused_resnet_emu::launch([&] { kernel(args...); }, grid, block);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// launch() for a kernel whose block_shared<S>() is past 48 KB: the launch reserves sizeof(S) bytes of
// dynamic shared memory, after raising the kernel's limit for it (per call, as the attribute is per device;
// a host-side attribute write, no device work).
template <class S, class... Params, class... Args>
cudaError_t launch_shared(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
#ifdef FUSED_RESNET_EMULATED
  return launch(kernel, grid, block, stream, args...);
#else
  if constexpr (sizeof(S) <= kStaticSharedBytes) {
    return launch(kernel, grid, block, stream, args...);
  } else {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(sizeof(S)));
    if (err != cudaSuccess) return err;
    kernel<<<grid, block, sizeof(S), stream>>>(args...);
    return cudaGetLastError();
  }
#endif
}

}  // namespace detail
}  // namespace fused_resnet
