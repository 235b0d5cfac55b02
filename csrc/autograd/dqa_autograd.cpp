// Autograd of dqa_ext's ops in C++, as torchvision's csrc/ops/autograd/ does: an eager call goes
// from the op to its backward node without returning to Python. The forward saves x and the raw
// step; the backward is the fake_quantize_backward op, itself wrapped in a Function whose own
// backward raises (the straight-through surrogate has no second derivative in the kernels).
// torch.compile and torch.export trace through these kernels down to the ops (their fakes are in
// dqa_ext/ops.py); Inductor then decomposes the ops into code it can fuse.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace dqa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

at::Tensor fake_quantize_op(const at::Tensor& x, const at::Tensor& step, int64_t qmin,
                            int64_t qmax, int64_t channel_dim, double grad_scale,
                            double min_step) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dqa_ext::fake_quantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               int64_t, int64_t, double, double)>();
  return op.call(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_op(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin,
    int64_t qmax, int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dqa_ext::fake_quantize_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t, int64_t,
                                                    double, bool, double)>();
  return op.call(grad_y, x, step, qmin, qmax, channel_dim, grad_scale, need_step_grad, min_step);
}

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
    auto [dx, dstep] = fake_quantize_backward_op(grad_y, x, step, qmin, qmax, channel_dim,
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
    Variable y = fake_quantize_op(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
    ctx->save_for_backward({x, step});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["channel_dim"] = channel_dim;
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->saved_data["min_step"] = min_step;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_step_grad = ctx->needs_input_grad(1);
    auto out = FakeQuantizeBackwardFunction::apply(
        grads[0], saved[0], saved[1], ctx->saved_data["qmin"].toInt(),
        ctx->saved_data["qmax"].toInt(), ctx->saved_data["channel_dim"].toInt(),
        ctx->saved_data["grad_scale"].toDouble(), need_step_grad,
        ctx->saved_data["min_step"].toDouble());
    return {out[0], need_step_grad ? out[1] : Variable(), Variable(), Variable(),
            Variable(),  Variable(),                      Variable()};
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
