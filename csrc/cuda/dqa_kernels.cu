// dqa_ext's CUDA kernels. Per-element math comes from dqa_math.h (V = float), shared with the
// CPU kernels, so y and grad_x are bitwise equal to the CPU path. No torch headers: CI compiles
// this file alone with nvcc (scripts/check_cuda_kernels.sh).
//
// Kernels (x seen as [outer, C, inner]):
//   elementwise_kernel  forward, and grad_x alone when no step gradient is wanted. Grid-stride
//                       over VEC-wide vectors of the flat tensor (one resident wave of 256-thread
//                       blocks); the channel of each element is tracked incrementally, so there
//                       is no division in the loop.
//   grad_rows_kernel    grad_x + per-channel partial sums for long rows (inner * elem >= 256 B,
//                       per-tensor included): grid (P, C); block (p, c) walks channel c's rows.
// VEC is the widest of 16/8/4/2 bytes (else 1 element) that the pointers' alignment and the
// layout allow; the last vector of a tensor may be partial.
//   grad_tiles_kernel   the same for short rows (channels_last, (N, C), small H*W): a block owns
//                       a tile of bx*VEC consecutive columns of the [outer, C*inner] matrix and a
//                       range of rows, so every load stays coalesced.
//   finalize_kernel     sums each channel's partials in a fixed order in double, times grad_scale.
// No float atomics: the partials and their sum have a fixed order for a given grid, and the grid
// depends only on the sizes, the pointers' alignment and the multiprocessor count.
#include "dqa_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../dqa_math.h"

namespace dqa_cuda {
namespace {

constexpr int kThreads = 256;     // threads per block (the row kernel may use fewer)
// Blocks of 256 per multiprocessor for the reduction kernels: all resident at once (they use
// <= 64 registers), so no block waits for a second wave, and the grid (hence the order of the
// partial sums) depends only on the sizes and the multiprocessor count.
constexpr int kReduceBlocksPerSm = 4;
constexpr int kMaxDevices = 64;
constexpr int kMaxVecBytes = 16;  // one 128-bit load or store per vector
// Rows shorter than this many bytes go to the tiled backward: the row kernel would read them
// as short strided segments.
constexpr int64_t kTiledMaxRowBytes = 256;
constexpr int kMaxGridY = 65535;

// ---- storage <-> float ----

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

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// The last, partial vector of a tensor: its first n < N elements, the rest zero.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_head(const T* p, int64_t n) {
  Pack<T, N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = j < n ? p[j] : from_float<T>(0.f);
  return r;
}
template <typename T, int N>
__device__ __forceinline__ void store_head(T* p, const Pack<T, N>& v, int64_t n) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j < n) p[j] = v.v[j];
  }
}

__device__ __forceinline__ float load_step(const float* __restrict__ step, int64_t c) {
  return dqa::checked_step(__ldg(step + c));
}

__device__ __forceinline__ float forward_value(float x, float s, float qmin, float qmax) {
  return dqa::quantize(dqa::scaled(x, s), s, qmin, qmax);
}

// ---- index arithmetic without division instructions ----

// n / d and n % d for 0 <= n < 2**64 by a multiply-high and shifts (Granlund & Montgomery
// 1994, fig. 4.1), with the magic number computed on the host. A 64-bit `/` or `%` in a kernel
// is a subroutine call in SASS, and ptxas spills what is live across a call.
struct Divider {
  uint64_t d;
  uint64_t m;
  unsigned sh1;
  unsigned sh2;
  __device__ __forceinline__ int64_t div(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
    const uint64_t t = __umul64hi(m, u);
    return static_cast<int64_t>((t + ((u - t) >> sh1)) >> sh2);
  }
};

// d >= 1. m = floor(2**64 * (2**l - d) / d) + 1 with l = ceil(log2(d)), by long division.
Divider make_divider(int64_t divisor) {
  const uint64_t d = static_cast<uint64_t>(divisor < 1 ? 1 : divisor);
  unsigned l = 0;
  while (l < 63 && (uint64_t{1} << l) < d) ++l;
  uint64_t rem = (uint64_t{1} << l) - d;  // < d: the high word of the dividend
  uint64_t q = 0;
  for (int bit = 0; bit < 64; ++bit) {
    const bool carry = (rem >> 63) != 0;
    rem <<= 1;
    q <<= 1;
    if (carry || rem >= d) {
      rem -= d;
      q |= 1;
    }
  }
  return {d, q + 1, l < 1 ? l : 1u, l > 1 ? l - 1 : 0u};
}

