// The host planner of dqa_ext's CUDA kernels: vector widths, grids, workspace sizes and the
// divider's magic numbers, as pure functions of plain values. No CUDA headers, so that CPU CI
// compiles and unit-tests it with g++ (tests/test_cuda_planner.py); the kernels include it.
//
// The step-gradient reduction's order is a function of (shape, dtype, path) alone: the
// partition uses the dtype's widest vector that the shape allows, a pointer that is not aligned
// to it only turns the vector loads into scalar loads (same elements, same order), and the grid
// is a constant, not derived from the multiprocessor count. So dstep is bitwise identical
// across alignments, runs and GPUs.
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
// Rows shorter than this many bytes go to the tiled backward: the row kernel would read them as
// short strided segments.
constexpr int64_t kTiledMaxRowBytes = 256;
// Blocks of 256 threads that the reduction kernels aim for: a constant (4 per multiprocessor
// of a 256-SM GPU), so the partition of the sums does not depend on the GPU.
constexpr int64_t kReduceBlocks = 1024;
// Finalize: one warp per channel, at most this many blocks (grid-stride over the channels).
constexpr int64_t kFinalizeBlocks = 1024;
// Float32 running sums take at most this many terms before they are added into a double,
// as the CPU kernels do (csrc/cpu/dqa_cpu.cpp's kFlush).
constexpr int kFlushTerms = 1024;

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

// Forward, and grad_x alone: a grid-stride pass over vec-wide vectors of the flat tensor (the
// last one may be partial, a vector may cross rows). One resident wave of blocks at most.
struct ElementwisePlan {
  int vec;
  unsigned blocks;
  Cursor stride;  // the grid stride blocks * kThreads * vec, as a cursor advance
};
ElementwisePlan plan_elementwise(Shape shape, DType dtype, uintptr_t x, uintptr_t dy,
                                 uintptr_t out, int sm_count, int blocks_per_sm);

// Backward with the step gradient.
struct BackwardPlan {
  bool tiled;
  int vec;      // the partition's vector width: a function of shape and dtype
  bool packed;  // every pointer aligned to vec: vector loads and stores, else scalar ones
  Grid grid;
  int block;
  int bx_log2;            // tiled: block is (1 << bx_log2) columns x (kThreads >> bx_log2) rows
  RowsWalk rows;          // rows: the walk of each channel
  int64_t partial_count;  // doubles of workspace
  FinalizeArgs finalize;
  Grid finalize_grid;
};
BackwardPlan plan_backward(Shape shape, DType dtype, uintptr_t dy, uintptr_t x, uintptr_t dx);

}  // namespace dqa_cuda
