// Test driver of the torch-free core: every ISA path that is compiled in and that this CPU runs, against a
// plain scalar reference written here (unpacked +-1 products, not popcounts; its own bfloat16 / half
// rounding), on random shapes: ragged channel counts, both padding modes, strides, dilations, kernels
// 1..7, batch 1..4, every epilogue (int32; float32 / bfloat16 / float16 with scale, bias, residual; sign
// bits; hardtanh + sign bits), the fused max-pool + hardtanh + sign bits, serial and threaded. Outputs
// must be equal bit for bit, and nothing past them may be written. Exit status 1 on any mismatch (or a required ISA not run), 2 on bad arguments.
//
//   test_core [--cases N] [--seed S] [--isa NAME] [--require NAME] [--verbose]
//
// Build: g++ -std=c++17 -O2 -ffp-contract=off -pthread core/*.cpp (see .ci/cpu_core.sh).
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ovsw_core.h"

namespace {

namespace core = ovsw::core;
using u32 = uint32_t;

// ------------------------------------------------------------------------------------ random inputs
struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin(double p = 0.5) { return std::uniform_real_distribution<double>(0, 1)(g) < p; }
  float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(g); }
  float real(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
  template <class T>
  T pick(std::initializer_list<T> v) { return *(v.begin() + uniform(0, static_cast<int64_t>(v.size()) - 1)); }
};

// Channel counts: mostly ragged (not multiples of 32, 64 or 128), sometimes the word boundaries themselves.
int64_t channels(Rng& r, int64_t max) {
  if (r.coin(0.3)) return std::min(max, r.pick<int64_t>({1, 3, 31, 32, 33, 63, 64, 65, 95, 127, 128, 129, 161}));
  return r.uniform(1, max);
}

// Random +-1 signs as bytes (1 = negative), and their packed words (LSB first, padding bits 0).
std::vector<uint8_t> random_signs(Rng& r, int64_t n) {
  std::vector<uint8_t> s(n);
  for (auto& b : s) b = static_cast<uint8_t>(r.coin());
  return s;
}

std::vector<u32> pack(const std::vector<uint8_t>& s, int64_t rows, int64_t k) {
  const int64_t kw = (k + 31) / 32;
  std::vector<u32> out(rows * kw, 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < k; ++j)
      if (s[i * k + j]) out[i * kw + j / 32] |= u32(1) << (j % 32);
  return out;
}

// ---------------------------------------------------------------------------- the scalar reference
uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Round f to a float with `digits` significant bits and smallest ulp 2^min_exp, to nearest even (in
// double, with the default rounding mode); +-inf past `max_finite`.
float round_to(float f, int digits, int min_exp, double overflow) {
  if (std::isnan(f) || std::isinf(f) || f == 0.0f) return f;
  int e = 0;
  std::frexp(f, &e);
  const int ulp = std::max(e - digits, min_exp);
  const double q = std::ldexp(std::nearbyint(std::ldexp(static_cast<double>(f), -ulp)), ulp);
  if (std::fabs(q) >= overflow) return std::signbit(f) ? -INFINITY : INFINITY;
  return static_cast<float>(q);
}

uint16_t ref_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  return static_cast<uint16_t>(bits_of(round_to(f, 8, -133, 0x1p128)) >> 16);
}

uint16_t ref_half(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  const float q = std::fabs(round_to(f, 11, -24, 65536.0));
  if (std::isinf(q)) return sign | 0x7c00;
  if (q < 0x1p-14f) return sign | static_cast<uint16_t>(q * 0x1p24f);  // subnormal: q / 2^-24 units
  int e = 0;
  const float m = std::frexp(q, &e);  // q = m 2^e, m in [0.5, 1)
  return sign | static_cast<uint16_t>((e + 14) << 10) | static_cast<uint16_t>((m * 2.0f - 1.0f) * 1024.0f);
}

