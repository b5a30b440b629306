// The row epilogues compiled for AVX2.
#include "epilogue.h"

#if defined(__x86_64__)
namespace ovsw::core::detail {

namespace {
struct Avx2Rows {
  template <class T, bool S, bool B, bool R, bool C>
  OVSW_AVX2 static void row(const TileEpilogue& e, int64_t r, const int32_t* pop, int64_t n0, int64_t cols) {
    epilogue_row<T, S, B, R, C>(e, r, pop, n0, cols);
  }
};
}  // namespace

RowFn select_rows_avx2(const TileEpilogue& e) { return select_rows<Avx2Rows>(e); }

}  // namespace ovsw::core::detail
#endif
