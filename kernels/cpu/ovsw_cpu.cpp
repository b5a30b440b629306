// XOR-popcount CPU kernels of the ovsw packed ops (design §3), registered as torch.ops.ovsw_cpu.*.
//
// Bit layout as kernels/reference.py: int32 words, LSB first, bit = (x < 0), padding bits 0, so
// dot(a, b) = K - 2 * popcount(a XOR b). One binary holds AVX-512 VPOPCNTDQ, AVX2 (vpshufb nibble
// popcount) and portable (__builtin_popcountll) microkernels, compiled with per-function target
// attributes and chosen at run time (NEON replaces the x86 ones on aarch64). A convolution is an im2col of
// the packed words (one tap = ceil(C/32) words; padded taps are zero words, i.e. +1) followed by the GEMM;
// with pad_value=0 the padded taps' contribution is removed exactly in the epilogue, from per-border
// pattern corrections popcount(w_tap) (a padded +1 tap adds C - 2 popcount(w_tap)).
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace {

using u32 = uint32_t;
using u64 = uint64_t;

enum Isa : int64_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2, NEON = 3 };
int64_t g_forced_isa = -1;

int64_t supported_isas() {
  int64_t mask = 1 << PORTABLE;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) mask |= 1 << AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    mask |= 1 << AVX512;
#endif
#if defined(__aarch64__)
  mask |= 1 << NEON;
#endif
  return mask;
}

int64_t get_isa() {
  if (g_forced_isa >= 0) return g_forced_isa;
  int64_t mask = supported_isas();
  for (int64_t isa : {AVX512, NEON, AVX2}) {
    if (mask >> isa & 1) return isa;
  }
  return PORTABLE;
}

void set_isa(int64_t isa) {
  TORCH_CHECK(isa == -1 || (isa >= 0 && isa <= 3 && (supported_isas() >> isa & 1)),
              "ovsw_cpu.set_isa: ISA ", isa, " is not supported on this CPU / build");
  g_forced_isa = isa;
}

// ------------------------------------------------------------------------------------ microkernels
// tile<MR, NR>(a, lda, b, ldb, kw, out, ldo): out[i * ldo + j] = popcount(a_i XOR b_j) over kw words.

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
#define OVSW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))
#define OVSW_AVX2 __attribute__((target("avx2")))

// AVX-512: output channels in the lanes, so no horizontal sums. The weights are repacked per call into
// panels of 32 channels, [k64][32] uint64 (a 64-bit word of 32 channels per 256 bytes); each A row's
// 64-bit word is broadcast and XOR-popcounted against 4 zmm of channels, for 6 rows x 32 channels at once.
struct Avx512 {
  static constexpr int MR = 6, PANEL = 32;
  template <int R>
  OVSW_AVX512 static void tile(const u32* a, int64_t lda, const u64* panel, int64_t kw, int32_t* out,
                               int64_t ldo) {
    __m512i acc[R][4];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
    const int64_t full = kw / 2;
    for (int64_t q = 0; q <= full; ++q) {
      if (q == full && !(kw & 1)) break;
      const u64* bp = panel + q * PANEL;
      __m512i bv[4];
      for (int j = 0; j < 4; ++j) bv[j] = _mm512_load_si512(bp + 8 * j);
      for (int i = 0; i < R; ++i) {
        u64 word;
        if (q < full) {
          std::memcpy(&word, a + i * lda + 2 * q, 8);
        } else {
          word = a[i * lda + 2 * q];  // odd word count: the last 32-bit word, high half 0 as in the panel
        }
        const __m512i av = _mm512_set1_epi64(static_cast<long long>(word));
        for (int j = 0; j < 4; ++j)
          acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, bv[j])));
      }
    }
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

// ---------------------------------------------------------------------------------------- epilogue
// Sign bits of k floats into ceil(k / 32) words (x < 0, LSB first), vectorized for the current ISA.
using PackRowFn = void (*)(const float*, u32*, int64_t);
PackRowFn pack_row_fn();
struct Epilogue;
// One output row of a tile, stored as floats (see epilogue_row below).
using RowFn = void (*)(const Epilogue&, int64_t, const int32_t*, int64_t, int64_t);

constexpr int64_t BLOCK_M = 48, BLOCK_N = 64;  // GEMM tile: multiples of every MR / NR and of the AVX-512 panel

// acc = base[row] - 2 * (popcount - corr[row][n]); then raw int32, or acc * scale + bias + residual in
// float32 (each step rounded like the reference; built with -ffp-contract=off) cast to the output dtype.
struct Epilogue {
  int64_t n = 0;                     // output channels (row length of the output)
  int64_t base = 0;                  // K (linear) or taps * C (conv) when no row patterns
  const int32_t* pattern = nullptr;  // per row: border pattern id (conv, pad_value = 0), or null
  const int32_t* pattern_base = nullptr;
  const int32_t* pattern_corr = nullptr;  // [patterns, n]
  const float* scale = nullptr;
  const float* bias = nullptr;
  const float* residual = nullptr;
  bool raw = true;
  at::ScalarType dtype = at::kFloat;
  void* out = nullptr;

