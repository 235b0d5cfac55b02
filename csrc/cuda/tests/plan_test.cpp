// Unit tests of the CUDA kernels' host planner (dqa_plan.h) and counter slots (dqa_counters.h),
// compiled with g++ and run on the CPU: no GPU, no CUDA headers. Built and run by
// scripts/check_cuda_kernels.sh and tests/test_cuda_planner.py. Exit status 0 when every check
// passes; each failure prints a line.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/dqa_counters.h"
#include "cuda/dqa_plan.h"

using namespace dqa_cuda;

namespace {

int failures = 0;
int checks = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

std::string str(Shape s, DType d) {
  static const char* names[] = {"float32", "float16", "bfloat16"};
  return "[" + std::to_string(s.outer) + ", " + std::to_string(s.channels) + ", " +
         std::to_string(s.inner) + "] " + names[static_cast<int>(d)];
}

// A 256-byte-aligned base address, as the caching allocator returns, plus an offset in elements.
uintptr_t ptr(int64_t elems, DType d) { return 0x7f0000000000u + elems * elem_size(d); }

const DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// The key shape [32, 64, 56, 56] and its layouts as [outer, C, inner] blocks.
const Shape kNchw{32, 64, 56 * 56};
const Shape kChannelsLast{32 * 56 * 56, 64, 1};
const Shape kPerTensor{1, 1, 32 * 64 * 56 * 56};

// Aligned tensors: the forward gets the dtype's widest vector on every path; the row backward
// too; the tiled backward at most kTiledBackwardMaxVec columns per thread (registers).
void aligned_tensors_get_the_widest_vector() {
  for (DType d : kDtypes) {
    const int widest = 16 / elem_size(d);
    const Shape small_hw{32, 64, 2 * 2};  // tiles (rows of less than a sector)
    for (Shape s : {kNchw, small_hw, kChannelsLast, kPerTensor}) {
      const ForwardPlan f = plan_forward(s, d, ptr(0, d), 0, ptr(0, d), 132 * 8);
      check(f.vec == widest, "forward vec " + std::to_string(f.vec) + " for " + str(s, d));
      const ForwardPlan g = plan_forward(s, d, ptr(0, d), ptr(0, d), ptr(0, d), 132 * 8);
      check(g.vec == widest, "grad_x vec " + std::to_string(g.vec) + " for " + str(s, d));
      const BackwardPlan b = plan_backward(s, d, ptr(0, d), ptr(0, d), ptr(0, d));
      const int want = b.tiled ? kTiledBackwardMaxVec : widest;
      check(b.vec == want && b.packed, "backward vec " + std::to_string(b.vec) + " for " + str(s, d));
    }
    check(!plan_forward(kNchw, d, 0, 0, 0, 1056).tiled && !plan_backward(kNchw, d, 0, 0, 0).tiled,
          "NCHW 56x56 takes the row path");
    check(plan_forward(kChannelsLast, d, 0, 0, 0, 1056).tiled && plan_backward(kChannelsLast, d, 0, 0, 0).tiled,
          "channels_last takes the tiles");
    check(!plan_forward(kPerTensor, d, 0, 0, 0, 1056).tiled && !plan_backward(kPerTensor, d, 0, 0, 0).tiled,
          "per-tensor takes the row path");
    check(plan_backward(small_hw, d, 0, 0, 0).tiled, "NCHW 2x2 takes the tiles");
    // 7x7: the backward's rows at width 1 (its partition is the shape's), the forward's tiles.
    const BackwardPlan seven = plan_backward(Shape{32, 64, 49}, d, 0, 0, 0);
    check(!seven.tiled && seven.vec == 1 && seven.fusable, "NCHW 7x7 backward: rows at width 1, fused");
    check(plan_forward(Shape{32, 64, 49}, d, 0, 0, 0, 1056).tiled, "NCHW 7x7 forward: tiles");
  }
}

// Odd rows: the forward takes the tiles where the matrix allows a wider vector than the rows;
// the backward keeps its shape-only partition (vec | inner on the rows).
void odd_rows() {
  const DType h = DType::kFloat16;
  const ForwardPlan f = plan_forward(Shape{4, 8, 130}, h, ptr(0, h), 0, ptr(0, h), 8);
  check(f.tiled && f.vec == 8, "forward of inner 130 fp16: tiles at vec 8 (W = 1040)");
  check(plan_backward(Shape{4, 8, 130}, h, 0, 0, 0).vec == 2, "fp16 inner 130 backward: vec 2");
  check(plan_backward(Shape{4, 100001, 1}, DType::kBFloat16, 0, 0, 0).vec == 1, "(N, 100001) bf16: vec 1");
  check(plan_backward(Shape{4, 12, 1}, h, 0, 0, 0).vec == 2, "(N, 12) fp16: vec 2 (tiles)");
  check(plan_backward(Shape{1, 1, 1001}, h, 0, 0, 0).vec == 8, "per-tensor odd numel: vec 8");
  const ForwardPlan odd = plan_forward(Shape{4, 7, 1001}, DType::kFloat32, 0, 0, 0, 8);
  check(!odd.tiled && odd.vec == 1, "odd C and inner: rows at vec 1");
  const ForwardPlan even = plan_forward(Shape{4, 8, 1001}, DType::kFloat32, 0, 0, 0, 8);
  check(even.tiled && even.vec == 4, "odd inner, C = 8: tiles at vec 4");
}

// Rows over 2**31 elements: the row walk's cursor is 32-bit, so they go to the tiles unless the
// channel is contiguous (outer == 1), which the walk describes as rows of one element.
void long_rows() {
  const int64_t big = (int64_t{1} << 31) + 16;
  const DType f = DType::kFloat32;
  const BackwardPlan one = plan_backward(Shape{1, 2, big}, f, 0, 0, 0);
  check(!one.tiled && one.rows.inner == 1 && one.rows.c_stride == big && one.rows.per_channel == big,
        "outer 1, rows over 2**31: a contiguous channel on the row path");
  check(plan_backward(Shape{2, 2, big}, f, 0, 0, 0).tiled, "outer 2, rows over 2**31: tiles");
  check(plan_forward(Shape{2, 2, big}, f, 0, 0, 0, 8).tiled, "forward, outer 2, rows over 2**31: tiles");
  const RowsWalk w = plan_backward(kNchw, f, 0, 0, 0).rows;
  check(w.inner == 56 * 56 && w.c_stride == 56 * 56 && w.row_stride == 64 * 56 * 56, "NCHW rows walk");
}

// Misaligned pointers: the forward's width follows the alignment; the backward keeps its
// partition and switches to scalar loads.
void misalignment_keeps_the_partition() {
  for (DType d : kDtypes) {
    const int widest = 16 / elem_size(d);
    for (int off = 1; off < widest; ++off) {
      int expect = widest;
      while (off % expect != 0) expect >>= 1;
      const Shape s{8, 16, 64};
      check(plan_forward(s, d, ptr(off, d), 0, ptr(0, d), 16).vec == expect,
            "forward vec with x offset " + std::to_string(off) + " for " + str(s, d));
      check(plan_forward(s, d, ptr(0, d), ptr(off, d), ptr(0, d), 16).vec == expect,
            "grad_x vec with dy offset " + std::to_string(off) + " for " + str(s, d));
      for (Shape b : {s, Shape{8, 16, 3}, Shape{1, 1, 999}, kChannelsLast}) {
        const BackwardPlan a = plan_backward(b, d, ptr(0, d), ptr(0, d), ptr(0, d));
        const BackwardPlan m = plan_backward(b, d, ptr(off, d), ptr(0, d), ptr(0, d));
        const bool same = a.tiled == m.tiled && a.vec == m.vec && a.grid.x == m.grid.x &&
                          a.grid.y == m.grid.y && a.block == m.block && a.bx_log2 == m.bx_log2 &&
                          a.workspace_doubles == m.workspace_doubles && a.reduce.count == m.reduce.count &&
                          a.fusable == m.fusable && a.counters == m.counters;
        check(same, "backward partition changed with dy offset " + std::to_string(off) + " for " + str(b, d));
        const bool misaligned = off % a.vec != 0;
        check(a.packed && m.packed == !misaligned,
              "packed flag with dy offset " + std::to_string(off) + " for " + str(b, d));
      }
    }
  }
}

// The backward's grid is sized by the tensor (at most kBackwardVectorsPerThread vectors per
// thread), never by the GPU; gridDim.y stays <= 65535.
void backward_grid_follows_the_tensor() {
  for (DType d : kDtypes) {
    for (Shape s : {Shape{1, 70000, 64}, Shape{1 << 20, 16384, 1}, Shape{256, 1, 1 << 20}, Shape{2, 3, 300},
                    Shape{1, 1, 1}, kNchw, kChannelsLast, kPerTensor, Shape{32, 256, 56 * 56}}) {
      const BackwardPlan p = plan_backward(s, d, 0, 0, 0);
      check(p.grid.y >= 1 && p.grid.y <= 65535 && p.grid.x >= 1, "grid range for " + str(s, d));
      if (!p.tiled) {
        const int64_t nvec = ceil_div(s.outer * s.inner, p.vec);
        const int64_t threads = int64_t{p.grid.x} * p.block;
        check(threads * kBackwardVectorsPerThread >= nvec && (p.grid.x == 1 || (threads - p.block) * kBackwardVectorsPerThread < nvec),
              "rows grid: " + std::to_string(p.grid.x) + " blocks per channel for " + str(s, d));
        check(p.reduce.count == p.grid.x && p.reduce.c_stride == p.grid.x && p.reduce.m_stride == 1,
              "rows partials for " + str(s, d));
      } else {
        const int by = kThreads >> p.bx_log2;
        check(int64_t{p.grid.y} * by * kBackwardVectorsPerThread >= s.outer || p.grid.y == 65535,
              "tiles grid for " + str(s, d));
        check(p.reduce.count == int64_t{p.grid.y} * s.inner && p.tiles.row_step == int64_t{p.grid.y} * by,
              "tiled partials for " + str(s, d));
      }
    }
  }
  // The key shape in f32: 25 blocks per channel of 256 threads, 1600 blocks; the per-tensor
  // key shape 1568 blocks; 4x the channels, 4x the blocks.
  const DType f = DType::kFloat32;
  check(plan_backward(kNchw, f, 0, 0, 0).grid.x == 25, "key NCHW f32: 25 blocks per channel");
  check(plan_backward(kPerTensor, f, 0, 0, 0).grid.x == 1568, "key per-tensor f32: 1568 blocks");
  check(plan_backward(Shape{32, 256, 56 * 56}, f, 0, 0, 0).grid.y == 256, "4x key: 256 channels along y");
}

// The fused finalize: the key cases fit one counter slot; where it is fused, a block's partial
// lies where the separate finalize reads it; count 1 needs no counter and no workspace.
void fused_finalize() {
  for (DType d : kDtypes) {
    for (Shape s : {kNchw, kChannelsLast, kPerTensor, Shape{32, 256, 56 * 56}, Shape{128, 256, 56 * 56},
                    Shape{128, 64, 8 * 8}, Shape{256, 16, 32 * 32}}) {
      const BackwardPlan p = plan_backward(s, d, 0, 0, 0);
      const bool key = s.outer != 128 && s.outer != 256;
      if (key) check(p.fusable, "key case fused: " + str(s, d));
      if (!p.fusable) continue;
      check(p.counters <= kMaxCounters && p.counters == p.domains * p.reduce.counters_per_domain,
            "counters of " + str(s, d));
      const int64_t groups = ceil_div(p.reduce.count, kGroup);
      check(p.reduce.groups == groups &&
                p.reduce.counters_per_domain == (p.reduce.count == 1 ? 0 : groups == 1 ? 1 : groups + 1),
            "counters per domain of " + str(s, d));
      for (int64_t c : {int64_t{0}, p.reduce.C / 3, p.reduce.C - 1}) {
        for (int64_t m = 0; m < p.reduce.count; m += 1 + p.reduce.count / 7) {
          check(fused_slot(p.reduce, c, m) == partial_slot(p.reduce, c, m),
                "fused slot of " + str(s, d) + " c " + std::to_string(c) + " m " + std::to_string(m));
        }
      }
    }
  }
  const BackwardPlan few = plan_backward(Shape{4, 70000, 64}, DType::kFloat32, 0, 0, 0);
  check(few.reduce.count == 1 && few.fusable && few.counters == 0 && few.workspace_doubles == 0,
        "one block per channel: dstep written directly");
  const BackwardPlan inner = plan_backward(Shape{512, 64, 3}, DType::kFloat32, 0, 0, 0);
  check(inner.tiled && !inner.fusable && inner.workspace_doubles == int64_t{inner.grid.y} * 64 * 3,
        "tiles with inner > 1: the separate finalize");
  // ResNet-20's last stage in 2-byte dtypes: rows of 128 bytes take the row path, one block
  // per channel, dstep written directly.
  const BackwardPlan r20 = plan_backward(Shape{128, 64, 64}, DType::kBFloat16, 0, 0, 0);
  check(!r20.tiled && r20.vec == 8 && r20.reduce.count == 1, "ResNet-20 stage 3 bf16: rows, direct dstep");
}

void forward_grid_is_one_wave() {
  const DType f = DType::kFloat32;
  const ForwardPlan big = plan_forward(Shape{64, 64, 4096}, f, ptr(0, f), 0, ptr(0, f), 132 * 8);
  check(int64_t{big.grid.x} * big.grid.y <= 132 * 8 + 64, "big forward: about one wave");
  const ForwardPlan tiny = plan_forward(Shape{1, 1, 5}, f, ptr(0, f), 0, ptr(0, f), 132 * 8);
  check(tiny.grid.x == 1 && tiny.grid.y == 1, "5 elements: one block");
  check(plan_forward(Shape{1, 1, 5}, f, 0, 0, 0, 0).grid.x == 1, "no wave: one block");
  // The grid stride, split as % inner and the flat advance.
  for (int64_t inner : {64, 96, 4096}) {
    for (int64_t C : {2, 5, 64}) {
      const ForwardPlan p = plan_forward(Shape{7, C, inner}, f, 0, 0, 0, 6);
      if (p.tiled) continue;
      const int64_t g = int64_t{p.grid.x} * p.block * p.vec;
      check(p.rows.g == g && p.rows.gi == g % inner && p.rows.ge == (g / inner) * C * inner + g % inner,
            "row walk stride");
    }
  }
}

void divider_matches_division() {
  std::mt19937_64 rng(7);
  const int64_t edges[] = {1, 2, 3, 5, 7, 49, 64, 100001, 65535, 65536, 65537,
                           (int64_t{1} << 31) - 1, int64_t{1} << 31, (int64_t{1} << 31) + 1,
                           (int64_t{1} << 40) + 3, (int64_t{1} << 62) + 1};
  auto one = [&](int64_t d, int64_t n) {
    const Divider v = make_divider(d);
    if (v.div(n) != n / d) {
      check(false, "divider " + std::to_string(n) + " / " + std::to_string(d));
      return;
    }
    ++checks;
  };
  for (int64_t d : edges) {
    for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{1000}, (int64_t{1} << 31) / d + 1,
                      (int64_t{1} << 62) / d}) {
      int64_t kd = 0;
      if (__builtin_mul_overflow(k, d, &kd)) continue;
      for (int64_t delta : {-1, 0, 1}) {
        if (!(delta > 0 && kd == INT64_MAX) && kd + delta >= 0) one(d, kd + delta);
      }
    }
  }
  for (int i = 0; i < 200000; ++i) {
    const int64_t d = static_cast<int64_t>(rng() >> (1 + rng() % 62)) + 1;
    const int64_t n = static_cast<int64_t>(rng() >> (1 + rng() % 62));
    one(d, n);
  }
}

