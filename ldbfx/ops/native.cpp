// Native (C++) bodies of the compiled path's most frequent kernels: ldbfx/ops/native.py builds
// and loads this file on first use. Each op here has the schema, tags and fake of the Python
// kernel of the same name in ldbfx/ops/kernels.py (``<name>_native`` is defined there) and does
// exactly what that kernel does, with the same aten calls, so gradients are the same bytes. What
// it saves is the Python: 50-70 us per call inside a compiled step on a 2-core CPU, 53
// convolutions and 106 norm parameters per ResNet-50 step (on CUDA every convolution's dW).
//
// The mask the graph passes is a view of the first n bytes of its model's control buffer
// (ldbfx/state.py, LdbState):
//   [0, n)    the drop mask, True = dropped;
//   [n, 2n)   the skip record these kernels write (1 = this backward skipped the layer), which
//             the state merges into its record before the optimizer steps;
//   [2n, 3n)  1 where the layer has a row selection (ChannelDropBack).
// A control buffer is known by its address: each state registers its buffer here
// (``ldbfx_native_control``) and withdraws it when the state dies, so a tensor that merely looks
// like one (a slice of some 3n-byte bool tensor, a copy of a mask) is never written to.
// Where a layer has a row selection, or the mask is not a registered buffer's view (another
// tensor handed to the op), the Python kernel runs instead, through the dispatcher: it handles
// every case, and records into the state the mask names, or refuses a mask of no live model.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;

// The registered control buffers: data address -> number of layers n (the buffer holds 3n bytes).
std::mutex registry_mutex;
std::unordered_map<const void*, int64_t>& registry() {
  static std::unordered_map<const void*, int64_t> buffers;
  return buffers;
}

}  // namespace

// Registers (n > 0) or withdraws (n == 0) the control buffer at ``address``: LdbState calls this
// through ctypes, outside the dispatcher, so that no mode active at the time (a fake-tensor trace
// during which the garbage collector finalises a state) can intercept it.
extern "C" void ldbfx_native_control(const void* address, int64_t n) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (n > 0) {
    registry()[address] = n;
  } else {
    registry().erase(address);
  }
}