  bool sign = false;  // store the sign bits of the float32 result (int32 words, the next layer's input)
  // Activation outputs (packed_conv2d_act): clamp the stored values to [lo, hi] (hardtanh, in float32 after
  // the cast to the output dtype, as torch computes it on that tensor) and also write their sign bits.
  bool clamp = false;
  float lo = 0.0f, hi = 0.0f;
  u32* bits = nullptr;
  PackRowFn pack_row = nullptr;  // for the sign bits (sign or bits)
  RowFn row_store = nullptr;     // float outputs: the fused row epilogue for these options (select_row)

  // Branch-free inner loops (the compiler vectorizes them); cols <= BLOCK_N.
  __attribute__((always_inline)) void accumulators(int64_t row, const int32_t* pop, int64_t n0, int64_t cols,
                                                   int32_t* acc) const {
    if (pattern) {
      const int32_t b = pattern_base[pattern[row]];
      const int32_t* corr = pattern_corr + pattern[row] * n + n0;
      for (int64_t j = 0; j < cols; ++j) acc[j] = b - 2 * (pop[j] - corr[j]);
    } else {
      const int32_t b = static_cast<int32_t>(base);
      for (int64_t j = 0; j < cols; ++j) acc[j] = b - 2 * pop[j];
    }
  }

  void store_raw(int64_t row, const int32_t* pop, int64_t n0, int64_t cols) const {
    int32_t acc[BLOCK_N];
    accumulators(row, pop, n0, cols, acc);
    std::memcpy(static_cast<int32_t*>(out) + row * n + n0, acc, cols * sizeof(int32_t));
  }

  void operator()(int64_t row, const int32_t* pop, int64_t n0, int64_t cols) const {
    if (raw && !sign) return store_raw(row, pop, n0, cols);
    row_store(*this, row, pop, n0, cols);
  }
};

// One pass per row: acc -> float -> * scale -> + bias -> + residual (each step rounded like the reference),
// then either (T = u32, packed_conv2d_sign) the sign bits of those float32 values into e.out, or the values
// cast to T into e.out; with C (packed_conv2d_act) clamped to [lo, hi] after the cast, as torch's hardtanh on
// the T tensor, and the sign bits of the stored values into e.bits. The options are template arguments and
// the body is compiled for each ISA (the build's baseline is plain x86-64): one branch-free vector loop.
template <class T, bool S, bool B, bool R, bool C>
__attribute__((always_inline)) inline void epilogue_row(const Epilogue& e, int64_t row, const int32_t* pop,
                                                        int64_t n0, int64_t cols) {
  constexpr bool SIGN = std::is_same_v<T, u32>;
  using Out = std::conditional_t<SIGN, float, T>;
  int32_t acc[BLOCK_N];
  float f[BLOCK_N];
  e.accumulators(row, pop, n0, cols, acc);
  Out* o = SIGN ? nullptr : static_cast<Out*>(e.out) + row * e.n + n0;
  const float* sc = S ? e.scale + n0 : nullptr;
  const float* bi = B ? e.bias + n0 : nullptr;
  const float* re = R ? e.residual + row * e.n + n0 : nullptr;
  const float lo = e.lo, hi = e.hi;
  for (int64_t j = 0; j < cols; ++j) {
    float v = static_cast<float>(acc[j]);
    if constexpr (S) v = v * sc[j];
    if constexpr (B) v = v + bi[j];
    if constexpr (R) v = v + re[j];
    if constexpr (SIGN) {
      f[j] = v;
    } else {
      if constexpr (C) {
        v = static_cast<float>(static_cast<Out>(v));
        v = v < lo ? lo : (hi < v ? hi : v);
      }
      const Out t = static_cast<Out>(v);
      o[j] = t;
      if constexpr (C) f[j] = static_cast<float>(t);
    }
  }
  const int64_t words = (e.n + 31) / 32;
  if constexpr (SIGN) e.pack_row(f, static_cast<u32*>(e.out) + row * words + n0 / 32, cols);
  if constexpr (C && !SIGN) {
    if (e.bits) e.pack_row(f, e.bits + row * words + n0 / 32, cols);
  }
}

template <class T, bool S, bool B, bool R, bool C>
void row_portable(const Epilogue& e, int64_t row, const int32_t* pop, int64_t n0, int64_t cols) {
  epilogue_row<T, S, B, R, C>(e, row, pop, n0, cols);
}
#if defined(__x86_64__)
template <class T, bool S, bool B, bool R, bool C>
OVSW_AVX2 void row_avx2(const Epilogue& e, int64_t row, const int32_t* pop, int64_t n0, int64_t cols) {
  epilogue_row<T, S, B, R, C>(e, row, pop, n0, cols);
}
template <class T, bool S, bool B, bool R, bool C>
OVSW_AVX512 void row_avx512(const Epilogue& e, int64_t row, const int32_t* pop, int64_t n0, int64_t cols) {
  epilogue_row<T, S, B, R, C>(e, row, pop, n0, cols);
}
#endif