// Counter slots: one per eager stream id and one per (capture, stream), none shared, a capture's
// given back by its grant's token only, at most kEagerSlots to eager keys (the rest stay for
// captures), none left when all are taken; from several threads at once.
void counter_slots() {
  const SlotKey E = SlotKey::kEager, G = SlotKey::kCapture;
  const SlotGrant a = counter_slot(0, E, 10, 0);
  check(a.slot >= 0 && a.fresh && a.token != 0, "a stream gets a slot");
  const SlotGrant a2 = counter_slot(0, E, 10, 0);
  check(a2.slot == a.slot && !a2.fresh && a2.token == a.token, "a stream keeps its slot");
  const SlotGrant b = counter_slot(0, E, 20, 0);
  check(b.slot >= 0 && b.slot != a.slot, "another stream, another slot");
  const SlotGrant c1 = counter_slot(0, G, 7, 0x10);
  const SlotGrant c2 = counter_slot(0, G, 8, 0x10);
  const SlotGrant c1b = counter_slot(0, G, 7, 0x20);
  check(c1.slot >= 0 && c2.slot >= 0 && c1b.slot >= 0 && c1.slot != a.slot && c1.slot != b.slot &&
            c1.slot != c2.slot && c1b.slot != c1.slot && c1b.slot != c2.slot && c1.fresh && c2.fresh && c1b.fresh,
        "each capture, and each stream of a capture, its own slot");
  check(counter_slot(0, G, 10, 0).slot != a.slot, "a capture id equal to a stream id is another key");
  check(counter_slot(0, G, 7, 0x10).slot == c1.slot && !counter_slot(0, G, 7, 0x10).fresh, "a capture keeps its slot");
  release_slot(0, c1.slot, c1.token + 1000);
  check(counter_slot(0, G, 7, 0x10).slot == c1.slot && !counter_slot(0, G, 7, 0x10).fresh,
        "a release with another grant's token does nothing");
  release_slot(0, c1.slot, c1.token);
  const SlotGrant c3 = counter_slot(0, G, 9, 0x30);
  check(c3.slot == c1.slot && c3.fresh && c3.token != c1.token, "a released slot is given again");
  release_slot(0, c1.slot, c1.token);  // a late destructor of the first grant: stale
  check(counter_slot(0, G, 9, 0x30).slot == c3.slot && !counter_slot(0, G, 9, 0x30).fresh,
        "a stale release leaves the slot with its new holder");
  check(counter_slot(0, E, 10, 0).slot == a.slot, "releasing one slot leaves the others");
  check(counter_slot(1, E, 10, 0).slot == 0, "slots are per device");
  check(counter_slot(-1, E, 10, 0).slot == -1, "no device: no slot");
  release_slot(5, 3, 1);  // an unknown device or slot: nothing happens
  release_slot(0, kCounterSlots + 3, 1);
  // Eager keys take at most kEagerSlots; captures then take the rest, from several threads.
  std::vector<int> eager(100, -2);
  std::vector<int> captured(100, -2);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &eager, &captured] {
      for (int i = t; i < 100; i += 4) {
        eager[i] = counter_slot(2, SlotKey::kEager, 1000 + i, 0).slot;
        captured[i] = counter_slot(2, SlotKey::kCapture, 5000 + i, 0x40).slot;
      }
    });
  }
  for (auto& t : threads) t.join();
  std::vector<int> seen(kCounterSlots, 0);
  int given_eager = 0, given_captured = 0;
  bool distinct = true;
  for (int i = 0; i < 100; ++i) {
    for (int s : {eager[i], captured[i]}) {
      if (s < 0) continue;
      distinct &= s < kCounterSlots && seen[s]++ == 0;
    }
    given_eager += eager[i] >= 0;
    given_captured += captured[i] >= 0;
  }
  check(distinct && given_eager == kEagerSlots && given_captured == kCounterSlots - kEagerSlots,
        "eager keys " + std::to_string(given_eager) + ", captures " + std::to_string(given_captured) +
            ", each slot once");
  int first_eager = -1, first_capture = -1;
  for (int i = 0; i < 100; ++i) {
    if (first_eager < 0 && eager[i] >= 0) first_eager = i;
    if (first_capture < 0 && captured[i] >= 0) first_capture = i;
  }
  check(first_eager >= 0 && counter_slot(2, E, 1000 + first_eager, 0).slot == eager[first_eager],
        "a stream still finds its slot when all are taken");
  check(counter_slot(2, G, 9999, 0x40).slot == -1 && counter_slot(2, E, 9999, 0).slot == -1,
        "all taken: a new key gets none");
  if (first_capture >= 0) {
    const SlotGrant held = counter_slot(2, G, 5000 + first_capture, 0x40);
    release_slot(2, held.slot, held.token);
    check(counter_slot(2, E, 9999, 0).slot == -1, "a capture's slot does not go to an eager key over the cap");
    check(counter_slot(2, G, 9999, 0x40).slot == held.slot, "until a capture's graph gives one back");
  }
}

}  // namespace

// CUDA runs a user object's destructor (release_slot) on its own thread, possibly while the
// process exits: the slot table must outlive static destruction. Registered before the table
// exists, this handler runs after every static object constructed later has been destroyed.
void release_at_exit() {
  release_slot(0, 0, 1);
  const SlotGrant g = counter_slot(3, SlotKey::kEager, 77, 0);
  if (g.slot != 0) std::printf("FAIL: a slot after static destruction\n"), std::_Exit(1);
}

int main() {
  std::atexit(release_at_exit);
  aligned_tensors_get_the_widest_vector();
  odd_rows();
  long_rows();
  misalignment_keeps_the_partition();
  backward_grid_follows_the_tensor();
  fused_finalize();
  forward_grid_is_one_wave();
  divider_matches_division();
  counter_slots();
  std::printf("plan_test: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
