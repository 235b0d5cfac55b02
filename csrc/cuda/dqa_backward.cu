// The backward kernels of dqa_ext with the step gradient (x seen as [outer, C, inner]):
//   grad_rows_kernel   grad_x + per-channel partial sums for long rows (inner * elem >= 256 B,
//                      per-tensor included): grid (P, min(C, 65535)); block (p, cy) walks
//                      channels cy, cy + gridDim.y, ...
//   grad_tiles_kernel  the same for short rows (channels_last, (N, C), small H*W): a block owns
//                      a tile of bx*VEC consecutive columns of the [outer, C*inner] matrix and a
//                      range of rows, so every load stays coalesced.
//   finalize_kernel    sums each channel's partials in the fixed order of dqa_walk.h, times
//                      grad_scale: only when the main kernel could not do it itself.
// Fused finalize: after writing its partials a block arrives at its group's counter; the last
// to arrive sums the group, the last group the channel, and writes dstep (dqa_walk.h's
// fused_finalize, which the emulation runs too). The counters (g_counters) start at zero and
// wrap back to zero at each full set of arrivals (atomicInc), so every launch leaves them there.
// The partition (VEC, grid, block) comes from plan_backward (dqa_plan.h): a function of shape
// and dtype. kPacked false (a pointer not aligned to VEC) loads and stores element by element,
// the same elements in the same order, so the sums are bitwise the same. Each thread's float32
// sum takes at most kFlushTerms terms before it is added into a double; the products and sums
// are rounded one by one (no FMA contraction), so both variants round alike. No float atomics.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dqa_math.h"
#include "dqa_counters.h"
#include "dqa_device.cuh"
#include "dqa_divide.h"
#include "dqa_kernels.cuh"
#include "dqa_plan.h"
#include "dqa_walk.h"

namespace dqa_cuda {

// Arrival counters of the fused finalize: kCounterSlots slots of kMaxCounters (dqa_counters.h).
// Zero when the module loads; the last arrival of each full set wraps its counter back to zero.
__device__ unsigned int g_counters[kCounterSlots * kMaxCounters];

namespace {

// The tiled backward within 48 registers (65536 / (256 * 5) = 51, allocated in steps of 8):
// kTiledBackwardMaxVec columns per thread, kTiledRowsInFlight rows in flight (dqa_plan.h).
constexpr int kTiledBackwardMinBlocks = 5;

// NV vectors (two in flight, or one) at e[0 .. NV): whole, or n < VEC elements when NV is 1.
// Writes grad_x and calls add(i, dy * t(v)) for element i = k * VEC + j (vector k, element j:
// in that order; each add rounds on its own, no FMA contraction). Element j's divisor is
// div_of(j); the quotients are the IEEE ones (dqa_device.cuh's quotients).
template <typename T, int VEC, int NV, bool kPacked, typename DivOf, typename Add>
__device__ __forceinline__ void grad_vectors(const T* __restrict__ dy, const T* __restrict__ x,
                                             T* __restrict__ dx, const int64_t (&e)[NV], int64_t n,
                                             DivOf div_of, float qmin, float qmax, Add add) {
  Pack<T, VEC> gv[NV];
  Pack<T, VEC> xv[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    gv[k] = load_vec<T, VEC, kPacked>(dy + e[k], n);
    xv[k] = load_vec<T, VEC, kPacked>(x + e[k], n);
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
      const float g = to_float(gv[k].v[j]);
      ov.v[j] = from_float<T>(dqa::grad_input(v[j], g, div_of(j).s, qmin, qmax));
      add(k * VEC + j, __fmul_rn(g, dqa::grad_step_term(v[j], qmin, qmax)));
    }
    store_vec<T, VEC, kPacked>(dx + e[k], ov, n);
  }
}

// dstep[c] from the channel's total, times d effective_step / d step[c] (-1, 0 or 1: exact).
__device__ __forceinline__ void write_dstep(float* __restrict__ dstep, const float* __restrict__ step,
                                            int64_t c, double total, double grad_scale,
                                            float min_step) {
  dstep[c] = static_cast<float>(total * grad_scale) *
             dqa::effective_step_grad(__ldg(step + c), min_step);
}

// The fused finalize's platform (dqa_walk.h's fused_finalize): every thread of the block runs it.
// Arrival, as cooperative groups' grid barrier: the block's writes (partials or level-one sums,
// by any of its threads) happen before __syncthreads; thread 0 then fences (release, cumulative
// over what the barrier ordered before it) and increments the counter; if it arrived last it
// fences again (acquire: the other blocks' writes, released before their increments, are now
// visible) before __syncthreads_or hands the result to every thread. One fence per block and
// arrival; the loads after it bypass L1 (__ldcg).
struct KernelFinalize {
  using Value = double;
  unsigned int* counters;  // this launch's slot
  double* partials;
  const float* step;
  float* dstep;
  double grad_scale;
  float min_step;

