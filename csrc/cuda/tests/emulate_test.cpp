// Runs the CUDA kernels' index arithmetic (dqa_walk.h, the same functions the kernels call) and
// the planner on the host, thread by thread, over many shapes, dtypes, pointer alignments and
// SM counts, and checks:
//  - forward and grad_x alone, both paths (rows, tiles): every element written once, by a vector
//    in bounds, aligned, inside one row (rows path, C > 1), with its own channel's step;
//  - the backward, both paths: the same, plus every float32 sum flushed before 1024 terms, every
//    partial-sum slot written once by its channel;
//  - the step-gradient reduction: the separate finalize reads every slot once, for its channel;
//    the fused one (dqa_walk.h's fused_finalize, the kernel's own control flow, on an atomicInc
//    emulated here), for random orders of block arrival and two launches in a row, reads only
//    slots already written (by blocks that arrived), writes each level-one sum once, leaves every
//    counter at zero, writes each dstep once, and sums in exactly the separate finalize's order
//    (an order-sensitive hash of the two trees must match);
//  - tensors over 2**31 elements: sampled threads, each index checked against 64-bit division.
// Built and run by scripts/check_cuda_kernels.sh and tests/test_cuda_planner.py.
// Usage: emulate_test [random cases, default 3000]
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/dqa_plan.h"
#include "cuda/dqa_walk.h"

using namespace dqa_cuda;

namespace {

int failures = 0;
int64_t cases = 0;
std::mt19937_64 order_rng(5);

struct Case {
  Shape shape;
  DType dtype;
  int64_t off_x, off_dy, off_out;  // pointer offsets in elements from a 256-byte boundary
  int sm_count, blocks_per_sm;
  std::string str() const {
    static const char* names[] = {"float32", "float16", "bfloat16"};
    char buf[200];
    std::snprintf(buf, sizeof buf, "[%lld, %lld, %lld] %s offsets (%lld, %lld, %lld) sms %d x %d",
                  (long long)shape.outer, (long long)shape.channels, (long long)shape.inner,
                  names[static_cast<int>(dtype)], (long long)off_x, (long long)off_dy,
                  (long long)off_out, sm_count, blocks_per_sm);
    return buf;
  }
};

// Stops a case at its first failure (one line per failing case).
struct Checker {
  const Case& k;
  bool ok = true;
  void operator()(bool cond, const char* what, int64_t a = 0, int64_t b = 0) {
    if (cond || !ok) return;
    ok = false;
    ++failures;
    std::printf("FAIL: %s (%lld, %lld) in %s\n", what, (long long)a, (long long)b, k.str().c_str());
  }
};

uintptr_t addr(int64_t off, DType d) { return 0x7f0000000000u + off * elem_size(d); }

bool aligned(int64_t off, int64_t e, int vec, DType d) {
  return (addr(off, d) + e * elem_size(d)) % (uintptr_t(vec) * elem_size(d)) == 0;
}

int64_t channel_of(const Shape& s, int64_t e) { return (e / s.inner) % s.channels; }

// ---- an order-sensitive hash of the reduction's trees ----

// A sum a + b; 0 stands for an absent term (+0.0 on the device), the identity of the addition.
uint64_t mix(uint64_t a, uint64_t b) {
  if (b == 0) return a;
  if (a == 0) return b;
  uint64_t h = a * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  h ^= (b + 0x94d049bb133111ebull) * 0xbf58476d1ce4e5b9ull;
  return h ^ (h >> 29);
}
// warp_sum's tree over 32 lanes (absent terms 0): for off = 16 .. 1, v[l] = v[l] + v[l + off].
uint64_t tree32(std::vector<uint64_t> v) {
  v.resize(kGroup, 0);
  for (int off = kGroup / 2; off > 0; off >>= 1) {
    for (int l = 0; l < off; ++l) v[l] = mix(v[l], v[l + off]);
  }
  return v[0];
}
uint64_t leaf(int64_t slot) { return slot < 0 ? 0 : mix(0x5bd1e995u, uint64_t(slot) + 1); }

// ---- forward ----

template <int VEC>
void forward(const Case& k, Checker& check, bool grad) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  const int64_t off_dy = grad ? k.off_dy : 0;
  const uintptr_t px = addr(k.off_x, k.dtype), pd = grad ? addr(off_dy, k.dtype) : 0,
                  po = addr(k.off_out, k.dtype);
  const ForwardPath path = forward_path(s, k.dtype, px, pd, po);
  const ForwardPlan p = plan_forward(s, k.dtype, px, pd, po, int64_t{k.sm_count} * k.blocks_per_sm);
  check(p.vec == VEC && path.vec == VEC && p.tiled == path.tiled, "forward path", p.vec, VEC);
  check(p.grid.x >= 1 && p.grid.y >= 1 && p.grid.y <= unsigned(kMaxGridY), "forward grid", p.grid.x, p.grid.y);
  std::vector<uint8_t> written(numel, 0);
  // A whole or partial vector at e of len elements whose steps are step_channel(j).
  auto visit = [&](int64_t e, int64_t len, auto step_channel) {
    if (!check.ok) return;
    check(e >= 0 && len > 0 && e + len <= numel, "forward vector out of bounds", e, len);
    if (!check.ok) return;
    if (len == VEC) {  // one packed access per pointer
      check(aligned(k.off_x, e, VEC, k.dtype) && aligned(k.off_out, e, VEC, k.dtype) &&
                (!grad || aligned(off_dy, e, VEC, k.dtype)),
            "forward packed access misaligned", e, VEC);
    }
    for (int64_t j = 0; j < len && check.ok; ++j) {
      check(step_channel(j) == channel_of(s, e + j), "forward element with another channel's step", e + j);
      check(written[e + j]++ == 0, "forward element written twice", e + j);
    }
  };
  if (!p.tiled) {
    check(s.channels == 1 || s.inner % VEC == 0, "rows vector may cross a row", s.inner, VEC);
    for (unsigned y = 0; y < p.grid.y && check.ok; ++y) {
      for (int64_t t = 0; t < int64_t{p.grid.x} * p.block && check.ok; ++t) {
        for (int64_t c = y; c < s.channels && check.ok; c += p.grid.y) {
          const auto chan = [c](int64_t) { return c; };
          walk_channel_rows<VEC, kNoChunks>(
              p.rows, t, c,
              [&](int64_t e0, int64_t e1) {
                visit(e0, VEC, chan);
                visit(e1, VEC, chan);
              },
              [&](int64_t e, int64_t n) {
                check(n >= VEC || (s.channels == 1 && e + n == numel), "rows partial vector", e, n);
                visit(e, n < VEC ? n : VEC, chan);
              },
              [&] { check(false, "a forward walk flushed"); });
        }
      }
    }
  } else {
    const int64_t W = s.channels * s.inner;
    const int bx = 1 << p.bx_log2;
    const int by = kThreads >> p.bx_log2;
    const Divider by_inner = make_divider(s.inner);
    check(W % VEC == 0 && p.tiles.W == W && p.tiles.row_step == int64_t{p.grid.y} * by,
          "tiles walk", W, VEC);
    for (unsigned y = 0; y < p.grid.y && check.ok; ++y) {
      for (unsigned x = 0; x < p.grid.x && check.ok; ++x) {
        for (int t = 0; t < kThreads && check.ok; ++t) {
          const int64_t col = tile_column(x, bx, t & (bx - 1), VEC);
          if (col >= W) continue;
          // The kernel loads column j's step once, from channel by_inner.div(col + j).
          const auto chan = [&](int64_t j) { return by_inner.div(col + j); };
          walk_tile_rows<2, kNoChunks>(
              p.tiles, col, int64_t{y} * by + (t >> p.bx_log2),
              [&](int64_t e, int64_t de) {
                visit(e, VEC, chan);
                visit(e + de, VEC, chan);
              },
              [&](int64_t e) { visit(e, VEC, chan); }, [&] { check(false, "a forward walk flushed"); });
        }
      }
    }
  }
  for (int64_t e = 0; e < numel && check.ok; ++e) check(written[e] == 1, "forward element not written", e);
}