float bf16_value(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_value(uint16_t h) {
  const int e = h >> 10 & 0x1f, m = h & 0x3ff;
  const float mag = e == 0x1f ? (m ? NAN : INFINITY) : e == 0 ? std::ldexp(float(m), -24)
                                                              : std::ldexp(float(1024 + m), e - 25);
  return h & 0x8000 ? -mag : mag;
}

// One float epilogue step rounded to float32 on its own (volatile: no contraction into an FMA).
float rounded(float v) {
  volatile float t = v;
  return t;
}

struct Spec {  // a case's epilogue
  core::Out out = core::Out::kInt32;
  bool scale = false, bias = false, residual = false, clamp = false;
  float lo = 0, hi = 0;
};

// The expected output bytes and activation bits of rows x n accumulators through the epilogue spec.
void ref_epilogue(const std::vector<int32_t>& acc, int64_t rows, int64_t n, const Spec& s,
                  const std::vector<float>& scale, const std::vector<float>& bias, const std::vector<float>& res,
                  std::vector<uint8_t>& out, std::vector<u32>& bits) {
  const int64_t words = (n + 31) / 32;
  const bool sign_out = s.out == core::Out::kSignBits;
  const size_t elem = s.out == core::Out::kBFloat16 || s.out == core::Out::kFloat16 ? 2 : 4;
  out.assign(sign_out ? rows * words * 4 : rows * n * elem, 0);
  bits.assign(s.clamp ? rows * words : 0, 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < n; ++c) {
      const int32_t a = acc[i * n + c];
      uint8_t* o = out.data() + (i * n + c) * elem;
      if (s.out == core::Out::kInt32) {
        std::memcpy(o, &a, 4);
        continue;
      }
      float v = rounded(static_cast<float>(a));
      if (s.scale) v = rounded(v * scale[c]);
      if (s.bias) v = rounded(v + bias[c]);
      if (s.residual) v = rounded(v + res[i * n + c]);
      if (sign_out) {
        if (v < 0.0f) reinterpret_cast<u32*>(out.data())[i * words + c / 32] |= u32(1) << (c % 32);
        continue;
      }
      float stored = v;  // the value of the output element, as float
      if (s.out == core::Out::kBFloat16) stored = bf16_value(ref_bf16(v));
      if (s.out == core::Out::kFloat16) stored = half_value(ref_half(v));
      if (s.clamp) {
        if (stored < s.lo) stored = s.lo;
        else if (stored > s.hi) stored = s.hi;
        if (s.out == core::Out::kBFloat16) stored = bf16_value(ref_bf16(stored));
        if (s.out == core::Out::kFloat16) stored = half_value(ref_half(stored));
        if (stored < 0.0f) bits[i * words + c / 32] |= u32(1) << (c % 32);
      }
      if (s.out == core::Out::kFloat32) {
        std::memcpy(o, &stored, 4);
      } else {
        const uint16_t h = s.out == core::Out::kBFloat16 ? (s.clamp ? ref_bf16(stored) : ref_bf16(v))
                                                         : (s.clamp ? ref_half(stored) : ref_half(v));
        std::memcpy(o, &h, 2);
      }
    }
}

// Accumulators of the convolution from the unpacked signs: sum over valid taps and channels of
// (+-1)(+-1); a padded tap contributes 0 (pad_value 0) or the weight's own sign (pad_value 1: x = +1).
std::vector<int32_t> ref_conv(const std::vector<uint8_t>& x, const std::vector<uint8_t>& w, const core::Conv2d& g) {
  const int64_t ho = g.out_h(), wo = g.out_w(), c = g.channels;
  std::vector<int32_t> acc(g.batch * ho * wo * g.out_channels, 0);
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t oh = 0; oh < ho; ++oh)
      for (int64_t ow = 0; ow < wo; ++ow)
        for (int64_t o = 0; o < g.out_channels; ++o) {
          int32_t s = 0;
          for (int64_t i = 0; i < g.kernel_h; ++i)
            for (int64_t j = 0; j < g.kernel_w; ++j) {
              const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
              const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dilation_w;
              const uint8_t* wt = &w[((o * g.kernel_h + i) * g.kernel_w + j) * c];
              const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
              if (!inside && g.pad_value == 0) continue;
              const uint8_t* xt = inside ? &x[((n * g.height + ih) * g.width + iw) * c] : nullptr;
              for (int64_t ch = 0; ch < c; ++ch) {
                const int xs = xt && xt[ch] ? -1 : 1, ws = wt[ch] ? -1 : 1;
                s += xs * ws;
              }
            }
          acc[((n * ho + oh) * wo + ow) * g.out_channels + o] = s;
        }
  return acc;
}

