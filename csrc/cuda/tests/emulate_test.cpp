// Runs the CUDA kernels' index arithmetic (dqa_walk.h, the same functions the kernels call) and
// the planner on the host, thread by thread, over many shapes, dtypes, pointer alignments and
// SM counts, and checks: every element is written once, with its own channel; every vector
// access is in bounds and, when packed, aligned; every partial-sum slot is written once, by its
// channel, and read once, by that channel's finalize; every channel's dstep is written once.
// Tensors over 2**31 elements: sampled threads, each index checked against 64-bit division.
// Built and run by scripts/check_cuda_kernels.sh and tests/test_cuda_planner.py.
// Usage: emulate_test [random cases, default 3000]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/dqa_plan.h"
#include "cuda/dqa_walk.h"

using namespace dqa_cuda;

namespace {

int failures = 0;
int64_t cases = 0;

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

template <int VEC>
void elementwise(const Case& k, Checker& check, bool grad) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  const int64_t off_dy = grad ? k.off_dy : 0;
  const ElementwisePlan p = plan_elementwise(s, k.dtype, addr(k.off_x, k.dtype),
                                             grad ? addr(off_dy, k.dtype) : 0,
                                             addr(k.off_out, k.dtype), k.sm_count, k.blocks_per_sm);
  check(p.vec == VEC, "elementwise vec", p.vec, VEC);
  const FlatWalk w{numel, s.channels, s.inner, make_divider(s.inner), make_divider(s.channels),
                   p.stride};
  std::vector<uint8_t> written(numel, 0);
  const int64_t nthreads = int64_t{p.blocks} * kThreads;
  for (int64_t tid = 0; tid < nthreads && check.ok; ++tid) {
    walk_flat<VEC>(w, tid, nthreads, [&](int64_t e, int64_t n, Cursor c) {
      check(e >= 0 && n > 0 && e + (n < VEC ? n : VEC) <= numel, "elementwise vector out of bounds", e, n);
      if (n >= VEC) {  // one packed access per pointer
        check(aligned(k.off_x, e, VEC, k.dtype) && aligned(k.off_out, e, VEC, k.dtype) &&
                  (!grad || aligned(off_dy, e, VEC, k.dtype)),
              "elementwise packed access misaligned", e, VEC);
      }
      for (int j = 0; j < VEC; ++j) {
        if (j > 0) next_element(c, s.inner, s.channels);
        if (j >= n || !check.ok) continue;
        check(c.c == channel_of(s, e + j) && c.i == (e + j) % s.inner, "elementwise channel", e + j, c.c);
        check(written[e + j]++ == 0, "elementwise element written twice", e + j);
      }
    });
  }
  for (int64_t e = 0; e < numel && check.ok; ++e) check(written[e] == 1, "elementwise element not written", e);
}

// Partial-sum slots: which channel wrote each, and how often each was written and read.
struct Slots {
  std::vector<int64_t> owner;
  std::vector<int> writes, reads;
  explicit Slots(int64_t n) : owner(n, -1), writes(n, 0), reads(n, 0) {}
};

void write_slot(Slots& sl, Checker& check, int64_t slot, int64_t c) {
  check(slot >= 0 && slot < int64_t(sl.owner.size()), "partial slot out of the workspace", slot, c);
  if (!check.ok) return;
  check(sl.writes[slot]++ == 0, "partial slot written twice", slot, c);
  sl.owner[slot] = c;
}