// ---- backward ----

// Partial-sum slots: which channel and block (m) wrote each, how often each was written and read.
struct Slots {
  std::vector<int64_t> owner, block;
  std::vector<int> writes, reads;
  explicit Slots(int64_t n) : owner(n, -1), block(n, -1), writes(n, 0), reads(n, 0) {}
};

void write_slot(Slots& sl, Checker& check, int64_t slot, int64_t c, int64_t m, int64_t limit) {
  check(slot >= 0 && slot < limit, "partial slot out of the workspace", slot, c);
  if (!check.ok) return;
  check(sl.writes[slot]++ == 0, "partial slot written twice", slot, c);
  sl.owner[slot] = c;
  sl.block[slot] = m;
}

// A float32 sum: terms added since the last flush.
struct Terms {
  int64_t n = 0;
  void add(Checker& check, int64_t k) {
    n += k;
    check(n <= kFlushTerms, "a float32 sum took more than kFlushTerms terms", n);
  }
};

template <int VEC>
void backward_rows(const Case& k, const BackwardPlan& p, Checker& check, Slots& sl,
                   std::vector<uint8_t>& written, std::vector<int>& dstep) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  check(s.channels == 1 || s.inner % VEC == 0, "rows vector may cross a row", s.inner, VEC);
  check(p.reduce.count == p.grid.x, "rows partials per channel", p.reduce.count, p.grid.x);
  for (unsigned y = 0; y < p.grid.y && check.ok; ++y) {
    for (unsigned x = 0; x < p.grid.x && check.ok; ++x) {
      for (int t = 0; t < p.block && check.ok; ++t) {
        const int64_t tid = int64_t{x} * p.block + t;
        for (int64_t c = y; c < s.channels && check.ok; c += p.grid.y) {
          Terms terms;
          auto visit = [&](int64_t e, int64_t len) {
            if (!check.ok) return;
            check(e >= 0 && len > 0 && e + len <= numel, "rows vector out of bounds", e, len);
            if (p.packed && len == VEC) {
              check(aligned(k.off_x, e, VEC, k.dtype) && aligned(k.off_dy, e, VEC, k.dtype) &&
                        aligned(k.off_out, e, VEC, k.dtype),
                    "rows packed access misaligned", e, VEC);
            }
            for (int64_t j = 0; j < len && check.ok; ++j) {
              check(channel_of(s, e + j) == c, "rows element of another channel", e + j, c);
              check(written[e + j]++ == 0, "rows element written twice", e + j);
            }
            terms.add(check, len);
          };
          walk_channel_rows<VEC, kRowsPairsPerFlush<VEC>>(
              p.rows, tid, c,
              [&](int64_t e0, int64_t e1) {
                visit(e0, VEC);
                visit(e1, VEC);
              },
              [&](int64_t e, int64_t n) {
                check(n >= VEC || s.channels == 1, "rows partial vector with C > 1", e, n);
                visit(e, n < VEC ? n : VEC);
              },
              [&] { terms.n = 0; });
          if (t != 0) continue;
          if (p.reduce.count == 1) {
            ++dstep[c];
          } else {
            write_slot(sl, check, rows_slot(c, x, p.grid.x), c, x, p.reduce.group_base);
          }
        }
      }
    }
  }
}