std::vector<int32_t> ref_linear(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, int64_t m, int64_t n,
                                int64_t k) {
  std::vector<int32_t> acc(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int32_t s = 0;
      for (int64_t t = 0; t < k; ++t) s += (a[i * k + t] ? -1 : 1) * (b[j * k + t] ? -1 : 1);
      acc[i * n + j] = s;
    }
  return acc;
}

// ------------------------------------------------------------------------------------ threading hooks
void thread_hook(int64_t begin, int64_t end, int64_t grain, void* ctx, core::ParallelBody body) {
  const int64_t chunk = std::max<int64_t>({grain, 1, (end - begin + 2) / 3});
  std::vector<std::thread> ts;
  for (int64_t s = begin; s < end; s += chunk) ts.emplace_back(body, ctx, s, std::min(end, s + chunk));
  for (auto& t : ts) t.join();
}

void reversed_hook(int64_t begin, int64_t end, int64_t grain, void* ctx, core::ParallelBody body) {
  const int64_t chunk = std::max<int64_t>(grain, 1);  // the smallest chunks, last first
  for (int64_t s = begin + (end - begin - 1) / chunk * chunk; s >= begin; s -= chunk)
    body(ctx, s, std::min(end, s + chunk));
}

// ------------------------------------------------------------------------------------------- a case
constexpr int kGuard = 64;  // bytes past every output, which must stay untouched
constexpr uint8_t kCanary = 0xa5;

struct Result {
  bool ok = true;
  std::string what;
};

std::string out_name(core::Out o) {
  switch (o) {
    case core::Out::kInt32: return "int32";
    case core::Out::kFloat32: return "float32";
    case core::Out::kBFloat16: return "bfloat16";
    case core::Out::kFloat16: return "float16";
    default: return "signbits";
  }
}

std::string describe(const Spec& s) {
  std::string d = out_name(s.out);
  if (s.scale) d += "+scale";
  if (s.bias) d += "+bias";
  if (s.residual) d += "+residual";
  if (s.clamp) d += "+hardtanh[" + std::to_string(s.lo) + "," + std::to_string(s.hi) + "]+bits";
  return d;
}

Spec random_spec(Rng& r, bool allow_sign) {
  Spec s;
  const int kind = static_cast<int>(r.uniform(0, allow_sign ? 5 : 3));
  s.out = kind == 0 ? core::Out::kInt32 : kind == 1 ? core::Out::kFloat32 : kind == 2 ? core::Out::kBFloat16
        : kind == 3 ? core::Out::kFloat16 : kind == 4 ? core::Out::kSignBits : r.pick({core::Out::kFloat32,
                                                                                       core::Out::kBFloat16,
                                                                                       core::Out::kFloat16});
  if (s.out == core::Out::kInt32) return s;
  s.scale = r.coin();
  s.bias = r.coin();
  s.residual = r.coin();
  if (kind == 5) {
    s.clamp = true;
    static const float bounds[][2] = {{-1.0f, 1.0f}, {-0.3f, 0.7f}, {0.0f, 6.0f}, {0.25f, 0.25f}, {-5.0f, 20.0f}};
    const int64_t b = r.uniform(0, 4);
    s.lo = bounds[b][0];
    s.hi = bounds[b][1];
  }
  return s;
}

// The epilogue operands: scale of a random magnitude (half subnormals, overflow to inf, plain), some
// negative, bias normal, residual normal with a few -0, NaN and +-inf (a diverged network's values).
void random_operands(Rng& r, const Spec& s, int64_t rows, int64_t n, std::vector<float>& scale,
                     std::vector<float>& bias, std::vector<float>& res) {
  const float mag = r.pick({1.0f, 1.0f, 1e-6f, 300.0f, 0.01f});
  scale.resize(s.scale ? n : 0);
  for (auto& v : scale) v = r.real(-0.5f, 1.5f) * mag;
  bias.resize(s.bias ? n : 0);
  for (auto& v : bias) v = r.coin(0.1) ? 0.0f : r.normal() * (mag > 1 ? 100.0f : 1.0f);
  res.resize(s.residual ? rows * n : 0);
  for (auto& v : res) v = r.coin(0.05) ? -0.0f : r.coin(0.01) ? r.pick({NAN, INFINITY, -INFINITY}) : r.normal();
}