  __device__ __forceinline__ bool arrive(int64_t counter, unsigned limit) const {
    __syncthreads();
    bool last = false;
    if (threadIdx.x == 0) {
      __threadfence();
      last = atomicInc(counters + counter, limit) == limit;
      if (last) __threadfence();
    }
    return __syncthreads_or(last);
  }
  template <typename Body>
  __device__ __forceinline__ void warps(Body body) const {
    body(static_cast<int>(threadIdx.x >> 5), static_cast<int>(blockDim.x >> 5));
  }
  template <typename SlotOf>
  __device__ __forceinline__ double load(SlotOf slot_of) const {
    const int64_t slot = slot_of(static_cast<int>(threadIdx.x & 31));
    return slot >= 0 ? __ldcg(partials + slot) : 0.0;
  }
  __device__ __forceinline__ double sum(double v) const { return warp_sum(v); }
  __device__ __forceinline__ double first(double v) const { return (threadIdx.x & 31) == 0 ? v : 0.0; }
  __device__ __forceinline__ double zero() const { return 0.0; }
  __device__ __forceinline__ double add(double a, double b) const { return a + b; }
  __device__ __forceinline__ void store_first(int64_t slot, double v) const {
    if ((threadIdx.x & 31) == 0) partials[slot] = v;
  }
  __device__ __forceinline__ void write_dstep(int64_t c, double total) const {
    if ((threadIdx.x & 31) == 0) dqa_cuda::write_dstep(dstep, step, c, total, grad_scale, min_step);
  }
};

template <typename T, int VEC, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const float* __restrict__ step, T* __restrict__ dx,
                     double* __restrict__ partials, float* __restrict__ dstep, RowsWalk w,
                     ReduceArgs r, int slot, float qmin, float qmax, float min_step,
                     double grad_scale) {
  __shared__ double smem[32];
  __shared__ double flushed_sums[kThreads];
  for (int64_t c = blockIdx.y; c < w.C; c += gridDim.y) {
    const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const Divisor d = make_divisor(load_step(step, c, min_step));
    const auto div_of = [d](int) { return d; };
    // This thread's float32 sum, added into its double after every kFlushTerms terms at most.
    // The double stays in shared memory (volatile: not promoted to a register that would live,
    // and spill, across the main loop).
    float acc = 0.f;
    volatile double& flushed = flushed_sums[threadIdx.x];
    flushed = 0.0;
    walk_channel_rows<VEC, kRowsPairsPerFlush<VEC>>(
        w, tid, c,
        [&](int64_t e0, int64_t e1) {
          const int64_t e[2] = {e0, e1};
          grad_vectors<T, VEC, 2, kPacked>(dy, x, dx, e, VEC, div_of, qmin, qmax,
                                           [&](int, float t) { acc = __fadd_rn(acc, t); });
        },
        [&](int64_t e0, int64_t n) {
          const int64_t e[1] = {e0};
          grad_vectors<T, VEC, 1, kPacked>(dy, x, dx, e, n, div_of, qmin, qmax, [&](int j, float t) {
            if (j < n) acc = __fadd_rn(acc, t);
          });
        },
        [&] {
          flushed = flushed + acc;
          acc = 0.f;
        });
    const double block = block_sum(flushed + acc, smem);
    if (r.count == 1) {  // this block is the channel's only one: its sum is the total
      if (threadIdx.x == 0) write_dstep(dstep, step, c, 0.0 + block, grad_scale, min_step);
      continue;
    }
    const unsigned p = fresh_block_x();
    if (threadIdx.x == 0) partials[rows_slot(c, p, gridDim.x)] = block;
    if (slot >= 0) {
      KernelFinalize f{g_counters + int64_t{slot} * kMaxCounters, partials, step, dstep, grad_scale,
                       min_step};
      fused_finalize(f, r, c, p, 1, [c](int) { return c; });
    }
  }
}

