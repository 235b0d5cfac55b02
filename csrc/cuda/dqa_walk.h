// The index arithmetic of dqa_ext's CUDA kernels, as host+device functions: which elements a
// thread visits, their channel, which partial-sum slot a block writes, which counter it arrives
// at and which slots the block that arrives last reads. The kernels call these; the emulation
// calls the same code on the host over many shapes, alignments, grids and block arrival orders
// and checks every access (csrc/cuda/tests/emulate_test.cpp, run by scripts/check_cuda_kernels.sh
// and tests/test_cuda_planner.py). Plain C++ plus DQA_HD: no CUDA headers.
#pragma once

#include <cstdint>

#include "../dqa_math.h"  // DQA_HD

#if defined(__CUDA_ARCH__)  // the device pass only: host compilers do not know the pragma
#define DQA_UNROLL _Pragma("unroll")
#else
#define DQA_UNROLL
#endif

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

// ---- rows: the outer * inner elements of one channel, in VEC-wide vectors ----
// Every tensor is a dense [outer, C, inner] block. A channel's k-th element (k < outer * inner)
// lies at (k / inner) * C * inner + c * inner + k % inner. VEC divides inner (a vector stays in
// one row, so it has one step), except for C == 1, where the channel is the whole contiguous
// tensor and only its last vector may be partial. When a channel is contiguous (C == 1 or
// outer == 1) the walk describes it as rows of one element (inner 1, row_stride 1, c_stride the
// real inner): element k at c * c_stride + k, no wrap. Otherwise inner < 2**31 (the planner sends
// longer rows to the tiles), so the row cursor is 32-bit and unsigned: i and gi are below inner,
// so i + gi < 2**32 (as int it would pass 2**31 for rows over 2**30 and skip the wrap).
struct RowsWalk {
  int64_t C;
  int64_t inner;
  int64_t per_channel;  // outer * inner (C == 1: numel)
  int64_t row_stride;   // C * inner
  int64_t c_stride;     // inner
  Divider by_inner;
  Divider by_g;  // counts a thread's vectors
  int64_t g;     // the grid stride nthreads * VEC, in elements of a channel,
  int64_t gi;    // its % inner,
  int64_t ge;    // its flat advance (g / inner) * row_stride + gi,
  int64_t wrap;  // and the flat advance row_stride - inner when i passes the row's end
};

// Pairs are run in chunks of at most kChunk, and chunk() is called after each (a step-gradient
// kernel flushes its float32 sums there), so the main loop holds no counter of terms.
constexpr int kNoChunks = 1 << 30;

// Thread tid of nthreads visits channel c's vectors tid, tid + nthreads, ...: one(e, n) for a
// partial last vector (C == 1 only; n < VEC elements) and for one whole vector when the count
// of whole ones is odd (n = VEC), then the rest two at a time, pair(e0, e1) (two loads in
// flight), in chunks of at most kChunk pairs, each followed by chunk(). e is a vector's flat
// index. The odd ones come first so that nothing lives across the main loop; per vector the
// loop only advances the cursor: a 32-bit add and compare and a 64-bit add.
template <int VEC, int kChunk, typename Pair, typename One, typename Chunk>
DQA_HD void walk_channel_rows(const RowsWalk& w, int64_t tid, int64_t c, Pair&& pair, One&& one,
                              Chunk&& chunk) {
  const int64_t first = tid * VEC;
  if (first >= w.per_channel) return;
  const int64_t o = w.by_inner.div(first);
  const unsigned inner = static_cast<unsigned>(w.inner);
  const unsigned gi = static_cast<unsigned>(w.gi);
  unsigned i = static_cast<unsigned>(first - o * w.inner);
  int64_t e = o * w.row_stride + c * w.c_stride + i;
  const int64_t span = w.per_channel - first;
  const int64_t n = w.by_g.div(span - 1) + 1;  // this thread's vectors
  const int64_t last_left = span - (n - 1) * w.g;
  // A partial last vector: C == 1, where element k lies at k.
  if (last_left < VEC) one(c * w.c_stride + w.per_channel - last_left, last_left);
  const int64_t whole = last_left < VEC ? n - 1 : n;
  auto advance = [&]() {
    i += gi;
    int64_t step = w.ge;
    if (i >= inner) {
      i -= inner;
      step += w.wrap;
    }
    e += step;
  };
  if (whole & 1) {
    one(e, VEC);
    advance();
  }
  for (int left = static_cast<int>(whole / 2); left > 0;) {
    // Without chunks the outer loop runs once: nothing of it lives across the main loop.
    const int pairs = kChunk == kNoChunks || left < kChunk ? left : kChunk;
    for (int p = pairs; p > 0; --p) {  // sass: main loop
      const int64_t e0 = e;
      advance();
      pair(e0, e);
      advance();
    }
    if (kChunk == kNoChunks) break;
    left -= pairs;
    chunk();
  }
}

