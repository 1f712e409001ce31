// Element types of the CPU kernels and their exact conversions to/from the accumulation type.
//
// bf16 and fp16 are stored as 16-bit patterns and converted with branch-free integer code that
// compilers vectorise (no dependence on _Float16 or a CPU feature such as F16C). float -> 16 bit
// rounds to nearest even, like torch; NaN becomes torch's canonical quiet NaN.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dtype_dispatch.h"
#include "permute.h"

namespace pathmoe {
namespace cpu {
// Internal linkage: this header is compiled once per instruction set (cpu_row_kernels.h), and
// no copy built for AVX2 may be shared with the baseline code.
namespace {

struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// cond ? a : b with a mask instead of a branch, so loops of conversions vectorise.
inline uint32_t select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

template <typename T>
struct Element;

template <>
struct Element<float> {
  using Acc = float;
  static Acc load(float x) { return x; }
  static float store(Acc x) { return x; }
};

template <>
struct Element<double> {
  using Acc = double;
  static Acc load(double x) { return x; }
  static double store(Acc x) { return x; }
};

template <>
struct Element<BFloat16> {
  using Acc = float;
  static Acc load(BFloat16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }
  static BFloat16 store(Acc x) {
    const uint32_t u = float_bits(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return BFloat16{static_cast<uint16_t>(select(is_nan, 0x7FC0u, rounded))};
  }
};

template <>
struct Element<Float16> {
  using Acc = float;

  static Acc load(Float16 x) {
    const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
    const uint32_t magnitude = x.bits & 0x7FFFu;
    const uint32_t exponent = magnitude >> 10;
    // Normal numbers: move exponent and mantissa into place and rebias 15 -> 127.
    const uint32_t normal = (magnitude << 13) + (112u << 23);
    // Inf/NaN: all exponent bits set in the result as well.
    const uint32_t special = (magnitude << 13) | 0x7F800000u;
    // Zero/subnormal: the mantissa counts units of 2^-24, exactly representable in float.
    const uint32_t subnormal = float_bits(static_cast<float>(magnitude) * 5.9604644775390625e-8f);
    return bits_float(select(exponent == 0, subnormal,
                             select(exponent == 31, special, normal)) | sign);
  }

  static Float16 store(Acc x) {
    const uint32_t u = float_bits(x);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // >= 65536: overflows to inf whatever the rounding; NaN maps to the quiet NaN.
    const uint32_t overflow = select(a > 0x7F800000u, 0x7E00u, 0x7C00u);
    // Normal half range: rebias 127 -> 15 and round the 13 dropped bits to nearest even. A
    // carry out of the mantissa correctly bumps the exponent (up to inf for >= 65520).
    const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    // Below 2^-14: adding 0.5f makes the FPU round to a multiple of 2^-24 (nearest even); the
    // low bits of the sum are then the subnormal half pattern.
    const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
    const uint32_t body =
        select(a >= 0x47800000u, overflow, select(a >= 0x38800000u, normal, subnormal));
    return Float16{static_cast<uint16_t>(body | sign)};
  }
};

// Calls fn(T{}) with the element type named by dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  dispatch_dtype_as<float, double, BFloat16, Float16>(dtype, fn, "pathmoe ops");
}

}  // namespace
}  // namespace cpu
}  // namespace pathmoe
