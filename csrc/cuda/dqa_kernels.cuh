// Launchers of dqa_ext's CUDA kernels. Raw pointers and sizes only, so that the kernel units
// compile with nvcc alone (no torch); the Torch glue is dqa_cuda.cpp.
//
// Every tensor is a dense [outer, channels, inner] block (dqa_plan.h's Shape) and uses step[c]
// (`channels` float32 values, contiguous, on the device). Nothing here reads device memory on
// the host, so no launcher syncs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "dqa_plan.h"

namespace dqa_cuda {

// y = clamp(rne(x / s), qmin, qmax) * s, s = dqa::effective_step(step[c], min_step) (step[c]
// itself when min_step is 0), one pass over x. sm_count sizes the grid (one resident wave); the
// result does not depend on it.
cudaError_t launch_fake_quantize(const void* x, const float* step, void* y, Shape shape,
                                 DType dtype, float qmin, float qmax, float min_step,
                                 int sm_count, cudaStream_t stream);

// Bytes of scratch (float64 partial sums, aligned to 8) that launch_fake_quantize_backward
// needs; 0 when need_step_grad is false or the tensor is empty. A function of shape and dtype.
size_t fake_quantize_backward_workspace_bytes(Shape shape, DType dtype, bool need_step_grad);

// grad_x = STE gradient, in one pass over grad_y and x. When grad_step is not null it also
// writes grad_step[c] = grad_scale * sum over channel c of grad_y * t(x / s) (zeros for an
// empty tensor), times dqa::effective_step_grad(step[c], min_step), reduced without atomics in an order fixed by (shape, dtype): bitwise identical
// across runs, pointer alignments and GPUs. `workspace` must then hold
// fake_quantize_backward_workspace_bytes(...) bytes.
cudaError_t launch_fake_quantize_backward(const void* grad_y, const void* x, const float* step,
                                          void* grad_x, float* grad_step, void* workspace,
                                          size_t workspace_bytes, Shape shape, DType dtype,
                                          float qmin, float qmax, float min_step,
                                          double grad_scale, int sm_count, cudaStream_t stream);

}  // namespace dqa_cuda