template <class T, int I>
RowFn row_variant(int64_t isa) {
  constexpr bool S = I & 1, B = I & 2, R = I & 4, C = I & 8;
#if defined(__x86_64__)
  if (isa == AVX512) return row_avx512<T, S, B, R, C>;
  if (isa == AVX2) return row_avx2<T, S, B, R, C>;
#endif
  return row_portable<T, S, B, R, C>;
}

template <class T, int... I>
RowFn row_table(int index, int64_t isa, std::integer_sequence<int, I...>) {
  const RowFn fns[] = {row_variant<T, I>(isa)...};
  return fns[index];
}

// The row epilogue for e's options, output dtype and the current ISA; call after every option is set.
void select_row(Epilogue& e) {
  const int index = (e.scale != nullptr) | (e.bias != nullptr) << 1 | (e.residual != nullptr) << 2 | e.clamp << 3;
  const auto all = std::make_integer_sequence<int, 16>{};
  if (e.sign) {
    e.row_store = row_table<u32>(index & 7, get_isa(), all);
  } else switch (e.dtype) {
    case at::kBFloat16: e.row_store = row_table<c10::BFloat16>(index, get_isa(), all); break;
    case at::kHalf: e.row_store = row_table<c10::Half>(index, get_isa(), all); break;
    default: e.row_store = row_table<float>(index, get_isa(), all);
  }
  e.pack_row = pack_row_fn();
}

// ------------------------------------------------------------------------------------------- GEMM

// Rows per tile: at most BLOCK_M, a multiple of mr, and as even as possible (49 rows: 2 x 30, not 48 + 1).
int64_t balanced_block(int64_t m, int64_t mr) {
  const int64_t tiles = (m + BLOCK_M - 1) / BLOCK_M;
  const int64_t rows = (m + tiles - 1) / tiles;
  return std::min<int64_t>(BLOCK_M, (rows + mr - 1) / mr * mr);
}

template <class K>
void gemm_block(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t kw, int64_t m0, int64_t m1,
                int64_t n0, int64_t n1, const Epilogue& epi) {
  constexpr int MR = K::MR, NR = K::NR;
  int32_t pop[BLOCK_M * BLOCK_N];
  const int64_t ldo = BLOCK_N;
  for (int64_t j = n0; j < n1; j += NR) {
    const u32* bj = b + j * ldb;
    const bool full_n = j + NR <= n1;
    for (int64_t i = m0; i < m1; i += MR) {
      const u32* ai = a + i * lda;
      int32_t* o = pop + (i - m0) * ldo + (j - n0);
      const bool full_m = i + MR <= m1;
      if (full_m && full_n) {
        K::template tile<MR, NR>(ai, lda, bj, ldb, kw, o, ldo);
      } else if (full_m) {
        for (int64_t jj = 0; jj < n1 - j; ++jj) K::template tile<MR, 1>(ai, lda, bj + jj * ldb, ldb, kw, o + jj, ldo);
      } else if (full_n) {
        for (int64_t ii = 0; ii < m1 - i; ++ii)
          K::template tile<1, NR>(ai + ii * lda, lda, bj, ldb, kw, o + ii * ldo, ldo);
      } else {
        for (int64_t ii = 0; ii < m1 - i; ++ii)
          for (int64_t jj = 0; jj < n1 - j; ++jj)
            K::template tile<1, 1>(ai + ii * lda, lda, bj + jj * ldb, ldb, kw, o + ii * ldo + jj, ldo);
      }
    }
  }
  for (int64_t i = m0; i < m1; ++i) epi(i, pop + (i - m0) * ldo, n0, n1 - n0);
}

template <class K>
void gemm(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t m, int64_t n, int64_t kw,
          const Epilogue& epi) {
  const int64_t block_m = balanced_block(m, K::MR);
  const int64_t tiles_m = (m + block_m - 1) / block_m, tiles_n = (n + BLOCK_N - 1) / BLOCK_N;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / tiles_n) * block_m, n0 = (t % tiles_n) * BLOCK_N;
      gemm_block<K>(a, lda, b, ldb, kw, m0, std::min(m, m0 + block_m), n0, std::min(n, n0 + BLOCK_N), epi);
    }
  });
}

