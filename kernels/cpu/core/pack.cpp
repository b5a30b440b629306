// Sign-and-pack (float -> sign bits, vectorized per ISA) and word popcounts for the padding corrections.
#include "detail.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ovsw::core {
namespace detail {

void pack_row_portable(const float* x, u32* out, int64_t k) {
  for (int64_t w = 0; w * 32 < k; ++w) {
    u32 word = 0;
    const int64_t n = std::min<int64_t>(32, k - w * 32);
    for (int64_t b = 0; b < n; ++b) word |= u32(x[w * 32 + b] < 0.0f) << b;
    out[w] = word;
  }
}

#if defined(OVSW_HAVE_AVX512)
OVSW_AVX512 void pack_row_avx512(const float* x, u32* out, int64_t k) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t w = 0;
  for (; (w + 1) * 32 <= k; ++w) {
    u32 lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + w * 32), zero, _CMP_LT_OQ);
    u32 hi = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + w * 32 + 16), zero, _CMP_LT_OQ);
    out[w] = lo | hi << 16;
  }
  if (w * 32 < k) {
    const int64_t left = k - w * 32;
    __mmask16 m0 = static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1);
    __mmask16 m1 = static_cast<__mmask16>(left <= 16 ? 0 : (1u << (left - 16)) - 1);
    u32 lo = _mm512_mask_cmp_ps_mask(m0, _mm512_maskz_loadu_ps(m0, x + w * 32), zero, _CMP_LT_OQ);
    u32 hi = _mm512_mask_cmp_ps_mask(m1, _mm512_maskz_loadu_ps(m1, x + w * 32 + 16), zero, _CMP_LT_OQ);
    out[w] = lo | hi << 16;
  }
}
#endif

#if defined(__x86_64__)
OVSW_AVX2 void pack_row_avx2(const float* x, u32* out, int64_t k) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t w = 0;
  for (; (w + 1) * 32 <= k; ++w) {
    u32 word = 0;
    for (int q = 0; q < 4; ++q)
      word |= u32(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + w * 32 + q * 8), zero, _CMP_LT_OQ)))
              << (8 * q);
    out[w] = word;
  }
  if (w * 32 < k) pack_row_portable(x + w * 32, out + w, k - w * 32);
}
#endif

PackRowFn pack_row_fn() {
#if defined(__x86_64__)
  const int isa = current_isa();
#if defined(OVSW_HAVE_AVX512)
  if (isa == kAvx512) return pack_row_avx512;
#endif
  if (isa == kAvx2) return pack_row_avx2;
#endif
  return pack_row_portable;
}

// popcount of n words, for the pad_value=0 corrections (hardware popcount where the ISA has one)
int32_t popcount_words_portable(const u32* p, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += __builtin_popcount(p[i]);
  return s;
}

#if defined(__x86_64__)
__attribute__((target("popcnt"))) int32_t popcount_words_popcnt(const u32* p, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += __builtin_popcount(p[i]);
  return s;
}

#if defined(OVSW_HAVE_AVX512)
OVSW_AVX512 int32_t popcount_words_avx512(const u32* p, int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_loadu_si512(p + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_maskz_loadu_epi32(m, p + i)));
  }
  return static_cast<int32_t>(_mm512_reduce_add_epi64(acc));
}
#endif  // OVSW_HAVE_AVX512
#endif

PopcountFn popcount_fn() {
#if defined(__x86_64__)
  const int isa = current_isa();
#if defined(OVSW_HAVE_AVX512)
  if (isa == kAvx512) return popcount_words_avx512;
#endif
  if (isa == kAvx2) return popcount_words_popcnt;
#endif
  return popcount_words_portable;
}

std::vector<int32_t> row_popcounts(const u32* w, int64_t rows, int64_t cw) {
  std::vector<int32_t> pop(rows);
  const PopcountFn count = popcount_fn();
  parallel_for(0, rows, 512, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) pop[r] = count(w + r * cw, cw);
  });
  return pop;
}

}  // namespace detail

using namespace detail;

void sign_pack_rows(const float* x, uint32_t* out, int64_t rows, int64_t k) {
  const int64_t kw = (k + 31) / 32;
  const PackRowFn pack = pack_row_fn();
  parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pack(x + i * k, out + i * kw, k);
  });
}

void sign_pack_rows_f64(const double* x, uint32_t* out, int64_t rows, int64_t k) {
  const int64_t kw = (k + 31) / 32;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t w = 0; w < kw; ++w) {
      u32 word = 0;
      for (int64_t b = 0; b < 32 && w * 32 + b < k; ++b) word |= u32(x[r * k + w * 32 + b] < 0.0) << b;
      out[r * kw + w] = word;
    }
}

// One pass: per (image, word), OR each channel plane's sign bits into a pixel-contiguous buffer (a loop
// the compiler vectorizes), then scatter it to the NHWC words.
void sign_pack_nchw(const float* x, uint32_t* out, int64_t batch, int64_t channels, int64_t pixels) {
  const int64_t cw = (channels + 31) / 32;
  parallel_for(0, batch * cw, 1, [&](int64_t begin, int64_t end) {
    std::vector<u32> buf(pixels);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / cw, word = t % cw;
      std::fill(buf.begin(), buf.end(), 0u);
      const int64_t c0 = word * 32, c1 = std::min(channels, c0 + 32);
      for (int64_t ch = c0; ch < c1; ++ch) {
        const float* plane = x + (img * channels + ch) * pixels;
        const u32 shift = static_cast<u32>(ch - c0);
        u32* bp = buf.data();
        for (int64_t p = 0; p < pixels; ++p) bp[p] |= u32(plane[p] < 0.0f) << shift;
      }
      u32* dst = out + img * pixels * cw + word;
      for (int64_t p = 0; p < pixels; ++p) dst[p * cw] = buf[p];
    }
  });
}

}  // namespace ovsw::core
