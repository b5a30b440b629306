// XOR-popcount microkernels, one struct per ISA. GEMM-style kernels (Portable, Neon) compute
//   tile<MR, NR>(a, lda, b, ldb, kw, out, ldo): out[i * ldo + j] = popcount(a_i XOR b_j) over kw words;
// panel kernels (Avx512, Avx2) keep output channels in vector lanes and read the weights repacked into
// panels of PANEL channels, [k64][PANEL] uint64 (rows(a, lda, panel, kw, out, ldo, r) for r <= MR rows).
#pragma once

#include <cstdint>
#include <cstring>

#include "detail.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ovsw::core::detail {

struct Portable {
  static constexpr int MR = 4, NR = 4;
  template <int R, int C>
  static void tile(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t kw, int32_t* out,
                   int64_t ldo) {
    int64_t acc[R][C] = {};
    int64_t k = 0;
    for (; k + 2 <= kw; k += 2) {
      u64 bv[C];
      for (int j = 0; j < C; ++j) std::memcpy(&bv[j], b + j * ldb + k, 8);
      for (int i = 0; i < R; ++i) {
        u64 av;
        std::memcpy(&av, a + i * lda + k, 8);
        for (int j = 0; j < C; ++j) acc[i][j] += __builtin_popcountll(av ^ bv[j]);
      }
    }
    if (k < kw) {
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j) acc[i][j] += __builtin_popcount(a[i * lda + k] ^ b[j * ldb + k]);
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) out[i * ldo + j] = static_cast<int32_t>(acc[i][j]);
  }
};

#if defined(__x86_64__)
#if defined(OVSW_HAVE_AVX512)
// AVX-512: output channels in the lanes, so no horizontal sums. The weights are repacked per call into
// panels of 32 channels, [k64][32] uint64 (a 64-bit word of 32 channels per 256 bytes); each A row's
// 64-bit word is broadcast and XOR-popcounted against 4 zmm of channels, for 6 rows x 32 channels at once.
struct Avx512 {
  static constexpr int MR = 6, PANEL = 32;
  // One k step: word q of each row row[i] (64 bits; with LAST on an odd count, the last 32-bit word, high
  // half 0 as in the panel) broadcast from memory against the panel's 4 vectors of channels at bp.
  template <int R, bool LAST = false>
  OVSW_AVX512 __attribute__((always_inline)) static inline void step(__m512i (&acc)[R][4], const u32* const* row,
                                                                      const u64* bp, int64_t q) {
    __m512i bv[4];
    for (int j = 0; j < 4; ++j) bv[j] = _mm512_load_si512(bp + 8 * j);
    for (int i = 0; i < R; ++i) {
      long long word;
      if constexpr (LAST) {
        word = row[i][2 * q];
      } else {
        std::memcpy(&word, row[i] + 2 * q, 8);
      }
      const __m512i av = _mm512_set1_epi64(word);
      for (int j = 0; j < 4; ++j)
        acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, bv[j])));
    }
  }

  template <int R>
  OVSW_AVX512 __attribute__((always_inline)) static inline void zero(__m512i (&acc)[R][4]) {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  }

  template <int R>
  OVSW_AVX512 static void tile(const u32* a, int64_t lda, const u64* panel, int64_t kw, int32_t* out,
                               int64_t ldo) {
    __m512i acc[R][4];
    zero(acc);
    const u32* row[R];
    for (int i = 0; i < R; ++i) row[i] = a + i * lda;
    const int64_t full = kw / 2;
    for (int64_t q = 0; q < full; ++q) step<R>(acc, row, panel + q * PANEL, q);
    if (kw & 1) step<R, true>(acc, row, panel + full * PANEL, full);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ldo + 8 * j), _mm512_cvtepi64_epi32(acc[i][j]));
  }

  OVSW_AVX512 static void rows(const u32* a, int64_t lda, const u64* panel, int64_t kw, int32_t* out,
                               int64_t ldo, int64_t r) {
    switch (r) {
      case 1: return tile<1>(a, lda, panel, kw, out, ldo);
      case 2: return tile<2>(a, lda, panel, kw, out, ldo);
      case 3: return tile<3>(a, lda, panel, kw, out, ldo);
      case 4: return tile<4>(a, lda, panel, kw, out, ldo);
      case 5: return tile<5>(a, lda, panel, kw, out, ldo);
      default: return tile<6>(a, lda, panel, kw, out, ldo);
    }
  }
};

