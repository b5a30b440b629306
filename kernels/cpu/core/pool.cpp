// Max pooling fused with hardtanh and the next binary layer's sign-and-pack, on NHWC float32: the ResNet
// stem's maxpool -> hardtanh -> first binary conv in one pass over the pooled output, per ISA.
#include <cmath>

#include "detail.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ovsw::core {
namespace detail {
namespace {

struct PoolJob {
  const float* x;
  Pool2d g;
  float lo, hi;
  float* y;
  u32* bits;
  PackRowFn pack;
};

// Output rows [begin, end) of (image, oh). Per output pixel: the running max over the window's taps in
// row-major order, a tap taken when it is greater or NaN (torch's max_pool2d: NaN propagates, ties keep
// the first), then hardtanh (NaN stays NaN, as torch.clamp), stored, then its sign bits packed. The
// branch-free channel loops vectorize for the target of the caller.
__attribute__((always_inline)) inline void pool_rows(const PoolJob& j, int64_t begin, int64_t end) {
  const Pool2d& g = j.g;
  const int64_t c = g.channels, cw = (c + 31) / 32;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t img = r / g.out_h, oh = r % g.out_h;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t pixel = r * g.out_w + ow;
      float* out = j.y + pixel * c;
      for (int64_t ch = 0; ch < c; ++ch) out[ch] = -INFINITY;
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
        if (ih < 0 || ih >= g.height) continue;
        for (int64_t t = 0; t < g.kernel_w; ++t) {
          const int64_t iw = ow * g.stride_w - g.pad_w + t * g.dilation_w;
          if (iw < 0 || iw >= g.width) continue;
          const float* in = j.x + ((img * g.height + ih) * g.width + iw) * c;
          for (int64_t ch = 0; ch < c; ++ch) {
            const float v = in[ch], m = out[ch];
            out[ch] = ((v > m) | (v != v)) ? v : m;
          }
        }
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const float v = out[ch];
        out[ch] = v != v ? v : std::min(std::max(v, j.lo), j.hi);
      }
      j.pack(out, j.bits + pixel * cw, c);
    }
  }
}

void pool_portable(const PoolJob& j, int64_t begin, int64_t end) { pool_rows(j, begin, end); }

#if defined(OVSW_HAVE_AVX512)
// AVX-512: 16 channels per vector, up to 4 vectors per pass held in registers over the whole window.
// max_ps(v, m) is v > m ? v : m, the tie and NaN-in-m rules above; a NaN tap (which max_ps would drop) is
// noted in a lane mask and written back after the clamp. The sign bits are the compare mask of y itself.
OVSW_AVX512 void pool_avx512(const PoolJob& j, int64_t begin, int64_t end) {
  const Pool2d& g = j.g;
  const int64_t c = g.channels, cw = (c + 31) / 32;
  const __m512 lo = _mm512_set1_ps(j.lo), hi = _mm512_set1_ps(j.hi), zero = _mm512_setzero_ps();
  const __m512 lowest = _mm512_set1_ps(-INFINITY), nan = _mm512_set1_ps(NAN);
  std::vector<const float*> taps(g.kernel_h * g.kernel_w);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t img = r / g.out_h, oh = r % g.out_h;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      int64_t n = 0;
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
        for (int64_t t = 0; t < g.kernel_w && ih >= 0 && ih < g.height; ++t) {
          const int64_t iw = ow * g.stride_w - g.pad_w + t * g.dilation_w;
          if (iw >= 0 && iw < g.width) taps[n++] = j.x + ((img * g.height + ih) * g.width + iw) * c;
        }
      }
      const int64_t pixel = r * g.out_w + ow;
      float* out = j.y + pixel * c;
      u32* bits = j.bits + pixel * cw;
      for (int64_t c0 = 0; c0 < c; c0 += 64) {
        const int vectors = static_cast<int>(std::min<int64_t>(4, (c - c0 + 15) / 16));
        __mmask16 lanes[4];
        __m512 m[4];
        __mmask16 saw_nan[4];
        for (int v = 0; v < 4; ++v) {
          const int64_t left = c - c0 - 16 * v;
          lanes[v] = static_cast<__mmask16>(left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1);
          m[v] = lowest;
          saw_nan[v] = 0;
        }
        for (int64_t p = 0; p < n; ++p) {
          const float* in = taps[p] + c0;
          for (int v = 0; v < vectors; ++v) {
            const __m512 x = _mm512_maskz_loadu_ps(lanes[v], in + 16 * v);
            m[v] = _mm512_max_ps(x, m[v]);
            saw_nan[v] |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
          }
        }
        for (int v = 0; v < vectors; ++v) {
          const __m512 y = _mm512_mask_mov_ps(_mm512_min_ps(_mm512_max_ps(m[v], lo), hi), saw_nan[v], nan);
          _mm512_mask_storeu_ps(out + c0 + 16 * v, lanes[v], y);
          const u32 sign = _mm512_mask_cmp_ps_mask(lanes[v], y, zero, _CMP_LT_OQ);
          u32& word = bits[c0 / 32 + v / 2];
          word = v % 2 ? word | sign << 16 : sign;
        }
      }
    }
  }
}
#endif
#if defined(__x86_64__)
OVSW_AVX2 void pool_avx2(const PoolJob& j, int64_t begin, int64_t end) { pool_rows(j, begin, end); }
#endif

using PoolFn = void (*)(const PoolJob&, int64_t, int64_t);

PoolFn pool_fn() {
#if defined(__x86_64__)
  const int isa = current_isa();
#if defined(OVSW_HAVE_AVX512)
  if (isa == kAvx512) return pool_avx512;
#endif
  if (isa == kAvx2) return pool_avx2;
#endif
  return pool_portable;
}

}  // namespace
}  // namespace detail

using namespace detail;

void max_pool2d_act(const float* x, const Pool2d& g, float lo, float hi, float* y, uint32_t* bits) {
  const PoolJob job{x, g, lo, hi, y, bits, pack_row_fn()};
  const PoolFn run = pool_fn();
  const int64_t row_work = std::max<int64_t>(1, g.out_w * g.channels * g.kernel_h * g.kernel_w);
  parallel_for(0, g.batch * g.out_h, std::max<int64_t>(1, 32768 / row_work),
               [&](int64_t begin, int64_t end) { run(job, begin, end); });
}

}  // namespace ovsw::core