// Weights repacked per call into panels of PANEL channels, [k64][PANEL] uint64, for kernels that keep output
// channels in vector lanes (x86: K = Avx512 or Avx2).
template <class K>
void gemm_panels(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t m, int64_t n, int64_t kw,
                 const Epilogue& epi) {
  constexpr int64_t P = K::PANEL;
  const int64_t k64 = (kw + 1) / 2, panels = (n + P - 1) / P;
  at::Tensor packed = at::empty({panels * k64 * P}, at::TensorOptions().dtype(at::kLong));  // 64-byte aligned
  u64* bt = reinterpret_cast<u64*>(packed.data_ptr<int64_t>());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows = std::min<int64_t>(P, n - p * P);
      u64* dst = bt + p * k64 * P;
      for (int64_t q = 0; q < k64; ++q, dst += P) {
        const bool pair = 2 * q + 1 < kw;
        for (int64_t l = 0; l < rows; ++l) {
          const u32* src = b + (p * P + l) * ldb + 2 * q;
          dst[l] = pair ? (u64(src[1]) << 32 | src[0]) : src[0];
        }
        for (int64_t l = rows; l < P; ++l) dst[l] = 0;
      }
    }
  });
  const int64_t block_m = balanced_block(m, K::MR);
  const int64_t tiles_m = (m + block_m - 1) / block_m, tiles_n = (n + BLOCK_N - 1) / BLOCK_N;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t pop[BLOCK_M * BLOCK_N];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / tiles_n) * block_m, n0 = (t % tiles_n) * BLOCK_N;
      const int64_t m1 = std::min(m, m0 + block_m), n1 = std::min(n, n0 + BLOCK_N);
      for (int64_t j = n0; j < n1; j += P)
        for (int64_t i = m0; i < m1; i += K::MR)
          K::rows(a + i * lda, lda, bt + (j / P) * k64 * P, kw, pop + (i - m0) * BLOCK_N + (j - n0), BLOCK_N,
                       std::min<int64_t>(K::MR, m1 - i));
      for (int64_t i = m0; i < m1; ++i) epi(i, pop + (i - m0) * BLOCK_N, n0, n1 - n0);
    }
  });
}

void run_gemm(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t m, int64_t n, int64_t kw,
              const Epilogue& epi) {
  switch (get_isa()) {
#if defined(__x86_64__)
    case AVX512: return gemm_panels<Avx512>(a, lda, b, ldb, m, n, kw, epi);
    case AVX2: return gemm_panels<Avx2>(a, lda, b, ldb, m, n, kw, epi);
#endif
#if defined(__aarch64__)
    case NEON: return gemm<Neon>(a, lda, b, ldb, m, n, kw, epi);
#endif
    default: return gemm<Portable>(a, lda, b, ldb, m, n, kw, epi);
  }
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
#endif

using PopcountFn = int32_t (*)(const u32*, int64_t);
PopcountFn popcount_fn() {
#if defined(__x86_64__)
  const int64_t isa = get_isa();
  if (isa == AVX512) return popcount_words_avx512;
  if (isa == AVX2) return popcount_words_popcnt;
#endif
  return popcount_words_portable;
}

at::Tensor new_output(at::IntArrayRef shape, bool raw, at::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(raw ? at::kInt : dtype));
}

void set_epilogue(Epilogue& epi, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, bool raw, at::Tensor& out) {
  epi.scale = scale ? scale->data_ptr<float>() : nullptr;
  epi.bias = bias ? bias->data_ptr<float>() : nullptr;
  epi.residual = residual ? residual->data_ptr<float>() : nullptr;
  epi.raw = raw;
  epi.dtype = out.scalar_type();
  epi.out = out.data_ptr();
}

void check_epilogue(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, int64_t rows, int64_t n) {
  for (const auto* t : {&scale, &bias}) {
    if (*t) TORCH_CHECK((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() && (*t)->numel() == n,
                        "ovsw_cpu: scale/bias must be contiguous float32 with one value per output channel");
  }
  if (residual)
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->numel() == rows * n,
                "ovsw_cpu: residual must be contiguous float32 of the output's shape");
}

at::Tensor linear_impl(const at::Tensor& a, const at::Tensor& b, int64_t k, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                         bool raw, at::ScalarType dtype) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.scalar_type() == at::kInt && b.scalar_type() == at::kInt &&
                  a.is_contiguous() && b.is_contiguous() && a.size(1) == b.size(1) && a.size(1) == (k + 31) / 32,
              "ovsw_cpu.packed_linear: expects contiguous int32 [M, KW] and [N, KW] with KW = ceil(k / 32)");
  const int64_t m = a.size(0), n = b.size(0);
  check_epilogue(scale, bias, residual, m, n);
  at::Tensor out = new_output({m, n}, raw, dtype);
  Epilogue epi;
  epi.n = n;
  epi.base = k;
  set_epilogue(epi, scale, bias, residual, raw, out);
  select_row(epi);
  if (m && n) {
    run_gemm(reinterpret_cast<const u32*>(a.data_ptr<int32_t>()), a.size(1),
             reinterpret_cast<const u32*>(b.data_ptr<int32_t>()), b.size(1), m, n, a.size(1), epi);
  }
  return out;
}