// Position of a flat element index e: i = e % inner, c = (e / inner) % C.
struct Cursor {
  int64_t i;
  int64_t c;
};

__device__ __forceinline__ Cursor cursor_at(int64_t e, int64_t inner, int64_t C,
                                            const Divider& by_inner, const Divider& by_c) {
  const int64_t row = by_inner.div(e);
  return {e - row * inner, row - by_c.div(row) * C};
}

// A fixed advance of g elements, split as g % inner and (g / inner) % C (computed on the host).
Cursor stride_of(int64_t g, int64_t inner, int64_t C) { return {g % inner, (g / inner) % C}; }

__device__ __forceinline__ void advance(Cursor& p, Cursor d, int64_t inner, int64_t C) {
  p.i += d.i;
  int64_t carry = 0;
  if (p.i >= inner) {
    p.i -= inner;
    carry = 1;
  }
  p.c += d.c + carry;  // < 2C, so one wrap is enough
  if (p.c >= C) p.c -= C;
}

// ---- reductions (fixed shapes: deterministic) ----

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by the previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : 0.f;
    v = warp_sum(v);
  }
  return v;
}

// ---- kernels ----

// kGrad false: out = y from x. kGrad true: out = grad_x from x and dy.
// The last vector may be partial (numel % VEC elements): it is loaded and stored element-wise,
// and its channel comes from the same cursor, so the loop holds no division. (A 64-bit
// division, like the IEEE float division's rare slow path, is a subroutine call in SASS, and
// every value live across a call costs a register or a spill.)
template <typename T, int VEC, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                       const float* __restrict__ step, T* __restrict__ out, int64_t numel,
                       int64_t C, int64_t inner, Divider by_inner, Divider by_c, Cursor d,
                       float qmin, float qmax) {
  // d: the grid stride gridDim.x * blockDim.x * VEC as a cursor advance.
  const int64_t nvec = (numel + VEC - 1) / VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  Cursor p = cursor_at(tid * VEC, inner, C, by_inner, by_c);
  for (int64_t v = tid; v < nvec; v += nthreads) {
    const int64_t e = v * VEC;
    const int64_t n = numel - e;  // >= VEC except in the last vector
    Pack<T, VEC> xv;
    Pack<T, VEC> gv;
    if (n >= VEC) {
      xv = load_pack<T, VEC>(x + e);
      if constexpr (kGrad) gv = load_pack<T, VEC>(dy + e);
    } else {
      xv = load_head<T, VEC>(x + e, n);
      if constexpr (kGrad) gv = load_head<T, VEC>(dy + e, n);
    }
    Pack<T, VEC> ov;
    int64_t i = p.i;
    int64_t c = p.c;
    float s = load_step(step, c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j > 0 && ++i == inner) {  // the vector crosses into the next row
        i = 0;
        if (++c == C) c = 0;
        s = load_step(step, c);
      }
      const float xf = to_float(xv.v[j]);
      float r;
      if constexpr (kGrad) {
        r = dqa::grad_input(dqa::scaled(xf, s), to_float(gv.v[j]), s, qmin, qmax);
      } else {
        r = forward_value(xf, s, qmin, qmax);
      }
      ov.v[j] = from_float<T>(r);
    }
    if (n >= VEC) {
      store_pack<T, VEC>(out + e, ov);
    } else {
      store_head<T, VEC>(out + e, ov, n);
    }
    advance(p, d, inner, C);
  }
}

// grad_x of one element; returns its term dy * t(v) of the step gradient.
template <typename T>
__device__ __forceinline__ float grad_one(T dy, T x, T* dx, float s, float qmin, float qmax) {
  const float v = dqa::scaled(to_float(x), s);
  const float g = to_float(dy);
  *dx = from_float<T>(dqa::grad_input(v, g, s, qmin, qmax));
  return g * dqa::grad_step_term(v, qmin, qmax);
}

