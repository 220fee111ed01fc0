// Host twins of the inline-PTX primitives in csrc/kernels/device.cuh: cp.async, ldmatrix, mma.sync
// (m16n8k16 fp16/bf16, m16n8k8 tf32), cvt.rna.tf32.
//
// Each follows the PTX ISA's definition, not a convenient shortcut, because a layout mistake here would
// hide the same mistake in a kernel (tests/test_emulation.py checks each against an independent answer):
// - cp.async copies are deferred: they land in shared memory only when the issuing thread's
//   cp_async_wait<N>() retires their group (or never, if it does not), so a kernel that reads a stage
//   before waiting reads stale or poisoned bytes, as it could on the GPU. Source and destination must be
//   16-byte aligned (checked). Visibility to other threads still needs __syncthreads (ThreadSanitizer
//   sees a missing one).
// - ldmatrix and mma.sync are warp-collective: every lane posts its operands (row addresses; fragment
//   registers), the warp meets, and each lane computes exactly the elements the PTX fragment tables give
//   its registers (m8n8 .b16 matrices; m16n8k16 A row-major / B column-major / f32 C and D), from the
//   other lanes' posts. All 32 lanes must call at the same site (checked: .aligned).
// - mma.sync products of two bf16/fp16 values are exact in float; the sum runs in k order in float (the
//   hardware's order and internal precision are not specified, so a test may not depend on them).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <source_location>
#include <type_traits>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace fused_resnet_emu {

struct PendingCopy {
  void* dst;
  const void* src;
  bool fill;  // false: 16 zero bytes (src-size 0)
};

struct CopyQueue {
  std::vector<PendingCopy> open;
  std::vector<std::vector<PendingCopy>> committed;  // oldest first
};

inline thread_local CopyQueue copy_queue;

inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "fused_resnet emulation: %s address %p is not 16-byte aligned\n", what, p);
    std::abort();
  }
}

inline float widen16(uint16_t bits, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

}  // namespace fused_resnet_emu