template <int VEC>
void backward_tiles(const Case& k, const BackwardPlan& p, Checker& check, Slots& sl,
                    std::vector<uint8_t>& written, std::vector<int>& dstep) {
  const Shape& s = k.shape;
  const int64_t W = s.channels * s.inner;
  const int bx = 1 << p.bx_log2;
  const int by = kThreads >> p.bx_log2;
  const Divider by_inner = make_divider(s.inner);
  check(p.block == kThreads && bx * by == kThreads, "tile block shape", bx, by);
  check(VEC <= kTiledBackwardMaxVec && W % VEC == 0, "tiled backward width", VEC, W);
  check(p.tiles.W == W && p.tiles.row_step == int64_t{p.grid.y} * by, "tiles walk", W);
  check(p.reduce.count == int64_t{p.grid.y} * s.inner, "tiled partials per channel", p.reduce.count);
  for (unsigned y = 0; y < p.grid.y && check.ok; ++y) {
    for (unsigned x = 0; x < p.grid.x && check.ok; ++x) {
      std::vector<uint8_t> smem(size_t(kThreads) * VEC, 0);  // the tree's slots in this block
      for (int t = 0; t < kThreads && check.ok; ++t) {
        const int tx = t & (bx - 1);
        const int ty = t >> p.bx_log2;
        for (int j = 0; j < VEC; ++j) {
          const int64_t m = int64_t{ty} * bx * VEC + tx * VEC + j;
          check(m < kThreads * VEC && smem[m]++ == 0, "tile shared slot shared", m);
        }
        const int64_t col = tile_column(x, bx, tx, VEC);
        if (col >= W) continue;
        check(col + VEC <= W, "tile vector past the row", col, W);
        Terms terms;  // per column: every row adds one term to each of the VEC sums
        auto visit = [&](int64_t e) {
          if (!check.ok) return;
          check(e >= 0 && e + VEC <= numel_of(s), "tile vector out of bounds", e);
          if (p.packed) {
            check(aligned(k.off_x, e, VEC, k.dtype) && aligned(k.off_dy, e, VEC, k.dtype) &&
                      aligned(k.off_out, e, VEC, k.dtype),
                  "tile packed access misaligned", e, VEC);
          }
          for (int j = 0; j < VEC && check.ok; ++j) {
            check(channel_of(s, e + j) == by_inner.div(col + j), "tile element of another channel", e + j);
            check(written[e + j]++ == 0, "tile element written twice", e + j);
          }
          terms.add(check, 1);
        };
        walk_tile_rows<kTiledRowsInFlight, kTilesGroupsPerFlush>(
            p.tiles, col, int64_t{y} * by + ty,
            [&](int64_t e, int64_t de) {
              for (int r = 0; r < kTiledRowsInFlight; ++r) visit(e + r * de);
            },
            visit, [&] { terms.n = 0; });
        if (ty != 0) continue;
        for (int j = 0; j < VEC; ++j) {
          if (p.reduce.count == 1) {
            check(s.inner == 1, "tiled direct dstep with inner > 1", s.inner);
            ++dstep[col + j];
          } else {
            write_slot(sl, check, tiles_slot(y, W, col + j), (col + j) / s.inner, y,
                       p.reduce.group_base);
          }
        }
      }
    }
  }
}

