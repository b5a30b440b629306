// The fused row epilogue, one template per option set, compiled once per ISA (rows_<isa>.cpp) so each
// gets that ISA's vector loop; select_rows<K> picks the variant for a TileEpilogue's options.
#pragma once

#include <type_traits>
#include <utility>

#include "detail.h"
#include "half.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF  // each epilogue step rounds on its own (GCC: build with -ffp-contract=off)
#endif

namespace ovsw::core::detail {

// One pass per row: acc -> float -> * scale -> + bias -> + residual (each step rounded like the reference),
// then either (T = u32, packed_conv2d_sign) the sign bits of those float32 values into e.out, or the values
// cast to T into e.out; with C (packed_conv2d_act) clamped to [lo, hi] after the cast, as torch's hardtanh on
// the T tensor, and the sign bits of the stored values into e.bits. The options are template arguments and
// the body is compiled for each ISA (the build's baseline is plain x86-64): one branch-free vector loop.
template <class T, bool S, bool B, bool R, bool C>
__attribute__((always_inline)) inline void epilogue_row(const TileEpilogue& e, int64_t row, const int32_t* pop,
                                                        int64_t n0, int64_t cols) {
  constexpr bool SIGN = std::is_same_v<T, u32>;
  using Store = std::conditional_t<SIGN, float, T>;
  int32_t acc[BLOCK_N];
  float f[BLOCK_N];
  e.accumulators(row, pop, n0, cols, acc);
  Store* o = SIGN ? nullptr : static_cast<Store*>(e.out) + row * e.n + n0;
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
        v = static_cast<float>(static_cast<Store>(v));
        v = v < lo ? lo : (hi < v ? hi : v);
      }
      const Store t = static_cast<Store>(v);
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

// K::row<T, S, B, R, C> is epilogue_row compiled for one ISA.
template <class K, class T, int I>
RowFn row_variant() {
  return &K::template row<T, (I & 1) != 0, (I & 2) != 0, (I & 4) != 0, (I & 8) != 0>;
}

template <class K, class T, int... I>
RowFn row_table(int index, std::integer_sequence<int, I...>) {
  const RowFn fns[] = {row_variant<K, T, I>()...};
  return fns[index];
}

// The row epilogue of K for e's options and output type; call after every option is set.
template <class K>
RowFn select_rows(const TileEpilogue& e) {
  const int index = (e.scale != nullptr) | (e.bias != nullptr) << 1 | (e.residual != nullptr) << 2 | e.clamp << 3;
  const auto all = std::make_integer_sequence<int, 16>{};
  switch (e.out_type) {
    case Out::kSignBits: return row_table<K, u32>(index & 7, all);
    case Out::kBFloat16: return row_table<K, BFloat16>(index, all);
    case Out::kFloat16: return row_table<K, Half>(index, all);
    default: return row_table<K, float>(index, all);
  }
}

RowFn select_rows_portable(const TileEpilogue& e);
#if defined(__x86_64__)
RowFn select_rows_avx2(const TileEpilogue& e);
#endif
#if defined(OVSW_HAVE_AVX512)
RowFn select_rows_avx512(const TileEpilogue& e);
#endif

}  // namespace ovsw::core::detail
