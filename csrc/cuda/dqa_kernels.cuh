// Launchers of dqa_ext's CUDA kernels. Raw pointers and sizes only, so that dqa_kernels.cu
// compiles with nvcc alone (no torch); the Torch glue is dqa_cuda.cpp.
//
// Every tensor is a dense [outer, channels, inner] block: element (o, c, i) lies at
// o*channels*inner + c*inner + i from its pointer, and uses step[c] (`channels` float32 values,
// contiguous, on the device). Nothing here reads device memory on the host, so no launcher syncs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dqa_cuda {

// Storage type of x, y, grad_y and grad_x; every kernel computes in float32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Shape {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// y = clamp(rne(x / step[c]), qmin, qmax) * step[c], one pass over x.
cudaError_t launch_fake_quantize(const void* x, const float* step, void* y, Shape shape,
                                 DType dtype, float qmin, float qmax, int sm_count,
                                 cudaStream_t stream);

// Bytes of float32 scratch that launch_fake_quantize_backward needs for its per-block partial
// step gradients (0 when need_step_grad is false). It depends on the pointers' alignment (which
// picks the vector width), so pass the same pointers as to the launch.
size_t fake_quantize_backward_workspace_bytes(const void* grad_y, const void* x,
                                              const void* grad_x, Shape shape, DType dtype,
                                              int sm_count, bool need_step_grad);

// grad_x = STE gradient, in one pass over grad_y and x. When grad_step is not null it also
// writes grad_step[c] = grad_scale * sum over channel c of grad_y * t(x / step[c]), reduced
// without atomics in a fixed order (bitwise identical run to run on one device); `workspace`
// must then hold fake_quantize_backward_workspace_bytes(...) bytes, aligned to 4.
cudaError_t launch_fake_quantize_backward(const void* grad_y, const void* x, const float* step,
                                          void* grad_x, float* grad_step, void* workspace,
                                          size_t workspace_bytes, Shape shape, DType dtype,
                                          float qmin, float qmax, double grad_scale,
                                          int sm_count, cudaStream_t stream);

}  // namespace dqa_cuda