// The separate finalize, as finalize_kernel: block b takes channels b, b + grid, ...; per round
// h of 32 groups, warp w of 8 computes groups 32h + w + 8u. Returns each channel's tree hash.
std::vector<uint64_t> finalize_separate(const BackwardPlan& p, Checker& check, Slots& sl) {
  const ReduceArgs& r = p.reduce;
  constexpr int kWarps = kThreads / 32;
  std::vector<uint64_t> total(r.C, 0);
  std::vector<int> done(r.C, 0);
  for (unsigned b = 0; b < p.finalize_grid.x && check.ok; ++b) {
    for (int64_t c = b; c < r.C && check.ok; c += p.finalize_grid.x) {
      uint64_t t = 0;
      for (int64_t h = 0; h * kGroup < r.groups && check.ok; ++h) {
        std::vector<uint64_t> level(kGroup, 0);
        for (int w = 0; w < kWarps; ++w) {
          for (int u = 0; u < kGroup / kWarps; ++u) {
            const int64_t g = finalize_group(h, w, u, kWarps);
            std::vector<uint64_t> lanes(kGroup, 0);
            for (int lane = 0; lane < kGroup && check.ok; ++lane) {
              const int64_t slot = finalize_slot(r, c, g, lane);
              if (slot < 0) continue;
              check(slot < int64_t(sl.owner.size()) && sl.owner[slot] == c,
                    "finalize reads another channel's slot", slot, c);
              if (!check.ok) break;
              ++sl.reads[slot];
              lanes[lane] = leaf(slot);
            }
            level[g - h * kGroup] = tree32(lanes);
          }
        }
        t = mix(t, tree32(level));
      }
      total[c] = t;
      ++done[c];
    }
  }
  for (int64_t c = 0; c < r.C && check.ok; ++c) check(done[c] == 1, "finalize misses a channel", c);
  return total;
}

// The fused finalize's platform for dqa_walk.h's fused_finalize (the kernel's own control flow):
// a block at a time, all 32 lanes of a warp at once, every warp in turn; values are tree hashes.
// It checks every counter, partial and level-one slot that the control flow touches.
struct EmuFinalize {
  using Value = std::array<uint64_t, kGroup>;
  static constexpr uint64_t kNotLaneZero = 0xdeadbeefcafef00dull;  // warp_sum's lanes 1..31

  const BackwardPlan& p;
  Checker& check;
  Slots& sl;
  std::vector<unsigned>& counters;
  std::vector<int>& group_writes;
  std::vector<int>& group_reads;
  std::vector<uint64_t>& group_hash;
  std::vector<uint64_t>& total;
  std::vector<int>& dstep;
  int64_t d = 0;                       // the arriving block's domain
  const std::vector<uint8_t>* arrived;  // the domain's blocks that have arrived

  bool arrive(int64_t counter, unsigned limit) {
    const int64_t per = p.reduce.counters_per_domain;
    check(counter >= d * per && counter < (d + 1) * per && counter < p.counters,
          "counter outside its domain's", counter, d);
    if (!check.ok) return false;
    const unsigned old = counters[counter];  // atomicInc
    counters[counter] = old >= limit ? 0u : old + 1u;
    return old == limit;
  }
  template <typename Body>
  void warps(Body body) {
    for (int w = 0; w < p.block / 32; ++w) body(w, p.block / 32);
  }
  template <typename SlotOf>
  Value load(SlotOf slot_of) {
    Value v{};
    for (int lane = 0; lane < kGroup && check.ok; ++lane) {
      const int64_t slot = slot_of(lane);
      if (slot < 0) continue;
      if (slot < p.reduce.group_base) {  // a block's partial
        check(slot < int64_t(sl.owner.size()) && sl.owner[slot] >= 0, "fused read of a partial not written", slot);
        if (!check.ok) break;
        check((*arrived)[sl.block[slot]] == 1, "fused read of a block that has not arrived", slot, sl.block[slot]);
        ++sl.reads[slot];
        v[lane] = leaf(slot);
      } else {  // a level-one sum
        const int64_t gs = slot - p.reduce.group_base;
        check(gs < int64_t(group_writes.size()) && group_writes[gs] == 1, "level two reads a sum not written", slot);
        if (!check.ok) break;
        ++group_reads[gs];
        v[lane] = group_hash[gs];
      }
    }
    return v;
  }
  Value sum(const Value& v) {
    Value r;
    r.fill(kNotLaneZero);
    r[0] = tree32(std::vector<uint64_t>(v.begin(), v.end()));
    return r;
  }
  Value first(const Value& v) {
    Value r{};
    r[0] = v[0];
    return r;
  }
  Value zero() { return Value{}; }
  Value add(const Value& a, const Value& b) {
    Value r;
    for (int l = 0; l < kGroup; ++l) r[l] = mix(a[l], b[l]);
    return r;
  }
  void store_first(int64_t slot, const Value& v) {
    const int64_t gs = slot - p.reduce.group_base;
    check(gs >= 0 && gs < int64_t(group_writes.size()), "level-one sum outside its slots", slot);
    if (!check.ok) return;
    check(group_writes[gs]++ == 0, "level-one sum written twice", gs);
    group_hash[gs] = v[0];
  }
  void write_dstep(int64_t c, const Value& t) {
    check(c >= 0 && c < p.reduce.C, "fused dstep of no channel", c);
    if (!check.ok) return;
    total[c] = t[0];
    ++dstep[c];
  }
};