// The partial sum of channel c from block p of the P along x.
DQA_HD int64_t rows_slot(int64_t c, int64_t p, int64_t P) { return c * P + p; }

// ---- tiles: x as an [outer, W = C * inner] matrix, a thread owning VEC columns ----

struct TilesWalk {
  int64_t outer;
  int64_t W;
  int64_t row_step;  // gridDim.y * by rows between a thread's vectors
  Divider by_step;   // counts a thread's rows
  int64_t de;        // row_step * W
};

// First column of thread tx of tile t (tiles of bx threads x VEC columns).
DQA_HD int64_t tile_column(int64_t t, int bx, int tx, int vec) {
  return (t * bx + tx) * static_cast<int64_t>(vec);
}

// Rows first_row, first_row + row_step, ... of column col: one(e) for each of the first
// n % NV rows, then NV at a time, rows(e, de) for the flat indices e, e + de, ...,
// e + (NV - 1) * de of the thread's vectors (NV loads in flight), in chunks of at most kChunk
// groups, each chunk followed by chunk().
template <int NV, int kChunk, typename Rows, typename One, typename Chunk>
DQA_HD void walk_tile_rows(const TilesWalk& w, int64_t col, int64_t first_row, Rows&& rows,
                           One&& one, Chunk&& chunk) {
  if (first_row >= w.outer) return;
  const int64_t n = w.by_step.div(w.outer - first_row - 1) + 1;  // this thread's rows
  int64_t e = first_row * w.W + col;
  for (int k = static_cast<int>(n % NV); k > 0; --k) {
    one(e);
    e += w.de;
  }
  for (int left = static_cast<int>(n / NV); left > 0;) {
    const int groups = kChunk == kNoChunks || left < kChunk ? left : kChunk;
    for (int p = groups; p > 0; --p) {  // sass: main loop
      rows(e, w.de);
      e += NV * w.de;
    }
    if (kChunk == kNoChunks) break;
    left -= groups;
    chunk();
  }
}

// The partial sum of column col from row block r.
DQA_HD int64_t tiles_slot(int64_t r, int64_t W, int64_t col) { return r * W + col; }

// ---- the step gradient's reduction: partials, their fixed order, the counters ----
//
// Channel c has `count` partial sums p_0 .. p_{count-1} (double) at partial_slot(c, m). Their
// sum, in an order fixed by (shape, dtype, path) alone, is
//   L_g   = T(p_{32g}, ..., p_{32g+31})                           g < G = ceil(count / 32)
//   total = (((0 + T(L_0 .. L_31)) + T(L_32 .. L_63)) + ...)      sequentially in double
// where T is the 32-lane tree of warp_sum (terms past the end are 0):
//   for off = 16, 8, 4, 2, 1: v_l += v_{l+off} for l < off;  T = v_0.
// dstep[c] = float(total * grad_scale) * effective_step_grad(step[c]).
// Either a separate finalize kernel computes it, or the main kernel does (fused_finalize below):
// the block that arrives last at its group's counter computes L_g, the one that arrives last at
// its domain's counter (after every group's L_g) the total. Both compute the same expressions,
// so the result does not depend on which ran.
constexpr int kGroup = 32;

