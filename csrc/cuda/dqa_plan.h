// The host planner of dqa_ext's CUDA kernels: paths, vector widths, grids, workspace sizes and
// the divider's magic numbers, as pure functions of plain values. No CUDA headers, so that CPU
// CI compiles and unit-tests it with g++ (tests/test_cuda_planner.py); the kernels include it.
//
// Two paths, the same for the forward and the backward. Rows: a block takes one channel at a
// time (gridDim.y over the channels), so its step is loaded once; its threads stride over the
// channel's rows in vectors that never cross a row. Tiles: for short rows (channels_last,
// (N, C), small H*W), x is an [outer, W = C * inner] matrix and a thread owns VEC columns, so its
// steps are loaded once; it walks down the rows. Each thread keeps two vectors in flight.
//
// The step-gradient reduction's order is a function of (shape, dtype) alone: the partition
// uses the dtype's widest vector that the shape allows, a pointer that is not aligned to it only
// turns the vector loads into scalar loads (same elements, same order), the grid is sized by
// the tensor (a fixed number of vectors per thread), not by the multiprocessor count, and the
// partials are summed in a fixed order (dqa_walk.h). So dstep is bitwise identical across
// alignments, runs and GPUs. The forward's grid may follow the GPU: it reduces nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dqa_walk.h"

namespace dqa_cuda {

// Storage type of x, y, grad_y and grad_x; every kernel computes in float32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A dense [outer, channels, inner] block: element (o, c, i) at o*channels*inner + c*inner + i.
struct Shape {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

struct Grid {
  unsigned x;
  unsigned y;
};

constexpr int kThreads = 256;     // threads per block (the row kernel may use fewer)
constexpr int kMaxVecBytes = 16;  // one 128-bit load or store per vector
constexpr int kMaxGridY = 65535;
// Rows shorter than one 32-byte sector go to the tiles: DRAM moves whole sectors, so the row
// kernel would read such rows as partly wasted ones. Longer rows keep every sector full.
constexpr int64_t kTiledMaxRowBytes = 32;
// The tiled backward keeps a float step, reciprocal and sum per column and two rows of dy and
// x in flight per thread: at most 2 columns per thread keep it within 48 registers, without
// spills, in every dtype (4 columns need 64 to 78).
constexpr int kTiledBackwardMaxVec = 2;
constexpr int kTiledRowsInFlight = 2;
// Vectors (rows of vectors, for the tiles) per thread of the backward: two pairs.
// The grid grows with the tensor, so large tensors run many short waves whose last one is
// small against the whole, and the partition does not depend on the GPU.
constexpr int64_t kBackwardVectorsPerThread = 4;
// The forward's grid is at most one resident wave, each thread at least one pair.
constexpr int64_t kForwardMinVectorsPerThread = 2;
// Float32 running sums take at most this many terms before they are added into a double,
// as the CPU kernels do (csrc/cpu/dqa_cpu.cpp's kFlush).
constexpr int kFlushTerms = 1024;
// Main-loop iterations between flushes: the walks run the odd vectors (rows) or rows (tiles)
// first, so the first chunk holds up to one iteration more.
template <int VEC>
constexpr int kRowsPairsPerFlush = kFlushTerms / (2 * VEC) - 1;
constexpr int kTilesGroupsPerFlush = kFlushTerms / kTiledRowsInFlight - 1;
// Fused finalize: the counters one launch may use (one slot of dqa_counters.h).
constexpr int64_t kMaxCounters = 4096;
// The separate finalize: at most this many blocks (grid-stride over the channels).
constexpr int64_t kFinalizeBlocks = 4096;

int elem_size(DType dtype);
int max_vec(DType dtype);  // elements in kMaxVecBytes
int64_t numel_of(Shape s);
int64_t ceil_div(int64_t a, int64_t b);

// d >= 1 (smaller values are treated as 1).
Divider make_divider(int64_t d);

// Widest vector (elements, <= kMaxVecBytes) that every non-zero address is aligned to.
int aligned_vec(DType dtype, uintptr_t a, uintptr_t b, uintptr_t c);
// Widest vector (elements, <= kMaxVecBytes) that divides n; n == 0 allows any.
int dividing_vec(DType dtype, int64_t n);

// Channel c's row walk for nthreads threads per channel, and the tiles' walk down the rows
// (dqa_walk.h); the plans below hold them.
RowsWalk rows_walk(Shape shape, int64_t nthreads, int vec);
TilesWalk tiles_walk(Shape shape, int64_t row_step);

// The path and vector width of the forward (and of grad_x alone): the shape picks the path
// and the widest vector it allows, the pointers may narrow it.
struct ForwardPath {
  bool tiled;
  int vec;
};
ForwardPath forward_path(Shape shape, DType dtype, uintptr_t x, uintptr_t dy, uintptr_t out);

struct ForwardPlan {
  bool tiled;
  int vec;
  Grid grid;
  int block;
  int bx_log2;      // tiles: block is (1 << bx_log2) columns x (kThreads >> bx_log2) rows
  TilesWalk tiles;  // tiles: the walk down the rows
  RowsWalk rows;    // rows: the walk of each channel
};
// wave: blocks of the chosen kernel resident on the whole GPU (SMs x blocks per SM).
ForwardPlan plan_forward(Shape shape, DType dtype, uintptr_t x, uintptr_t dy, uintptr_t out,
                         int64_t wave);

// Backward with the step gradient.
struct BackwardPlan {
  bool tiled;
  int vec;      // the partition's vector width: a function of shape and dtype
  bool packed;  // every pointer aligned to vec: vector loads and stores, else scalar ones
  Grid grid;
  int block;
  int bx_log2;
  TilesWalk tiles;
  RowsWalk rows;
  ReduceArgs reduce;
  // Fused finalize: possible when a domain's blocks make whole channels (rows; tiles of
  // inner == 1) and its counters fit in one slot. With count == 1 it needs no counter and
  // no workspace: the block writes dstep itself.
  bool fusable;
  int64_t domains;   // rows: C; tiles: the tiles along x
  int64_t counters;  // domains * counters_per_domain
  int64_t workspace_doubles;
  Grid finalize_grid;  // the separate finalize
};
BackwardPlan plan_backward(Shape shape, DType dtype, uintptr_t dy, uintptr_t x, uintptr_t dx);

}  // namespace dqa_cuda
