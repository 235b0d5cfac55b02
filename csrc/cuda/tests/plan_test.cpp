// Unit tests of the CUDA kernels' host planner (dqa_plan.h), compiled with g++ and run on the
// CPU: no GPU, no CUDA headers. Built and run by scripts/check_cuda_kernels.sh and
// tests/test_cuda_planner.py. Exit status 0 when every check passes; each failure prints a line.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

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

// Aligned tensors get the dtype's widest vector on every path: forward, grad_x alone, the row
// backward (NCHW, long rows), the tiled backward (short rows) and per-tensor.
void aligned_tensors_get_the_widest_vector() {
  for (DType d : kDtypes) {
    const int widest = 16 / elem_size(d);
    const Shape nchw{32, 64, 56 * 56};    // rows path
    const Shape small_hw{32, 64, 7 * 7};  // tiled path (W = 3136)
    const Shape cl{32 * 56 * 56, 64, 1};  // channels_last: tiled
    const Shape per_tensor{1, 1, 32 * 64 * 56 * 56};
    for (Shape s : {nchw, small_hw, cl, per_tensor}) {
      const ElementwisePlan f = plan_elementwise(s, d, ptr(0, d), 0, ptr(0, d), 132, 8);
      check(f.vec == widest, "forward vec " + std::to_string(f.vec) + " for " + str(s, d));
      const ElementwisePlan g = plan_elementwise(s, d, ptr(0, d), ptr(0, d), ptr(0, d), 132, 8);
      check(g.vec == widest, "grad_x vec " + std::to_string(g.vec) + " for " + str(s, d));
      const BackwardPlan b = plan_backward(s, d, ptr(0, d), ptr(0, d), ptr(0, d));
      check(b.vec == widest && b.packed,
            "backward vec " + std::to_string(b.vec) + " packed " + std::to_string(b.packed) +
                " for " + str(s, d));
    }
    check(!plan_backward(Shape{32, 64, 56 * 56}, d, 0, 0, 0).tiled, "NCHW 56x56 takes the row path");
    check(plan_backward(Shape{32, 64, 7 * 7}, d, 0, 0, 0).tiled, "NCHW 7x7 takes the tiled path");
  }
}

// Odd rows: a vector may cross rows in the elementwise pass (any width), the row backward
// needs vec | inner, the tiled one vec | C * inner.
void shape_limits_the_backward_partition_only() {
  const DType h = DType::kFloat16;
  check(plan_elementwise(Shape{4, 3, 7}, h, ptr(0, h), 0, ptr(0, h), 1, 1).vec == 8,
        "forward of inner 7 fp16 uses vec 8");
  check(plan_backward(Shape{4, 8, 130}, h, 0, 0, 0).vec == 2, "fp16 inner 130: vec 2");
  check(plan_backward(Shape{4, 100001, 1}, DType::kBFloat16, 0, 0, 0).vec == 1,
        "(N, 100001) bf16: vec 1");
  check(plan_backward(Shape{4, 12, 1}, h, 0, 0, 0).vec == 4, "(N, 12) fp16: vec 4");
  check(plan_backward(Shape{3, 1, 1001}, h, 0, 0, 0).vec == 8, "per-tensor odd numel: vec 8");
}

// Misaligned pointers: the elementwise width follows the alignment; the backward keeps its
// partition and switches to scalar loads.
void misalignment_keeps_the_partition() {
  for (DType d : kDtypes) {
    const int widest = 16 / elem_size(d);
    for (int off = 1; off < widest; ++off) {
      int expect = widest;
      while (off % expect != 0) expect >>= 1;
      const Shape s{8, 16, 64};
      check(plan_elementwise(s, d, ptr(off, d), 0, ptr(0, d), 4, 4).vec == expect,
            "forward vec with x offset " + std::to_string(off) + " for " + str(s, d));
      check(plan_elementwise(s, d, ptr(0, d), ptr(off, d), ptr(0, d), 4, 4).vec == expect,
            "grad_x vec with dy offset " + std::to_string(off) + " for " + str(s, d));
      for (Shape b : {s, Shape{8, 16, 3}, Shape{1, 1, 999}}) {
        const BackwardPlan a = plan_backward(b, d, ptr(0, d), ptr(0, d), ptr(0, d));
        const BackwardPlan m = plan_backward(b, d, ptr(off, d), ptr(0, d), ptr(0, d));
        const bool same = a.tiled == m.tiled && a.vec == m.vec && a.grid.x == m.grid.x &&
                          a.grid.y == m.grid.y && a.block == m.block && a.bx_log2 == m.bx_log2 &&
                          a.partial_count == m.partial_count && a.finalize.count == m.finalize.count &&
                          a.finalize_grid.x == m.finalize_grid.x;
        check(same, "backward partition changed with dy offset " + std::to_string(off) + " for " +
                        str(b, d));
        check(a.packed && (m.packed == (a.vec == 1)),
              "packed flag with dy offset " + std::to_string(off) + " for " + str(b, d));
      }
    }
  }
}