// Run one epilogue case through the core (run(epi)) and compare with the reference accumulators.
template <class Run>
Result check_epilogue(Rng& r, const Spec& s, const std::vector<int32_t>& acc, int64_t rows, int64_t n,
                      const Run& run) {
  std::vector<float> scale, bias, res;
  random_operands(r, s, rows, n, scale, bias, res);
  std::vector<uint8_t> want;
  std::vector<u32> want_bits;
  ref_epilogue(acc, rows, n, s, scale, bias, res, want, want_bits);
  std::vector<uint8_t> got(want.size() + kGuard, kCanary);
  std::vector<u32> got_bits(want_bits.size() + kGuard / 4, 0xa5a5a5a5u);
  core::Epilogue epi;
  epi.scale = s.scale ? scale.data() : nullptr;
  epi.bias = s.bias ? bias.data() : nullptr;
  epi.residual = s.residual ? res.data() : nullptr;
  epi.out_type = s.out;
  epi.out = got.data();
  epi.clamp = s.clamp;
  epi.lo = s.lo;
  epi.hi = s.hi;
  epi.bits = s.clamp ? got_bits.data() : nullptr;
  run(epi);
  Result res_;
  const bool words = s.out == core::Out::kSignBits;  // then an element is a word of 32 channels
  const int64_t elem = s.out == core::Out::kBFloat16 || s.out == core::Out::kFloat16 ? 2 : 4;
  const int64_t row_len = words ? (n + 31) / 32 : n;
  for (size_t i = 0; i < want.size() && res_.ok; ++i)
    if (got[i] != want[i]) {
      const int64_t e = static_cast<int64_t>(i) / elem;
      char buf[200];
      std::snprintf(buf, sizeof buf, "output %s %" PRId64 " (row %" PRId64 ", %s %" PRId64 "): byte %" PRId64
                    " got 0x%02x want 0x%02x", words ? "word" : "element", e, e / row_len, words ? "word" : "col",
                    e % row_len, static_cast<int64_t>(i) % elem, got[i], want[i]);
      res_ = {false, buf};
    }
  for (size_t i = want.size(); i < got.size() && res_.ok; ++i)
    if (got[i] != kCanary) res_ = {false, "wrote past the output"};
  for (size_t i = 0; i < want_bits.size() && res_.ok; ++i)
    if (got_bits[i] != want_bits[i]) {
      char buf[120];
      std::snprintf(buf, sizeof buf, "activation bits word %zu got 0x%08x want 0x%08x", i, got_bits[i], want_bits[i]);
      res_ = {false, buf};
    }
  for (size_t i = want_bits.size(); i < got_bits.size() && res_.ok; ++i)
    if (got_bits[i] != 0xa5a5a5a5u) res_ = {false, "wrote past the activation bits"};
  return res_;
}

// Keep the reference's cost (outputs x taps x channels) small enough for an emulator.
constexpr int64_t kBudget = 4'000'000;