// The fused finalize for one order of arrival per domain, over counters that start at zero
// (and must end there); returns each channel's tree hash.
std::vector<uint64_t> finalize_fused(const Case& k, const BackwardPlan& p, Checker& check, Slots& sl,
                                     std::vector<unsigned>& counters, std::vector<int>& dstep) {
  const ReduceArgs& r = p.reduce;
  const Shape& s = k.shape;
  std::vector<uint64_t> total(r.C, 0);
  const int64_t groups_end = r.group_base + (r.groups > 1 ? r.C * r.groups : 0);
  check(groups_end <= p.workspace_doubles, "level-one sums outside the workspace", groups_end);
  std::vector<int> group_writes(groups_end > r.group_base ? groups_end - r.group_base : 0, 0);
  std::vector<int> group_reads(group_writes.size(), 0);
  std::vector<uint64_t> group_hash(group_writes.size(), 0);
  EmuFinalize f{p, check, sl, counters, group_writes, group_reads, group_hash, total, dstep, 0, nullptr};
  const int bx = 1 << p.bx_log2;
  for (int64_t d = 0; d < p.domains && check.ok; ++d) {
    // The domain's channels: rows, its channel; tiles (inner == 1), the tile's columns.
    int64_t first = d;
    int64_t K = 1;
    if (p.tiled) {
      first = tile_column(d, bx, 0, p.vec);
      K = std::min<int64_t>(int64_t{bx} * p.vec, s.channels - first);
    }
    std::vector<int64_t> order(r.count);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), order_rng);
    std::vector<uint8_t> arrived(r.count, 0);
    f.d = d;
    f.arrived = &arrived;
    for (int64_t m : order) {
      if (!check.ok) break;
      arrived[m] = 1;
      fused_finalize(f, r, d, m, static_cast<int>(K), [&](int j) { return first + j; });
    }
  }
  for (size_t i = 0; i < counters.size() && check.ok; ++i) check(counters[i] == 0, "a counter left non-zero", i);
  for (size_t i = 0; i < group_writes.size() && check.ok; ++i) {
    check(group_writes[i] == group_reads[i] && group_writes[i] <= 1, "level-one sum not read once", i);
  }
  return total;
}

template <int VEC>
void backward(const Case& k, Checker& check) {
  const Shape& s = k.shape;
  const BackwardPlan p = plan_backward(s, k.dtype, addr(k.off_dy, k.dtype), addr(k.off_x, k.dtype),
                                       addr(k.off_out, k.dtype));
  const BackwardPlan q = plan_backward(s, k.dtype, 0, 0, 0);
  check(p.vec == VEC && p.vec == q.vec && p.tiled == q.tiled && p.grid.x == q.grid.x &&
            p.grid.y == q.grid.y && p.block == q.block && p.workspace_doubles == q.workspace_doubles &&
            p.reduce.count == q.reduce.count && p.fusable == q.fusable,
        "backward partition depends on the pointers");
  check(p.grid.y >= 1 && p.grid.y <= unsigned(kMaxGridY) && p.grid.x >= 1, "backward grid", p.grid.x, p.grid.y);
  Slots sl(p.workspace_doubles);
  std::vector<uint8_t> written(numel_of(s), 0);
  std::vector<int> dstep(s.channels, 0);
  if (p.tiled) {
    backward_tiles<VEC>(k, p, check, sl, written, dstep);
  } else {
    backward_rows<VEC>(k, p, check, sl, written, dstep);
  }
  for (int64_t e = 0; e < numel_of(s) && check.ok; ++e) check(written[e] == 1, "backward element not written", e);
  if (!check.ok) return;
  if (p.reduce.count == 1) {  // every block wrote its channels' dstep: nothing to finalize
    check(p.fusable && p.counters == 0 && p.workspace_doubles == 0, "direct dstep plan", p.counters);
  } else {
    const std::vector<uint64_t> separate = finalize_separate(p, check, sl);
    const int64_t partials = p.reduce.C * p.reduce.count;
    for (int64_t m = 0; m < partials && check.ok; ++m) {
      const int64_t slot = p.tiled ? m : m;  // the partials fill [0, C * count) on both paths
      check(sl.writes[slot] == 1 && sl.reads[slot] == 1, "partial slot not written and read once", slot,
            sl.writes[slot]);
    }
    if (p.fusable && check.ok) {
      // Two launches in a row on the same counters (another order of arrival): the first must
      // leave them at zero for the second.
      std::vector<unsigned> counters(p.counters, 0);
      for (int launch = 0; launch < 2 && check.ok; ++launch) {
        std::fill(sl.reads.begin(), sl.reads.end(), 0);
        std::vector<int> fused_dstep(s.channels, 0);
        const std::vector<uint64_t> fused = finalize_fused(k, p, check, sl, counters, fused_dstep);
        for (int64_t m = 0; m < partials && check.ok; ++m) check(sl.reads[m] == 1, "fused: partial slot not read once", m);
        for (int64_t c = 0; c < s.channels && check.ok; ++c) {
          check(fused[c] == separate[c], "fused and separate finalize sum in different orders", c);
          check(fused_dstep[c] == 1, "fused dstep not written once", c, fused_dstep[c]);
        }
      }
      for (int64_t c = 0; c < s.channels; ++c) ++dstep[c];
    } else {
      for (int64_t c = 0; c < s.channels; ++c) ++dstep[c];  // the separate finalize wrote it
    }
  }
  for (int64_t c = 0; c < s.channels && check.ok; ++c) check(dstep[c] == 1, "dstep not written once", c, dstep[c]);
}