// Long rows. Grid (P, min(C, 65535)); block (p, cy) handles channels cy, cy + gridDim.y, ...
// and, of each, the VEC-vectors p*T + t + k*P*T of its outer*inner elements. VEC divides
// inner, or C == 1 and the channel is the whole contiguous tensor, whose last vector may be
// partial. partials[c * P + p].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const float* __restrict__ step, T* __restrict__ dx,
                     float* __restrict__ partials, int64_t outer, int64_t C, int64_t inner,
                     Divider by_inner, int64_t gi, int64_t go, float qmin, float qmax) {
  // gi, go: the grid stride gridDim.x * blockDim.x * VEC as % inner and / inner.
  __shared__ float smem[32];
  const int64_t per_channel = outer * inner;
  const int64_t nvec = (per_channel + VEC - 1) / VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t o0 = by_inner.div(tid * VEC);
  const int64_t i0 = tid * VEC - o0 * inner;
  const int64_t row_stride = C * inner;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const float s = load_step(step, c);
    const int64_t base = c * inner;
    float acc = 0.f;
    int64_t o = o0;
    int64_t i = i0;
    for (int64_t v = tid; v < nvec; v += nthreads) {
      const int64_t e = o * row_stride + base + i;
      const int64_t n = per_channel - v * VEC;  // >= VEC except in a partial last vector
      Pack<T, VEC> gv;
      Pack<T, VEC> xv;
      if (n >= VEC) {
        gv = load_pack<T, VEC>(dy + e);
        xv = load_pack<T, VEC>(x + e);
      } else {
        gv = load_head<T, VEC>(dy + e, n);
        xv = load_head<T, VEC>(x + e, n);
      }
      Pack<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float term = grad_one(gv.v[j], xv.v[j], &ov.v[j], s, qmin, qmax);
        if (j < n) acc += term;
      }
      if (n >= VEC) {
        store_pack<T, VEC>(dx + e, ov);
      } else {
        store_head<T, VEC>(dx + e, ov, n);
      }
      i += gi;
      o += go;
      if (i >= inner) {
        i -= inner;
        ++o;
      }
    }
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) partials[c * gridDim.x + blockIdx.x] = acc;
  }
}

// Short rows: x as a [outer, W = C*inner] matrix. A block is bx x by threads (bx*by = 256, both
// powers of two): thread (tx, ty) owns columns col..col+VEC-1 of tile blockIdx.x and rows
// blockIdx.y*by + ty + k*gridDim.y*by. The by partial sums of a column are added in a fixed
// tree in shared memory; partials[blockIdx.y * W + column].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    grad_tiles_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                      const float* __restrict__ step, T* __restrict__ dx,
                      float* __restrict__ partials, int64_t outer, int64_t C, int64_t inner,
                      Divider by_inner, int bx_log2, float qmin, float qmax) {
  __shared__ float smem[kThreads * VEC];
  const int bx = 1 << bx_log2;
  const int by = kThreads >> bx_log2;
  const int tx = threadIdx.x & (bx - 1);
  const int ty = threadIdx.x >> bx_log2;
  const int64_t W = C * inner;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * bx + tx) * VEC;
  const bool active = col < W;  // VEC divides W: a vector is all in or all out
  float s[VEC];
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s[j] = active ? load_step(step, by_inner.div(col + j)) : 0.f;
    acc[j] = 0.f;
  }
  if (active) {
    const int64_t row_step = static_cast<int64_t>(gridDim.y) * by;
    for (int64_t o = static_cast<int64_t>(blockIdx.y) * by + ty; o < outer; o += row_step) {
      const int64_t e = o * W + col;
      const Pack<T, VEC> gv = load_pack<T, VEC>(dy + e);
      const Pack<T, VEC> xv = load_pack<T, VEC>(x + e);
      Pack<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += grad_one(gv.v[j], xv.v[j], &ov.v[j], s[j], qmin, qmax);
      }
      store_pack<T, VEC>(dx + e, ov);
    }
  }
  const int row_len = bx * VEC;
  float* mine = smem + ty * row_len + tx * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) mine[j] = acc[j];
  __syncthreads();
  for (int h = by >> 1; h > 0; h >>= 1) {
    if (ty < h) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += mine[h * row_len + j];
        mine[j] = acc[j];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partials[blockIdx.y * W + col + j] = acc[j];
  }
}

// One warp per channel: dstep[c] = grad_scale * sum over m < count of
// partials[c * c_stride + (m / chunk) * chunk_stride + m % chunk], in double, in a fixed order.
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const float* __restrict__ partials, float* __restrict__ dstep, int64_t C,
                    int64_t count, int64_t chunk, Divider by_chunk, int64_t chunk_stride,
                    int64_t c_stride, double grad_scale) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); c < C;
       c += static_cast<int64_t>(gridDim.x) * kWarps) {
    double sum = 0.0;
    for (int64_t m = lane; m < count; m += 32) {
      const int64_t k = by_chunk.div(m);
      sum += partials[c * c_stride + k * chunk_stride + (m - k * chunk)];
    }
    sum = warp_sum(sum);
    if (lane == 0) dstep[c] = static_cast<float>(sum * grad_scale);
  }
}

