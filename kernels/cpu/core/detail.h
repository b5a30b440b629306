// Internals shared by the core's translation units: ISA target attributes, the threading helper, scratch
// buffers, and the tile epilogue that the GEMM calls per output row.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "ovsw_core.h"

#if defined(__x86_64__) && !defined(OVSW_CORE_NO_AVX512)
#define OVSW_HAVE_AVX512 1
#endif

#if defined(__x86_64__)
#define OVSW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))
#define OVSW_AVX2 __attribute__((target("avx2")))
#endif

namespace ovsw::core::detail {

using u32 = uint32_t;
using u64 = uint64_t;

constexpr int64_t BLOCK_M = 48, BLOCK_N = 64;  // GEMM tile: multiples of every MR / NR and of the AVX-512 panel

ParallelFor parallel_hook();

// f(begin, end) over chunks of [begin, end): through the hook, or serially without one.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  ParallelFor hook = parallel_hook();
  if (!hook) {
    f(begin, end);
    return;
  }
  hook(begin, end, grain, const_cast<void*>(static_cast<const void*>(&f)),
       [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); });
}

// n uninitialized uint64 aligned to 64 bytes (the AVX-512 panels use aligned loads).
class AlignedWords {
 public:
  explicit AlignedWords(int64_t n) : buf_(new u64[n + 8]) {
    const auto addr = reinterpret_cast<uintptr_t>(buf_.get());
    data_ = buf_.get() + ((64 - addr % 64) % 64) / sizeof(u64);
  }
  u64* data() { return data_; }
  const u64* data() const { return data_; }

 private:
  std::unique_ptr<u64[]> buf_;
  u64* data_ = nullptr;
};

// Sign bits of k floats into ceil(k / 32) words (x < 0, LSB first), vectorized for the current ISA.
using PackRowFn = void (*)(const float*, u32*, int64_t);
PackRowFn pack_row_fn();
// popcount of n words (the pad_value=0 corrections), with the ISA's popcount.
using PopcountFn = int32_t (*)(const u32*, int64_t);
PopcountFn popcount_fn();

// popcount of each of rows consecutive runs of cw words (a conv weight's (channel, tap) rows).
std::vector<int32_t> row_popcounts(const u32* w, int64_t rows, int64_t cw);

struct TileEpilogue;
// One output row of a tile, stored as floats (epilogue_row in gemm.cpp).
using RowFn = void (*)(const TileEpilogue&, int64_t, const int32_t*, int64_t, int64_t);

// acc = base[row] - 2 * (popcount - corr[row][n]); then the public Epilogue's store. Set by make_epilogue.
struct TileEpilogue {
  int64_t n = 0;                     // output channels (row length of the output)
  int64_t base = 0;                  // K (linear) or taps * C (conv) when no row patterns
  const int32_t* pattern = nullptr;  // per row: border pattern id (conv, pad_value = 0), or null
  const int32_t* pattern_base = nullptr;
  const int32_t* pattern_corr = nullptr;  // [patterns, n]
  const float* scale = nullptr;
  const float* bias = nullptr;
  const float* residual = nullptr;
  Out out_type = Out::kInt32;
  void* out = nullptr;
  bool clamp = false;
  float lo = 0.0f, hi = 0.0f;
  u32* bits = nullptr;
  PackRowFn pack_row = nullptr;  // for the sign bits (kSignBits or bits)
  RowFn row_store = nullptr;     // non-int32 outputs: the fused row epilogue for these options

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

  void operator()(int64_t row, const int32_t* pop, int64_t n0, int64_t cols) const {
    if (out_type != Out::kInt32) return row_store(*this, row, pop, n0, cols);
    int32_t acc[BLOCK_N];
    accumulators(row, pop, n0, cols, acc);
    std::memcpy(static_cast<int32_t*>(out) + row * n + n0, acc, cols * sizeof(int32_t));
  }
};

// Weights [n, kw] words in panels of P channels, [panels][k64][P] uint64 (k64 = ceil(kw / 2), a 64-bit
// word of P channels at a time; channels past n and the high half of an odd last word 0): the layout of
// the kernels that keep output channels in vector lanes (x86: Avx512, Avx2).
AlignedWords pack_panels(const u32* b, int64_t ldb, int64_t n, int64_t kw, int64_t P);

// The tile epilogue of epi for n output channels and base, with the row store for the current ISA.
TileEpilogue make_epilogue(const Epilogue& epi, int64_t n, int64_t base);

// popcount(a_i XOR b_j) over kw words for a [m, lda] x b [n, ldb], through epi, with the current ISA;
// the panels of prepared (b's, or null) when they are this ISA's.
void run_gemm(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t m, int64_t n, int64_t kw,
              const TileEpilogue& epi, const PreparedWeights* prepared);

// The direct AVX-512 convolution (conv_avx512.cpp: tap words read in place, the epilogue on the
// accumulators in registers). Runs and returns true when the AVX-512 kernels are current, ceil(C / 32) is
// even and the output is int32, float32 or sign bits; else returns false and the caller runs im2col + GEMM.
bool direct_conv_avx512(const u32* x, const u32* w, const Conv2d& g, const TileEpilogue& e,
                        const PreparedWeights* prepared);

}  // namespace ovsw::core::detail

namespace ovsw::core {
struct PreparedWeights {
  int isa = kPortable;
  int64_t n = 0, taps = 0, cw = 0;
  std::optional<detail::AlignedWords> panels;  // the x86 kernels' [panels][k64][PANEL] layout, else empty
  std::vector<int32_t> tap_popcount;           // [n * taps]
  bool fits(int64_t rows, int64_t kernel_taps, int64_t words) const {
    return n == rows && taps == kernel_taps && cw == words;
  }
};
}  // namespace ovsw::core