// The reduction's grid is a constant budget, not the SM count; gridDim.y stays <= 65535.
void reduction_grid_is_bounded() {
  for (DType d : kDtypes) {
    for (Shape s : {Shape{1, 70000, 64}, Shape{1 << 20, 16384, 1}, Shape{256, 1, 1 << 20},
                    Shape{2, 3, 300}, Shape{1, 1, 1}}) {
      const BackwardPlan p = plan_backward(s, d, 0, 0, 0);
      const int64_t threads = int64_t{p.grid.x} * p.grid.y * p.block;
      check(p.grid.y >= 1 && p.grid.y <= 65535 && p.grid.x >= 1, "grid y range for " + str(s, d));
      if (!p.tiled) {
        check(threads <= kReduceBlocks * kThreads * 2 || p.grid.x == 1,
              "rows grid " + std::to_string(threads) + " threads for " + str(s, d));
        check(p.partial_count == s.channels * p.grid.x && p.finalize.count == p.grid.x,
              "rows partials for " + str(s, d));
      } else {
        check(p.partial_count == int64_t{p.grid.y} * s.channels * s.inner &&
                  p.finalize.count == int64_t{p.grid.y} * s.inner,
              "tiled partials for " + str(s, d));
      }
    }
  }
}

void elementwise_grid_is_one_wave() {
  const DType f = DType::kFloat32;
  const ElementwisePlan big = plan_elementwise(Shape{64, 64, 4096}, f, ptr(0, f), 0, ptr(0, f), 132, 8);
  check(big.blocks == 132 * 8, "big forward: one wave of 132 * 8 blocks");
  const ElementwisePlan tiny = plan_elementwise(Shape{1, 1, 5}, f, ptr(0, f), 0, ptr(0, f), 132, 8);
  check(tiny.blocks == 1, "5 elements: one block");
  check(plan_elementwise(Shape{1, 1, 5}, f, 0, 0, 0, 0, 0).blocks == 1, "sm_count 0: one block");
  // The stride is the grid stride in elements, split as % inner and (/ inner) % C.
  for (int64_t inner : {1, 3, 49, 4096}) {
    for (int64_t C : {1, 5, 64}) {
      const ElementwisePlan p = plan_elementwise(Shape{7, C, inner}, f, 0, 0, 0, 3, 2);
      const int64_t g = int64_t{p.blocks} * kThreads * p.vec;
      check(p.stride.i == g % inner && p.stride.c == (g / inner) % C, "stride cursor");
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
      for (int64_t delta : {-1, 0, 1}) {
        const int64_t n = k * d + delta;
        if (n >= 0) one(d, n);
      }
    }
  }
  for (int i = 0; i < 200000; ++i) {
    const int64_t d = static_cast<int64_t>(rng() >> (1 + rng() % 62)) + 1;
    const int64_t n = static_cast<int64_t>(rng() >> (1 + rng() % 62));
    one(d, n);
  }
}

}  // namespace

int main() {
  aligned_tensors_get_the_widest_vector();
  shape_limits_the_backward_partition_only();
  misalignment_keeps_the_partition();
  reduction_grid_is_bounded();
  elementwise_grid_is_one_wave();
  divider_matches_division();
  std::printf("plan_test: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
