// Device helpers shared by dqa_ext's kernel units: storage <-> float, vector loads and stores
// (packed or element by element, same elements in the same order), the step in use, warp and
// block sums, and the elementwise launcher the backward reuses when no step gradient is wanted.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dqa_math.h"
#include "dqa_divide.h"
#include "dqa_plan.h"

namespace dqa_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
// Round to nearest even, as c10::Half and c10::BFloat16 do on the CPU.
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one aligned load or store (128-bit when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements [0, n) of the vector at p (n >= N: all of it; the rest of a partial one is zero).
// kPacked: one aligned vector access when the vector is whole; else element by element.
template <typename T, int N, bool kPacked>
__device__ __forceinline__ Pack<T, N> load_vec(const T* p, int64_t n) {
  if (kPacked && n >= N) return *reinterpret_cast<const Pack<T, N>*>(p);
  Pack<T, N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = j < n ? p[j] : from_float<T>(0.f);
  return r;
}
template <typename T, int N, bool kPacked>
__device__ __forceinline__ void store_vec(T* p, const Pack<T, N>& v, int64_t n) {
  if (kPacked && n >= N) {
    *reinterpret_cast<Pack<T, N>*>(p) = v;
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j < n) p[j] = v.v[j];
  }
}

// The step in use for channel c (max(|step|, min_step) for a learned one), NaN when it is not
// finite and > 0.
__device__ __forceinline__ float load_step(const float* __restrict__ step, int64_t c,
                                           float min_step) {
  return dqa::checked_step(dqa::effective_step(__ldg(step + c), min_step));
}

// v[i] = x[i] / div_of(i).s for i < N, bitwise the IEEE quotient of dqa::scaled: the fast
// sequence of dqa_divide.h when every x[i] is in its range, else the IEEE division for all N
// (infinities, NaN, subnormals, huge ratios, a bad step: rare, and out of the hot path).
template <int N, typename DivOf>
__device__ __forceinline__ void quotients(const float (&x)[N], float (&v)[N], DivOf div_of) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = fast_quotient(x[i], div_of(i));
    ok = ok & fast(x[i], div_of(i));
  }
  if (__builtin_expect(!ok, 0)) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = dqa::scaled(x[i], div_of(i).s);
  }
}

// blockIdx.x and .y read where they are used: ptxas would otherwise keep the value read at the
// kernel's start alive across the main loop (and spill it there).
__device__ __forceinline__ unsigned fresh_block_x() {
  unsigned v;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  return v;
}
__device__ __forceinline__ unsigned fresh_block_y() {
  unsigned v;
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(v));
  return v;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024) in a fixed tree; valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by the previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : 0.0;
    v = warp_sum(v);
  }
  return v;
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(Tag<float>{});
    case DType::kFloat16:
      return f(Tag<__half>{});
    case DType::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, vec>) for the vec widths that fit in kMaxVecBytes of T.
template <typename T, typename F>
cudaError_t with_vec(int vec, F&& f) {
  switch (vec) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      if constexpr (4 * sizeof(T) <= kMaxVecBytes) return f(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (8 * sizeof(T) <= kMaxVecBytes) return f(std::integral_constant<int, 8>{});
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

// grad_x alone (dqa_elementwise.cu): the backward without a step gradient.
cudaError_t launch_grad_input(const void* x, const void* grad_y, const float* step, void* grad_x,
                              Shape shape, DType dtype, float qmin, float qmax, float min_step,
                              int sm_count, cudaStream_t stream);

}  // namespace dqa_cuda