// Thread (tx, ty) of a bx x by block (bx*by = 256, powers of two) owns columns col..col+VEC-1
// of tile blockIdx.x (VEC divides W: a vector is all in or all out) and rows
// blockIdx.y*by + ty + k*gridDim.y*by. The by sums of a column are added in a fixed tree.
template <typename T, int VEC, bool kPacked>
__global__ void __launch_bounds__(kThreads, kTiledBackwardMinBlocks)
    grad_tiles_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                      const float* __restrict__ step, T* __restrict__ dx,
                      double* __restrict__ partials, float* __restrict__ dstep, TilesWalk w,
                      Divider by_inner, int bx_log2, ReduceArgs r, int slot,
                      float qmin, float qmax, float min_step, double grad_scale) {
  __shared__ double smem[kThreads * VEC];
  const int bx = 1 << bx_log2;
  const int by = kThreads >> bx_log2;
  const int tx = threadIdx.x & (bx - 1);
  const int ty = threadIdx.x >> bx_log2;
  const int64_t col = tile_column(blockIdx.x, bx, tx, VEC);
  const int64_t W = w.W;
  const bool active = col < W;
  // This thread's VEC flushed double sums, then its row of the tree below (shared memory, not
  // registers: the IEEE division's slow path is a call, and registers live across it spill).
  const int row_len = bx * VEC;
  volatile double* mine = smem + ty * row_len + tx * VEC;
  float s[VEC];
  float rcp[VEC];
  float hi = INFINITY;  // one range for the thread: the fast division only if every step allows it
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const Divisor d = make_divisor(active ? load_step(step, by_inner.div(col + j), min_step) : 1.f);
    s[j] = d.s;
    rcp[j] = d.r;
    hi = fminf(hi, d.hi);
    acc[j] = 0.f;
    mine[j] = 0.0;
  }
  const auto div_of = [&](int j) { return Divisor{s[j], rcp[j], hi}; };
  if (active) {
    const auto add = [&](int i, float t) { acc[i % VEC] = __fadd_rn(acc[i % VEC], t); };
    walk_tile_rows<kTiledRowsInFlight, kTilesGroupsPerFlush>(
        w, col, static_cast<int64_t>(blockIdx.y) * by + ty,
        [&](int64_t e0, int64_t de) {
          int64_t e[kTiledRowsInFlight];
#pragma unroll
          for (int k = 0; k < kTiledRowsInFlight; ++k) e[k] = e0 + k * de;
          grad_vectors<T, VEC, kTiledRowsInFlight, kPacked>(dy, x, dx, e, VEC, div_of, qmin, qmax,
                                                            add);
        },
        [&](int64_t e0) {
          const int64_t e[1] = {e0};
          grad_vectors<T, VEC, 1, kPacked>(dy, x, dx, e, VEC, div_of, qmin, qmax, add);
        },
        [&] {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            mine[j] = mine[j] + acc[j];
            acc[j] = 0.f;
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
  if (r.count == 1) {  // one row block and inner == 1: the column's sum is its channel's total
    if (ty == 0 && active) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) write_dstep(dstep, step, col + j, 0.0 + total[j], grad_scale, min_step);
    }
    return;
  }
  const unsigned tile = fresh_block_x();
  const unsigned row_block = fresh_block_y();
  if (ty == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partials[tiles_slot(row_block, W, col + j)] = total[j];
  }
  if (slot >= 0) {
    // Domain: this tile; its channels are its columns (inner == 1).
    const int64_t first = tile_column(tile, bx, 0, VEC);
    const int64_t width = W - first < row_len ? W - first : row_len;
    KernelFinalize f{g_counters + int64_t{slot} * kMaxCounters, partials, step, dstep, grad_scale,
                     min_step};
    fused_finalize(f, r, tile, row_block, static_cast<int>(width), [first](int k) { return first + k; });
  }
}

// The separate finalize, when the main kernel could not: block b takes channels b, b + gridDim.x,
// ...; for each round of 32 groups, warp w computes L_g of the groups 32h + w, 32h + w + 8, ...
// (lane l the term m = 32g + l), then warp 0 adds T(L_32h .. L_32h+31) to the total.
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ partials, const float* __restrict__ step,
                    float* __restrict__ dstep, ReduceArgs r, double grad_scale, float min_step) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kPerWarp = kGroup / kWarps;
  __shared__ double level[kGroup];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t c = blockIdx.x; c < r.C; c += gridDim.x) {
    double total = 0.0;
    for (int64_t h = 0; h * kGroup < r.groups; ++h) {
      double v[kPerWarp];
#pragma unroll
      for (int u = 0; u < kPerWarp; ++u) {
        const int64_t slot = finalize_slot(r, c, finalize_group(h, warp, u, kWarps), lane);
        v[u] = slot >= 0 ? __ldg(partials + slot) : 0.0;
      }
#pragma unroll
      for (int u = 0; u < kPerWarp; ++u) {
        const double l = warp_sum(v[u]);
        if (lane == 0) level[warp + u * kWarps] = l;
      }
      __syncthreads();
      if (warp == 0) {
        const double t = warp_sum(level[lane]);
        if (lane == 0) total += t;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) write_dstep(dstep, step, c, total, grad_scale, min_step);
  }
}

template <typename F>
cudaError_t with_packed(bool packed, F&& f) {
  return packed ? f(std::true_type{}) : f(std::false_type{});
}