template <template <int> class F>
void with_vec(int vec, const Case& k, Checker& check) {
  switch (vec) {
    case 1: F<1>::run(k, check); break;
    case 2: F<2>::run(k, check); break;
    case 4: F<4>::run(k, check); break;
    case 8: F<8>::run(k, check); break;
    default: check(false, "unexpected vec", vec);
  }
}
template <int V> struct Fwd { static void run(const Case& k, Checker& c) { forward<V>(k, c, false); } };
template <int V> struct Gx { static void run(const Case& k, Checker& c) { forward<V>(k, c, true); } };
template <int V> struct Bwd { static void run(const Case& k, Checker& c) { backward<V>(k, c); } };

void run_case(const Case& k) {
  ++cases;
  Checker check{k};
  const uintptr_t x = addr(k.off_x, k.dtype), dy = addr(k.off_dy, k.dtype), out = addr(k.off_out, k.dtype);
  with_vec<Fwd>(forward_path(k.shape, k.dtype, x, 0, out).vec, k, check);
  with_vec<Gx>(forward_path(k.shape, k.dtype, x, dy, out).vec, k, check);
  with_vec<Bwd>(plan_backward(k.shape, k.dtype, dy, x, out).vec, k, check);
}

// ---- the walks alone on small grids: many vectors per thread, so many chunks and flushes ----

// The backward's walks with few threads: every element once, and every float32 sum flushed
// before it takes kFlushTerms terms (the planner's grids give a thread at most 4 vectors, so
// only such grids reach the chunking).
template <int VEC>
void chunked_walks(const Case& k, Checker& check) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  std::vector<uint8_t> written(numel, 0);
  if (s.channels == 1 || s.inner % VEC == 0) {
    for (int64_t nthreads : {int64_t{1}, int64_t{3}, int64_t{32}}) {
      std::fill(written.begin(), written.end(), 0);
      const RowsWalk w = rows_walk(s, nthreads, VEC);
      for (int64_t c = 0; c < s.channels && check.ok; ++c) {
        for (int64_t tid = 0; tid < nthreads && check.ok; ++tid) {
          Terms terms;
          auto visit = [&](int64_t e, int64_t len) {
            for (int64_t j = 0; j < len && check.ok; ++j) {
              check(e + j < numel && channel_of(s, e + j) == c, "chunked rows element of another channel", e + j, c);
              if (check.ok) check(written[e + j]++ == 0, "chunked rows element twice", e + j);
            }
            terms.add(check, len);
          };
          walk_channel_rows<VEC, kRowsPairsPerFlush<VEC>>(
              w, tid, c,
              [&](int64_t e0, int64_t e1) {
                visit(e0, VEC);
                visit(e1, VEC);
              },
              [&](int64_t e, int64_t n) { visit(e, n < VEC ? n : VEC); }, [&] { terms.n = 0; });
        }
      }
      for (int64_t e = 0; e < numel && check.ok; ++e) check(written[e] == 1, "chunked rows element missed", e);
    }
  }
  const int64_t W = s.channels * s.inner;
  if (W % VEC == 0) {
    for (int64_t row_step : {int64_t{1}, int64_t{3}}) {
      std::fill(written.begin(), written.end(), 0);
      const TilesWalk w = tiles_walk(s, row_step);
      for (int64_t col = 0; col < W && check.ok; col += VEC) {
        for (int64_t first = 0; first < row_step && check.ok; ++first) {
          Terms terms;
          auto visit = [&](int64_t e) {
            for (int j = 0; j < VEC && check.ok; ++j) {
              check(e + j < numel && written[e + j]++ == 0, "chunked tile element twice", e + j);
            }
            terms.add(check, 1);
          };
          walk_tile_rows<kTiledRowsInFlight, kTilesGroupsPerFlush>(
              w, col, first,
              [&](int64_t e, int64_t de) {
                for (int r = 0; r < kTiledRowsInFlight; ++r) visit(e + r * de);
              },
              visit, [&] { terms.n = 0; });
        }
      }
      for (int64_t e = 0; e < numel && check.ok; ++e) check(written[e] == 1, "chunked tile element missed", e);
    }
  }
}
template <int V> struct Chunked { static void run(const Case& k, Checker& c) { chunked_walks<V>(k, c); } };

