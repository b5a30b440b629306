// Torch-free C++17 core of the ovsw CPU packed-inference kernels (design §3): bit packing, XOR-popcount
// microkernels per ISA (AVX-512 VPOPCNTDQ, AVX2, NEON, portable), the packed GEMM, the implicit-GEMM
// convolution with its zero-padding correction, the fused epilogues, and the stem's fused max-pool.
// ../ovsw_cpu.cpp binds it to the torch.ops.ovsw CPU kernels; test_core.cpp checks every ISA against an
// independent scalar reference.
//
// Bit layout: uint32 words, least significant bit first, bit 1 = the value is < 0 (-1), padding bits of
// the last word 0 in both operands, so dot(a, b) = K - 2 * popcount(a XOR b).
//
// The functions trust their arguments (shapes, pointers, sizes): validation is the caller's job. Build
// with -ffp-contract=off: the float epilogue rounds each step like the reference, and an FMA would not.
#pragma once

#include <cstdint>
#include <memory>

namespace ovsw::core {

// ------------------------------------------------------------------------------------------------ ISA
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

int supported_isas();        // bit mask (1 << Isa) of the families this build and CPU can run
int current_isa();           // the forced one, else the fastest supported
bool force_isa(int isa);     // -1: back to the fastest; false (and no change) if isa is not supported
const char* isa_name(int isa);

// ------------------------------------------------------------------------------------------ threading
// The core splits work with this hook; without one (the default) it runs serially. The torch binding sets
// it to at::parallel_for; any implementation must call body over disjoint chunks covering [begin, end).
using ParallelBody = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelFor = void (*)(int64_t begin, int64_t end, int64_t grain, void* ctx, ParallelBody body);
void set_parallel_for(ParallelFor fn);  // nullptr: serial

// ------------------------------------------------------------------------------------------- epilogue
// What a GEMM / conv stores per output (row, channel): acc = the +-1 dot product (int32), then
//   kInt32:   acc as is (no scale / bias / residual allowed)
//   float:    v = float(acc) [* scale[c]] [+ bias[c]] [+ residual[row, c]], each step rounded in float32,
//             stored as kFloat32 / kBFloat16 / kFloat16 (round to nearest even, as torch casts)
//   kSignBits: the sign bits (v < 0) of the float32 v, [rows, ceil(n / 32)] words, bits past n zero
// With clamp (float outputs only): y = hardtanh(cast(v)) in float32 after the cast to the output type (as
// torch clamps that tensor), stored as the output type, and, if bits is set, the sign bits of y there.
enum class Out : int { kInt32, kFloat32, kBFloat16, kFloat16, kSignBits };

struct Epilogue {
  const float* scale = nullptr;     // [n] or null
  const float* bias = nullptr;      // [n] or null
  const float* residual = nullptr;  // [rows, n] or null
  Out out_type = Out::kInt32;
  void* out = nullptr;              // [rows, n] of out_type, or [rows, ceil(n / 32)] uint32 for kSignBits
  bool clamp = false;
  float lo = 0.0f, hi = 0.0f;
  uint32_t* bits = nullptr;         // with clamp: [rows, ceil(n / 32)] sign bits of y, or null
};

// ------------------------------------------------------------------------------------ prepared weights
// A weight matrix [n, taps * cw] words rearranged once for many calls: the GEMM layout of the ISA current
// when it was made (x86: channel panels; other ISAs read the words as they are) and the popcount of every
// (row, tap) for a conv's pad_value=0 correction. The kernels take it in place of repacking w per call;
// under another ISA (or another shape) they ignore its panels and repack. Immutable, so shareable.
struct PreparedWeights;
std::shared_ptr<const PreparedWeights> prepare_weights(const uint32_t* w, int64_t n, int64_t taps, int64_t cw);

// --------------------------------------------------------------------------------------------- kernels
// a [m, ceil(k/32)] x b [n, ceil(k/32)] -> [m, n] through the epilogue; prepared: b prepared (taps 1), or null.
void packed_linear(const uint32_t* a, const uint32_t* b, int64_t m, int64_t n, int64_t k, const Epilogue& epi,
                   const PreparedWeights* prepared = nullptr);

// Geometry of a packed NHWC convolution: x [batch, height, width, ceil(channels/32)] words, weights
// [out_channels, kernel_h, kernel_w, ceil(channels/32)], output rows (image, oh, ow) of out_channels.
// pad_value 0: padded taps contribute 0 (F.conv2d on sign(x)); 1: padded taps are +1. Kernels up to 64x64.
struct Conv2d {
  int64_t batch = 1, height = 1, width = 1, channels = 1;
  int64_t out_channels = 1, kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
  int pad_value = 0;
  int64_t out_h() const { return (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1; }
  int64_t out_w() const { return (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1; }
};
void packed_conv2d(const uint32_t* x, const uint32_t* w, const Conv2d& g, const Epilogue& epi,
                   const PreparedWeights* prepared = nullptr);  // prepared: w prepared, or null

// Geometry of a max pooling of NHWC float32 [batch, height, width, channels] -> [batch, out_h, out_w,
// channels]: window taps at (o * stride - pad + i * dilation), those outside the input skipped; out_h and
// out_w are the caller's (torch's rule, ceil_mode included), every window must hold a tap inside the input.
struct Pool2d {
  int64_t batch = 1, height = 1, width = 1, channels = 1;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1, out_h = 1, out_w = 1;
};
// y = hardtanh(max_pool2d(x), lo, hi) (NaN propagates, as in torch) and its sign bits, [batch, out_h,
// out_w, ceil(channels / 32)] words: a ResNet stem's pool, activation and first sign-and-pack in one pass.
void max_pool2d_act(const float* x, const Pool2d& g, float lo, float hi, float* y, uint32_t* bits);

// Sign bits (x < 0) of rows of k values into ceil(k/32) words per row.
void sign_pack_rows(const float* x, uint32_t* out, int64_t rows, int64_t k);
void sign_pack_rows_f64(const double* x, uint32_t* out, int64_t rows, int64_t k);  // compared in double
// NCHW float32 [batch, channels, pixels] -> NHWC words [batch, pixels, ceil(channels/32)].
void sign_pack_nchw(const float* x, uint32_t* out, int64_t batch, int64_t channels, int64_t pixels);

}  // namespace ovsw::core