// ---- host side ----

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

int elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Widest vector (<= 16 bytes) that every pointer is aligned to and that divides `multiple_of`.
int vec_width(DType dtype, const void* a, const void* b, const void* c, int64_t multiple_of) {
  const int es = elem_size(dtype);
  for (int vec = kMaxVecBytes / es; vec > 1; vec >>= 1) {
    const int64_t bytes = static_cast<int64_t>(vec) * es;
    if (multiple_of % vec == 0 && aligned(a, bytes) && aligned(b, bytes) && aligned(c, bytes)) {
      return vec;
    }
  }
  return 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}
int log2_of(int64_t pow2) {
  int l = 0;
  while ((int64_t{1} << l) < pow2) ++l;
  return l;
}
int64_t numel_of(Shape s) { return s.outer * s.channels * s.inner; }

// Blocks of Kernel (at kThreads threads) that fit on one multiprocessor of the current device,
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

// Blocks of a grid-stride elementwise launch: one full wave at most, so that no block waits.
unsigned elementwise_blocks(int64_t numel, int vec, int sm_count, int per_sm) {
  const int64_t want = ceil_div(ceil_div(numel, vec), kThreads);
  return static_cast<unsigned>(clamp64(want, 1, int64_t{sm_count} * per_sm));
}

template <bool kGrad>
cudaError_t launch_elementwise(const void* x, const void* dy, const float* step, void* out,
                               Shape shape, DType dtype, float qmin, float qmax, int sm_count,
                               cudaStream_t stream) {
  const int64_t numel = numel_of(shape);
  const int vec = vec_width(dtype, x, dy, out, 1);
  const Divider by_inner = make_divider(shape.inner);
  const Divider by_c = make_divider(shape.channels);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vec<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      constexpr auto kernel = elementwise_kernel<T, VEC, kGrad>;
      const unsigned blocks = elementwise_blocks(numel, VEC, sm_count, resident_blocks<kernel>());
      const Cursor d = stride_of(int64_t{blocks} * kThreads * VEC, shape.inner, shape.channels);
      kernel<<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(dy), step, static_cast<T*>(out), numel,
          shape.channels, shape.inner, by_inner, by_c, d, qmin, qmax);
      return cudaGetLastError();
    });
  });
}

// How the backward with a step gradient is launched; a pure function of its arguments, so the
// workspace query and the launch agree.
struct BackwardPlan {
  bool tiled;
  int vec;
  dim3 grid;
  int block;
  int bx_log2;             // tiled only
  int64_t partial_count;   // floats of workspace
  int64_t count;           // finalize: partials per channel
  int64_t chunk;
  int64_t chunk_stride;
  int64_t c_stride;
};

BackwardPlan plan_backward(const void* dy, const void* x, const void* dx, Shape shape,
                           DType dtype, int sm_count) {
  BackwardPlan plan{};
  const int64_t C = shape.channels;
  const int64_t inner = shape.inner;
  const int64_t target_blocks = int64_t{sm_count} * kReduceBlocksPerSm;  // of 256 threads
  plan.tiled = inner * elem_size(dtype) < kTiledMaxRowBytes;
  if (plan.tiled) {
    const int64_t W = C * inner;
    plan.vec = vec_width(dtype, dy, x, dx, W);
    // Wide enough to cover the columns, narrow enough to leave several rows per block when
    // there are several rows.
    const int64_t min_by = next_pow2(clamp64(shape.outer, 1, 8));
    const int64_t bx = clamp64(next_pow2(ceil_div(W, plan.vec)), 1, kThreads / min_by);
    const int64_t by = kThreads / bx;
    const int64_t tiles = ceil_div(W, bx * plan.vec);
    const int64_t max_gy = clamp64(ceil_div(shape.outer, by), 1, kMaxGridY);
    const int64_t gy = clamp64(ceil_div(target_blocks, tiles), 1, max_gy);
    plan.bx_log2 = log2_of(bx);
    plan.block = kThreads;
    plan.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(gy), 1);
    plan.partial_count = gy * W;
    plan.count = gy * inner;
    plan.chunk = inner;
    plan.chunk_stride = W;
    plan.c_stride = inner;
  } else {
    plan.vec = vec_width(dtype, dy, x, dx, C == 1 ? 1 : inner);
    const int64_t nvec = ceil_div(shape.outer * inner, plan.vec);
    const int64_t block = clamp64(next_pow2(nvec), 32, kThreads);
    const int64_t p = clamp64(ceil_div(target_blocks * (kThreads / block), C), 1,
                              ceil_div(nvec, block));
    plan.block = static_cast<int>(block);
    plan.grid = dim3(static_cast<unsigned>(p), static_cast<unsigned>(clamp64(C, 1, kMaxGridY)), 1);
    plan.partial_count = C * p;
    plan.count = p;
    plan.chunk = p;
    plan.chunk_stride = 0;
    plan.c_stride = p;
  }
  return plan;
}

}  // namespace