Result conv_case(Rng& r, bool big, std::string& what) {
  core::Conv2d g;
  if (big) {  // a ResNet-like layer: many row tiles and two channel tiles
    g.batch = 1;
    g.height = g.width = 14;
    g.channels = r.pick<int64_t>({128, 100});
    g.out_channels = r.pick<int64_t>({128, 97});
    g.kernel_h = g.kernel_w = 3;
    g.pad_h = g.pad_w = 1;
  } else {
    g.batch = r.uniform(1, 4);
    g.channels = channels(r, 200);
    g.out_channels = r.coin(0.3) ? r.uniform(60, 140) : r.uniform(1, 40);
    const int64_t k = r.pick<int64_t>({1, 3, 3, 5, 7});
    g.kernel_h = k;
    g.kernel_w = r.coin(0.2) ? r.uniform(1, 7) : k;
    g.stride_h = r.uniform(1, 3);
    g.stride_w = r.coin(0.7) ? g.stride_h : r.uniform(1, 3);
    g.dilation_h = r.coin(0.7) ? 1 : r.uniform(2, 3);
    g.dilation_w = r.coin(0.7) ? g.dilation_h : r.uniform(1, 3);
    g.pad_h = r.uniform(0, std::min<int64_t>(3, g.kernel_h));
    g.pad_w = r.coin(0.7) ? g.pad_h : r.uniform(0, 3);
    const int64_t eh = g.dilation_h * (g.kernel_h - 1) + 1, ew = g.dilation_w * (g.kernel_w - 1) + 1;
    g.height = std::max<int64_t>(1, eh - 2 * g.pad_h) + r.uniform(0, 9);
    g.width = std::max<int64_t>(1, ew - 2 * g.pad_w) + r.uniform(0, 9);
    auto cost = [&] { return g.batch * g.out_h() * g.out_w() * g.out_channels * g.kernel_h * g.kernel_w * g.channels; };
    while (cost() > kBudget && g.batch > 1) --g.batch;
    while (cost() > kBudget && g.out_channels > 8) g.out_channels = g.out_channels * 2 / 3;
    while (cost() > kBudget && g.channels > 8) g.channels = g.channels * 2 / 3;
  }
  g.pad_value = static_cast<int>(r.uniform(0, 1));
  const int64_t cw = (g.channels + 31) / 32, taps = g.kernel_h * g.kernel_w;
  const std::vector<uint8_t> xs = random_signs(r, g.batch * g.height * g.width * g.channels);
  const std::vector<uint8_t> ws = random_signs(r, g.out_channels * taps * g.channels);
  const std::vector<u32> x = pack(xs, g.batch * g.height * g.width, g.channels);
  const std::vector<u32> w = pack(ws, g.out_channels * taps, g.channels);
  const Spec s = random_spec(r, true);
  char buf[240];
  std::snprintf(buf, sizeof buf,
                "conv N=%" PRId64 " H=%" PRId64 " W=%" PRId64 " C=%" PRId64 " Cout=%" PRId64 " k=%" PRId64 "x%" PRId64
                " s=%" PRId64 ",%" PRId64 " p=%" PRId64 ",%" PRId64 " d=%" PRId64 ",%" PRId64 " pad_value=%d (cw %" PRId64 ") ",
                g.batch, g.height, g.width, g.channels, g.out_channels, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
                g.pad_h, g.pad_w, g.dilation_h, g.dilation_w, g.pad_value, cw);
  const auto prepared = r.coin(0.5) ? core::prepare_weights(w.data(), g.out_channels, taps, cw) : nullptr;
  what = buf + describe(s) + (prepared ? " prepared" : "");
  const std::vector<int32_t> acc = ref_conv(xs, ws, g);
  return check_epilogue(r, s, acc, g.batch * g.out_h() * g.out_w(), g.out_channels, [&](const core::Epilogue& epi) {
    core::packed_conv2d(x.data(), w.data(), g, epi, prepared.get());
  });
}

Result linear_case(Rng& r, std::string& what) {
  const int64_t m = r.coin(0.3) ? r.uniform(40, 120) : r.uniform(1, 20);
  const int64_t n = r.coin(0.3) ? r.uniform(60, 150) : r.uniform(1, 40);
  int64_t k = r.coin(0.5) ? channels(r, 700) : r.uniform(1, 1500);
  while (m * n * k > kBudget) k = k * 2 / 3 + 1;
  const std::vector<uint8_t> as = random_signs(r, m * k), bs = random_signs(r, n * k);
  const std::vector<u32> a = pack(as, m, k), b = pack(bs, n, k);
  const Spec s = random_spec(r, true);
  const auto prepared = r.coin(0.5) ? core::prepare_weights(b.data(), n, 1, (k + 31) / 32) : nullptr;
  what = "linear M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) + " " + describe(s) +
         (prepared ? " prepared" : "");
  return check_epilogue(r, s, ref_linear(as, bs, m, n, k), m, n, [&](const core::Epilogue& epi) {
    core::packed_linear(a.data(), b.data(), m, n, k, epi, prepared.get());
  });
}

