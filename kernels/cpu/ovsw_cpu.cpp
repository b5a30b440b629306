// The ovsw ops' CPU kernels (torch.ops.ovsw.*, schemas in kernels/ops.py) and the ISA controls
// (torch.ops.ovsw_cpu.*), a thin binding over the torch-free core in core/ovsw_core.h: argument checks
// with clear errors, tensor allocation and dtype conversion, profiler ranges, and at::parallel_for as the
// core's threading hook. The kernels themselves (bit layout, microkernels, epilogues) live in core/.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "core/ovsw_core.h"

namespace {

namespace core = ovsw::core;
using u32 = uint32_t;

void torch_parallel_for(int64_t begin, int64_t end, int64_t grain, void* ctx, core::ParallelBody body) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}
[[maybe_unused]] const bool g_threads_hooked = (core::set_parallel_for(&torch_parallel_for), true);

int64_t supported_isas() { return core::supported_isas(); }
int64_t get_isa() { return core::current_isa(); }
void set_isa(int64_t isa) {
  TORCH_CHECK(isa >= -1 && isa <= core::kNeon && core::force_isa(static_cast<int>(isa)), "ovsw_cpu.set_isa: ISA ",
              isa, " is not supported on this CPU / build");
}

u32* words(const at::Tensor& t) { return reinterpret_cast<u32*>(t.data_ptr<int32_t>()); }

// ------------------------------------------------ weights prepared once per weight tensor
// The core's prepared weights (GEMM panels, per-tap popcounts) of each weight tensor the kernels have seen,
// so a packed model's weights are rearranged on its first call, not on every call. An entry is used only
// while its tensor is alive (weak reference), unmodified (same version counter and data pointer) and the
// ISA unchanged; otherwise it is rebuilt. Inference-mode tensors have no version counter: not cached.
class PreparedCache {
 public:
  std::shared_ptr<const core::PreparedWeights> get(const at::Tensor& w, int64_t n, int64_t taps, int64_t cw) {
    if (w.is_inference()) return core::prepare_weights(words(w), n, taps, cw);
    c10::TensorImpl* impl = w.unsafeGetTensorImpl();
    const uint32_t version = impl->version_counter().current_version();
    const int isa = core::current_isa();
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(impl);
    if (it != entries_.end() && !it->second.owner.expired() && it->second.version == version &&
        it->second.data == w.data_ptr() && it->second.isa == isa && it->second.shape == Shape{n, taps, cw})
      return it->second.prepared;
    if (it == entries_.end() && entries_.size() >= kMaxEntries) evict_dead();
    Entry e{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), version, w.data_ptr(), isa,
            Shape{n, taps, cw}, core::prepare_weights(words(w), n, taps, cw)};
    auto prepared = e.prepared;
    entries_.insert_or_assign(impl, std::move(e));
    return prepared;
  }

 private:
  static constexpr size_t kMaxEntries = 4096;
  using Shape = std::tuple<int64_t, int64_t, int64_t>;  // rows, taps, words per tap
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> owner;
    uint32_t version;
    const void* data;
    int isa;
    Shape shape;
    std::shared_ptr<const core::PreparedWeights> prepared;
  };
  void evict_dead() {  // entries of freed tensors; all of them if every tensor is still alive
    for (auto it = entries_.begin(); it != entries_.end();) it = it->second.owner.expired() ? entries_.erase(it) : ++it;
    if (entries_.size() >= kMaxEntries) entries_.clear();
  }
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

PreparedCache& prepared_cache() {
  static PreparedCache cache;
  return cache;
}

// ------------------------------------------------ tensors -> core (arguments already validated below)
struct Activation {  // packed_conv2d_act: hardtanh bounds and where the sign bits go
  float lo = 0.0f, hi = 0.0f;
  u32* bits = nullptr;
};

at::Tensor new_output(at::IntArrayRef shape, bool raw, at::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(raw ? at::kInt : dtype));
}

// The core epilogue writing into out (int32 if raw, else float32 / bfloat16 / float16; sign: words).
core::Epilogue core_epilogue(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, bool raw, bool sign, at::Tensor& out,
                             const Activation* act) {
  core::Epilogue epi;
  epi.scale = scale ? scale->data_ptr<float>() : nullptr;
  epi.bias = bias ? bias->data_ptr<float>() : nullptr;
  epi.residual = residual ? residual->data_ptr<float>() : nullptr;
  if (sign) {
    epi.out_type = core::Out::kSignBits;
  } else if (raw) {
    epi.out_type = core::Out::kInt32;
  } else {
    const at::ScalarType t = out.scalar_type();
    epi.out_type = t == at::kBFloat16 ? core::Out::kBFloat16 : t == at::kHalf ? core::Out::kFloat16
                                                                              : core::Out::kFloat32;
  }
  epi.out = out.data_ptr();
  if (act) {
    epi.clamp = true;
    epi.lo = act->lo;
    epi.hi = act->hi;
    epi.bits = act->bits;
  }
  return epi;
}

