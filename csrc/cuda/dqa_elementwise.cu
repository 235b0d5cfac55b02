// The elementwise kernel of dqa_ext: forward, and grad_x alone when no step gradient is
// wanted. A grid-stride pass over VEC-wide vectors of the flat tensor (one resident wave of
// 256-thread blocks); VEC is the widest vector (<= 16 bytes) the pointers are aligned to, a
// vector may cross rows, and the last one may be partial. The channel of each element is
// tracked incrementally (dqa_walk.h), so the loop holds no division. Per-element math from
// dqa_math.h (V = float), shared with the CPU kernels, so y and grad_x are bitwise equal to them.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../dqa_math.h"
#include "dqa_device.cuh"
#include "dqa_kernels.cuh"
#include "dqa_plan.h"
#include "dqa_walk.h"

namespace dqa_cuda {
namespace {

constexpr int kMaxDevices = 64;

// kGrad false: out = y from x. kGrad true: out = grad_x from x and dy.
template <typename T, int VEC, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                       const float* __restrict__ step, T* __restrict__ out, FlatWalk w,
                       float qmin, float qmax, float min_step) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  walk_flat<VEC>(w, tid, nthreads, [&](int64_t e, int64_t n, Cursor p) {
    const Pack<T, VEC> xv = load_vec<T, VEC, true>(x + e, n);
    Pack<T, VEC> gv;
    if constexpr (kGrad) gv = load_vec<T, VEC, true>(dy + e, n);
    Pack<T, VEC> ov;
    float s = load_step(step, p.c, min_step);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j > 0 && next_element(p, w.inner, w.C)) s = load_step(step, p.c, min_step);
      const float v = dqa::scaled(to_float(xv.v[j]), s);
      float r;
      if constexpr (kGrad) {
        r = dqa::grad_input(v, to_float(gv.v[j]), s, qmin, qmax);
      } else {
        r = dqa::quantize(v, s, qmin, qmax);
      }
      ov.v[j] = from_float<T>(r);
    }
    store_vec<T, VEC, true>(out + e, ov, n);
  });
}

// Blocks of Kernel (at kThreads threads) resident on one multiprocessor of the current device,
// from the occupancy calculator, cached per kernel and device; 4 if it cannot say.
template <auto Kernel>
int resident_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();  // ours: the launch must not report it
    return 4;
  }
  if (dev < 0 || dev >= kMaxDevices) return 4;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0) != cudaSuccess ||
        n < 1) {
      (void)cudaGetLastError();  // ours: the launch must not report it
      n = 4;
    }
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <bool kGrad>
cudaError_t launch_elementwise(const void* x, const void* dy, const float* step, void* out,
                               Shape shape, DType dtype, float qmin, float qmax, float min_step,
                               int sm_count, cudaStream_t stream) {
  if (numel_of(shape) == 0) return cudaSuccess;
  const int vec = aligned_vec(dtype, reinterpret_cast<uintptr_t>(x),
                              reinterpret_cast<uintptr_t>(dy), reinterpret_cast<uintptr_t>(out));
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vec<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      constexpr auto kernel = elementwise_kernel<T, VEC, kGrad>;
      const ElementwisePlan plan =
          plan_elementwise(shape, dtype, reinterpret_cast<uintptr_t>(x),
                           reinterpret_cast<uintptr_t>(dy), reinterpret_cast<uintptr_t>(out),
                           sm_count, resident_blocks<kernel>());
      if (plan.vec != VEC) return cudaErrorInvalidValue;  // one rule picks both: cannot happen
      const FlatWalk w{numel_of(shape),
                       shape.channels,
                       shape.inner,
                       make_divider(shape.inner),
                       make_divider(shape.channels),
                       plan.stride};
      kernel<<<plan.blocks, kThreads, 0, stream>>>(static_cast<const T*>(x),
                                                   static_cast<const T*>(dy), step,
                                                   static_cast<T*>(out), w, qmin, qmax, min_step);
      return cudaGetLastError();
    });
  });
}

}  // namespace

cudaError_t launch_fake_quantize(const void* x, const float* step, void* y, Shape shape,
                                 DType dtype, float qmin, float qmax, float min_step,
                                 int sm_count, cudaStream_t stream) {
  return launch_elementwise<false>(x, nullptr, step, y, shape, dtype, qmin, qmax, min_step,
                                   sm_count, stream);
}

cudaError_t launch_grad_input(const void* x, const void* grad_y, const float* step, void* grad_x,
                              Shape shape, DType dtype, float qmin, float qmax, float min_step,
                              int sm_count, cudaStream_t stream) {
  return launch_elementwise<true>(x, grad_y, step, grad_x, shape, dtype, qmin, qmax, min_step,
                                  sm_count, stream);
}

}  // namespace dqa_cuda