// A capture's slot, given back when its graph is destroyed (a CUDA user object's destructor:
// it runs once the graph, every executable made from it, and their launched work are gone).
struct SlotRelease {
  int device;
  int slot;
  unsigned long long token;
};
void CUDART_CB release_captured_slot(void* data) {
  const SlotRelease* r = static_cast<const SlotRelease*>(data);
  release_slot(r->device, r->slot, r->token);
  delete r;
}

// The slot of a capture's launches on this stream, tied to the graph being captured; -1 (fuse
// nothing) when it cannot be tied.
int captured_slot(int device, cudaStream_t stream, unsigned long long capture, cudaGraph_t graph) {
  // cudaStreamPerThread is another stream in each thread: no key tells them apart here.
  if (graph == nullptr || stream == cudaStreamPerThread) return -1;
  const SlotGrant g = counter_slot(device, SlotKey::kCapture, capture, reinterpret_cast<uintptr_t>(stream));
  if (g.slot < 0 || !g.fresh) return g.slot;
  SlotRelease* r = new SlotRelease{device, g.slot, g.token};
  cudaUserObject_t object = nullptr;
  if (cudaUserObjectCreate(&object, r, release_captured_slot, 1, cudaUserObjectNoDestructorSync) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // ours: the launch must not report it
    delete r;
    release_slot(device, g.slot, g.token);
    return -1;
  }
  if (cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove) != cudaSuccess) {
    (void)cudaGetLastError();
    // Given back now, so that a later launch of this capture takes (and ties) a fresh grant; the
    // destructor, whenever CUDA runs it, then finds its token stale and does nothing.
    release_slot(device, g.slot, g.token);
    cudaUserObjectRelease(object, 1);
    return -1;
  }
  return g.slot;
}

// The counter slot of launches on this stream (and capture): see dqa_counters.h; -1 for none.
int slot_for(cudaStream_t stream) {
  int device = -1;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture = 0;
  cudaGraph_t graph = nullptr;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaStreamGetCaptureInfo(stream, &status, &capture, &graph) != cudaSuccess) {
    (void)cudaGetLastError();  // ours: the launch must not report it
    return -1;
  }
  if (status == cudaStreamCaptureStatusInvalidated) return -1;
  if (status == cudaStreamCaptureStatusActive) return captured_slot(device, stream, capture, graph);
  // Eager: the stream's unique id (not its handle, which a new stream may reuse, and which means
  // another stream in each thread for cudaStreamPerThread). Not asked while capturing: a
  // capturing stream does not support it.
  unsigned long long id = 0;
  if (cudaStreamGetId(stream, &id) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return counter_slot(device, SlotKey::kEager, id, 0).slot;
}

}  // namespace

size_t fake_quantize_backward_workspace_bytes(Shape shape, DType dtype, bool need_step_grad) {
  if (!need_step_grad || numel_of(shape) == 0) return 0;
  return static_cast<size_t>(plan_backward(shape, dtype, 0, 0, 0).workspace_doubles) *
         sizeof(double);
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
  if (plan.workspace_doubles > 0 &&
      (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % alignof(double) != 0 ||
       workspace_bytes < static_cast<size_t>(plan.workspace_doubles) * sizeof(double))) {
    return cudaErrorInvalidValue;
  }
  // Fused when the plan allows it and a counter slot is free; no counter needed: count == 1.
  const bool needs_counters = plan.counters > 0;
  const int slot = plan.fusable && needs_counters ? slot_for(stream) : -1;
  const bool fused = plan.fusable && (!needs_counters || slot >= 0);
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
          if constexpr (VEC <= kTiledBackwardMaxVec) {
            grad_tiles_kernel<T, VEC, kPacked><<<grid, plan.block, 0, stream>>>(
                dy, xt, step, dx, partials, grad_step, plan.tiles, make_divider(shape.inner),
                plan.bx_log2, plan.reduce, slot, qmin, qmax, min_step, grad_scale);
          } else {
            return cudaErrorInvalidValue;  // plan_backward caps the tiled width: cannot happen
          }
        } else {
          grad_rows_kernel<T, VEC, kPacked><<<grid, plan.block, 0, stream>>>(
              dy, xt, step, dx, partials, grad_step, plan.rows, plan.reduce, slot, qmin, qmax,
              min_step, grad_scale);
        }
        return cudaGetLastError();
      });
    });
  });
  if (err != cudaSuccess || fused) return err;
  finalize_kernel<<<plan.finalize_grid.x, kThreads, 0, stream>>>(
      partials, step, grad_step, plan.reduce, grad_scale, min_step);
  return cudaGetLastError();
}

}  // namespace dqa_cuda
