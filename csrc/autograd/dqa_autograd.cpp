// Autograd of dqa_ext's ops in C++, as torchvision's csrc/ops/autograd/ does: an eager call goes
// from the op to its backward node without returning to Python. The forward saves x and the raw
// step; the backward is the fake_quantize_backward op, itself wrapped in a Function whose own
// backward raises (the straight-through surrogate has no second derivative in the kernels).
// torch.compile and torch.export trace through these kernels down to the ops (their fakes are in
// dqa_ext/ops.py); Inductor then decomposes the ops into code it can fuse.
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "../dqa_ops.h"

namespace dqa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

constexpr const char* kNoDoubleBackward =
    "dqa_ext: the extension's fake_quantize backward is not differentiable, so double backward "
    "(create_graph=True, gradient penalties, hessians) is not supported on it; "
    "DQA_EXT_BACKEND=reference (dqa_ext.set_backend('reference')) computes it in plain PyTorch";

// The backward op as a Function: under create_graph=True its outputs get a node whose backward
// raises one clear line, instead of a second derivative silently dropped.
class FakeQuantizeBackwardFunction
    : public torch::autograd::Function<FakeQuantizeBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Variable& grad_y, const Variable& x,
                               const Variable& step, int64_t qmin, int64_t qmax,
                               int64_t channel_dim, double grad_scale, bool need_step_grad,
                               double min_step) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dstep] = call_fake_quantize_backward(grad_y, x, step, qmin, qmax, channel_dim,
                                                 grad_scale, need_step_grad, min_step);
    return {dx, dstep};
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false, kNoDoubleBackward);
  }
};

class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& x, const Variable& step,
                          int64_t qmin, int64_t qmax, int64_t channel_dim, double grad_scale,
                          double min_step) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Variable y = call_fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
    ctx->save_for_backward({x, step});
    // One entry, not five: each is a string-keyed map insert on every call.
    ctx->saved_data["args"] = c10::ivalue::Tuple::create(qmin, qmax, channel_dim, grad_scale, min_step);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_step_grad = ctx->needs_input_grad(1);
    const auto args = ctx->saved_data["args"].toTuple();
    const auto& a = args->elements();
    at::Tensor dx, dstep;
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True: a node that raises
      auto out = FakeQuantizeBackwardFunction::apply(grads[0], saved[0], saved[1], a[0].toInt(),
                                                     a[1].toInt(), a[2].toInt(), a[3].toDouble(),
                                                     need_step_grad, a[4].toDouble());
      dx = out[0];
      dstep = out[1];
    } else {  // the usual backward: no graph to record, so no Function around the op
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dstep) =
          call_fake_quantize_backward(grads[0], saved[0], saved[1], a[0].toInt(), a[1].toInt(),
                                    a[2].toInt(), a[3].toDouble(), need_step_grad, a[4].toDouble());
    }
    return {dx, need_step_grad ? dstep : Variable(), Variable(), Variable(),
            Variable(), Variable(), Variable()};
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor& x, const at::Tensor& step, int64_t qmin,
                                  int64_t qmax, int64_t channel_dim, double grad_scale,
                                  double min_step) {
  return FakeQuantizeFunction::apply(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin,
    int64_t qmax, int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step) {
  auto out = FakeQuantizeBackwardFunction::apply(grad_y, x, step, qmin, qmax, channel_dim,
                                                 grad_scale, need_step_grad, min_step);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dqa_ext, Autograd, m) {
  m.impl("fake_quantize", &fake_quantize_autograd);
  m.impl("fake_quantize_backward", &fake_quantize_backward_autograd);
}

}  // namespace dqa