// ---- tensors of more than 2**31 elements: sampled threads, indices against 64-bit division ----

// The flat index of channel c's k-th element.
int64_t channel_element(const Shape& s, int64_t c, int64_t k) {
  return (k / s.inner) * s.channels * s.inner + c * s.inner + k % s.inner;
}

template <int VEC>
void sampled_rows(const Case& k, Checker& check, const RowsWalk& w, int64_t nthreads, const char* what) {
  const Shape& s = k.shape;
  const int64_t nvec = (w.per_channel + VEC - 1) / VEC;
  // The edges, a few threads at random, and the owners of the vectors that end rows 0 and 1 (the
  // row cursor is then at its largest before a wrap).
  std::vector<int64_t> tids = {0, nthreads / 3, nthreads - 1};
  std::mt19937_64 rng(uint64_t(nthreads) * 31 + uint64_t(s.inner));
  for (int r = 0; r < 4; ++r) tids.push_back(int64_t(rng() % uint64_t(nthreads)));
  if (s.channels > 1) {
    for (int64_t row = 1; row <= 2; ++row) tids.push_back((row * s.inner / VEC - 1) % nthreads);
  }
  std::vector<int64_t> chans = {0, s.channels / 2, s.channels - 1};
  chans.erase(std::unique(chans.begin(), chans.end()), chans.end());
  for (int64_t c : chans) {
    for (int64_t tid : tids) {
      std::vector<int64_t> seen;
      walk_channel_rows<VEC, kNoChunks>(
          w, tid, c,
          [&](int64_t e0, int64_t e1) {
            seen.push_back(e0);
            seen.push_back(e1);
          },
          [&](int64_t e, int64_t) { seen.push_back(e); }, [] {});
      std::vector<int64_t> want;
      for (int64_t v = tid; v < nvec; v += nthreads) {
        want.push_back(s.channels == 1 ? v * VEC : channel_element(s, c, v * VEC));
      }
      if (!std::is_sorted(seen.begin(), seen.end())) std::sort(seen.begin(), seen.end());
      check(seen == want, what, tid, c);
    }
  }
}

void sampled_tiles(const Case& k, Checker& check, const TilesWalk& w, Grid grid, int bx_log2, int vec,
                   const char* what) {
  const int bx = 1 << bx_log2;
  const int by = kThreads >> bx_log2;
  for (unsigned x : {0u, grid.x / 2, grid.x - 1}) {
    for (unsigned y : {0u, grid.y - 1}) {
      for (int t : {0, kThreads / 2 + 1, kThreads - 1}) {
        const int64_t col = tile_column(x, bx, t & (bx - 1), vec);
        if (col >= w.W) continue;
        const int64_t first = int64_t{y} * by + (t >> bx_log2);
        std::vector<int64_t> seen;
        walk_tile_rows<2, kNoChunks>(
            w, col, first,
            [&](int64_t e, int64_t de) {
              seen.push_back(e);
              seen.push_back(e + de);
            },
            [&](int64_t e) { seen.push_back(e); }, [] {});
        std::vector<int64_t> want;
        for (int64_t o = first; o < k.shape.outer; o += w.row_step) want.push_back(o * w.W + col);
        std::sort(seen.begin(), seen.end());
        check(seen == want && (want.empty() || want.back() + vec <= numel_of(k.shape)), what, col, first);
      }
    }
  }
}

template <int VEC>
void sampled(const Case& k, Checker& check) {
  const Shape& s = k.shape;
  const uintptr_t x = addr(k.off_x, k.dtype), out = addr(k.off_out, k.dtype);
  const ForwardPlan f = plan_forward(s, k.dtype, x, 0, out, int64_t{k.sm_count} * k.blocks_per_sm);
  if (f.vec == VEC) {
    if (f.tiled) {
      sampled_tiles(k, check, f.tiles, f.grid, f.bx_log2, VEC, "sampled forward tile rows");
    } else {
      sampled_rows<VEC>(k, check, f.rows, int64_t{f.grid.x} * f.block, "sampled forward rows");
    }
  }
  const BackwardPlan b = plan_backward(s, k.dtype, 0, 0, 0);
  if (b.vec == VEC) {
    if (b.tiled) {
      sampled_tiles(k, check, b.tiles, b.grid, b.bx_log2, VEC, "sampled backward tile rows");
    } else {
      sampled_rows<VEC>(k, check, b.rows, int64_t{b.grid.x} * b.block, "sampled backward rows");
    }
    check(!b.fusable || b.counters <= kMaxCounters, "sampled: counters over a slot", b.counters);
  }
}
template <int V> struct Sampled { static void run(const Case& k, Checker& c) { sampled<V>(k, c); } };

