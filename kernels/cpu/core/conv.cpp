// Implicit-GEMM convolution on packed NHWC words: an im2col of the words (one tap = ceil(C/32) words; a
// padded tap is zero words, i.e. +1 everywhere) followed by the packed GEMM. With pad_value=0 the padded
// taps' contribution is removed exactly in the epilogue: per border pattern (which kernel rows / columns
// fall in the padding) the valid tap count sets the base, and a padded +1 tap adds C - 2 popcount(w_tap),
// so popcount(w_tap) is added back per output channel.
#include <memory>
#include <optional>

#include "detail.h"

namespace ovsw::core {
namespace {

using detail::u32;
using detail::u64;

// Per output position along one axis: bit t set if kernel tap t falls in the padding.
std::vector<u64> border_masks(int64_t size, int64_t out_size, int64_t k, int64_t s, int64_t p, int64_t d) {
  std::vector<u64> mask(out_size, 0);
  for (int64_t o = 0; o < out_size; ++o)
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = o * s - p + t * d;
      if (i < 0 || i >= size) mask[o] |= u64(1) << t;
    }
  return mask;
}

std::vector<u64> distinct(std::vector<u64> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

// The pad_value=0 correction tables, kept alive for the GEMM: row -> pattern, pattern -> base and
// per-channel popcount of its padded taps.
struct BorderCorrection {
  std::vector<int32_t> row_pattern, pattern_base, pattern_corr;

  BorderCorrection(const std::vector<int32_t>& tap_pop, const Conv2d& g, int64_t ho, int64_t wo) {
    const int64_t kh = g.kernel_h, kwid = g.kernel_w, taps = kh * kwid;
    const int64_t cout = g.out_channels;
    const std::vector<u64> hmask = border_masks(g.height, ho, kh, g.stride_h, g.pad_h, g.dilation_h);
    const std::vector<u64> wmask = border_masks(g.width, wo, kwid, g.stride_w, g.pad_w, g.dilation_w);
    const std::vector<u64> hs = distinct(hmask), ws = distinct(wmask);
    const int64_t npat = static_cast<int64_t>(hs.size() * ws.size());
    pattern_base.resize(npat);
    pattern_corr.assign(npat * cout, 0);
    for (size_t a = 0; a < hs.size(); ++a)
      for (size_t b = 0; b < ws.size(); ++b) {
        const int64_t p = static_cast<int64_t>(a * ws.size() + b);
        int64_t valid = 0;
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kwid; ++j) {
            if (!((hs[a] >> i & 1) || (ws[b] >> j & 1))) {
              ++valid;
              continue;
            }
            for (int64_t o = 0; o < cout; ++o) pattern_corr[p * cout + o] += tap_pop[o * taps + i * kwid + j];
          }
        pattern_base[p] = static_cast<int32_t>(valid * g.channels);
      }
    std::vector<int32_t> hid(ho), wid(wo);
    for (int64_t o = 0; o < ho; ++o) hid[o] = std::lower_bound(hs.begin(), hs.end(), hmask[o]) - hs.begin();
    for (int64_t o = 0; o < wo; ++o) wid[o] = std::lower_bound(ws.begin(), ws.end(), wmask[o]) - ws.begin();
    row_pattern.resize(g.batch * ho * wo);
    for (int64_t img = 0, r = 0; img < g.batch; ++img)
      for (int64_t oh = 0; oh < ho; ++oh)
        for (int64_t ow = 0; ow < wo; ++ow, ++r) row_pattern[r] = hid[oh] * static_cast<int32_t>(ws.size()) + wid[ow];
  }
};

// im2col of the packed words: row r = (image, oh, ow), columns (kh, kw, word) as the weight rows.
void im2col(const u32* x, const Conv2d& g, int64_t ho, int64_t wo, u32* cols) {
  const int64_t h = g.height, wd = g.width, cw = (g.channels + 31) / 32, kh = g.kernel_h, kwid = g.kernel_w;
  const int64_t kw = kh * kwid * cw, m = g.batch * ho * wo;
  detail::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ow = r % wo, oh = (r / wo) % ho, img = r / (wo * ho);
      u32* dst = cols + r * kw;
      const int64_t iw0 = ow * g.stride_w - g.pad_w, iw1 = iw0 + (kwid - 1) * g.dilation_w;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
        if (g.dilation_w == 1 && ih >= 0 && ih < h && iw0 >= 0 && iw1 < wd) {  // a whole kernel row is contiguous
          std::memcpy(dst, x + ((img * h + ih) * wd + iw0) * cw, kwid * cw * sizeof(u32));
          dst += kwid * cw;
          continue;
        }
        for (int64_t j = 0; j < kwid; ++j, dst += cw) {
          const int64_t iw = iw0 + j * g.dilation_w;
          if (ih < 0 || ih >= h || iw < 0 || iw >= wd) {
            std::memset(dst, 0, cw * sizeof(u32));
          } else {
            std::memcpy(dst, x + ((img * h + ih) * wd + iw) * cw, cw * sizeof(u32));
          }
        }
      }
    }
  });
}

}  // namespace

void packed_conv2d(const uint32_t* x, const uint32_t* w, const Conv2d& g, const Epilogue& epi,
                   const PreparedWeights* prepared) {
  const int64_t ho = g.out_h(), wo = g.out_w(), cw = (g.channels + 31) / 32;
  const int64_t m = g.batch * ho * wo, taps = g.kernel_h * g.kernel_w, kw = taps * cw, cout = g.out_channels;
  if (m <= 0 || cout <= 0) return;
  detail::TileEpilogue e = detail::make_epilogue(epi, cout, taps * g.channels);
  std::optional<BorderCorrection> border;
  if (prepared && !prepared->fits(cout, taps, cw)) prepared = nullptr;
  if (g.pad_value == 0 && (g.pad_h > 0 || g.pad_w > 0)) {
    std::vector<int32_t> counted;
    border.emplace(prepared ? prepared->tap_popcount : (counted = detail::row_popcounts(w, cout * taps, cw)), g, ho,
                   wo);
    e.pattern = border->row_pattern.data();
    e.pattern_base = border->pattern_base.data();
    e.pattern_corr = border->pattern_corr.data();
  }
  if (detail::direct_conv_avx512(x, w, g, e, prepared)) return;
  if (taps == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0) {
    detail::run_gemm(x, cw, w, kw, m, cout, kw, e, prepared);  // 1x1 stride 1: the input is the GEMM operand
    return;
  }
  std::unique_ptr<u32[]> cols(new u32[m * kw]);  // every word is written by im2col
  im2col(x, g, ho, wo, cols.get());
  detail::run_gemm(cols.get(), kw, w, kw, m, cout, kw, e, prepared);
}

}  // namespace ovsw::core
