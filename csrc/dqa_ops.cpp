// Op schemas of dqa_ext. Kernels register per device (cpu/dqa_cpu.cpp, cuda/dqa_cuda.cpp), the
// autograd in autograd/dqa_autograd.cpp; dqa_python.cpp is the Python module that loads them.
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
}
