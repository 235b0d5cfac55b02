// The ops of dqa_ext called through the dispatcher from C++ (the autograd kernels, the Python
// entry): the schemas are in dqa_ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace dqa {

at::Tensor call_fake_quantize(const at::Tensor& x, const at::Tensor& step, int64_t qmin, int64_t qmax,
                              int64_t channel_dim, double grad_scale, double min_step);

std::tuple<at::Tensor, at::Tensor> call_fake_quantize_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin, int64_t qmax,
    int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step);

}  // namespace dqa