at::Tensor linear_impl(const at::Tensor& a, const at::Tensor& b, int64_t k, const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, bool raw,
                       at::ScalarType dtype) {
  const int64_t m = a.size(0), n = b.size(0);
  at::Tensor out = new_output({m, n}, raw, dtype);
  const core::Epilogue epi = core_epilogue(scale, bias, residual, raw, false, out, nullptr);
  const auto prepared = prepared_cache().get(b, n, 1, b.size(1));
  core::packed_linear(words(a), words(b), m, n, k, epi, prepared.get());
  return out;
}

// The stride, padding and dilation fields shared by the core's Conv2d and Pool2d.
template <class Geometry>
void set_window(Geometry& g, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
}

at::Tensor conv_impl(const at::Tensor& x, const at::Tensor& w, int64_t channels, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t pad_value,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, bool raw, at::ScalarType dtype, bool sign,
                     const Activation* act) {
  core::Conv2d g;
  g.batch = x.size(0);
  g.height = x.size(1);
  g.width = x.size(2);
  g.channels = channels;
  g.out_channels = w.size(0);
  g.kernel_h = w.size(1);
  g.kernel_w = w.size(2);
  set_window(g, stride, padding, dilation);
  g.pad_value = static_cast<int>(pad_value);
  const int64_t ho = g.out_h(), wo = g.out_w(), cout = g.out_channels;
  at::Tensor out = sign ? at::empty({g.batch, ho, wo, (cout + 31) / 32}, at::TensorOptions().dtype(at::kInt))
                        : new_output({g.batch, ho, wo, cout}, raw, dtype);
  const core::Epilogue epi = core_epilogue(scale, bias, residual, raw, sign, out, act);
  const auto prepared = prepared_cache().get(w, cout, g.kernel_h * g.kernel_w, w.size(3));
  core::packed_conv2d(words(x), words(w), g, epi, prepared.get());
  return out;
}

at::Tensor pack_rows_f32(const at::Tensor& x) {
  at::Tensor out = at::empty({x.size(0), (x.size(1) + 31) / 32}, at::TensorOptions().dtype(at::kInt));
  core::sign_pack_rows(x.data_ptr<float>(), words(out), x.size(0), x.size(1));
  return out;
}

at::Tensor pack_nchw_f32(const at::Tensor& x) {
  const int64_t c = x.size(1);
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(3), (c + 31) / 32}, at::TensorOptions().dtype(at::kInt));
  core::sign_pack_nchw(x.data_ptr<float>(), words(out), x.size(0), c, x.size(2) * x.size(3));
  return out;
}

// ------------------------------------------------------------------ the ovsw ops' CPU kernels (validated)
// Each check and message is the one of kernels/ops.py's validation (tests/test_ops_cpu.py compares them):
// the C++ kernels are the ops' CPU dispatch, so Python's checks do not run in front of them.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_bits(const at::Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name,
                   " must be an int32 tensor of packed sign words (from ovsw.sign_pack), got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(ndim < 0 || t.dim() == ndim, name, " must have ", ndim, " dims, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, " must be a floating point tensor, got ",
                   dtype_name(t.scalar_type()));
}

// The named tensors that are present (nullptr: an absent optional) must all be CPU tensors.
void check_cpu(std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  bool all_cpu = true;
  for (const auto& [name, t] : ts) all_cpu = all_cpu && (!t || t->device().is_cpu());
  if (all_cpu) return;
  std::string found;
  for (const auto& [name, t] : ts)
    if (t) found += (found.empty() ? "" : ", ") + std::string(name) + " on " + t->device().str();
  TORCH_CHECK_VALUE(false, "all tensors must be on one device; got ", found, ". Move them with .to(device).");
}

const at::Tensor* ptr(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

void check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= minimum && v[1] >= minimum, name, " must be a pair of ints >= ",
                    minimum, ", got ", v);
}

