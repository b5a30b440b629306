// bfloat16 and IEEE half storage types for the epilogue outputs, without c10: float -> 16 bits rounds to
// nearest even (NaN -> a quiet NaN, as c10 casts), 16 bits -> float is exact. Branch-light so the epilogue
// loops stay vectorizable.
#pragma once

#include <cstdint>
#include <cstring>

namespace ovsw::core::detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct BFloat16 {
  uint16_t x;
  explicit BFloat16(float f) {
    const uint32_t u = float_bits(f);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    x = nan ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + (u >> 16 & 1u)) >> 16);
  }
  explicit operator float() const { return bits_float(uint32_t(x) << 16); }
};

struct Half {
  uint16_t x;
  explicit Half(float f) {
    const uint32_t u = float_bits(f), sign = u >> 16 & 0x8000u, a = u & 0x7fffffffu;
    uint16_t h;
    if (a > 0x7f800000u) {
      h = 0x7e00;                                   // NaN
    } else if (a >= 0x477ff000u) {
      h = 0x7c00;                                   // >= 65520 rounds to infinity
    } else if (a < 0x38800000u) {                   // below 2^-14: a subnormal half (or zero)
      // adding 0.5 (ulp 2^-24, the subnormal half unit) rounds to nearest even in the FPU
      h = uint16_t(float_bits(bits_float(a) + 0.5f) - 0x3f000000u);
    } else {                                        // normal: rebias 127 -> 15, round 23 -> 10 bits
      h = uint16_t((a - (112u << 23) + 0xfffu + (a >> 13 & 1u)) >> 13);
    }
    x = uint16_t(sign | h);
  }
  explicit operator float() const {
    const uint32_t sign = uint32_t(x & 0x8000u) << 16, e = x >> 10 & 0x1fu, m = x & 0x3ffu;
    if (e == 0x1f) return bits_float(sign | 0x7f800000u | m << 13);
    if (e == 0) {
      const float f = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
      return sign ? -f : f;
    }
    return bits_float(sign | (e + 112u) << 23 | m << 13);
  }
};

}  // namespace ovsw::core::detail