struct ReduceArgs {
  int64_t C;      // channels: dstep entries
  int64_t count;  // partials per channel
  // partial_slot(c, m) = c * c_stride + (m / chunk) * chunk_stride + m % chunk
  int64_t chunk;
  Divider by_chunk;
  int64_t chunk_stride;
  int64_t c_stride;
  int64_t groups;      // G = ceil(count / kGroup)
  int64_t group_base;  // L_g of channel c at group_base + c * groups + g (fused, groups > 1)
  // Fused: a domain is the blocks whose partials make the same channels; in it the block with
  // index m writes the partials m of its channels (count blocks per domain), at
  // c * c_stride + m * m_stride (chunk is count or 1 there: no division needed).
  int64_t m_stride;
  int64_t counters_per_domain;  // 0 when count == 1, 1 when groups == 1, else groups + 1
};

DQA_HD int64_t partial_slot(const ReduceArgs& a, int64_t c, int64_t m) {
  const int64_t k = a.by_chunk.div(m);
  return c * a.c_stride + k * a.chunk_stride + (m - k * a.chunk);
}
// partial_slot where the reduction is fused (the kernels check it: plan_test).
DQA_HD int64_t fused_slot(const ReduceArgs& a, int64_t c, int64_t m) {
  return c * a.c_stride + m * a.m_stride;
}
DQA_HD int64_t group_slot(const ReduceArgs& a, int64_t c, int64_t g) {
  return a.group_base + c * a.groups + g;
}
// Members of group g: m in [g * kGroup, g * kGroup + group_size(a, g)).
DQA_HD int64_t group_size(const ReduceArgs& a, int64_t g) {
  const int64_t n = a.count - g * kGroup;
  return n < kGroup ? n : kGroup;
}
// Counters of domain d: one per group (the level-one sums), then one for the total.
DQA_HD int64_t group_counter(const ReduceArgs& a, int64_t d, int64_t g) {
  return d * a.counters_per_domain + g;
}
DQA_HD int64_t domain_counter(const ReduceArgs& a, int64_t d) {
  return d * a.counters_per_domain + a.groups;
}

// The slots a warp's lanes read. Fused, level one: lane l of the warp computing L_g of channel
// c reads the partial m = 32g + l. Level two (fused): lane l reads L_g for g = 32h + l of round
// h. Separate finalize: round h's group g = 32h + warp + u * warps_per_block (u < 32 / warps)
// is computed by that warp, lane l reading m = 32g + l. -1: no term (0.0 in the tree).
DQA_HD int64_t level1_slot(const ReduceArgs& a, int64_t c, int64_t g, int lane) {
  const int64_t m = g * kGroup + lane;
  return m < a.count ? fused_slot(a, c, m) : -1;
}
DQA_HD int64_t level2_slot(const ReduceArgs& a, int64_t c, int64_t h, int lane) {
  const int64_t g = h * kGroup + lane;
  return g < a.groups ? group_slot(a, c, g) : -1;
}
DQA_HD int64_t finalize_group(int64_t h, int warp, int u, int warps) {
  return h * kGroup + warp + u * warps;
}
DQA_HD int64_t finalize_slot(const ReduceArgs& a, int64_t c, int64_t g, int lane) {
  const int64_t m = g * kGroup + lane;
  return g < a.groups && m < a.count ? partial_slot(a, c, m) : -1;
}