void run_sampled(const Case& k) {
  ++cases;
  Checker check{k};
  for (int vec : {1, 2, 4, 8}) {
    if (vec <= max_vec(k.dtype)) with_vec<Sampled>(vec, k, check);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 3000;
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  // The shapes the CUDA tests name, and the paths' edges: long rows, short rows, channels_last,
  // (N, C) with odd C, per-tensor with a partial last vector, many channels, many rows.
  const Shape fixed[] = {{1, 70000, 64},  {3, 100001, 1}, {4, 8, 130},    {2, 8, 49},   {2, 16, 256},
                         {33, 24, 1},     {1, 1, 1},      {1, 1, 4097},   {1, 1, 1001}, {64, 3, 1},
                         {5, 12, 11},     {2, 70000, 1},  {1, 1, 300},    {1, 5, 64},   {7, 2, 127},
                         {3000, 8, 1},    {1, 1, 262147}, {2, 4, 8192},   {9, 64, 1},   {40, 2, 1024},
                         {1, 3, 100000}};
  for (const Shape& s : fixed) {
    for (DType d : dtypes) {
      for (int off = 0; off < 3; ++off) run_case({s, d, 0, off, 0, 132, 8});
      run_case({s, d, 1, 0, 0, 1, 1});
    }
  }
  std::mt19937_64 rng(20261128);
  auto pick = [&](int64_t lo, int64_t hi) { return lo + int64_t(rng() % uint64_t(hi - lo + 1)); };
  const int sms[] = {1, 2, 7, 46, 108, 132};
  for (int i = 0; i < random_cases; ++i) {
    Shape s{pick(1, 40), pick(1, 70), pick(1, 300)};
    if (i % 4 == 0) s.inner = pick(1, 8);        // the tiled path, several rows per tile
    if (i % 7 == 0) { s.outer = 1; s.channels = 1; }  // per-tensor: [1, 1, numel]
    if (i % 11 == 0) { s.outer = pick(200, 3000); s.inner = 1; s.channels = pick(1, 20); }  // many row blocks
    if (i % 13 == 0) { s.outer = pick(1, 4); s.channels = pick(1, 3); s.inner = pick(2000, 20000); }  // many blocks per channel
    while (numel_of(s) > 60000) s.outer = s.outer / 2;
    if (s.outer < 1) s.outer = 1;
    if (s.channels == 1) { s.inner = numel_of(s); s.outer = 1; }
    const DType d = dtypes[rng() % 3];
    const int widest = 16 / elem_size(d);
    const int64_t ox = rng() % 4 == 0 ? pick(0, widest - 1) : 0;
    const int64_t od = rng() % 3 == 0 ? pick(0, widest - 1) : 0;
    const int64_t oo = rng() % 4 == 0 ? pick(0, widest - 1) : 0;
    run_case({s, d, ox, od, oo, sms[rng() % 6], int(pick(1, 8))});
  }
  // The walks on grids of 1 to 32 threads: thousands of vectors per thread, chunks, flushes.
  for (const Shape& s : {Shape{1, 1, 40000}, Shape{3, 2, 4100}, Shape{5000, 4, 1}, Shape{2100, 3, 2},
                         Shape{1, 1, 3}, Shape{2, 3, 1}}) {
    for (DType d : dtypes) {
      const Case k{s, d, 0, 0, 0, 1, 1};
      ++cases;
      Checker check{k};
      for (int vec : {1, 2, 4, 8}) {
        if (vec <= max_vec(d)) with_vec<Chunked>(vec, k, check);
      }
    }
  }
  // More than 2**31 elements (the CUDA tests' shapes and larger), sampled threads only.
  const Shape big[] = {{518217, 4144, 1}, {1025, 8, 1 << 18}, {1, 1, (int64_t{1} << 31) + (1 << 21)},
                       {1, 1, int64_t{1} << 33}, {3, 70000, 1 << 14}, {1 << 16, 3, 16385},
                       {1 << 20, 4096, 1}, {1 << 25, 16, 8}, {2, 2, (int64_t{1} << 31) + 16},
                       // Rows of 2**30 to 2**31 - 1 elements, several per channel: the row cursor
                       // plus the grid stride passes 2**31 before it wraps.
                       {2, 2, 1500000000}, {3, 2, 1500000000}, {2, 2, (int64_t{1} << 31) - 8},
                       {3, 2, (int64_t{1} << 31) - 8}, {2, 2, (int64_t{1} << 31) - 1},
                       {3, 2, (int64_t{1} << 31) - 1}, {2, 3, (int64_t{1} << 30) + 8}};
  for (const Shape& s : big) {
    for (DType d : dtypes) {
      for (int sm : {1, 132}) run_sampled({s, d, 0, 0, 0, sm, 8});
      run_sampled({s, d, 1, 0, 0, 108, 3});
    }
  }
  std::printf("emulate_test: %lld cases, %d failed\n", (long long)cases, failures);
  return failures == 0 ? 0 : 1;
}
