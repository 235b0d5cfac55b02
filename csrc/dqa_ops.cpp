// Op schemas of dqa_ext. Kernels register per device (cpu/dqa_cpu.cpp, cuda/dqa_cuda.cpp), the
// autograd in autograd/dqa_autograd.cpp; dqa_python.cpp is the Python module that loads them.
#include "dqa_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(dqa_ext, m) {
  // y = clamp(rne(x / s), qmin, qmax) * s per element, in x's dtype and memory format, where
  // s = step, or max(|step|, min_step) when min_step > 0 (a learned step: dqa::effective_step).
  // grad_scale is not used by the forward: it is an input so that the autograd kernel
  // (autograd/dqa_autograd.cpp) can hand it to the backward.
  m.def(
      "fake_quantize(Tensor x, Tensor step, int qmin, int qmax, int channel_dim, "
      "float grad_scale=1.0, float min_step=0.0) -> Tensor");
  // (grad_x, grad_step). grad_step has step's shape (the gradient with respect to the raw step,
  // through max(|step|, min_step) when min_step > 0), or is empty when need_step_grad is false.
  m.def(
      "fake_quantize_backward(Tensor grad_y, Tensor x, Tensor step, int qmin, int qmax, "
      "int channel_dim, float grad_scale, bool need_step_grad, float min_step=0.0) -> "
      "(Tensor, Tensor)");
  // The sigmoid staircase, a smooth stand-in for the quantizer that the robustness toolkit's
  // attacks differentiate: (y, d) per element of x, with s its step (one, or one per channel along
  // channel_dim), v = x / s, z_k = clamp((v - (k - 1/2)) / temp, -30, 30) over k = 1..qmax,
  // y = s * sum_k sigmoid(z_k) and d = dy/dx = sum_k sigmoid'(z_k) [z_k not clamped] / temp;
  // temp is one per example (x's first dim) or one for all. float32, contiguous or channels_last;
  // CPU only (other devices use the same formula in PyTorch ops:
  // dqa_ext/robust/attacks/adaptive.py).
  m.def("sigmoid_staircase(Tensor x, Tensor step, Tensor temp, int qmax, int channel_dim) -> (Tensor, Tensor)");
}

namespace dqa {

at::Tensor call_fake_quantize(const at::Tensor& x, const at::Tensor& step, int64_t qmin, int64_t qmax,
                              int64_t channel_dim, double grad_scale, double min_step) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dqa_ext::fake_quantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               int64_t, int64_t, double, double)>();
  return op.call(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
}

std::tuple<at::Tensor, at::Tensor> call_fake_quantize_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin, int64_t qmax,
    int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dqa_ext::fake_quantize_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t, int64_t,
                                                    double, bool, double)>();
  return op.call(grad_y, x, step, qmin, qmax, channel_dim, grad_scale, need_step_grad, min_step);
}

}  // namespace dqa