namespace fused_resnet {
namespace detail {

inline void cp_async_16(void* smem, const void* gmem, bool pred) {
  fused_resnet_emu::check_aligned16(smem, "cp.async shared");
  if (pred) fused_resnet_emu::check_aligned16(gmem, "cp.async global");
  fused_resnet_emu::copy_queue.open.push_back({smem, gmem, pred});
}

inline void cp_async_commit() {
  auto& q = fused_resnet_emu::copy_queue;
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& q = fused_resnet_emu::copy_queue;
  while (q.committed.size() > static_cast<size_t>(N)) {
    for (const auto& c : q.committed.front()) {
      if (c.fill)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    q.committed.erase(q.committed.begin());
  }
}

// ldmatrix .m8n8 .b16 (Count matrices; trans: each transposed): lane L supplies the address of row L % 8
// of matrix L / 8; register j of lane L receives matrix j's elements (row L / 4, columns 2(L % 4), +1),
// of the transpose when trans. Computed for all lanes at once from their posted addresses.
template <int Count, bool Trans>
inline void ldmatrix_all(fused_resnet_emu::Warp& w, int set) {
  for (size_t lane = 0; lane < w.live.size(); ++lane) {
    if (!w.live[lane]) continue;
    uint32_t r[Count];
    for (int j = 0; j < Count; ++j) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int rr = Trans ? 2 * (int(lane) % 4) + h : int(lane) / 4;  // row of matrix j holding it
        const int cc = Trans ? int(lane) / 4 : 2 * (int(lane) % 4) + h;  // its column
        const unsigned char* base;
        std::memcpy(&base, w.in[set][8 * j + rr], sizeof(base));
        std::memcpy(&e[h], base + 2 * cc, 2);
      }
      r[j] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
    std::memcpy(w.out[set][lane], r, sizeof(r));
  }
}

template <int Count, bool Trans>
inline void ldmatrix(uint32_t* r, const void* row, const std::source_location& loc) {
  fused_resnet_emu::check_aligned16(row, "ldmatrix row");
  fused_resnet_emu::warp_collective(ldmatrix_all<Count, Trans>, &row, sizeof(row), r, Count * sizeof(uint32_t), loc);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, std::source_location loc = std::source_location::current()) {
  ldmatrix<4, false>(r, row, loc);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row,
                              std::source_location loc = std::source_location::current()) {
  ldmatrix<4, true>(r, row, loc);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row,
                              std::source_location loc = std::source_location::current()) {
  ldmatrix<2, true>(r, row, loc);
}

// What each live lane of an m16n8kK mma receives: its four D elements (rows g, g + 8; columns 2t, 2t + 1)
// = C (posted at byte 24) + the sum over k of A(row, k) B(k, col), in k order. A and B read the operands
// the lanes posted.
template <int K, class FA, class FB>
inline void mma_lanes(fused_resnet_emu::Warp& w, int set, FA&& A, FB&& B) {
  for (size_t lane = 0; lane < w.live.size(); ++lane) {
    if (!w.live[lane]) continue;
    const int g = int(lane) / 4, t = int(lane) % 4;
    float d[4];
    std::memcpy(d, w.in[set][lane] + 24, 16);
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
      for (int k = 0; k < K; ++k) d[i] = std::fma(A(row, k), B(k, col), d[i]);
    }
    std::memcpy(w.out[set][lane], d, 16);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += A B. Fragments (g = lane / 4, t = lane % 4):
// A 16x16: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..];
// B 16x8: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; C, D 16x8: d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][..].
// Posted per lane: a (16 bytes), b (8), c (16).
template <bool Bf16>
inline void mma_all(fused_resnet_emu::Warp& w, int set) {
  using fused_resnet_emu::widen16;
  auto elem = [&](int lane, int offset) {
    uint16_t e;
    std::memcpy(&e, w.in[set][lane] + offset, 2);
    return widen16(e, Bf16);
  };
  auto A = [&](int row, int k) {  // element (row, k) of A from the lane and register holding it
    return elem((row % 8) * 4 + (k % 8) / 2, 4 * ((row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)) + 2 * (k % 2));
  };
  auto B = [&](int k, int col) { return elem(col * 4 + (k % 8) / 2, 16 + 4 * (k >= 8 ? 1 : 0) + 2 * (k % 2)); };
  mma_lanes<16>(w, set, A, B);
}

// cvt.rna.tf32.f32: to nearest, ties away from zero, on the low 13 mantissa bits; inf stays inf, NaN a NaN.
inline uint32_t cvt_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? 0x7fffffffu : u;
  return (u + 0x1000u) & 0xffffe000u;  // the carry may reach the exponent: rounds up to the next binade / inf
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d += A B. Fragments (g = lane / 4, t = lane % 4):
// A 16x8: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]; B 8x8: b[0] = B[t][g],
// b[1] = B[t+4][g]; C, D as m16n8k16. The hardware reads only the TF32 bits of each operand (the low 13
// mantissa bits are ignored), and so does this. Posted per lane: a (16 bytes), b (8), c (16).
inline void mma_tf32_all(fused_resnet_emu::Warp& w, int set) {
  auto elem = [&](int lane, int offset) {
    uint32_t u;
    std::memcpy(&u, w.in[set][lane] + offset, 4);
    u &= 0xffffe000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  auto A = [&](int row, int k) { return elem((row % 8) * 4 + k % 4, 4 * ((row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0))); };
  auto B = [&](int k, int col) { return elem(col * 4 + k % 4, 16 + 4 * (k >= 4 ? 1 : 0)); };
  mma_lanes<8>(w, set, A, B);
}

inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                          std::source_location loc = std::source_location::current()) {
  unsigned char operands[40];
  std::memcpy(operands, a, 16);
  std::memcpy(operands + 16, b, 8);
  std::memcpy(operands + 24, d, 16);
  fused_resnet_emu::warp_collective(mma_tf32_all, operands, sizeof(operands), d, sizeof(d), loc);
}

template <class T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      std::source_location loc = std::source_location::current()) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816: fp16/bf16");
  unsigned char operands[40];
  std::memcpy(operands, a, 16);
  std::memcpy(operands + 16, b, 8);
  std::memcpy(operands + 24, d, 16);
  fused_resnet_emu::warp_collective(mma_all<std::is_same_v<T, __nv_bfloat16>>, operands, sizeof(operands), d,
                                    sizeof(d), loc);
}

}  // namespace detail
}  // namespace fused_resnet
