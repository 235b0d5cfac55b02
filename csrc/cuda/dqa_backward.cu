// The backward kernels of dqa_ext with the step gradient (x seen as [outer, C, inner]):
//   grad_rows_kernel   grad_x + per-channel partial sums for long rows (inner * elem >= 256 B,
//                      per-tensor included): grid (P, min(C, 65535)); block (p, cy) walks
//                      channels cy, cy + gridDim.y, ...
//   grad_tiles_kernel  the same for short rows (channels_last, (N, C), small H*W): a block owns
//                      a tile of bx*VEC consecutive columns of the [outer, C*inner] matrix and a
//                      range of rows, so every load stays coalesced.
//   finalize_kernel    sums each channel's partials in a fixed order in double, times grad_scale.
// The partition (VEC, grid, block) comes from plan_backward (dqa_plan.h): a function of shape
// and dtype. kPacked false (a pointer not aligned to VEC) loads and stores element by element,
// the same elements in the same order, so the sums are bitwise the same. Each thread's float32
// sum takes at most kFlushTerms terms before it is added into a double; the products and sums
// are rounded one by one (no FMA contraction), so both variants round alike. No float atomics.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dqa_math.h"
#include "dqa_device.cuh"
#include "dqa_kernels.cuh"
#include "dqa_plan.h"
#include "dqa_walk.h"

namespace dqa_cuda {
namespace {

// grad_x of one element; returns its term dy * t(v) of the step gradient.
template <typename T>
__device__ __forceinline__ float grad_one(T dy, T x, T* dx, float s, float qmin, float qmax) {
  const float v = dqa::scaled(to_float(x), s);
  const float g = to_float(dy);
  *dx = from_float<T>(dqa::grad_input(v, g, s, qmin, qmax));
  return __fmul_rn(g, dqa::grad_step_term(v, qmin, qmax));
}

template <typename T, int VEC, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const float* __restrict__ step, T* __restrict__ dx,
                     double* __restrict__ partials, RowsWalk w, float qmin, float qmax,
                     float min_step) {
  __shared__ double smem[32];
  // Each thread's flushed double sum lives in shared memory, not in registers: the IEEE
  // division's slow path is a call, and registers live across it would spill.
  __shared__ double flushed[kThreads];
  double& total = flushed[threadIdx.x];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t c = blockIdx.y; c < w.C; c += gridDim.y) {
    const float s = load_step(step, c, min_step);
    float acc = 0.f;
    total = 0.0;
    int vectors = 0;
    walk_channel_rows<VEC>(w, tid, c, [&](int64_t e, int64_t n) {
      const Pack<T, VEC> gv = load_vec<T, VEC, kPacked>(dy + e, n);
      const Pack<T, VEC> xv = load_vec<T, VEC, kPacked>(x + e, n);
      Pack<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float term = grad_one(gv.v[j], xv.v[j], &ov.v[j], s, qmin, qmax);
        if (j < n) acc = __fadd_rn(acc, term);
      }
      store_vec<T, VEC, kPacked>(dx + e, ov, n);
      if (++vectors == kFlushTerms / VEC) {
        total += acc;
        acc = 0.f;
        vectors = 0;
      }
    });
    const double block = block_sum(total + acc, smem);
    if (threadIdx.x == 0) partials[rows_slot(c, blockIdx.x, gridDim.x)] = block;
  }
}

// Thread (tx, ty) of a bx x by block (bx*by = 256, powers of two) owns columns col..col+VEC-1
// of tile blockIdx.x (VEC divides W: a vector is all in or all out) and rows
// blockIdx.y*by + ty + k*gridDim.y*by. The by sums of a column are added in a fixed tree.
template <typename T, int VEC, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    grad_tiles_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                      const float* __restrict__ step, T* __restrict__ dx,
                      double* __restrict__ partials, int64_t outer, int64_t W, Divider by_inner,
                      int bx_log2, float qmin, float qmax, float min_step) {
  __shared__ double smem[kThreads * VEC];
  const int bx = 1 << bx_log2;
  const int by = kThreads >> bx_log2;
  const int tx = threadIdx.x & (bx - 1);
  const int ty = threadIdx.x >> bx_log2;
  const int64_t col = tile_column(blockIdx.x, bx, tx, VEC);
  const bool active = col < W;
  // This thread's VEC flushed double sums, then its row of the tree below (shared memory, not
  // registers: the IEEE division's slow path is a call, and registers live across it spill).
  const int row_len = bx * VEC;
  double* mine = smem + ty * row_len + tx * VEC;
  float s[VEC];
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s[j] = active ? load_step(step, by_inner.div(col + j), min_step) : 0.f;
    acc[j] = 0.f;
    mine[j] = 0.0;
  }
  if (active) {
    int rows = 0;
    const int64_t first = static_cast<int64_t>(blockIdx.y) * by + ty;
    walk_tile_rows(outer, W, col, first, static_cast<int64_t>(gridDim.y) * by, [&](int64_t e) {
      const Pack<T, VEC> gv = load_vec<T, VEC, kPacked>(dy + e, VEC);
      const Pack<T, VEC> xv = load_vec<T, VEC, kPacked>(x + e, VEC);
      Pack<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] = __fadd_rn(acc[j], grad_one(gv.v[j], xv.v[j], &ov.v[j], s[j], qmin, qmax));
      }
      store_vec<T, VEC, kPacked>(dx + e, ov, VEC);
      if (++rows == kFlushTerms) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          mine[j] += acc[j];
          acc[j] = 0.f;
        }
        rows = 0;
      }
    });
  }
  double total[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    total[j] = mine[j] + acc[j];
    mine[j] = total[j];
  }
  __syncthreads();
  for (int h = by >> 1; h > 0; h >>= 1) {
    if (ty < h) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        total[j] += mine[h * row_len + j];
        mine[j] = total[j];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partials[tiles_slot(blockIdx.y, W, col + j)] = total[j];
  }
}

