// The direct AVX-512 convolution: no im2col. The packed input is copied once into a zero-padded frame (a
// padded tap reads zero words, +1 everywhere, exactly what im2col writes), so every tap of an output
// position is at a fixed offset from that position's corner. A tile is MR consecutive output positions
// (rows of the output, in (image, oh, ow) order) x a panel of 32 output channels; the epilogue runs on the
// accumulators in registers, with masks for a ragged last panel. Bit-exact with epilogue_row (epilogue.h):
// the same int32 and float32 steps.
#include "microkernels.h"

namespace ovsw::core::detail {

#if defined(OVSW_HAVE_AVX512)
namespace {

constexpr int MR = Avx512::MR, P = Avx512::PANEL;

// acc[i][0..3] (channels c0 + 8j .. + 8, int64 lanes) -> v[i][0..1] (channels c0 + 16h .. + 16, int32).
template <int R>
OVSW_AVX512 __attribute__((always_inline)) inline void narrow(const __m512i (&acc)[R][4], __m512i (&v)[R][2]) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2; ++h) v[i][h] = _mm512_permutex2var_epi32(acc[i][2 * h], even, acc[i][2 * h + 1]);
}

// The epilogue of rows r0 .. r0 + R of channels c0 .. c0 + 32 (fewer in a last panel): acc = base - 2 *
// (popcount - border correction), then int32, or float32 through scale / bias / residual (each rounded)
// and hardtanh, with the sign bits of what was stored (or, for kSignBits, only those bits).
template <int R>
OVSW_AVX512 void store_tile(const TileEpilogue& e, int64_t r0, int64_t c0, const __m512i (&acc)[R][4]) {
  // e's fields as locals: the stores below could alias e, and the compiler would reload them after each
  const int64_t n = e.n, cols = std::min<int64_t>(P, n - c0), words = (n + 31) / 32;
  const bool full = cols == P;  // unmasked stores where the panel is whole
  const __mmask16 mask[2] = {static_cast<__mmask16>(cols >= 16 ? 0xffff : (1u << cols) - 1),
                             static_cast<__mmask16>(cols <= 16 ? 0 : cols >= 32 ? 0xffff : (1u << (cols - 16)) - 1)};
  const Out type = e.out_type;
  const bool sign = type == Out::kSignBits, clamp = e.clamp, scaled = e.scale, biased = e.bias;
  const int32_t* const pattern = e.pattern;
  const float* const residual = e.residual;
  void* const out = e.out;
  u32* const bits = sign ? static_cast<u32*>(out) : e.bits;
  __m512 scale[2], bias[2];
  for (int h = 0; h < 2; ++h) {
    scale[h] = scaled ? _mm512_maskz_loadu_ps(mask[h], e.scale + c0 + 16 * h) : _mm512_setzero_ps();
    bias[h] = biased ? _mm512_maskz_loadu_ps(mask[h], e.bias + c0 + 16 * h) : _mm512_setzero_ps();
  }
  const __m512 lo = _mm512_set1_ps(e.lo), hi = _mm512_set1_ps(e.hi), zero = _mm512_setzero_ps();
  __m512i pop[R][2];
  narrow(acc, pop);
  for (int i = 0; i < R; ++i) {
    const int64_t row = r0 + i;
    const int32_t* corr = pattern ? e.pattern_corr + pattern[row] * n + c0 : nullptr;
    const __m512i base = _mm512_set1_epi32(pattern ? e.pattern_base[pattern[row]] : static_cast<int32_t>(e.base));
    u32 word = 0;
    for (int h = 0; h < 2; ++h) {
      __m512i p = pop[i][h];
      if (corr) p = _mm512_sub_epi32(p, _mm512_maskz_loadu_epi32(mask[h], corr + 16 * h));
      const __m512i a = _mm512_sub_epi32(base, _mm512_slli_epi32(p, 1));
      const int64_t at = row * n + c0 + 16 * h;
      if (type == Out::kInt32) {
        if (full) {
          _mm512_storeu_si512(static_cast<int32_t*>(out) + at, a);
        } else {
          _mm512_mask_storeu_epi32(static_cast<int32_t*>(out) + at, mask[h], a);
        }
        continue;
      }
      __m512 v = _mm512_cvtepi32_ps(a);
      if (scaled) v = _mm512_mul_ps(v, scale[h]);
      if (biased) v = _mm512_add_ps(v, bias[h]);
      if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[h], residual + at));
      if (!sign) {
        if (clamp) v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));  // v < lo ? lo : (hi < v ? hi : v); NaN stays
        if (full) {
          _mm512_storeu_ps(static_cast<float*>(out) + at, v);
        } else {
          _mm512_mask_storeu_ps(static_cast<float*>(out) + at, mask[h], v);
        }
      }
      word |= static_cast<u32>(_mm512_mask_cmp_ps_mask(mask[h], v, zero, _CMP_LT_OQ)) << (16 * h);
    }
    if (bits) bits[row * words + c0 / 32] = word;
  }
}