at::Tensor conv_impl(const at::Tensor& x, const at::Tensor& w, int64_t channels, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t pad_value,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, bool raw, at::ScalarType dtype, bool sign,
                         const Epilogue* act = nullptr) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && x.scalar_type() == at::kInt && w.scalar_type() == at::kInt &&
                  x.is_contiguous() && w.is_contiguous() && x.size(3) == w.size(3) &&
                  x.size(3) == (channels + 31) / 32,
              "ovsw_cpu.packed_conv2d: expects contiguous int32 NHWC words and [Cout, KH, KW, CW] weights");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "ovsw_cpu: pairs expected");
  const int64_t nb = x.size(0), h = x.size(1), wd = x.size(2), cw = x.size(3);
  const int64_t cout = w.size(0), kh = w.size(1), kwid = w.size(2);
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1], dh = dilation[0],
                dw = dilation[1];
  TORCH_CHECK(kh <= 64 && kwid <= 64, "ovsw_cpu.packed_conv2d: kernels up to 64x64");
  const int64_t ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, wo = (wd + 2 * pw - dw * (kwid - 1) - 1) / sw + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "ovsw_cpu.packed_conv2d: empty output");
  const int64_t m = nb * ho * wo, taps = kh * kwid, kw = taps * cw;
  check_epilogue(scale, bias, residual, m, cout);
  at::Tensor out = sign ? at::empty({nb, ho, wo, (cout + 31) / 32}, at::TensorOptions().dtype(at::kInt))
                        : new_output({nb, ho, wo, cout}, raw, dtype);
  if (m == 0 || cout == 0) return out;
  const u32* xp = reinterpret_cast<const u32*>(x.data_ptr<int32_t>());
  const u32* wp = reinterpret_cast<const u32*>(w.data_ptr<int32_t>());

  Epilogue epi;
  epi.n = cout;
  epi.base = taps * channels;
  set_epilogue(epi, scale, bias, residual, raw, out);
  epi.sign = sign;
  if (act) {
    epi.clamp = act->clamp;
    epi.lo = act->lo;
    epi.hi = act->hi;
    epi.bits = act->bits;
  }
  select_row(epi);

  // Border patterns (pad_value = 0): which kernel rows / columns fall in the padding, per output row / col.
  auto masks = [](int64_t size, int64_t out_size, int64_t k, int64_t s, int64_t p, int64_t d) {
    std::vector<u64> mask(out_size, 0);
    for (int64_t o = 0; o < out_size; ++o)
      for (int64_t t = 0; t < k; ++t) {
        int64_t i = o * s - p + t * d;
        if (i < 0 || i >= size) mask[o] |= u64(1) << t;
      }
    return mask;
  };
  const std::vector<u64> hmask = masks(h, ho, kh, sh, ph, dh), wmask = masks(wd, wo, kwid, sw, pw, dw);
  std::vector<int32_t> row_pattern, pattern_base, pattern_corr;
  if (pad_value == 0 && (ph > 0 || pw > 0)) {
    std::vector<u64> hs(hmask), ws(wmask);
    std::sort(hs.begin(), hs.end());
    hs.erase(std::unique(hs.begin(), hs.end()), hs.end());
    std::sort(ws.begin(), ws.end());
    ws.erase(std::unique(ws.begin(), ws.end()), ws.end());
    const int64_t npat = hs.size() * ws.size();
    std::vector<int32_t> tap_pop(cout * taps);
    const auto count = popcount_fn();
    at::parallel_for(0, cout * taps, 512, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) tap_pop[r] = count(wp + r * cw, cw);
    });
    pattern_base.resize(npat);
    pattern_corr.assign(npat * cout, 0);
    for (size_t a = 0; a < hs.size(); ++a)
      for (size_t b = 0; b < ws.size(); ++b) {
        const int64_t p = a * ws.size() + b;
        int64_t valid = 0;
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kwid; ++j) {
            const bool padded = (hs[a] >> i & 1) || (ws[b] >> j & 1);
            if (!padded) {
              ++valid;
              continue;
            }
            for (int64_t o = 0; o < cout; ++o) pattern_corr[p * cout + o] += tap_pop[o * taps + i * kwid + j];
          }
        pattern_base[p] = static_cast<int32_t>(valid * channels);
      }
    std::vector<int32_t> hid(ho), wid(wo);
    for (int64_t o = 0; o < ho; ++o) hid[o] = std::lower_bound(hs.begin(), hs.end(), hmask[o]) - hs.begin();
    for (int64_t o = 0; o < wo; ++o) wid[o] = std::lower_bound(ws.begin(), ws.end(), wmask[o]) - ws.begin();
    row_pattern.resize(m);
    for (int64_t img = 0, r = 0; img < nb; ++img)
      for (int64_t oh = 0; oh < ho; ++oh)
        for (int64_t ow = 0; ow < wo; ++ow, ++r) row_pattern[r] = hid[oh] * ws.size() + wid[ow];
    epi.pattern = row_pattern.data();
    epi.pattern_base = pattern_base.data();
    epi.pattern_corr = pattern_corr.data();
  }

  if (taps == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0) {  // 1x1 stride 1: the input is the GEMM operand
    run_gemm(xp, cw, wp, kw, m, cout, kw, epi);
    return out;
  }
  // im2col of the packed words: row r = (image, oh, ow), columns (kh, kw, word) as the weight rows.
  at::Tensor cols = at::empty({m, kw}, at::TensorOptions().dtype(at::kInt));
  u32* cp = reinterpret_cast<u32*>(cols.data_ptr<int32_t>());
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ow = r % wo, oh = (r / wo) % ho, img = r / (wo * ho);
      u32* dst = cp + r * kw;
      const int64_t iw0 = ow * sw - pw, iw1 = iw0 + (kwid - 1) * dw;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * sh - ph + i * dh;
        if (dw == 1 && ih >= 0 && ih < h && iw0 >= 0 && iw1 < wd) {  // a whole kernel row is contiguous
          std::memcpy(dst, xp + ((img * h + ih) * wd + iw0) * cw, kwid * cw * sizeof(u32));
          dst += kwid * cw;
          continue;
        }
        for (int64_t j = 0; j < kwid; ++j, dst += cw) {
          const int64_t iw = ow * sw - pw + j * dw;
          if (ih < 0 || ih >= h || iw < 0 || iw >= wd) {
            std::memset(dst, 0, cw * sizeof(u32));
          } else {
            std::memcpy(dst, xp + ((img * h + ih) * wd + iw) * cw, cw * sizeof(u32));
          }
        }
      }
    }
  });
  run_gemm(cp, kw, wp, kw, m, cout, kw, epi);
  return out;
}

