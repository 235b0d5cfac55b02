// The index arithmetic of dqa_ext's CUDA kernels, as host+device functions: which elements a
// thread visits, their channel, and which partial-sum slot a block writes and a finalize lane
// reads. The kernels call these; the emulation calls the same code on the host over
// many shapes, alignments and grids and checks every access (csrc/cuda/tests/emulate_test.cpp,
// run by scripts/check_cuda_kernels.sh and tests/test_cuda_planner.py).
// Plain C++ plus DQA_HD: no CUDA headers.
#pragma once

#include <cstdint>

#include "../dqa_math.h"  // DQA_HD

namespace dqa_cuda {

// n / d for 0 <= n < 2**63 by a multiply-high and shifts (Granlund & Montgomery 1994,
// fig. 4.1); make_divider (dqa_plan.cpp) computes m, sh1, sh2. A 64-bit `/` in a kernel is a
// subroutine call in SASS, and ptxas spills what is live across a call.
struct Divider {
  uint64_t m;
  unsigned sh1;
  unsigned sh2;
  DQA_HD int64_t div(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
#if defined(__CUDA_ARCH__)
    const uint64_t t = __umul64hi(m, u);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(m) * u) >> 64);
#endif
    return static_cast<int64_t>((t + ((u - t) >> sh1)) >> sh2);
  }
};

// Position of a flat element index e in [outer, C, inner]: i = e % inner, c = (e / inner) % C.
struct Cursor {
  int64_t i;
  int64_t c;
};

DQA_HD Cursor cursor_at(int64_t e, int64_t inner, int64_t C, const Divider& by_inner,
                        const Divider& by_c) {
  const int64_t row = by_inner.div(e);
  return {e - row * inner, row - by_c.div(row) * C};
}

// p += d, where d = {g % inner, (g / inner) % C} is a fixed advance of g elements.
DQA_HD void advance(Cursor& p, Cursor d, int64_t inner, int64_t C) {
  p.i += d.i;
  int64_t carry = 0;
  if (p.i >= inner) {
    p.i -= inner;
    carry = 1;
  }
  p.c += d.c + carry;  // < 2C, so one wrap is enough
  if (p.c >= C) p.c -= C;
}

// p += 1 inside a vector; true when the element starts a new row (its channel may change).
DQA_HD bool next_element(Cursor& p, int64_t inner, int64_t C) {
  if (++p.i < inner) return false;
  p.i = 0;
  if (++p.c == C) p.c = 0;
  return true;
}

// ---- elementwise: the flat tensor in VEC-wide vectors, grid-stride ----

struct FlatWalk {
  int64_t numel;
  int64_t C;
  int64_t inner;
  Divider by_inner;
  Divider by_c;
  Cursor stride;  // the grid stride nthreads * VEC as a cursor advance
};

// f(e, n, cursor) for the vectors v = tid, tid + nthreads, ...: e = v * VEC is the first
// element, n = numel - e (>= VEC except in a partial last vector), cursor is e's (i, c).
template <int VEC, typename F>
DQA_HD void walk_flat(const FlatWalk& w, int64_t tid, int64_t nthreads, F&& f) {
  const int64_t nvec = (w.numel + VEC - 1) / VEC;
  Cursor p = cursor_at(tid * VEC, w.inner, w.C, w.by_inner, w.by_c);
  for (int64_t v = tid; v < nvec; v += nthreads) {
    f(v * VEC, w.numel - v * VEC, p);
    advance(p, w.stride, w.inner, w.C);
  }
}

// ---- backward, long rows: block (p, cy) of grid (P, gy) takes channels cy, cy + gy, ... ----

struct RowsWalk {
  int64_t C;
  int64_t inner;
  int64_t per_channel;  // outer * inner
  int64_t row_stride;   // C * inner
  Divider by_inner;
  int64_t g;     // the grid stride nthreads * VEC in elements of a channel,
  int64_t gi;    // its % inner,
  int64_t ge;    // its flat advance (g / inner) * row_stride + gi,
  int64_t wrap;  // and the flat advance row_stride - inner when i passes the row's end
};

// f(e, n) for channel c's vectors v = tid, tid + nthreads, ... of its outer * inner elements:
// e the flat index of the vector's first element, n = outer * inner - v * VEC (>= VEC except
// in a partial last vector, which only C == 1 has: VEC divides inner otherwise). Few values
// live in the loop: the kernel's division slow path is a call, and what is live across it
// must fit in the callee-saved registers.
template <int VEC, typename F>
DQA_HD void walk_channel_rows(const RowsWalk& w, int64_t tid, int64_t c, F&& f) {
  const int64_t first = tid * VEC;
  const int64_t o = w.by_inner.div(first);
  int64_t i = first - o * w.inner;
  int64_t e = o * w.row_stride + c * w.inner + i;
  for (int64_t left = w.per_channel - first; left > 0; left -= w.g) {
    f(e, left);
    e += w.ge;
    i += w.gi;
    if (i >= w.inner) {
      i -= w.inner;
      e += w.wrap;
    }
  }
}

// The partial sum of channel c from block p of the P along x.
DQA_HD int64_t rows_slot(int64_t c, int64_t p, int64_t P) { return c * P + p; }

// ---- backward, short rows: x as an [outer, W = C * inner] matrix in column tiles ----

// First column of thread tx of tile t (tiles of bx threads x VEC columns).
DQA_HD int64_t tile_column(int64_t t, int bx, int tx, int vec) {
  return (t * bx + tx) * static_cast<int64_t>(vec);
}

// f(e) for rows first_row, first_row + row_step, ... of column col.
template <typename F>
DQA_HD void walk_tile_rows(int64_t outer, int64_t W, int64_t col, int64_t first_row,
                           int64_t row_step, F&& f) {
  for (int64_t o = first_row; o < outer; o += row_step) f(o * W + col);
}

// The partial sum of column col from row block r.
DQA_HD int64_t tiles_slot(int64_t r, int64_t W, int64_t col) { return r * W + col; }

// ---- finalize: dstep[c] = scale * sum over m < count of partials[finalize_slot(c, m)] ----

struct FinalizeArgs {
  int64_t C;
  int64_t count;         // partials per channel
  int64_t chunk;         // slot = c * c_stride + (m / chunk) * chunk_stride + m % chunk
  Divider by_chunk;
  int64_t chunk_stride;
  int64_t c_stride;
};

DQA_HD int64_t finalize_slot(const FinalizeArgs& a, int64_t c, int64_t m) {
  const int64_t k = a.by_chunk.div(m);
  return c * a.c_stride + k * a.chunk_stride + (m - k * a.chunk);
}

// For each channel c that warp `warp` of nwarps takes: read(slot) for the slots lane reads of
// it, in order, then done(c) (the same channels for every lane of a warp: done may shuffle).
template <typename Read, typename Done>
DQA_HD void walk_finalize(const FinalizeArgs& a, int64_t warp, int64_t nwarps, int lane,
                          Read&& read, Done&& done) {
  for (int64_t c = warp; c < a.C; c += nwarps) {
    for (int64_t m = lane; m < a.count; m += 32) read(finalize_slot(a, c, m));
    done(c);
  }
}

}  // namespace dqa_cuda