// Panels p0 .. p1 of R rows whose taps start at corner[i] + offset[t] (half = 64-bit words per tap; the
// k64 words of a panel are ordered (tap, word) as the weights).
template <int R>
OVSW_AVX512 void conv_tiles(const TileEpilogue& e, const u32* const* corner, const int64_t* offset, int64_t taps,
                            int64_t half, const u64* panels, int64_t p0, int64_t p1, int64_t r0) {
  const int64_t k64 = taps * half;
  for (int64_t p = p0; p < p1; ++p) {
    __m512i acc[R][4];
    Avx512::zero(acc);
    const u64* panel = panels + p * k64 * P;
    for (int64_t t = 0; t < taps; ++t, panel += half * P) {
      const u32* rows[R];
      for (int i = 0; i < R; ++i) rows[i] = corner[i] + offset[t];
      for (int64_t q = 0; q < half; ++q) Avx512::step<R>(acc, rows, panel + q * P, q);
    }
    store_tile<R>(e, r0, p * P, acc);
  }
}

using ConvTilesFn = void (*)(const TileEpilogue&, const u32* const*, const int64_t*, int64_t, int64_t, const u64*,
                             int64_t, int64_t, int64_t);

constexpr ConvTilesFn kConvTiles[MR] = {conv_tiles<1>, conv_tiles<2>, conv_tiles<3>,
                                        conv_tiles<4>, conv_tiles<5>, conv_tiles<6>};

// x [batch, height, width, cw] in a zero frame of pad rows / columns on each side (x itself without padding).
const u32* padded_input(const u32* x, const Conv2d& g, int64_t cw, std::vector<u32>& buf) {
  if (g.pad_h == 0 && g.pad_w == 0) return x;
  const int64_t hp = g.height + 2 * g.pad_h, wp = g.width + 2 * g.pad_w, row = g.width * cw;
  buf.assign(g.batch * hp * wp * cw, 0u);
  for (int64_t img = 0; img < g.batch; ++img)
    for (int64_t h = 0; h < g.height; ++h)
      std::memcpy(buf.data() + ((img * hp + h + g.pad_h) * wp + g.pad_w) * cw, x + (img * g.height + h) * row,
                  row * sizeof(u32));
  return buf.data();
}

}  // namespace

bool direct_conv_avx512(const u32* x, const u32* w, const Conv2d& g, const TileEpilogue& e,
                        const PreparedWeights* prepared) {
  const int64_t cw = (g.channels + 31) / 32;
  if (current_isa() != kAvx512 || cw % 2 != 0) return false;
  if (e.out_type != Out::kInt32 && e.out_type != Out::kFloat32 && e.out_type != Out::kSignBits) return false;
  const int64_t ho = g.out_h(), wo = g.out_w(), m = g.batch * ho * wo, n = g.out_channels;
  const int64_t kh = g.kernel_h, kwid = g.kernel_w, taps = kh * kwid;
  std::optional<AlignedWords> packed;
  const bool ready = prepared && prepared->isa == kAvx512 && prepared->panels;
  const u64* panels = ready ? prepared->panels->data() : packed.emplace(pack_panels(w, taps * cw, n, taps * cw, P)).data();
  std::vector<u32> frame;
  const u32* xp = padded_input(x, g, cw, frame);
  const int64_t hp = g.height + 2 * g.pad_h, wp = g.width + 2 * g.pad_w;
  std::vector<int64_t> offset(taps);  // of tap (a, b) from the output position's corner, in words
  for (int64_t a = 0; a < kh; ++a)
    for (int64_t b = 0; b < kwid; ++b) offset[a * kwid + b] = (a * g.dilation_h * wp + b * g.dilation_w) * cw;
  // Work units: a tile of rows x a group of panels (groups only when there are few tiles, for the threads).
  // Tiles as even as possible (49 rows: 5 x 5 + 4 x 6, not 8 x 6 + 1): the first `longer` get one more row.
  const int64_t tiles = (m + MR - 1) / MR, npanels = (n + P - 1) / P;
  const int64_t short_rows = m / tiles, longer = m % tiles;
  const int64_t groups = std::min<int64_t>(npanels, (32 + tiles - 1) / tiles);
  const int64_t per_group = (npanels + groups - 1) / groups;
  parallel_for(0, tiles * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t tile = u / groups, group = u % groups;
      const int64_t r0 = tile * short_rows + std::min(tile, longer), rows = short_rows + (tile < longer);
      const u32* corner[MR];  // (image, oh, ow) of r0, then stepped along the rows
      int64_t ow = r0 % wo, oh = (r0 / wo) % ho, img = r0 / (wo * ho);
      for (int64_t i = 0; i < rows; ++i) {
        corner[i] = xp + ((img * hp + oh * g.stride_h) * wp + ow * g.stride_w) * cw;
        if (++ow == wo) {
          ow = 0;
          if (++oh == ho) oh = 0, ++img;
        }
      }
      const int64_t p0 = group * per_group, p1 = std::min(npanels, p0 + per_group);
      if (p0 < p1) kConvTiles[rows - 1](e, corner, offset.data(), taps, cw / 2, panels, p0, p1, r0);
    }
  });
  return true;
}
#else
bool direct_conv_avx512(const u32*, const u32*, const Conv2d&, const TileEpilogue&, const PreparedWeights*) {
  return false;
}
#endif

}  // namespace ovsw::core::detail