void check_bounds(double min_val, double max_val) {
  TORCH_CHECK_VALUE(min_val <= max_val, "min_val must be <= max_val (the hardtanh range), got ", min_val, " > ",
                    max_val);
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
    TORCH_CHECK_VALUE(v.numel() == n, names[i], " must hold one value per output channel (", n, "), got shape ",
                      v.sizes());
    *outs[i] = v.reshape({n}).to(at::kFloat).contiguous();
  }
  if (residual) {
    check_float(*residual, "residual");
    TORCH_CHECK_VALUE(residual->sizes() == out_shape, "residual must have the output's shape ", out_shape,
                      ", got ", residual->sizes());
    e.residual = residual->to(at::kFloat).contiguous();
  }
  TORCH_CHECK_VALUE(!out_dtype || is_float(*out_dtype),
                    "out_dtype must be None (int32 or float32 output) or a floating point dtype, got ",
                    dtype_name(*out_dtype));
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
    core::sign_pack_rows_f64(rows.data_ptr<double>(), words(out), rows.size(0), k);
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
  check_cpu({{"x_bits", &x_bits}, {"w_bits", &w_bits}, {"scale", ptr(scale)}, {"bias", ptr(bias)},
             {"residual", ptr(residual)}});
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
                Activation* act = nullptr, at::Tensor* act_bits = nullptr) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());  // the profiler shows that the C++ kernel ran
  check_bits(x_bits, "x_bits", 4);
  check_bits(w_bits, "w_bits", 4);
  check_cpu({{"x_bits", &x_bits}, {"w_bits", &w_bits}, {"scale", ptr(scale)}, {"bias", ptr(bias)},
             {"residual", ptr(residual)}});
  TORCH_CHECK_VALUE(in_channels >= 1, "in_channels must be a positive int, got ", in_channels);
  const int64_t cw = (in_channels + 31) / 32;
  TORCH_CHECK_VALUE(x_bits.size(3) == cw && w_bits.size(3) == cw, "in_channels=", in_channels, " needs ", cw,
                    " words per pixel; got x_bits ", x_bits.sizes(), ", w_bits ", w_bits.sizes(),
                    " (expected packed NHWC input [N, H, W, CW], e.g. from ovsw.sign_pack_nchw, and weights "
                    "[Cout, KH, KW, CW])");
  TORCH_CHECK_VALUE(pad_value == 0 || pad_value == 1,
                    "pad_value must be 0 (padded taps contribute 0) or 1 (pad with +1), got ", pad_value);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
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
    act->bits = words(*act_bits);
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
  check_bounds(min_val, max_val);
  const at::ScalarType dtype = out_dtype ? *out_dtype : at::kFloat;
  TORCH_CHECK_VALUE(is_float(dtype), "out_dtype must be None (int32 or float32 output) or a floating point dtype, got ",
                    dtype_name(dtype));
  if (dtype == at::kDouble) {  // not a native output: clamp the float64 tensor as torch would
    at::Tensor out = ovsw_packed_conv2d(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale,
                                        bias, residual, dtype).clamp_(min_val, max_val);
    return {out, ovsw_sign_pack(out)};
  }
  at::Tensor bits;
  Activation act;
  act.lo = static_cast<float>(min_val);
  act.hi = static_cast<float>(max_val);
  at::Tensor out = conv("ovsw_cpu::packed_conv2d_act", x_bits, w_bits, in_channels, stride, padding, dilation,
                        pad_value, scale, bias, residual, dtype, false, &act, &bits);
  return {out, bits};
}

// torch's max_pool2d output size (kernels/ops.py: pool_output_size).
int64_t pool_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation, bool ceil_mode) {
  const int64_t span = size + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  if (span < 0) return 0;
  const int64_t out = span / stride + 1;
  return ceil_mode && (out - 1) * stride >= size + pad ? out - 1 : out;
}

// hardtanh(max_pool2d(x)) and its sign bits (the next binary conv's input): one pass for channels-last
// float32 input, else torch's max_pool2d and clamp, then the sign-and-pack; y in torch's memory format.
std::tuple<at::Tensor, at::Tensor> ovsw_max_pool2d_act(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode, double min_val,
                                                       double max_val) {
  RECORD_FUNCTION("ovsw_cpu::max_pool2d_act", std::vector<c10::IValue>());
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
                    "x must be NCHW [N, C, H, W] with C, H, W > 0, got shape ", x.sizes());
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2,
                    "padding must be at most half the kernel size (as in max_pool2d), got padding ", padding,
                    " for kernel_size ", kernel_size);
  check_bounds(min_val, max_val);
  core::Pool2d g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.kernel_h = kernel_size[0];
  g.kernel_w = kernel_size[1];
  set_window(g, stride, padding, dilation);
  g.out_h = pool_output_size(g.height, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, ceil_mode);
  g.out_w = pool_output_size(g.width, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w, ceil_mode);
  TORCH_CHECK_VALUE(g.out_h >= 1 && g.out_w >= 1, "the ", g.kernel_h, "x", g.kernel_w, " window (dilation ",
                    dilation, ") does not fit the ", g.height, "x", g.width, " input padded by ", padding);
  const bool nhwc = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;  // torch's output layout too
  if (x.scalar_type() != at::kFloat || !nhwc || !x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    at::Tensor y = at::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode).clamp_(min_val, max_val);
    return {y, ovsw_sign_pack_nchw(y)};
  }
  at::Tensor y = at::empty({g.batch, g.channels, g.out_h, g.out_w},
                           at::TensorOptions().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor bits =
      at::empty({g.batch, g.out_h, g.out_w, (g.channels + 31) / 32}, at::TensorOptions().dtype(at::kInt));
  core::max_pool2d_act(x.data_ptr<float>(), g, static_cast<float>(min_val), static_cast<float>(max_val),
                       y.data_ptr<float>(), words(bits));
  return {y, bits};
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
  m.impl("max_pool2d_act", &ovsw_max_pool2d_act);
}

TORCH_LIBRARY(ovsw_cpu, m) {
  m.def("supported_isas() -> int", &supported_isas);
  m.def("get_isa() -> int", &get_isa);
  m.def("set_isa(int isa) -> ()", &set_isa);
}