// Floats where the sign convention matters: +-0, tiny, subnormal, +-inf, NaN, or normal.
template <class T>
T special(Rng& r) {
  if (!r.coin(0.2)) return static_cast<T>(r.normal());
  return r.pick<T>({T(0), -T(0), T(1e-30), -T(1e-30), T(1e-40), -T(1e-40), T(INFINITY), -T(INFINITY), T(NAN),
                    -T(1e-300)});
}

template <class T>
std::vector<u32> ref_pack(const std::vector<T>& x, int64_t rows, int64_t k) {
  std::vector<uint8_t> s(x.size());
  for (size_t i = 0; i < x.size(); ++i) s[i] = x[i] < T(0);
  return pack(s, rows, k);
}

Result pack_case(Rng& r, std::string& what) {
  const int kind = static_cast<int>(r.uniform(0, 2));
  std::vector<u32> got, want;
  if (kind < 2) {
    const int64_t rows = r.uniform(1, 6), k = r.coin(0.5) ? channels(r, 300) : r.uniform(1, 300);
    what = std::string(kind ? "sign_pack_rows_f64" : "sign_pack_rows") + " rows=" + std::to_string(rows) +
           " k=" + std::to_string(k);
    got.assign(rows * ((k + 31) / 32) + 8, 0xa5a5a5a5u);
    if (kind == 0) {
      std::vector<float> x(rows * k);
      for (auto& v : x) v = special<float>(r);
      core::sign_pack_rows(x.data(), got.data(), rows, k);
      want = ref_pack(x, rows, k);
    } else {
      std::vector<double> x(rows * k);
      for (auto& v : x) v = special<double>(r);
      core::sign_pack_rows_f64(x.data(), got.data(), rows, k);
      want = ref_pack(x, rows, k);
    }
  } else {
    const int64_t nb = r.uniform(1, 3), c = channels(r, 100), hw = r.uniform(1, 50), cw = (c + 31) / 32;
    what = "sign_pack_nchw N=" + std::to_string(nb) + " C=" + std::to_string(c) + " HW=" + std::to_string(hw);
    std::vector<float> x(nb * c * hw), nhwc(nb * hw * c);
    for (auto& v : x) v = special<float>(r);
    for (int64_t n = 0; n < nb; ++n)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t p = 0; p < hw; ++p) nhwc[(n * hw + p) * c + ch] = x[(n * c + ch) * hw + p];
    got.assign(nb * hw * cw + 8, 0xa5a5a5a5u);
    core::sign_pack_nchw(x.data(), got.data(), nb, c, hw);
    want = ref_pack(nhwc, nb * hw, c);
  }
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i]) {
      char buf[100];
      std::snprintf(buf, sizeof buf, "word %zu got 0x%08x want 0x%08x", i, got[i], want[i]);
      return {false, buf};
    }
  for (size_t i = want.size(); i < got.size(); ++i)
    if (got[i] != 0xa5a5a5a5u) return {false, "wrote past the output"};
  return {};
}