// ------------------------------------------------------------------------------------- sign-and-pack
void pack_row_portable(const float* x, u32* out, int64_t k) {
  for (int64_t w = 0; w * 32 < k; ++w) {
    u32 word = 0;
    const int64_t n = std::min<int64_t>(32, k - w * 32);
    for (int64_t b = 0; b < n; ++b) word |= u32(x[w * 32 + b] < 0.0f) << b;
    out[w] = word;
  }
}

#if defined(__x86_64__)
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
  const int64_t isa = get_isa();
  if (isa == AVX512) return pack_row_avx512;
  if (isa == AVX2) return pack_row_avx2;
#endif
  return pack_row_portable;
}

at::Tensor pack_rows_f32(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "ovsw_cpu.sign_pack: expects contiguous float32 [R, K]");
  const int64_t r = x.size(0), k = x.size(1), kw = (k + 31) / 32;
  at::Tensor out = at::empty({r, kw}, at::TensorOptions().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  u32* op = reinterpret_cast<u32*>(out.data_ptr<int32_t>());
  const PackRowFn pack = pack_row_fn();
  at::parallel_for(0, r, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pack(xp + i * k, op + i * kw, k);
  });
  return out;
}

// NCHW float -> NHWC words in one pass: per (image, word), OR each channel plane's sign bits into a
// pixel-contiguous buffer (a loop the compiler vectorizes), then scatter it to the NHWC words.
at::Tensor pack_nchw_f32(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "ovsw_cpu.sign_pack_nchw: expects contiguous float32 [N, C, H, W]");
  const int64_t nb = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), cw = (c + 31) / 32;
  at::Tensor out = at::empty({nb, x.size(2), x.size(3), cw}, at::TensorOptions().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  u32* op = reinterpret_cast<u32*>(out.data_ptr<int32_t>());
  at::parallel_for(0, nb * cw, 1, [&](int64_t begin, int64_t end) {
    std::vector<u32> buf(hw);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / cw, word = t % cw;
      std::fill(buf.begin(), buf.end(), 0u);
      const int64_t c0 = word * 32, c1 = std::min(c, c0 + 32);
      for (int64_t ch = c0; ch < c1; ++ch) {
        const float* plane = xp + (img * c + ch) * hw;
        const u32 shift = static_cast<u32>(ch - c0);
        u32* bp = buf.data();
        for (int64_t p = 0; p < hw; ++p) bp[p] |= u32(plane[p] < 0.0f) << shift;
      }
      u32* dst = op + img * hw * cw + word;
      for (int64_t p = 0; p < hw; ++p) dst[p * cw] = buf[p];
    }
  });
  return out;
}

// ------------------------------------------------------------------ the ovsw ops' CPU kernels (validated)
bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_bits(const at::Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name,
                   " must be an int32 tensor of packed sign words (from ovsw.sign_pack), got ", t.scalar_type());
  TORCH_CHECK_VALUE(ndim < 0 || t.dim() == ndim, name, " must have ", ndim, " dims, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, " must be a floating point tensor, got ", t.scalar_type());
}

void check_cpu(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK_VALUE(t->device().is_cpu(), "all tensors must be on one device; got one on ", t->device(),
                      ". Move them with .to(device).");
}

struct EpilogueArgs {
  std::optional<at::Tensor> scale, bias, residual;
  bool raw;
  at::ScalarType native;
};

// Validate the epilogue operands; convert them to contiguous float32 (as the reference computes).
EpilogueArgs epilogue_args(at::IntArrayRef out_shape, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           std::optional<at::ScalarType> out_dtype) {
  const int64_t n = out_shape.back();
  EpilogueArgs e;
  const std::optional<at::Tensor>* vecs[2] = {&scale, &bias};
  const char* names[2] = {"scale", "bias"};
  std::optional<at::Tensor>* outs[2] = {&e.scale, &e.bias};
  for (int i = 0; i < 2; ++i) {
    if (!*vecs[i]) continue;
    const at::Tensor& v = **vecs[i];
    check_float(v, names[i]);
    check_cpu({&v});
    TORCH_CHECK_VALUE(v.numel() == n, names[i], " must hold one value per output channel (", n, "), got shape ",
                      v.sizes());
    *outs[i] = v.reshape({n}).to(at::kFloat).contiguous();
  }
  if (residual) {
    check_float(*residual, "residual");
    check_cpu({&*residual});
    TORCH_CHECK_VALUE(residual->sizes() == out_shape, "residual must have the output's shape ", out_shape,
                      ", got ", residual->sizes());
    e.residual = residual->to(at::kFloat).contiguous();
  }
  TORCH_CHECK_VALUE(!out_dtype || is_float(*out_dtype),
                    "out_dtype must be None (int32 or float32 output) or a floating point dtype, got ", *out_dtype);
  e.raw = !scale && !bias && !residual && !out_dtype;
  e.native = out_dtype && (*out_dtype == at::kBFloat16 || *out_dtype == at::kHalf) ? *out_dtype : at::kFloat;
  return e;
}