namespace {

// The layer's byte in each region of the control buffer, or nullptr where ``mask`` is not the
// mask part of a registered control buffer.
uint8_t* control(const Tensor& mask, int64_t index) {
  const int64_t n = mask.numel();
  if (mask.layout() != at::kStrided || !mask.device().is_cpu() || mask.scalar_type() != at::kBool ||
      mask.dim() != 1 || !mask.is_contiguous() || index < 0 || index >= n) {
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto found = registry().find(mask.const_data_ptr());
    if (found == registry().end() || found->second != n) return nullptr;
  }
  return static_cast<uint8_t*>(mask.mutable_data_ptr()) + index;
}

// Whether the layer is dropped as the backward runs; if so, records that this backward skipped it.
bool skipped(uint8_t* layer, int64_t n) {
  if (layer[0]) {
    layer[n] = 1;
    return true;
  }
  return false;
}

std::vector<int64_t> dense_strides(at::IntArrayRef shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t step = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = step;
    step *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

std::optional<at::MemoryFormat> channels_last_of(const Tensor& t) {
  if (t.dim() == 4) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5) return at::MemoryFormat::ChannelsLast3d;
  return std::nullopt;
}

// The strides of ``empty_like(t)``: t's own where it is dense, else the dense layout empty_like picks.
std::vector<int64_t> empty_like_strides(const Tensor& t) {
  auto cl = channels_last_of(t);
  if (t.is_contiguous() || (cl && t.is_contiguous(*cl))) return t.strides().vec();
  return at::empty_like(t).strides().vec();
}

// ``t`` with exactly ``strides`` (what the fake promised); size-1 dimensions' strides are restrided,
// not copied (see _strided_as in kernels.py).
Tensor strided_as(const Tensor& t, at::IntArrayRef strides) {
  if (t.strides().equals(strides)) return t;
  bool same_bytes = t.storage_offset() == 0;
  for (int64_t i = 0; same_bytes && i < t.dim(); ++i) {
    if (t.size(i) != 1 && t.stride(i) != strides[i]) same_bytes = false;
  }
  if (same_bytes) return t.as_strided(t.sizes(), strides);
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

Tensor dropped_weight_grad(const Tensor& like, at::IntArrayRef shape, at::IntArrayRef strides) {
  return at::empty_strided(shape, strides, like.options()).zero_();
}

using ConvResult = std::tuple<Tensor, Tensor, Tensor>;

ConvResult conv_backward(const Tensor& grad_in, const Tensor& x, const Tensor& weight, const Tensor& mask,
                         int64_t index, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool want_input, bool want_weight,
                         bool with_bias, bool contiguous_weight_grad) {
  uint8_t* layer = control(mask, index);
  if (layer == nullptr || layer[2 * mask.numel()]) {
    static auto python = c10::Dispatcher::singleton()
        .findSchemaOrThrow("ldbfx::conv_backward", "")
        .typed<ConvResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, at::IntArrayRef,
                          at::IntArrayRef, at::IntArrayRef, int64_t, bool, bool, bool, bool)>();
    return python.call(grad_in, x, weight, mask, index, stride, padding, dilation, groups, want_input,
                       want_weight, with_bias, contiguous_weight_grad);
  }
  Tensor grad = grad_in;
  auto cl = channels_last_of(x);
  if (want_input && cl && !x.is_contiguous() && x.is_contiguous(*cl) && !grad.is_contiguous(*cl)) {
    grad = grad.contiguous(*cl);
  }
  const bool dropped = skipped(layer, mask.numel());
  const bool fused_weight = want_weight && !dropped;
  const bool fused_bias = with_bias && !dropped;
  Tensor gx, gw, gb;
  if (want_input || fused_weight || fused_bias) {
    std::vector<int64_t> bias_sizes{weight.size(0)};
    std::vector<int64_t> output_padding(stride.size(), 0);
    std::tie(gx, gw, gb) = at::convolution_backward(
        grad, x, weight, fused_bias ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt, stride, padding,
        dilation, false, output_padding, groups, {want_input, fused_weight, fused_bias});
  }
  if (!want_input) {
    gx = grad.new_empty({0});
  } else if (!gx.strides().equals(x.strides())) {
    gx = strided_as(gx, empty_like_strides(x));
  }
  const auto weight_strides = contiguous_weight_grad ? dense_strides(weight.sizes()) : empty_like_strides(weight);
  if (dropped) {
    gw = want_weight ? dropped_weight_grad(weight, weight.sizes(), weight_strides) : grad.new_empty({0});
    gb = with_bias ? grad.new_zeros({weight.size(0)}) : grad.new_empty({0});
    return {gx, gw, gb};
  }
  gw = want_weight ? strided_as(gw, weight_strides) : grad.new_empty({0});
  return {gx, gw, with_bias ? gb : grad.new_empty({0})};
}

// dW and db only: dX is the graph's own aten call (CUDA, and a double backward on any device).
std::tuple<Tensor, Tensor> conv_weight_grad(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                            const Tensor& mask, int64_t index, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                            bool want_weight, bool with_bias, bool contiguous_weight_grad) {
  // As the Python kernel: conv_backward without dX (whose fallback, for row selections and
  // foreign masks, is then the Python conv_backward without dX: the same as conv_weight_grad's).
  auto result = conv_backward(grad, x, weight, mask, index, stride, padding, dilation, groups, false, want_weight,
                              with_bias, contiguous_weight_grad);
  return {std::get<1>(result), std::get<2>(result)};
}

std::tuple<Tensor, Tensor> linear_weight_grad(const Tensor& grad2d, const Tensor& x2d, const Tensor& mask,
                                              int64_t index, bool with_bias) {
  uint8_t* layer = control(mask, index);
  if (layer == nullptr || layer[2 * mask.numel()]) {
    static auto python = c10::Dispatcher::singleton()
        .findSchemaOrThrow("ldbfx::linear_weight_grad", "")
        .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, bool)>();
    return python.call(grad2d, x2d, mask, index, with_bias);
  }
  if (skipped(layer, mask.numel())) {
    std::vector<int64_t> shape{grad2d.size(1), x2d.size(1)};
    return {dropped_weight_grad(grad2d, shape, dense_strides(shape)),
            grad2d.new_zeros({with_bias ? grad2d.size(1) : 0})};
  }
  Tensor grad_bias = with_bias ? grad2d.sum(0) : grad2d.new_zeros({0});
  return {grad2d.t().mm(x2d), grad_bias};
}

Tensor masked_grad(const Tensor& grad, const Tensor& mask, int64_t index) {
  uint8_t* layer = control(mask, index);
  if (layer == nullptr) {
    static auto python = c10::Dispatcher::singleton()
        .findSchemaOrThrow("ldbfx::masked_grad", "")
        .typed<Tensor(const Tensor&, const Tensor&, int64_t)>();
    return python.call(grad, mask, index);
  }
  if (skipped(layer, mask.numel())) return at::zeros_like(grad);
  return grad.clone();
}

}  // namespace

TORCH_LIBRARY_IMPL(ldbfx, CompositeExplicitAutograd, m) {
  m.impl("conv_backward_native", conv_backward);
  m.impl("conv_weight_grad_native", conv_weight_grad);
  m.impl("linear_weight_grad_native", linear_weight_grad);
  m.impl("masked_grad_native", masked_grad);
}