template <int VEC>
void backward_rows(const Case& k, const BackwardPlan& p, Checker& check, Slots& sl,
                   std::vector<uint8_t>& written) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  for (unsigned y = 0; y < p.grid.y && check.ok; ++y) {
    for (unsigned x = 0; x < p.grid.x && check.ok; ++x) {
      for (int t = 0; t < p.block && check.ok; ++t) {
        const int64_t tid = int64_t{x} * p.block + t;
        for (int64_t c = y; c < s.channels && check.ok; c += p.grid.y) {
          walk_channel_rows<VEC>(p.rows, tid, c, [&](int64_t e, int64_t n) {
            if (!check.ok) return;
            const int64_t len = n < VEC ? n : VEC;
            check(e >= 0 && n > 0 && e + len <= numel, "rows vector out of bounds", e, n);
            check(n >= VEC || s.channels == 1, "rows partial vector with C > 1", e, n);
            if (p.packed && n >= VEC) {
              check(aligned(k.off_x, e, VEC, k.dtype) && aligned(k.off_dy, e, VEC, k.dtype) &&
                        aligned(k.off_out, e, VEC, k.dtype),
                    "rows packed access misaligned", e, VEC);
            }
            for (int64_t j = 0; j < len && check.ok; ++j) {
              check(channel_of(s, e + j) == c, "rows element of another channel", e + j, c);
              check(written[e + j]++ == 0, "rows element written twice", e + j);
            }
          });
          if (t == 0) write_slot(sl, check, rows_slot(c, x, p.grid.x), c);
        }
      }
    }
  }
}

template <int VEC>
void backward_tiles(const Case& k, const BackwardPlan& p, Checker& check, Slots& sl,
                    std::vector<uint8_t>& written) {
  const Shape& s = k.shape;
  const int64_t W = s.channels * s.inner;
  const int bx = 1 << p.bx_log2;
  const int by = kThreads >> p.bx_log2;
  const Divider by_inner = make_divider(s.inner);
  check(p.block == kThreads && bx * by == kThreads, "tile block shape", bx, by);
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
        for (int j = 0; j < VEC; ++j) {
          check(by_inner.div(col + j) == (col + j) / s.inner, "tile column channel", col + j);
        }
        walk_tile_rows(s.outer, W, col, int64_t{y} * by + ty, int64_t{p.grid.y} * by, [&](int64_t e) {
          if (!check.ok) return;
          check(e >= 0 && e + VEC <= numel_of(s), "tile vector out of bounds", e);
          if (p.packed) {
            check(aligned(k.off_x, e, VEC, k.dtype) && aligned(k.off_dy, e, VEC, k.dtype) &&
                      aligned(k.off_out, e, VEC, k.dtype),
                  "tile packed access misaligned", e, VEC);
          }
          for (int j = 0; j < VEC && check.ok; ++j) {
            check(channel_of(s, e + j) == (col + j) / s.inner, "tile element of another channel", e + j);
            check(written[e + j]++ == 0, "tile element written twice", e + j);
          }
        });
        if (ty == 0) {
          for (int j = 0; j < VEC; ++j) write_slot(sl, check, tiles_slot(y, W, col + j), (col + j) / s.inner);
        }
      }
    }
  }
}