at::Tensor finish(at::Tensor out, const EpilogueArgs& e, std::optional<at::ScalarType> out_dtype) {
  return !e.raw && out_dtype && *out_dtype != e.native ? out.to(*out_dtype) : out;
}

at::Tensor ovsw_sign_pack(const at::Tensor& x) {
  RECORD_FUNCTION("ovsw_cpu::sign_pack", std::vector<c10::IValue>());
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dim to pack, got shape ",
                    x.sizes());
  const int64_t k = x.size(-1), kw = (k + 31) / 32;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = kw;
  if (x.scalar_type() == at::kDouble) {  // compare in double: a tiny negative must not round to -0.0
    at::Tensor rows = x.reshape({-1, k}).contiguous();
    at::Tensor out = at::empty({rows.size(0), kw}, at::TensorOptions().dtype(at::kInt));
    const double* xp = rows.data_ptr<double>();
    u32* op = reinterpret_cast<u32*>(out.data_ptr<int32_t>());
    for (int64_t r = 0; r < rows.size(0); ++r)
      for (int64_t w = 0; w < kw; ++w) {
        u32 word = 0;
        for (int64_t b = 0; b < 32 && w * 32 + b < k; ++b) word |= u32(xp[r * k + w * 32 + b] < 0.0) << b;
        op[r * kw + w] = word;
      }
    return out.reshape(shape);
  }
  return pack_rows_f32(x.reshape({-1, k}).to(at::kFloat).contiguous()).reshape(shape);
}

at::Tensor ovsw_sign_pack_nchw(const at::Tensor& x) {
  RECORD_FUNCTION("ovsw_cpu::sign_pack_nchw", std::vector<c10::IValue>());
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) > 0, "x must be NCHW [N, C, H, W] with C > 0, got shape ",
                    x.sizes());
  if (x.scalar_type() == at::kDouble || x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return ovsw_sign_pack(x.permute({0, 2, 3, 1}));
  return pack_nchw_f32(x.to(at::kFloat).contiguous());
}

at::Tensor ovsw_packed_linear(const at::Tensor& x_bits, const at::Tensor& w_bits, int64_t k,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, std::optional<at::ScalarType> out_dtype) {
  RECORD_FUNCTION("ovsw_cpu::packed_linear", std::vector<c10::IValue>());  // profiler: the C++ kernel ran
  TORCH_CHECK_VALUE(k >= 1, "k must be a positive int (the number of packed bits), got ", k);
  check_bits(x_bits, "x_bits", -1);
  check_bits(w_bits, "w_bits", 2);
  TORCH_CHECK_VALUE(x_bits.dim() >= 1, "x_bits must be a tensor [..., ceil(k/32)] of packed sign words");
  check_cpu({&x_bits, &w_bits});
  const int64_t kw = (k + 31) / 32;
  TORCH_CHECK_VALUE(x_bits.size(-1) == kw && w_bits.size(1) == kw, "k=", k, " bits need ", kw,
                    " words per row; got x_bits ", x_bits.sizes(), ", w_bits ", w_bits.sizes(),
                    ". Pack both with ovsw.sign_pack over the same k features.");
  std::vector<int64_t> shape(x_bits.sizes().begin(), x_bits.sizes().end());
  shape.back() = w_bits.size(0);
  EpilogueArgs e = epilogue_args(shape, scale, bias, residual, out_dtype);
  at::Tensor a = x_bits.reshape({-1, kw}).contiguous();
  std::optional<at::Tensor> res;
  if (e.residual) res = e.residual->reshape({a.size(0), w_bits.size(0)});
  at::Tensor out = linear_impl(a, w_bits.contiguous(), k, e.scale, e.bias, res, e.raw, e.native);
  return finish(out.reshape(shape), e, out_dtype);
}

