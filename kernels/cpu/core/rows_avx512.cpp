// The row epilogues compiled for AVX-512.
#include "epilogue.h"

#if defined(OVSW_HAVE_AVX512)
namespace ovsw::core::detail {

namespace {
struct Avx512Rows {
  template <class T, bool S, bool B, bool R, bool C>
  OVSW_AVX512 static void row(const TileEpilogue& e, int64_t r, const int32_t* pop, int64_t n0, int64_t cols) {
    epilogue_row<T, S, B, R, C>(e, r, pop, n0, cols);
  }
};
}  // namespace

RowFn select_rows_avx512(const TileEpilogue& e) { return select_rows<Avx512Rows>(e); }

}  // namespace ovsw::core::detail
#endif