template <int VEC>
void backward(const Case& k, Checker& check) {
  const Shape& s = k.shape;
  const BackwardPlan p = plan_backward(s, k.dtype, addr(k.off_dy, k.dtype), addr(k.off_x, k.dtype),
                                       addr(k.off_out, k.dtype));
  const BackwardPlan q = plan_backward(s, k.dtype, 0, 0, 0);
  check(p.vec == q.vec && p.grid.x == q.grid.x && p.grid.y == q.grid.y && p.block == q.block &&
            p.partial_count == q.partial_count,
        "backward partition depends on the pointers");
  Slots sl(p.partial_count);
  std::vector<uint8_t> written(numel_of(s), 0);
  if (p.tiled) {
    backward_tiles<VEC>(k, p, check, sl, written);
  } else {
    backward_rows<VEC>(k, p, check, sl, written);
  }
  for (int64_t e = 0; e < numel_of(s) && check.ok; ++e) check(written[e] == 1, "backward element not written", e);
  // Finalize: one warp per channel, grid-stride; lane 0 writes dstep[c].
  std::vector<int> dstep(s.channels, 0);
  const int64_t nwarps = int64_t{p.finalize_grid.x} * (kThreads / 32);
  for (int64_t warp = 0; warp < nwarps && check.ok; ++warp) {
    for (int lane = 0; lane < 32 && check.ok; ++lane) {
      std::vector<int64_t> read;
      walk_finalize(
          p.finalize, warp, nwarps, lane, [&](int64_t slot) { read.push_back(slot); },
          [&](int64_t c) {
            for (int64_t slot : read) {
              check(slot >= 0 && slot < p.partial_count, "finalize reads outside the workspace", slot, c);
              if (!check.ok) return;
              check(sl.owner[slot] == c, "finalize reads another channel's slot", slot, c);
              ++sl.reads[slot];
            }
            read.clear();
            if (lane == 0) ++dstep[c];
          });
    }
  }
  for (int64_t m = 0; m < p.partial_count && check.ok; ++m) {
    check(sl.writes[m] == 1 && sl.reads[m] == 1, "partial slot not written and read once", m, sl.writes[m]);
  }
  for (int64_t c = 0; c < s.channels && check.ok; ++c) check(dstep[c] == 1, "dstep not written once", c);
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
template <int V> struct Fwd { static void run(const Case& k, Checker& c) { elementwise<V>(k, c, false); } };
template <int V> struct Gx { static void run(const Case& k, Checker& c) { elementwise<V>(k, c, true); } };
template <int V> struct Bwd { static void run(const Case& k, Checker& c) { backward<V>(k, c); } };

void run_case(const Case& k) {
  ++cases;
  Checker check{k};
  const uintptr_t x = addr(k.off_x, k.dtype), dy = addr(k.off_dy, k.dtype), out = addr(k.off_out, k.dtype);
  with_vec<Fwd>(aligned_vec(k.dtype, x, 0, out), k, check);
  with_vec<Gx>(aligned_vec(k.dtype, x, dy, out), k, check);
  with_vec<Bwd>(plan_backward(k.shape, k.dtype, dy, x, out).vec, k, check);
}

// Tensors of more than 2**31 elements cannot be walked whole: sampled threads are, and every
// vector they visit is checked against its index computed directly with 64-bit division.
template <int VEC>
void sampled_flat(const Case& k, Checker& check) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  const ElementwisePlan p = plan_elementwise(s, k.dtype, addr(k.off_x, k.dtype), 0,
                                             addr(k.off_out, k.dtype), k.sm_count, k.blocks_per_sm);
  check(p.vec == VEC, "sampled elementwise vec", p.vec, VEC);
  const FlatWalk w{numel, s.channels, s.inner, make_divider(s.inner), make_divider(s.channels), p.stride};
  const int64_t nthreads = int64_t{p.blocks} * kThreads;
  const int64_t nvec = (numel + VEC - 1) / VEC;
  for (int64_t tid : {int64_t{0}, int64_t{1}, nthreads / 2 + 3, nthreads - 1}) {
    int64_t v = tid;
    walk_flat<VEC>(w, tid, nthreads, [&](int64_t e, int64_t n, Cursor c) {
      check(e == v * VEC && n == numel - e, "sampled elementwise vector index", e, v);
      check(c.i == e % s.inner && c.c == (e / s.inner) % s.channels, "sampled elementwise cursor", e, c.c);
      v += nthreads;
    });
    check(v >= nvec && v - nthreads < nvec, "sampled elementwise vector count", tid, v);
  }
}