at::Tensor conv(const char* name, const at::Tensor& x_bits, const at::Tensor& w_bits, int64_t in_channels,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t pad_value,
                const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& residual, std::optional<at::ScalarType> out_dtype, bool sign,
                Epilogue* act = nullptr, at::Tensor* act_bits = nullptr) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());  // the profiler shows that the C++ kernel ran
  check_bits(x_bits, "x_bits", 4);
  check_bits(w_bits, "w_bits", 4);
  check_cpu({&x_bits, &w_bits});
  TORCH_CHECK_VALUE(in_channels >= 1, "in_channels must be a positive int, got ", in_channels);
  const int64_t cw = (in_channels + 31) / 32;
  TORCH_CHECK_VALUE(x_bits.size(3) == cw && w_bits.size(3) == cw, "in_channels=", in_channels, " needs ", cw,
                    " words per pixel; got x_bits ", x_bits.sizes(), ", w_bits ", w_bits.sizes(),
                    " (expected packed NHWC input [N, H, W, CW], e.g. from ovsw.sign_pack_nchw, and weights "
                    "[Cout, KH, KW, CW])");
  TORCH_CHECK_VALUE(pad_value == 0 || pad_value == 1,
                    "pad_value must be 0 (padded taps contribute 0) or 1 (pad with +1), got ", pad_value);
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
                    "stride must be a pair of ints >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
                    "padding must be a pair of ints >= 0, got ", padding);
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
                    "dilation must be a pair of ints >= 1, got ", dilation);
  const int64_t kh = w_bits.size(1), kwid = w_bits.size(2);
  const int64_t ho = (x_bits.size(1) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t wo = (x_bits.size(2) + 2 * padding[1] - dilation[1] * (kwid - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(x_bits.size(1) + 2 * padding[0] - dilation[0] * (kh - 1) - 1 >= 0 &&
                        x_bits.size(2) + 2 * padding[1] - dilation[1] * (kwid - 1) - 1 >= 0,
                    "the ", kh, "x", kwid, " kernel (dilation ", dilation, ") does not fit the ", x_bits.size(1),
                    "x", x_bits.size(2), " input padded by ", padding);
  TORCH_CHECK_VALUE(kh <= 64 && kwid <= 64, "kernels up to 64x64 are supported, got ", kh, "x", kwid);
  const std::vector<int64_t> shape = {x_bits.size(0), ho, wo, w_bits.size(0)};
  EpilogueArgs e = epilogue_args(shape, scale, bias, residual, out_dtype);
  if (act) {  // the activation's sign bits, NHWC words
    *act_bits = at::empty({shape[0], ho, wo, (shape[3] + 31) / 32}, at::TensorOptions().dtype(at::kInt));
    act->bits = reinterpret_cast<u32*>(act_bits->data_ptr<int32_t>());
  }
  at::Tensor out = conv_impl(x_bits.contiguous(), w_bits.contiguous(), in_channels, stride, padding, dilation,
                             pad_value, e.scale, e.bias, e.residual, e.raw, e.native, sign, act);
  return sign ? out : finish(out, e, out_dtype);
}

at::Tensor ovsw_packed_conv2d(const at::Tensor& x_bits, const at::Tensor& w_bits, int64_t in_channels,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t pad_value, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              std::optional<at::ScalarType> out_dtype) {
  return conv("ovsw_cpu::packed_conv2d", x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale,
              bias, residual, out_dtype, false);
}

at::Tensor ovsw_packed_conv2d_sign(const at::Tensor& x_bits, const at::Tensor& w_bits, int64_t in_channels,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t pad_value, const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& residual) {
  return conv("ovsw_cpu::packed_conv2d_sign", x_bits, w_bits, in_channels, stride, padding, dilation, pad_value,
              scale, bias, residual, at::kFloat, true);
}


// hardtanh(packed_conv2d(...)) and its sign bits (the next binary layer's input) from one epilogue.
std::tuple<at::Tensor, at::Tensor> ovsw_packed_conv2d_act(
    const at::Tensor& x_bits, const at::Tensor& w_bits, int64_t in_channels, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t pad_value, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double min_val,
    double max_val, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(min_val <= max_val, "min_val must be <= max_val, got ", min_val, " > ", max_val);
  const at::ScalarType dtype = out_dtype ? *out_dtype : at::kFloat;
  TORCH_CHECK_VALUE(is_float(dtype), "out_dtype must be None (float32) or a floating point dtype, got ", dtype);
  if (dtype == at::kDouble) {  // not a native output: clamp the float64 tensor as torch would
    at::Tensor out = ovsw_packed_conv2d(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale,
                                        bias, residual, dtype).clamp_(min_val, max_val);
    return {out, ovsw_sign_pack(out)};
  }
  at::Tensor bits;
  Epilogue act;
  act.clamp = true;
  act.lo = static_cast<float>(min_val);
  act.hi = static_cast<float>(max_val);
  at::Tensor out = conv("ovsw_cpu::packed_conv2d_act", x_bits, w_bits, in_channels, stride, padding, dilation,
                        pad_value, scale, bias, residual, dtype, false, &act, &bits);
  return {out, bits};
}

}  // namespace

// The ovsw ops' schemas are defined in Python (kernels/ops.py); these are their CPU kernels.
TORCH_LIBRARY_IMPL(ovsw, CPU, m) {
  m.impl("sign_pack", &ovsw_sign_pack);
  m.impl("sign_pack_nchw", &ovsw_sign_pack_nchw);
  m.impl("packed_linear", &ovsw_packed_linear);
  m.impl("packed_conv2d", &ovsw_packed_conv2d);
  m.impl("packed_conv2d_sign", &ovsw_packed_conv2d_sign);
  m.impl("packed_conv2d_act", &ovsw_packed_conv2d_act);
}

TORCH_LIBRARY(ovsw_cpu, m) {
  m.def("supported_isas() -> int", &supported_isas);
  m.def("get_isa() -> int", &get_isa);
  m.def("set_isa(int isa) -> ()", &set_isa);
}
