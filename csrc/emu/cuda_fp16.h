// Emulated <cuda_fp16.h>: IEEE binary16 storage with the device's round-to-nearest-even conversion.
// Only what the kernels call. Conversions are checked against torch's on every bit pattern
// (tests/test_emulation.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

namespace fused_resnet_emu {
inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
}  // namespace fused_resnet_emu

inline float __half2float(__half h) {
  using namespace fused_resnet_emu;
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline __half __float2half_rn(float f) {
  using namespace fused_resnet_emu;
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return __half{static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (x >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to nearest even (default FP mode)
    const float scaled = bits_float(x) * 16777216.0f;  // exact: a power-of-two scaling
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  x += 0xfffu + ((x >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return __half{static_cast<uint16_t>(sign | ((x - (112u << 23)) >> 13))};
}
