// The packed GEMM: tiles of BLOCK_M rows x BLOCK_N output channels, popcounts into a tile buffer, then the
// row epilogue (epilogue.h) per row; tiles split over the threading hook.
#include "epilogue.h"
#include "microkernels.h"

namespace ovsw::core {
namespace detail {
namespace {

// Rows per tile: at most BLOCK_M, a multiple of mr, and as even as possible (49 rows: 2 x 30, not 48 + 1).
int64_t balanced_block(int64_t m, int64_t mr) {
  const int64_t tiles = (m + BLOCK_M - 1) / BLOCK_M;
  const int64_t rows = (m + tiles - 1) / tiles;
  return std::min<int64_t>(BLOCK_M, (rows + mr - 1) / mr * mr);
}

template <class K>
void gemm_block(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t kw, int64_t m0, int64_t m1,
                int64_t n0, int64_t n1, const TileEpilogue& epi) {
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
          const TileEpilogue& epi) {
  const int64_t block_m = balanced_block(m, K::MR);
  const int64_t tiles_m = (m + block_m - 1) / block_m, tiles_n = (n + BLOCK_N - 1) / BLOCK_N;
  parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / tiles_n) * block_m, n0 = (t % tiles_n) * BLOCK_N;
      gemm_block<K>(a, lda, b, ldb, kw, m0, std::min(m, m0 + block_m), n0, std::min(n, n0 + BLOCK_N), epi);
    }
  });
}

}  // namespace

AlignedWords pack_panels(const u32* b, int64_t ldb, int64_t n, int64_t kw, int64_t P) {
  const int64_t k64 = (kw + 1) / 2, panels = (n + P - 1) / P;
  AlignedWords packed(panels * k64 * P);
  u64* bt = packed.data();
  parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
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
  return packed;
}

namespace {

// The panel GEMM, on bt = the weights' panels (prepared once, or packed here per call when null).
template <class K>
void gemm_panels(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t m, int64_t n, int64_t kw,
                 const TileEpilogue& epi, const u64* bt) {
  constexpr int64_t P = K::PANEL;
  const int64_t k64 = (kw + 1) / 2;
  std::optional<AlignedWords> packed;
  if (!bt) bt = packed.emplace(pack_panels(b, ldb, n, kw, P)).data();
  const int64_t block_m = balanced_block(m, K::MR);
  const int64_t tiles_m = (m + block_m - 1) / block_m, tiles_n = (n + BLOCK_N - 1) / BLOCK_N;
  parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
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

}  // namespace

void run_gemm(const u32* a, int64_t lda, const u32* b, int64_t ldb, int64_t m, int64_t n, int64_t kw,
              const TileEpilogue& epi, const PreparedWeights* prepared) {
  const int isa = current_isa();
  [[maybe_unused]] const u64* panels = prepared && prepared->isa == isa && prepared->panels ? prepared->panels->data()
                                                                                           : nullptr;
  switch (isa) {
#if defined(OVSW_HAVE_AVX512)
    case kAvx512: return gemm_panels<Avx512>(a, lda, b, ldb, m, n, kw, epi, panels);
#endif
#if defined(__x86_64__)
    case kAvx2: return gemm_panels<Avx2>(a, lda, b, ldb, m, n, kw, epi, panels);
#endif
#if defined(__aarch64__)
    case kNeon: return gemm<Neon>(a, lda, b, ldb, m, n, kw, epi);
#endif
    default: return gemm<Portable>(a, lda, b, ldb, m, n, kw, epi);
  }
}

TileEpilogue make_epilogue(const Epilogue& epi, int64_t n, int64_t base) {
  TileEpilogue e;
  e.n = n;
  e.base = base;
  e.scale = epi.scale;
  e.bias = epi.bias;
  e.residual = epi.residual;
  e.out_type = epi.out_type;
  e.out = epi.out;
  e.clamp = epi.clamp && epi.out_type != Out::kInt32 && epi.out_type != Out::kSignBits;
  e.lo = epi.lo;
  e.hi = epi.hi;
  e.bits = e.clamp ? epi.bits : nullptr;
  e.pack_row = pack_row_fn();
  if (e.out_type != Out::kInt32) {
    [[maybe_unused]] const int isa = current_isa();
    e.row_store = select_rows_portable(e);
#if defined(__x86_64__)
    if (isa == kAvx2) e.row_store = select_rows_avx2(e);
#endif
#if defined(OVSW_HAVE_AVX512)
    if (isa == kAvx512) e.row_store = select_rows_avx512(e);
#endif
  }
  return e;
}

}  // namespace detail

void packed_linear(const uint32_t* a, const uint32_t* b, int64_t m, int64_t n, int64_t k, const Epilogue& epi,
                   const PreparedWeights* prepared) {
  const int64_t kw = (k + 31) / 32;
  const detail::TileEpilogue e = detail::make_epilogue(epi, n, k);
  if (prepared && !prepared->fits(n, 1, kw)) prepared = nullptr;
  if (m > 0 && n > 0) detail::run_gemm(a, kw, b, kw, m, n, kw, e, prepared);
}

std::shared_ptr<const PreparedWeights> prepare_weights(const uint32_t* w, int64_t n, int64_t taps, int64_t cw) {
  auto p = std::make_shared<PreparedWeights>();
  p->isa = current_isa();
  p->n = n;
  p->taps = taps;
  p->cw = cw;
  [[maybe_unused]] const int64_t kw = taps * cw;
  switch (p->isa) {
#if defined(OVSW_HAVE_AVX512)
    case kAvx512: p->panels.emplace(detail::pack_panels(w, kw, n, kw, detail::Avx512::PANEL)); break;
#endif
#if defined(__x86_64__)
    case kAvx2: p->panels.emplace(detail::pack_panels(w, kw, n, kw, detail::Avx2::PANEL)); break;
#endif
    default: break;  // the GEMM kernels read the words as they are
  }
  p->tap_popcount = detail::row_popcounts(w, n * taps, cw);
  return p;
}

}  // namespace ovsw::core