// max_pool2d_act: per output, the window's valid taps; NaN if any tap is NaN (the last one, as the core
// takes every NaN), else the first of the largest values; clamped; sign bits of the clamped value.
Result pool_case(Rng& r, std::string& what) {
  core::Pool2d g;
  g.batch = r.uniform(1, 3);
  g.channels = channels(r, 100);
  g.height = r.uniform(1, 20);
  g.width = r.uniform(1, 20);
  g.kernel_h = r.uniform(1, 4);
  g.kernel_w = r.uniform(1, 4);
  g.stride_h = r.uniform(1, 3);
  g.stride_w = r.uniform(1, 3);
  g.dilation_h = r.uniform(1, 2);
  g.dilation_w = r.uniform(1, 2);
  g.pad_h = r.uniform(0, g.kernel_h / 2);
  g.pad_w = r.uniform(0, g.kernel_w / 2);
  const bool ceil_mode = r.coin();
  auto out_size = [&](int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {  // torch's pooling rule
    const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
    if (span < 0) return int64_t(0);
    int64_t o = span / s + 1;
    if (ceil_mode && (o - 1) * s >= in + p) --o;
    return o;
  };
  g.out_h = out_size(g.height, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_w = out_size(g.width, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  const float lo = r.coin(0.8) ? -1.0f : r.real(-2.0f, 0.0f), hi = r.coin(0.8) ? 1.0f : r.real(0.0f, 2.0f);
  what = "max_pool2d_act N=" + std::to_string(g.batch) + " C=" + std::to_string(g.channels) + " " +
         std::to_string(g.height) + "x" + std::to_string(g.width) + " k=" + std::to_string(g.kernel_h) + "x" +
         std::to_string(g.kernel_w) + " s=" + std::to_string(g.stride_h) + "," + std::to_string(g.stride_w) +
         " p=" + std::to_string(g.pad_h) + "," + std::to_string(g.pad_w) + " d=" + std::to_string(g.dilation_h) +
         "," + std::to_string(g.dilation_w) + (ceil_mode ? " ceil" : "");
  if (g.out_h < 1 || g.out_w < 1) return {};  // torch rejects these shapes before the core
  const int64_t c = g.channels, cw = (c + 31) / 32, pixels = g.batch * g.out_h * g.out_w;
  std::vector<float> x(g.batch * g.height * g.width * c);
  for (auto& v : x) v = r.coin(0.02) ? NAN : special<float>(r);
  std::vector<float> y(pixels * c + kGuard, 7.0f), want(pixels * c);
  std::vector<u32> bits(pixels * cw + 8, 0xa5a5a5a5u);
  core::max_pool2d_act(x.data(), g, lo, hi, y.data(), bits.data());
  for (int64_t p = 0; p < pixels; ++p) {
    const int64_t img = p / (g.out_h * g.out_w), oh = p / g.out_w % g.out_h, ow = p % g.out_w;
    for (int64_t ch = 0; ch < c; ++ch) {
      bool nan = false, any = false;
      float best = 0.0f;
      for (int64_t i = 0; i < g.kernel_h; ++i)
        for (int64_t t = 0; t < g.kernel_w; ++t) {
          const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
          const int64_t iw = ow * g.stride_w - g.pad_w + t * g.dilation_w;
          if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) continue;
          const float v = x[((img * g.height + ih) * g.width + iw) * c + ch];
          if (std::isnan(v)) {
            nan = true;
            best = v;
          } else if (!nan && (!any || v > best)) {
            best = v;
          }
          any = true;
        }
      if (!any) best = -INFINITY;
      want[p * c + ch] = nan ? best : best < lo ? lo : best > hi ? hi : best;
    }
  }
  std::vector<uint8_t> neg(want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    neg[i] = want[i] < 0.0f;
    const bool same = std::isnan(want[i]) ? std::isnan(y[i]) : bits_of(y[i]) == bits_of(want[i]);
    if (!same) {
      char buf[120];
      std::snprintf(buf, sizeof buf, "y[%zu] got %g (0x%08x) want %g (0x%08x)", i, y[i], bits_of(y[i]), want[i],
                    bits_of(want[i]));
      return {false, buf};
    }
  }
  const std::vector<u32> want_bits = pack(neg, pixels, c);
  for (size_t i = 0; i < want_bits.size(); ++i)
    if (bits[i] != want_bits[i]) return {false, "sign word " + std::to_string(i) + " differs"};
  for (size_t i = want.size(); i < y.size(); ++i)
    if (y[i] != 7.0f) return {false, "wrote past y"};
  for (size_t i = want_bits.size(); i < bits.size(); ++i)
    if (bits[i] != 0xa5a5a5a5u) return {false, "wrote past the sign words"};
  return {};
}

// The compiler's half type, where C++ has one: the reference's own rounding is checked against it.
#if defined(__aarch64__)
#define OVSW_TEST_F16 __fp16
#elif defined(__x86_64__) && defined(__FLT16_MANT_DIG__)
#define OVSW_TEST_F16 _Float16
#endif

int self_check_half() {
  int bad = 0;
#if defined(OVSW_TEST_F16)
  Rng r(7);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = static_cast<uint32_t>(r.g());
    if (i % 2) u = (u & 0x807fffffu) | uint32_t(r.uniform(100, 145)) << 23;  // near the half range
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const OVSW_TEST_F16 h = static_cast<OVSW_TEST_F16>(f);
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    if (hb != ref_half(f) || bits_of(half_value(hb)) != bits_of(static_cast<float>(h))) {
      if (++bad <= 3) std::printf("reference half rounding disagrees with the compiler half type at 0x%08x\n", u);
    }
  }
  std::printf("reference: half rounding checked against the compiler's half type, %d disagreements\n", bad);
#endif
  return bad;
}

int find_isa(const std::string& name) {
  for (int i = core::kPortable; i <= core::kNeon; ++i)
    if (name == core::isa_name(i)) return i;
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t cases = 240;
  uint64_t seed = 14;
  std::string only, require;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    if (a == "--cases" && has) cases = std::atoll(argv[++i]);
    else if (a == "--seed" && has) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--isa" && has) only = argv[++i];
    else if (a == "--require" && has) require = argv[++i];
    else if (a == "--verbose") verbose = true;
    else {
      std::fprintf(stderr, "usage: %s [--cases N] [--seed S] [--isa NAME] [--require NAME] [--verbose]\n", argv[0]);
      return 2;
    }
  }
  if ((!only.empty() && find_isa(only) < 0) || (!require.empty() && find_isa(require) < 0)) {
    std::fprintf(stderr, "unknown ISA name (portable, avx2, avx512, neon)\n");
    return 2;
  }
  int failures = self_check_half();
  for (int isa : {-2, 0, 1, 2, 3, 99}) {  // every Isa and two unknown ones
    const bool ok = isa >= 0 && isa <= core::kNeon && (core::supported_isas() >> isa & 1);
    if (core::force_isa(isa) != ok) {
      std::printf("FAIL: force_isa(%d) returned %d\n", isa, int(!ok));
      ++failures;
    }
  }
  core::force_isa(-1);
  std::vector<int> compiled = {core::kPortable};
#if defined(__x86_64__)
  compiled.push_back(core::kAvx2);
#if !defined(OVSW_CORE_NO_AVX512)
  compiled.push_back(core::kAvx512);
#endif
#endif
#if defined(__aarch64__)
  compiled.push_back(core::kNeon);
#endif
  bool required_ran = require.empty();
  for (int isa : compiled) {
    const char* name = core::isa_name(isa);
    if (!only.empty() && only != name) continue;
    if (!(core::supported_isas() >> isa & 1)) {
      std::printf("%s: skipped (compiled in, but this CPU cannot run it)\n", name);
      continue;
    }
    core::force_isa(isa);
    Rng r(seed);  // the same cases for every ISA
    int64_t bad = 0;
    for (int64_t c = 0; c < cases; ++c) {
      const int hook = static_cast<int>(r.uniform(0, 2));
      core::set_parallel_for(hook == 0 ? nullptr : hook == 1 ? thread_hook : reversed_hook);
      std::string what;
      const int kind = static_cast<int>(r.uniform(0, 21));
      const Result res = kind < 11   ? conv_case(r, c % 80 == 40, what)
                         : kind < 16 ? linear_case(r, what)
                         : kind < 20 ? pack_case(r, what)
                                     : pool_case(r, what);
      if (verbose) std::printf("  %s case %" PRId64 ": %s%s\n", name, c, what.c_str(), res.ok ? "" : "  MISMATCH");
      if (!res.ok && ++bad <= 5)
        std::printf("%s case %" PRId64 " MISMATCH [%s threads] %s: %s\n", name, c,
                    hook == 0 ? "serial" : hook == 1 ? "3" : "reversed", what.c_str(), res.what.c_str());
    }
    core::set_parallel_for(nullptr);
    std::printf("%s: %" PRId64 " cases, %" PRId64 " mismatches\n", name, cases, bad);
    failures += bad > 0;
    if (name == require && cases > 0) required_ran = true;
  }
  core::force_isa(-1);
  if (!required_ran) {
    std::printf("FAIL: the required ISA %s did not run\n", require.c_str());
    return 1;
  }
  return failures ? 1 : 0;
}
