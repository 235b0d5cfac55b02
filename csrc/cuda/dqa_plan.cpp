// The host planner of dqa_ext's CUDA kernels (see dqa_plan.h). Plain C++: g++ compiles it alone.
#include "dqa_plan.h"

namespace dqa_cuda {
namespace {

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

bool aligned_to(uintptr_t p, int64_t bytes) {
  return p == 0 || p % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

int elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }
int max_vec(DType dtype) { return kMaxVecBytes / elem_size(dtype); }
int64_t numel_of(Shape s) { return s.outer * s.channels * s.inner; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// m = floor(2**64 * (2**l - d) / d) + 1 with l = ceil(log2(d)), by long division.
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
  return {q + 1, l < 1 ? l : 1u, l > 1 ? l - 1 : 0u};
}

int aligned_vec(DType dtype, uintptr_t a, uintptr_t b, uintptr_t c) {
  const int es = elem_size(dtype);
  for (int vec = max_vec(dtype); vec > 1; vec >>= 1) {
    const int64_t bytes = int64_t{vec} * es;
    if (aligned_to(a, bytes) && aligned_to(b, bytes) && aligned_to(c, bytes)) return vec;
  }
  return 1;
}

int dividing_vec(DType dtype, int64_t n) {
  int vec = max_vec(dtype);
  while (vec > 1 && n % vec != 0) vec >>= 1;
  return vec;
}

ElementwisePlan plan_elementwise(Shape shape, DType dtype, uintptr_t x, uintptr_t dy,
                                 uintptr_t out, int sm_count, int blocks_per_sm) {
  ElementwisePlan plan{};
  // A vector may cross rows and the last one may be partial: only alignment limits the width.
  plan.vec = aligned_vec(dtype, x, dy, out);
  const int64_t want = ceil_div(ceil_div(numel_of(shape), plan.vec), kThreads);
  const int64_t wave = int64_t{sm_count < 1 ? 1 : sm_count} * (blocks_per_sm < 1 ? 1 : blocks_per_sm);
  plan.blocks = static_cast<unsigned>(clamp64(want, 1, wave));
  const int64_t g = int64_t{plan.blocks} * kThreads * plan.vec;
  const int64_t inner = shape.inner < 1 ? 1 : shape.inner;
  const int64_t C = shape.channels < 1 ? 1 : shape.channels;
  plan.stride = {g % inner, (g / inner) % C};
  return plan;
}

BackwardPlan plan_backward(Shape shape, DType dtype, uintptr_t dy, uintptr_t x, uintptr_t dx) {
  BackwardPlan plan{};
  const int64_t C = shape.channels;
  const int64_t inner = shape.inner;
  plan.tiled = inner * elem_size(dtype) < kTiledMaxRowBytes;
  if (plan.tiled) {
    // A thread owns vec consecutive columns of [outer, W]: vec must divide W.
    const int64_t W = C * inner;
    plan.vec = dividing_vec(dtype, W);
    // Wide enough to cover the columns, narrow enough to leave several rows per block when
    // there are several rows.
    const int64_t min_by = next_pow2(clamp64(shape.outer, 1, 8));
    const int64_t bx = clamp64(next_pow2(ceil_div(W, plan.vec)), 1, kThreads / min_by);
    const int64_t by = kThreads / bx;
    const int64_t tiles = ceil_div(W, bx * plan.vec);
    const int64_t max_gy = clamp64(ceil_div(shape.outer, by), 1, kMaxGridY);
    const int64_t gy = clamp64(ceil_div(kReduceBlocks, tiles), 1, max_gy);
    plan.bx_log2 = log2_of(bx);
    plan.block = kThreads;
    plan.grid = {static_cast<unsigned>(tiles), static_cast<unsigned>(gy)};
    plan.partial_count = gy * W;
    plan.finalize = {C, gy * inner, inner, make_divider(inner), W, inner};
  } else {
    // A vector stays in one row of its channel (vec divides inner), or C == 1 and the channel
    // is the whole contiguous tensor, whose last vector may be partial.
    plan.vec = C == 1 ? max_vec(dtype) : dividing_vec(dtype, inner);
    const int64_t nvec = ceil_div(shape.outer * inner, plan.vec);
    const int64_t block = clamp64(next_pow2(nvec), 32, kThreads);
    const int64_t p = clamp64(ceil_div(kReduceBlocks * (kThreads / block), C), 1,
                              ceil_div(nvec, block));
    plan.block = static_cast<int>(block);
    plan.grid = {static_cast<unsigned>(p), static_cast<unsigned>(clamp64(C, 1, kMaxGridY))};
    const int64_t g = p * block * plan.vec;
    const int64_t row_stride = C * inner;
    plan.rows = {C,         inner,         shape.outer * inner,
                 row_stride, make_divider(inner), g,
                 g % inner, (g / inner) * row_stride + g % inner, row_stride - inner};
    plan.partial_count = C * p;
    plan.finalize = {C, p, p, make_divider(p), 0, p};
  }
  const int64_t bytes = int64_t{plan.vec} * elem_size(dtype);
  plan.packed = aligned_to(dy, bytes) && aligned_to(x, bytes) && aligned_to(dx, bytes);
  plan.finalize_grid = {static_cast<unsigned>(clamp64(ceil_div(C, kThreads / 32), 1, kFinalizeBlocks)), 1};
  return plan;
}

}  // namespace dqa_cuda
