// Emulated <cuda_bf16.h>: bfloat16 storage with the device's round-to-nearest-even conversion.
// Only what the kernels call; checked against torch's conversion (tests/test_emulation.py).
#pragma once

#include "cuda_fp16.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) { return fused_resnet_emu::bits_float(uint32_t(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = fused_resnet_emu::float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};  // quiet NaN
  return __nv_bfloat16{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
