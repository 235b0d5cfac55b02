// CUDA kernels of dqa_ext's ops: argument checks and layout (dqa_args.h), then the launchers
// declared in dqa_kernels.cuh (dqa_elementwise.cu, dqa_backward.cu) on the current stream.
// Nothing here syncs with the host: a step that is not finite and > 0 gives NaN outputs for
// its channel instead of an error (see dqa::checked_step).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <tuple>

#include "../dqa_args.h"
#include "dqa_kernels.cuh"

namespace {

dqa_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dqa_cuda::DType::kFloat32;
    case at::kHalf:
      return dqa_cuda::DType::kFloat16;
    case at::kBFloat16:
      return dqa_cuda::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "dqa_ext: unsupported dtype ", t.scalar_type());  // check_args forbids it
  return dqa_cuda::DType::kFloat32;
}

dqa_cuda::Shape shape_of(const at::Tensor& x_dense, int64_t dim, const at::Tensor& step) {
  const dqa::Blocks b = dqa::blocks_of(x_dense, dim, step);
  return {b.outer, b.channels, b.inner};
}

// Multiprocessors of the current device (the guard's), queried once per device. It only sizes
// the elementwise grid (one resident wave); no result depends on it. c10 headers only:
// ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers for no benefit here.
int sm_count() {
  constexpr int kCached = 64;
  static std::array<std::atomic<int>, kCached> cache{};
  const int dev = c10::cuda::current_device();
  int n = dev >= 0 && dev < kCached ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (dev >= 0 && dev < kCached) cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

at::Tensor fake_quantize_cuda(const at::Tensor& x, const at::Tensor& step, int64_t qmin,
                              int64_t qmax, int64_t channel_dim, double /*grad_scale*/,
                              double min_step) {
  const int64_t dim = dqa::check_args(x, step, qmin, qmax, channel_dim, min_step);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dqa::dense(x);
  at::Tensor y = at::empty_like(xd);  // keeps xd's strides, so y has the same block layout
  if (xd.numel() == 0) return y;
  const at::Tensor s = step.contiguous();
  C10_CUDA_CHECK(dqa_cuda::launch_fake_quantize(
      xd.const_data_ptr(), s.const_data_ptr<float>(), y.mutable_data_ptr(), shape_of(xd, dim, s),
      dtype_of(xd), static_cast<float>(qmin), static_cast<float>(qmax),
      static_cast<float>(min_step), sm_count(),
      c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin,
    int64_t qmax, int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step) {
  const int64_t dim = dqa::check_args(x, step, qmin, qmax, channel_dim, min_step);
  dqa::check_backward_args(grad_y, x, grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dqa::dense(x);
  const at::Tensor dy = dqa::with_layout_of(grad_y, xd);
  at::Tensor dx = at::empty_like(xd);
  at::Tensor dstep = need_step_grad ? at::empty(step.sizes(), step.options())
                                    : at::empty({0}, step.options());
  if (xd.numel() == 0) {
    dstep.zero_();
    return {dx, dstep};
  }
  const at::Tensor s = step.contiguous();
  const dqa_cuda::Shape shape = shape_of(xd, dim, s);
  const dqa_cuda::DType dtype = dtype_of(xd);
  const size_t ws_bytes =
      dqa_cuda::fake_quantize_backward_workspace_bytes(shape, dtype, need_step_grad);
  // Per-block partial sums (float64) of the step gradient; the caching allocator makes this
  // cheap, and nothing is allocated when there is none.
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>((ws_bytes + sizeof(double) - 1) / sizeof(double))},
                          x.options().dtype(at::kDouble));
  }
  C10_CUDA_CHECK(dqa_cuda::launch_fake_quantize_backward(
      dy.const_data_ptr(), xd.const_data_ptr(), s.const_data_ptr<float>(), dx.mutable_data_ptr(),
      need_step_grad ? dstep.mutable_data_ptr<float>() : nullptr,
      ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, ws_bytes, shape, dtype,
      static_cast<float>(qmin), static_cast<float>(qmax), static_cast<float>(min_step), grad_scale,
      sm_count(),
      c10::cuda::getCurrentCUDAStream()));
  return {dx, dstep};
}

}  // namespace

TORCH_LIBRARY_IMPL(dqa_ext, CUDA, m) {
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
}