// One warp per channel: dstep[c] = grad_scale * its partials' sum, in double, in a fixed order,
// times d effective_step / d step[c] (-1, 0 or 1: exact).
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ partials, const float* __restrict__ step,
                    float* __restrict__ dstep, FinalizeArgs a, double grad_scale,
                    float min_step) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  double sum = 0.0;
  walk_finalize(
      a, warp, static_cast<int64_t>(gridDim.x) * kWarps, lane,
      [&](int64_t slot) { sum += partials[slot]; },
      [&](int64_t c) {
        const double total = warp_sum(sum);
        if (lane == 0) {
          dstep[c] = static_cast<float>(total * grad_scale) *
                     dqa::effective_step_grad(__ldg(step + c), min_step);
        }
        sum = 0.0;
      });
}

template <typename F>
cudaError_t with_packed(bool packed, F&& f) {
  return packed ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace

size_t fake_quantize_backward_workspace_bytes(Shape shape, DType dtype, bool need_step_grad) {
  if (!need_step_grad || numel_of(shape) == 0) return 0;
  return static_cast<size_t>(plan_backward(shape, dtype, 0, 0, 0).partial_count) * sizeof(double);
}

cudaError_t launch_fake_quantize_backward(const void* grad_y, const void* x, const float* step,
                                          void* grad_x, float* grad_step, void* workspace,
                                          size_t workspace_bytes, Shape shape, DType dtype,
                                          float qmin, float qmax, float min_step,
                                          double grad_scale, int sm_count, cudaStream_t stream) {
  if (numel_of(shape) == 0) {
    if (grad_step == nullptr || shape.channels < 1) return cudaSuccess;
    return cudaMemsetAsync(grad_step, 0, static_cast<size_t>(shape.channels) * sizeof(float),
                           stream);
  }
  if (grad_step == nullptr) {
    return launch_grad_input(x, grad_y, step, grad_x, shape, dtype, qmin, qmax, min_step, sm_count,
                             stream);
  }
  const BackwardPlan plan =
      plan_backward(shape, dtype, reinterpret_cast<uintptr_t>(grad_y),
                    reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(grad_x));
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % alignof(double) != 0 ||
      workspace_bytes < static_cast<size_t>(plan.partial_count) * sizeof(double)) {
    return cudaErrorInvalidValue;
  }
  double* partials = static_cast<double*>(workspace);
  const dim3 grid(plan.grid.x, plan.grid.y, 1);
  const cudaError_t err = with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vec<T>(plan.vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      // Width 1 is always aligned: one variant suffices.
      return with_packed(VEC == 1 || plan.packed, [&](auto packed_c) {
        constexpr bool kPacked = VEC == 1 || decltype(packed_c)::value;
        const T* dy = static_cast<const T*>(grad_y);
        const T* xt = static_cast<const T*>(x);
        T* dx = static_cast<T*>(grad_x);
        if (plan.tiled) {
          grad_tiles_kernel<T, VEC, kPacked><<<grid, plan.block, 0, stream>>>(
              dy, xt, step, dx, partials, shape.outer, shape.channels * shape.inner,
              make_divider(shape.inner), plan.bx_log2, qmin, qmax, min_step);
        } else {
          grad_rows_kernel<T, VEC, kPacked><<<grid, plan.block, 0, stream>>>(
              dy, xt, step, dx, partials, plan.rows, qmin, qmax, min_step);
        }
        return cudaGetLastError();
      });
    });
  });
  if (err != cudaSuccess) return err;
  finalize_kernel<<<plan.finalize_grid.x, kThreads, 0, stream>>>(
      partials, step, grad_step, plan.finalize, grad_scale, min_step);
  return cudaGetLastError();
}

}  // namespace dqa_cuda