#endif  // OVSW_HAVE_AVX512

OVSW_AVX2 static inline __m256i popcount_bytes(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3,
                                       1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
  __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_add_epi8(lo, hi);
}

// AVX2: the AVX-512 scheme on 256-bit vectors (panels of 8 channels, 4 rows), popcount by vpshufb nibble
// lookup, summed per 64-bit lane by vpsadbw.
struct Avx2 {
  static constexpr int MR = 4, PANEL = 8;
  template <int R>
  OVSW_AVX2 static void tile(const u32* a, int64_t lda, const u64* panel, int64_t kw, int32_t* out, int64_t ldo) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = zero;
    const int64_t full = kw / 2;
    for (int64_t q = 0; q <= full; ++q) {
      if (q == full && !(kw & 1)) break;
      const u64* bp = panel + q * PANEL;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 4));
      for (int i = 0; i < R; ++i) {
        u64 word;
        if (q < full) {
          std::memcpy(&word, a + i * lda + 2 * q, 8);
        } else {
          word = a[i * lda + 2 * q];
        }
        const __m256i av = _mm256_set1_epi64x(static_cast<long long>(word));
        acc[i][0] = _mm256_add_epi64(acc[i][0], _mm256_sad_epu8(popcount_bytes(_mm256_xor_si256(av, b0)), zero));
        acc[i][1] = _mm256_add_epi64(acc[i][1], _mm256_sad_epu8(popcount_bytes(_mm256_xor_si256(av, b1)), zero));
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < 2; ++j) {  // 4 x int64 -> 4 x int32 (values < 2^31)
        const __m256i lo = _mm256_permutevar8x32_epi32(acc[i][j], _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * ldo + 4 * j), _mm256_castsi256_si128(lo));
      }
  }

  OVSW_AVX2 static void rows(const u32* a, int64_t lda, const u64* panel, int64_t kw, int32_t* out, int64_t ldo,
                             int64_t r) {
    switch (r) {
      case 1: return tile<1>(a, lda, panel, kw, out, ldo);
      case 2: return tile<2>(a, lda, panel, kw, out, ldo);
      case 3: return tile<3>(a, lda, panel, kw, out, ldo);
      default: return tile<4>(a, lda, panel, kw, out, ldo);
    }
  }
};
#endif  // __x86_64__

#if defined(__aarch64__)
struct Neon {
  static constexpr int MR = 4, NR = 4;
  template <int R, int C>
  static void tile(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t kw, int32_t* out,
                   int64_t ldo) {
    uint32x4_t acc[R][C];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] = vdupq_n_u32(0);
    int64_t k = 0;
    for (; k + 4 <= kw; k += 4) {
      uint32x4_t bv[C];
      for (int j = 0; j < C; ++j) bv[j] = vld1q_u32(b + j * ldb + k);
      for (int i = 0; i < R; ++i) {
        uint32x4_t av = vld1q_u32(a + i * lda + k);
        for (int j = 0; j < C; ++j) {
          uint8x16_t c = vcntq_u8(vreinterpretq_u8_u32(veorq_u32(av, bv[j])));
          acc[i][j] = vpadalq_u16(acc[i][j], vpaddlq_u8(c));
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) {
        uint32_t s = vaddvq_u32(acc[i][j]);
        for (int64_t t = k; t < kw; ++t) s += __builtin_popcount(a[i * lda + t] ^ b[j * ldb + t]);
        out[i * ldo + j] = static_cast<int32_t>(s);
      }
  }
};
#endif

}  // namespace ovsw::core::detail