// ---- the fused finalize: one control flow for the kernel and the emulation ----
//
// Run by a block of domain d after it wrote the partials m of the K channels channel_of(0 ..
// K-1). F is the platform: the kernel's (dqa_backward.cu, every thread of the block runs this)
// or the emulation's (emulate_test.cpp, one call per block, all lanes at once). It provides
//   Value                        a lane's double (the emulation: the 32 lanes' tree hashes)
//   arrive(counter, limit)       the block arrives at the counter, as atomicInc(counter, limit):
//                                old = *counter; *counter = old >= limit ? 0 : old + 1. True (in
//                                every thread) when old == limit: the block arrived last, and
//                                the counter is back at 0 for the next launch, with no reset
//                                store. Release (the block's writes before) and acquire (the
//                                others' writes after) are the platform's.
//   warps(body)                  body(warp, warps) for this thread's warp (the emulation: each)
//   load(slot_of)                the double at slot_of(lane), 0 where it is -1 (lane: this one)
//   sum(v)                       warp_sum's tree over the 32 lanes (valid in lane 0 only)
//   first(v)                     lane 0's v, 0 in the others
//   zero(), add(a, b)            0.0 and a + b, per lane
//   store_first(slot, v)         lane 0 writes v to the workspace slot (a level-one sum)
//   write_dstep(c, total)        lane 0 writes dstep[c] from the channel's total
// Within a warp, kFinalizeAtOnce channels at a time: their loads are in flight together.
constexpr int kFinalizeAtOnce = 2;

// v[u] = this lane's term slot_of(k0 + u, lane) of channel k0 + u, for each u (none past K).
template <typename F, typename SlotOf>
DQA_HD void load_channels(F& f, typename F::Value (&v)[kFinalizeAtOnce], int k0, int K, SlotOf slot_of) {
  DQA_UNROLL
  for (int u = 0; u < kFinalizeAtOnce; ++u) {
    const int k = k0 + u;
    v[u] = f.load([&](int lane) { return k < K ? slot_of(k, lane) : int64_t{-1}; });
  }
}

template <typename F, typename ChannelOf>
DQA_HD void fused_finalize(F& f, const ReduceArgs& r, int64_t d, int64_t m, int K, ChannelOf channel_of) {
  using V = typename F::Value;
  constexpr int kAtOnce = kFinalizeAtOnce;
  const int64_t g = m / kGroup;
  if (!f.arrive(group_counter(r, d, g), static_cast<unsigned>(group_size(r, g) - 1))) return;
  // Last of its group: L_g of each channel, one warp per channel.
  f.warps([&](int warp, int warps) {
    for (int k0 = warp * kAtOnce; k0 < K; k0 += warps * kAtOnce) {
      V v[kAtOnce];
      load_channels(f, v, k0, K, [&](int k, int lane) { return level1_slot(r, channel_of(k), g, lane); });
      DQA_UNROLL
      for (int u = 0; u < kAtOnce; ++u) {
        if (k0 + u >= K) break;
        const int64_t c = channel_of(k0 + u);
        const V level = f.sum(v[u]);
        if (r.groups == 1) {  // the total: 0 + T(L_0, 0, ..., 0)
          f.write_dstep(c, f.add(f.zero(), f.sum(f.first(level))));
        } else {
          f.store_first(group_slot(r, c, g), level);
        }
      }
    }
  });
  if (r.groups == 1) return;
  // Last of the domain's groups: the totals.
  if (!f.arrive(domain_counter(r, d), static_cast<unsigned>(r.groups - 1))) return;
  f.warps([&](int warp, int warps) {
    for (int k0 = warp * kAtOnce; k0 < K; k0 += warps * kAtOnce) {
      V total[kAtOnce];
      DQA_UNROLL
      for (int u = 0; u < kAtOnce; ++u) total[u] = f.zero();
      for (int64_t h = 0; h * kGroup < r.groups; ++h) {
        V v[kAtOnce];
        load_channels(f, v, k0, K, [&](int k, int lane) { return level2_slot(r, channel_of(k), h, lane); });
        DQA_UNROLL
        for (int u = 0; u < kAtOnce; ++u) total[u] = f.add(total[u], f.sum(v[u]));
      }
      DQA_UNROLL
      for (int u = 0; u < kAtOnce; ++u) {
        if (k0 + u < K) f.write_dstep(channel_of(k0 + u), total[u]);
      }
    }
  });
}

}  // namespace dqa_cuda