template <int VEC>
void sampled_backward(const Case& k, Checker& check) {
  const Shape& s = k.shape;
  const int64_t numel = numel_of(s);
  const BackwardPlan p = plan_backward(s, k.dtype, 0, 0, 0);
  check(p.vec == VEC, "sampled backward vec", p.vec, VEC);
  if (!p.tiled) {
    const int64_t nthreads = int64_t{p.grid.x} * p.block;
    const int64_t nvec = (s.outer * s.inner + VEC - 1) / VEC;
    for (int64_t c : {int64_t{0}, s.channels / 2, s.channels - 1}) {
      for (int64_t tid : {int64_t{0}, nthreads / 3, nthreads - 1}) {
        int64_t v = tid;
        walk_channel_rows<VEC>(p.rows, tid, c, [&](int64_t e, int64_t n) {
          const int64_t m = v * VEC;  // the vector's first element within the channel
          const int64_t want = (m / s.inner) * s.channels * s.inner + c * s.inner + m % s.inner;
          check(e == want && n == s.outer * s.inner - m, "sampled rows vector index", e, want);
          check(e + (n < VEC ? n : VEC) <= numel, "sampled rows vector out of bounds", e, n);
          v += nthreads;
        });
        check(v >= nvec && v - nthreads < nvec, "sampled rows vector count", tid, v);
      }
    }
  } else {
    const int64_t W = s.channels * s.inner;
    const int bx = 1 << p.bx_log2;
    const int by = kThreads >> p.bx_log2;
    const int64_t row_step = int64_t{p.grid.y} * by;
    for (unsigned x : {0u, p.grid.x / 2, p.grid.x - 1}) {
      for (unsigned y : {0u, p.grid.y - 1}) {
        for (int t : {0, kThreads / 2 + 1, kThreads - 1}) {
          const int64_t col = tile_column(x, bx, t & (bx - 1), VEC);
          if (col >= W) continue;
          int64_t o = int64_t{y} * by + (t >> p.bx_log2);
          walk_tile_rows(s.outer, W, col, o, row_step, [&](int64_t e) {
            check(e == o * W + col && e + VEC <= numel, "sampled tile vector index", e, o);
            o += row_step;
          });
          check(o >= s.outer, "sampled tile rows end early", o, s.outer);
        }
      }
    }
  }
}

template <int V> struct SampledFwd { static void run(const Case& k, Checker& c) { sampled_flat<V>(k, c); } };
template <int V> struct SampledBwd { static void run(const Case& k, Checker& c) { sampled_backward<V>(k, c); } };

void run_sampled(const Case& k) {
  ++cases;
  Checker check{k};
  with_vec<SampledFwd>(aligned_vec(k.dtype, addr(k.off_x, k.dtype), 0, addr(k.off_out, k.dtype)), k, check);
  with_vec<SampledBwd>(plan_backward(k.shape, k.dtype, 0, 0, 0).vec, k, check);
}

}  // namespace

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 3000;
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  // The shapes the CUDA tests name, and the paths' edges.
  const Shape fixed[] = {{1, 70000, 64}, {3, 100001, 1}, {4, 8, 130}, {2, 8, 49}, {2, 16, 256},
                         {33, 24, 1}, {1, 1, 1}, {1, 1, 4097}, {3, 1, 1001}, {64, 3, 1},
                         {5, 12, 11}, {2, 70000, 1}, {9, 1, 300}, {1, 5, 64}, {7, 2, 127}};
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
    if (i % 4 == 0) s.inner = pick(1, 8);       // the tiled path, several rows per tile
    if (i % 7 == 0) s.channels = 1;             // per-tensor and C == 1
    while (numel_of(s) > 60000) s.outer = s.outer / 2 + 0;
    if (s.outer < 1) s.outer = 1;
    const DType d = dtypes[rng() % 3];
    const int widest = 16 / elem_size(d);
    const int64_t ox = rng() % 4 == 0 ? pick(0, widest - 1) : 0;
    const int64_t od = rng() % 3 == 0 ? pick(0, widest - 1) : 0;
    const int64_t oo = rng() % 4 == 0 ? pick(0, widest - 1) : 0;
    run_case({s, d, ox, od, oo, sms[rng() % 6], int(pick(1, 8))});
  }
  // More than 2**31 elements (the CUDA tests' shapes and larger), sampled threads only.
  const Shape big[] = {{518217, 4144, 1}, {1025, 8, 1 << 18}, {1, 1, (int64_t{1} << 31) + (1 << 21)},
                       {8, 1, int64_t{1} << 30}, {3, 70000, 1 << 14}, {1 << 16, 3, 16385},
                       {1 << 20, 4096, 1}, {1 << 25, 16, 8}};
  for (const Shape& s : big) {
    for (DType d : dtypes) {
      for (int sm : {1, 132}) run_sampled({s, d, 0, 0, 0, sm, 8});
      run_sampled({s, d, 1, 0, 0, 108, 3});
    }
  }
  std::printf("emulate_test: %lld cases, %d failed\n", (long long)cases, failures);
  return failures == 0 ? 0 : 1;
}
