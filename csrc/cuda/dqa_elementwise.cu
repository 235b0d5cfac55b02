// The elementwise kernels of dqa_ext: the forward, and grad_x alone when no step gradient is
// wanted, on the two paths of dqa_plan.h:
//   rows_kernel   long rows and per-tensor: block (p, cy) takes channels cy, cy + gridDim.y, ...,
//                 loads the channel's step once and strides over its rows in VEC-wide vectors
//                 that never cross a row (VEC divides inner; C == 1: the last may be partial);
//   tiles_kernel  short rows (channels_last, (N, C), small H*W): a thread owns VEC columns of the
//                 [outer, C * inner] matrix, loads their steps once and walks down the rows.
// Each thread keeps two vectors in flight. No index arithmetic per element: the loop advances
// one cursor per vector (dqa_walk.h). Per-element math from dqa_math.h (V = float), shared with
// the CPU kernels, so y and grad_x are bitwise equal to them.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../dqa_math.h"
#include "dqa_device.cuh"
#include "dqa_divide.h"
#include "dqa_kernels.cuh"
#include "dqa_plan.h"
#include "dqa_walk.h"

namespace dqa_cuda {
namespace {

constexpr int kMaxDevices = 64;

// NV vectors (two in flight, or one) at e[0 .. NV): whole, or n < VEC elements when NV is 1.
// Element j of each has divisor div_of(j) (its step). kGrad false: out = y of x; kGrad true:
// out = grad_x of x and dy. The quotients are the IEEE ones (dqa_device.cuh's quotients).
template <typename T, int VEC, int NV, bool kGrad, typename DivOf>
__device__ __forceinline__ void elementwise_vectors(const T* __restrict__ x,
                                                    const T* __restrict__ dy, T* __restrict__ out,
                                                    const int64_t (&e)[NV], int64_t n,
                                                    DivOf div_of, float qmin, float qmax) {
  Pack<T, VEC> xv[NV];
  Pack<T, VEC> gv[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) xv[k] = load_vec<T, VEC, true>(x + e[k], n);
  if constexpr (kGrad) {
#pragma unroll
    for (int k = 0; k < NV; ++k) gv[k] = load_vec<T, VEC, true>(dy + e[k], n);
  }
  // One vector at a time once every load is in flight, stored as soon as it is computed:
  // fewer registers live.
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    Pack<T, VEC> ov;
    float xf[VEC];
    float v[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) xf[j] = to_float(xv[k].v[j]);
    quotients(xf, v, div_of);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float s = div_of(j).s;
      float r;
      if constexpr (kGrad) {
        r = dqa::grad_input(v[j], to_float(gv[k].v[j]), s, qmin, qmax);
      } else {
        r = dqa::quantize(v[j], s, qmin, qmax);
      }
      ov.v[j] = from_float<T>(r);
    }
    store_vec<T, VEC, true>(out + e[k], ov, n);
  }
}

template <typename T, int VEC, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ step,
                T* __restrict__ out, RowsWalk w, float qmin, float qmax, float min_step) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t c = blockIdx.y; c < w.C; c += gridDim.y) {
    const Divisor d = make_divisor(load_step(step, c, min_step));
    const auto div_of = [d](int) { return d; };
    walk_channel_rows<VEC, kNoChunks>(
        w, tid, c,
        [&](int64_t e0, int64_t e1) {
          const int64_t e[2] = {e0, e1};
          elementwise_vectors<T, VEC, 2, kGrad>(x, dy, out, e, VEC, div_of, qmin, qmax);
        },
        [&](int64_t e0, int64_t n) {
          const int64_t e[1] = {e0};
          elementwise_vectors<T, VEC, 1, kGrad>(x, dy, out, e, n, div_of, qmin, qmax);
        },
        [] {});
  }
}

// Thread (tx, ty) of a bx x by block (bx * by = kThreads, powers of two) owns columns
// col .. col + VEC - 1 of tile blockIdx.x (VEC divides W) and rows blockIdx.y * by + ty,
// + gridDim.y * by, ...
template <typename T, int VEC, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    tiles_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ step,
                 T* __restrict__ out, TilesWalk w, Divider by_inner, int bx_log2, float qmin,
                 float qmax, float min_step) {
  const int bx = 1 << bx_log2;
  const int tx = threadIdx.x & (bx - 1);
  const int ty = threadIdx.x >> bx_log2;
  const int64_t col = tile_column(blockIdx.x, bx, tx, VEC);
  if (col >= w.W) return;
  float s[VEC];
  float rcp[VEC];
  float hi = INFINITY;  // one range for the thread: the fast division only if every step allows it
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const Divisor d = make_divisor(load_step(step, by_inner.div(col + j), min_step));
    s[j] = d.s;
    rcp[j] = d.r;
    hi = fminf(hi, d.hi);
  }
  const auto div_of = [&](int j) { return Divisor{s[j], rcp[j], hi}; };
  const int by = kThreads >> bx_log2;
  walk_tile_rows<2, kNoChunks>(
      w, col, static_cast<int64_t>(blockIdx.y) * by + ty,
      [&](int64_t e0, int64_t de) {
        const int64_t e[2] = {e0, e0 + de};
        elementwise_vectors<T, VEC, 2, kGrad>(x, dy, out, e, VEC, div_of, qmin, qmax);
      },
      [&](int64_t e0) {
        const int64_t e[1] = {e0};
        elementwise_vectors<T, VEC, 1, kGrad>(x, dy, out, e, VEC, div_of, qmin, qmax);
      },
      [] {});
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
  const uintptr_t px = reinterpret_cast<uintptr_t>(x), pd = reinterpret_cast<uintptr_t>(dy),
                  po = reinterpret_cast<uintptr_t>(out);
  const ForwardPath path = forward_path(shape, dtype, px, pd, po);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vec<T>(path.vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const T* xt = static_cast<const T*>(x);
      const T* dyt = static_cast<const T*>(dy);
      T* ot = static_cast<T*>(out);
      if (path.tiled) {
        constexpr auto kernel = tiles_kernel<T, VEC, kGrad>;
        const ForwardPlan plan = plan_forward(shape, dtype, px, pd, po,
                                              int64_t{sm_count} * resident_blocks<kernel>());
        if (plan.vec != VEC || !plan.tiled) return cudaErrorInvalidValue;  // one rule: cannot happen
        kernel<<<dim3(plan.grid.x, plan.grid.y), plan.block, 0, stream>>>(
            xt, dyt, step, ot, plan.tiles, make_divider(shape.inner), plan.bx_log2, qmin, qmax,
            min_step);
      } else {
        constexpr auto kernel = rows_kernel<T, VEC, kGrad>;
        const ForwardPlan plan = plan_forward(shape, dtype, px, pd, po,
                                              int64_t{sm_count} * resident_blocks<kernel>());
        if (plan.vec != VEC || plan.tiled) return cudaErrorInvalidValue;
        kernel<<<dim3(plan.grid.x, plan.grid.y), plan.block, 0, stream>>>(
            xt, dyt, step, ot, plan.rows, qmin, qmax, min_step);
      }
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