cudaError_t launch_fake_quantize(const void* x, const float* step, void* y, Shape shape,
                                 DType dtype, float qmin, float qmax, int sm_count,
                                 cudaStream_t stream) {
  if (numel_of(shape) == 0) return cudaSuccess;
  if (sm_count < 1) sm_count = 1;
  return launch_elementwise<false>(x, nullptr, step, y, shape, dtype, qmin, qmax, sm_count,
                                   stream);
}

size_t fake_quantize_backward_workspace_bytes(const void* grad_y, const void* x,
                                              const void* grad_x, Shape shape, DType dtype,
                                              int sm_count, bool need_step_grad) {
  if (!need_step_grad || numel_of(shape) == 0) return 0;
  if (sm_count < 1) sm_count = 1;
  const BackwardPlan plan = plan_backward(grad_y, x, grad_x, shape, dtype, sm_count);
  return static_cast<size_t>(plan.partial_count) * sizeof(float);
}

cudaError_t launch_fake_quantize_backward(const void* grad_y, const void* x, const float* step,
                                          void* grad_x, float* grad_step, void* workspace,
                                          size_t workspace_bytes, Shape shape, DType dtype,
                                          float qmin, float qmax, double grad_scale,
                                          int sm_count, cudaStream_t stream) {
  if (numel_of(shape) == 0) return cudaSuccess;
  if (sm_count < 1) sm_count = 1;
  if (grad_step == nullptr) {
    return launch_elementwise<true>(x, grad_y, step, grad_x, shape, dtype, qmin, qmax, sm_count,
                                    stream);
  }
  const BackwardPlan plan = plan_backward(grad_y, x, grad_x, shape, dtype, sm_count);
  if (workspace == nullptr ||
      workspace_bytes < static_cast<size_t>(plan.partial_count) * sizeof(float)) {
    return cudaErrorInvalidValue;
  }
  float* partials = static_cast<float*>(workspace);
  const Divider by_inner = make_divider(shape.inner);
  // The row kernel's grid stride in elements, split by inner.
  const int64_t g = int64_t{plan.grid.x} * plan.block * plan.vec;
  const cudaError_t err = with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return with_vec<T>(plan.vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const T* dy = static_cast<const T*>(grad_y);
      const T* xt = static_cast<const T*>(x);
      T* dx = static_cast<T*>(grad_x);
      if (plan.tiled) {
        grad_tiles_kernel<T, VEC><<<plan.grid, plan.block, 0, stream>>>(
            dy, xt, step, dx, partials, shape.outer, shape.channels, shape.inner, by_inner,
            plan.bx_log2, qmin, qmax);
      } else {
        grad_rows_kernel<T, VEC><<<plan.grid, plan.block, 0, stream>>>(
            dy, xt, step, dx, partials, shape.outer, shape.channels, shape.inner, by_inner,
            g % shape.inner, g / shape.inner, qmin, qmax);
      }
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  constexpr int64_t kWarps = kThreads / 32;
  const unsigned blocks = static_cast<unsigned>(
      clamp64(ceil_div(shape.channels, kWarps), 1, int64_t{sm_count} * kReduceBlocksPerSm));
  finalize_kernel<<<blocks, kThreads, 0, stream>>>(partials, grad_step, shape.channels,
                                                   plan.count, plan.chunk,
                                                   make_divider(plan.chunk), plan.chunk_stride,
                                                   plan.c_stride, grad_scale);
  return cudaGetLastError();
}

}  // namespace dqa_cuda
