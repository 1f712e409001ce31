// Eight elements at a time, with GCC/Clang vector extensions: each element type loads 8 values
// into 8 accumulation-type lanes and stores them back with the same rounding as the scalar
// conversions of cpu_dtypes.h (bitwise equal results). The compiler lowers the vectors to
// whatever the translation unit targets (SSE2, AVX2, NEON), so the hot loops vectorise
// reliably instead of depending on the auto-vectoriser.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu_dtypes.h"

namespace pathmoe {
namespace cpu {
// Internal linkage: compiled once per instruction set (see cpu_row_kernels.h).
namespace {

constexpr int kVec = 8;

// Everything here must inline into the loops (a call would pass the vectors through memory).
#define PATHMOE_INLINE inline __attribute__((always_inline))

typedef float VecF __attribute__((vector_size(32)));
typedef double VecD __attribute__((vector_size(64)));
typedef uint32_t VecU32 __attribute__((vector_size(32)));
typedef int32_t VecI32 __attribute__((vector_size(32)));
typedef uint16_t VecU16 __attribute__((vector_size(16)));

template <typename V, typename P>
PATHMOE_INLINE V load_bytes(const P* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename P, typename V>
PATHMOE_INLINE void store_bytes(P* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename To, typename From>
PATHMOE_INLINE To bitcast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// Lane-wise cond ? a : b; cond holds all-ones or all-zeros lanes (a vector comparison).
PATHMOE_INLINE VecU32 select(VecI32 cond, VecU32 a, VecU32 b) {
  const VecU32 mask = bitcast<VecU32>(cond);
  return (a & mask) | (b & ~mask);
}

PATHMOE_INLINE VecU32 widen(VecU16 v) { return __builtin_convertvector(v, VecU32); }
// Lanes must be < 2^16. The generic conversion compiles to slow code on x86 (there is no
// truncating 32 -> 16 bit pack), so pack with saturation, which cannot trigger here.
PATHMOE_INLINE VecU16 narrow(VecU32 v) {
#if defined(__AVX2__)
  const __m256i x = bitcast<__m256i>(v);
  return bitcast<VecU16>(_mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
#elif defined(__SSE2__)
  // SSE2 packs signed 32 -> 16 bits only: shift [0, 2^16) to [-2^15, 2^15) and back.
  const VecU32 biased = v - 0x8000u;
  const __m128i low = load_bytes<__m128i>(&biased);
  const __m128i high = load_bytes<__m128i>(reinterpret_cast<const char*>(&biased) + 16);
  return bitcast<VecU16>(_mm_xor_si128(_mm_packs_epi32(low, high), _mm_set1_epi16(-0x8000)));
#else
  return __builtin_convertvector(v, VecU16);
#endif
}

template <typename T>
struct Vec8;

template <>
struct Vec8<float> {
  using V = VecF;
  PATHMOE_INLINE static V load(const float* p) { return load_bytes<V>(p); }
  PATHMOE_INLINE static void store(float* p, V v) { store_bytes(p, v); }
};

template <>
struct Vec8<double> {
  using V = VecD;
  PATHMOE_INLINE static V load(const double* p) { return load_bytes<V>(p); }
  PATHMOE_INLINE static void store(double* p, V v) { store_bytes(p, v); }
};

template <>
struct Vec8<BFloat16> {
  using V = VecF;
  PATHMOE_INLINE static V load(const BFloat16* p) { return bitcast<V>(widen(load_bytes<VecU16>(p)) << 16); }
  // The bf16 bit patterns (in the low 16 bits of each lane), rounded to nearest even.
  PATHMOE_INLINE static VecU32 round(V v) {
    const VecU32 u = bitcast<VecU32>(v);
    const VecU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const VecI32 is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return select(is_nan, VecU32{} + 0x7FC0u, rounded);
  }
  PATHMOE_INLINE static void store(BFloat16* p, V v) { store_bytes(p, narrow(round(v))); }
};

#if defined(__F16C__)
// The conversion instructions (the AVX2 variant): same rounding to nearest even; a NaN stays a
// NaN (keeping its payload, where the portable code below makes it the canonical one).
template <>
struct Vec8<Float16> {
  using V = VecF;
  PATHMOE_INLINE static V load(const Float16* p) {
    return bitcast<V>(_mm256_cvtph_ps(load_bytes<__m128i>(p)));
  }
  PATHMOE_INLINE static void store(Float16* p, V v) {
    store_bytes(p, _mm256_cvtps_ph(bitcast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
  }
};
#else
template <>
struct Vec8<Float16> {
  using V = VecF;
  // Same steps as Element<Float16> (cpu_dtypes.h), lane-wise.
  PATHMOE_INLINE static V load(const Float16* p) {
    const VecU32 h = widen(load_bytes<VecU16>(p));
    const VecU32 sign = (h & 0x8000u) << 16;
    const VecU32 magnitude = h & 0x7FFFu;
    const VecU32 exponent = magnitude >> 10;
    const VecU32 normal = (magnitude << 13) + (112u << 23);
    const VecU32 special = (magnitude << 13) | 0x7F800000u;
    const VecF scaled = __builtin_convertvector(bitcast<VecI32>(magnitude), VecF) *
                        5.9604644775390625e-8f;
    const VecU32 subnormal = bitcast<VecU32>(scaled);
    const VecU32 body = select(exponent == 0u, subnormal, select(exponent == 31u, special, normal));
    return bitcast<V>(body | sign);
  }
  PATHMOE_INLINE static void store(Float16* p, V v) {
    const VecU32 u = bitcast<VecU32>(v);
    const VecU32 sign = (u >> 16) & 0x8000u;
    const VecU32 a = u & 0x7FFFFFFFu;
    const VecU32 overflow = select(a > 0x7F800000u, VecU32{} + 0x7E00u, VecU32{} + 0x7C00u);
    const VecU32 normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    const VecU32 subnormal = bitcast<VecU32>(bitcast<VecF>(a) + 0.5f) - 0x3F000000u;
    const VecU32 body =
        select(a >= 0x47800000u, overflow, select(a >= 0x38800000u, normal, subnormal));
    store_bytes(p, narrow(body | sign));
  }
};
#endif  // __F16C__

// Sixteen elements as two vectors of 8 lanes (low, high). Sums and products are lane-wise, so
// which column sits in which lane does not matter as long as store() undoes load(); dot
// products name the column of each lane through column().
template <typename T>
struct Block16 {
  using V = typename Vec8<T>::V;
  PATHMOE_INLINE static void load(const T* p, V& low, V& high) {
    low = Vec8<T>::load(p);
    high = Vec8<T>::load(p + kVec);
  }
  PATHMOE_INLINE static void store(T* p, V low, V high) {
    Vec8<T>::store(p, low);
    Vec8<T>::store(p + kVec, high);
  }
  // Column (0..15) held by lane l (0..7) of the high (or low) vector.
  static constexpr int column(bool high, int l) { return high ? l + kVec : l; }
};

#if defined(__AVX2__)
// bf16 with AVX2: interleaving with zeros turns 16 bf16 into two float vectors in 2 instructions
// (the widening load above takes 5 per 8); it works within 128-bit halves, so low holds columns
// 0-3 and 8-11, high 4-7 and 12-15, and the saturating pack of the store puts them back.
template <>
struct Block16<BFloat16> {
  using V = VecF;
  PATHMOE_INLINE static void load(const BFloat16* p, V& low, V& high) {
    const __m256i x = load_bytes<__m256i>(p);
    const __m256i zero = _mm256_setzero_si256();
    low = bitcast<V>(_mm256_unpacklo_epi16(zero, x));
    high = bitcast<V>(_mm256_unpackhi_epi16(zero, x));
  }
  PATHMOE_INLINE static void store(BFloat16* p, V low, V high) {
    const __m256i l = bitcast<__m256i>(Vec8<BFloat16>::round(low));
    const __m256i h = bitcast<__m256i>(Vec8<BFloat16>::round(high));
    store_bytes(p, _mm256_packus_epi32(l, h));  // lanes hold < 2^16: no saturation
  }
  static constexpr int column(bool high, int l) { return (l < 4 ? l : l + 4) + (high ? 4 : 0); }
};
#endif

}  // namespace
}  // namespace cpu
}  // namespace pathmoe
