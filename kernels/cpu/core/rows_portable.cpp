// The row epilogues for the portable kernels (on aarch64 also the NEON ones: the baseline vectorizes).
#include "epilogue.h"

namespace ovsw::core::detail {

namespace {
struct PortableRows {
  template <class T, bool S, bool B, bool R, bool C>
  static void row(const TileEpilogue& e, int64_t r, const int32_t* pop, int64_t n0, int64_t cols) {
    epilogue_row<T, S, B, R, C>(e, r, pop, n0, cols);
  }
};
}  // namespace

RowFn select_rows_portable(const TileEpilogue& e) { return select_rows<PortableRows>(e); }

}  // namespace ovsw::core::detail
