// The host planner of dqa_ext's CUDA kernels (see dqa_plan.h). Plain C++: g++ compiles it alone.
#include "dqa_plan.h"

namespace dqa_cuda {
namespace {

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

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

// Rows longer than this go to the tiles unless the channel is contiguous (outer == 1): the row
// walk's cursor is 32-bit unsigned and must hold the cursor plus the grid stride, both below
// inner. (Such a tensor has over 2**32 elements; its tiled backward needs a workspace of one
// double per column.)
constexpr int64_t kMaxRowsInner = (int64_t{1} << 31) - 1;
static_assert(2 * (kMaxRowsInner - 1) <= int64_t{0xffffffff}, "the row cursor plus the stride fit 32 bits");

// Threads per block of a row kernel: enough for the channel's vectors, 32 to kThreads.
int64_t rows_block(int64_t nvec) { return clamp64(next_pow2(nvec), 32, kThreads); }

// Tile shape of the forward: bx threads across (wide enough to cover the columns, narrow enough
// to leave several rows per block when there are several rows), by = kThreads / bx rows.
int64_t tiles_bx(Shape s, int64_t W, int vec) {
  const int64_t min_by = next_pow2(clamp64(s.outer, 1, 8));
  return clamp64(next_pow2(ceil_div(W, vec)), 1, kThreads / min_by);
}

// Tile shape of the backward: as narrow as one 32-byte sector per row (DRAM moves sectors, so
// the loads stay as efficient) and as tall as the rows allow, so that a block sums many rows of
// few columns: fewer partial sums (a block writes one per column) for the finalize to add up.
int64_t backward_tiles_bx(Shape s, int64_t W, int vec, int es) {
  const int64_t sector_bx = clamp64(32 / (int64_t{vec} * es), 1, kThreads);
  const int64_t rows_bx = kThreads / next_pow2(clamp64(s.outer, 1, kThreads));  // few rows: wider
  const int64_t need = next_pow2(ceil_div(W, vec));
  return clamp64(max64(sector_bx, rows_bx), 1, min64(need, kThreads));
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

// Channel c's walk for a grid of nthreads threads per channel. A contiguous channel (C == 1:
// the whole tensor; outer == 1) is described as rows of 1 element: no wrap, any length.
RowsWalk rows_walk(Shape s, int64_t nthreads, int vec) {
  const bool contiguous = s.channels == 1 || s.outer == 1;
  const int64_t inner = contiguous ? 1 : max64(s.inner, 1);
  const int64_t row_stride = contiguous ? 1 : s.channels * inner;
  const int64_t g = nthreads * vec;
  return {s.channels,
          inner,
          numel_of(s) / max64(s.channels, 1),
          row_stride,
          s.channels == 1 ? 0 : s.inner,
          make_divider(inner),
          make_divider(g),
          g,
          g % inner,
          (g / inner) * row_stride + g % inner,
          row_stride - inner};
}

TilesWalk tiles_walk(Shape s, int64_t row_step) {
  const int64_t W = s.channels * s.inner;
  return {s.outer, W, row_step, make_divider(row_step), row_step * W};
}

ForwardPath forward_path(Shape shape, DType dtype, uintptr_t x, uintptr_t dy, uintptr_t out) {
  ForwardPath p{};
  if (shape.channels == 1) {
    // The whole tensor has one step: any width, the last vector may be partial.
    p = {false, max_vec(dtype)};
  } else {
    const int rows_vec = dividing_vec(dtype, shape.inner);
    const int tiles_vec = dividing_vec(dtype, shape.channels * shape.inner);
    // Short rows, or rows whose length allows a narrower vector than the matrix's width.
    p.tiled = shape.inner * elem_size(dtype) < kTiledMaxRowBytes || rows_vec < tiles_vec ||
              (shape.inner > kMaxRowsInner && shape.outer > 1);
    p.vec = p.tiled ? tiles_vec : rows_vec;
  }
  const int fit = aligned_vec(dtype, x, dy, out);
  if (fit < p.vec) p.vec = fit;
  return p;
}

ForwardPlan plan_forward(Shape shape, DType dtype, uintptr_t x, uintptr_t dy, uintptr_t out,
                         int64_t wave) {
  const ForwardPath path = forward_path(shape, dtype, x, dy, out);
  ForwardPlan plan{};
  plan.tiled = path.tiled;
  plan.vec = path.vec;
  wave = max64(wave, 1);
  if (plan.tiled) {
    const int64_t W = shape.channels * shape.inner;
    const int64_t bx = tiles_bx(shape, W, plan.vec);
    const int64_t by = kThreads / bx;
    const int64_t tiles = ceil_div(W, bx * plan.vec);
    const int64_t most = min64(kMaxGridY, max64(1, ceil_div(shape.outer, by * kForwardMinVectorsPerThread)));
    plan.bx_log2 = log2_of(bx);
    plan.block = kThreads;
    const int64_t gy = clamp64(ceil_div(wave, tiles), 1, most);
    plan.grid = {static_cast<unsigned>(tiles), static_cast<unsigned>(gy)};
    plan.tiles = tiles_walk(shape, gy * by);
  } else {
    const int64_t nvec = ceil_div(shape.outer * shape.inner, plan.vec);
    const int64_t block = rows_block(nvec);
    const int64_t cy = clamp64(shape.channels, 1, kMaxGridY);
    const int64_t most = max64(1, ceil_div(nvec, block * kForwardMinVectorsPerThread));
    const int64_t p = clamp64(ceil_div(wave * (kThreads / block), cy), 1, most);
    plan.block = static_cast<int>(block);
    plan.grid = {static_cast<unsigned>(p), static_cast<unsigned>(cy)};
    plan.rows = rows_walk(shape, p * block, plan.vec);
  }
  return plan;
}

BackwardPlan plan_backward(Shape shape, DType dtype, uintptr_t dy, uintptr_t x, uintptr_t dx) {
  BackwardPlan plan{};
  const int64_t C = shape.channels;
  const int64_t inner = shape.inner;
  plan.tiled = C > 1 && (inner * elem_size(dtype) < kTiledMaxRowBytes ||
                        (inner > kMaxRowsInner && shape.outer > 1));
  ReduceArgs& r = plan.reduce;
  r.C = C;
  if (plan.tiled) {
    // A thread owns vec consecutive columns of [outer, W]: vec must divide W.
    const int64_t W = C * inner;
    plan.vec = dividing_vec(dtype, W);
    if (plan.vec > kTiledBackwardMaxVec) plan.vec = kTiledBackwardMaxVec;
    const int64_t bx = backward_tiles_bx(shape, W, plan.vec, elem_size(dtype));
    const int64_t by = kThreads / bx;
    const int64_t tiles = ceil_div(W, bx * plan.vec);
    const int64_t gy = clamp64(ceil_div(shape.outer, by * kBackwardVectorsPerThread), 1, kMaxGridY);
    plan.bx_log2 = log2_of(bx);
    plan.block = kThreads;
    plan.grid = {static_cast<unsigned>(tiles), static_cast<unsigned>(gy)};
    plan.tiles = tiles_walk(shape, gy * by);
    // Channel c's partials: row block r's columns c * inner + i, as m = r * inner + i.
    r.count = gy * inner;
    r.chunk = inner;
    r.by_chunk = make_divider(inner);
    r.chunk_stride = W;
    r.c_stride = inner;
    r.groups = ceil_div(r.count, kGroup);
    r.group_base = gy * W;
    if (inner == 1) {  // a column is a channel: the row blocks of a tile make whole channels
      r.m_stride = W;
      r.counters_per_domain = gy == 1 ? 0 : (r.groups == 1 ? 1 : r.groups + 1);
      plan.domains = tiles;
      plan.counters = tiles * r.counters_per_domain;
      plan.fusable = plan.counters <= kMaxCounters;
      plan.workspace_doubles = gy == 1 ? 0 : gy * W + (r.groups > 1 ? C * r.groups : 0);
    } else {
      plan.workspace_doubles = gy * W;
    }
  } else {
    // A vector stays in one row of its channel (vec divides inner), or C == 1 and the channel
    // is the whole contiguous tensor, whose last vector may be partial.
    plan.vec = C == 1 ? max_vec(dtype) : dividing_vec(dtype, inner);
    const int64_t nvec = ceil_div(shape.outer * inner, plan.vec);
    const int64_t block = rows_block(nvec);
    const int64_t p = max64(1, ceil_div(nvec, block * kBackwardVectorsPerThread));
    plan.block = static_cast<int>(block);
    plan.grid = {static_cast<unsigned>(p), static_cast<unsigned>(clamp64(C, 1, kMaxGridY))};
    plan.rows = rows_walk(shape, p * block, plan.vec);
    // Channel c's partials: one per block along x, m = p.
    r.count = p;
    r.chunk = p;
    r.by_chunk = make_divider(p);
    r.chunk_stride = 0;
    r.c_stride = p;
    r.groups = ceil_div(p, kGroup);
    r.group_base = C * p;
    r.m_stride = 1;
    r.counters_per_domain = p == 1 ? 0 : (r.groups == 1 ? 1 : r.groups + 1);
    plan.domains = C;
    plan.counters = C * r.counters_per_domain;
    plan.fusable = plan.counters <= kMaxCounters;
    plan.workspace_doubles = p == 1 ? 0 : C * p + (r.groups > 1 ? C * r.groups : 0);
  }
  const int64_t bytes = int64_t{plan.vec} * elem_size(dtype);
  plan.packed = aligned_to(dy, bytes) && aligned_to(x, bytes) && aligned_to(dx, bytes);
  plan.finalize_grid = {static_cast<unsigned>(clamp64(C, 1, kFinalizeBlocks)), 1};
  return plan;
}

}  // namespace dqa_cuda
