// Fused CPU kernels: forward in one pass; backward in one pass that writes dx and accumulates
// per-chunk, per-channel partial sums of dstep, added in a fixed order afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace dqa {
// SIMD overloads that dqa_math.h's templates need; they must precede its inclusion.
using VecF = at::vec::Vectorized<float>;
inline VecF rne(VecF v) { return v.round(); }  // round-to-nearest-even instruction
inline VecF select(VecF mask, VecF a, VecF b) { return VecF::blendv(b, a, mask); }
}  // namespace dqa

#include "../dqa_args.h"
#include "../dqa_math.h"

namespace dqa {
namespace {

constexpr int64_t W = VecF::size();
// Elements per parallel task. Backward chunks are also the units of the dstep partial sums,
// so their bounds depend on the shape only: dstep is bitwise identical for any thread count.
constexpr int64_t kGrain = 16384;
constexpr int64_t kMaxChunks = 128;
// Float accumulators take at most this many additions per lane before they are added into
// double partials, which bounds the float32 rounding error of dstep.
constexpr int64_t kFlush = 1024;

// x's dtypes: float32, float16, bfloat16 (check_args rejects the rest).
#define DQA_DISPATCH(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Two float vectors: the 2*W elements at p, or only the first n of them (the rest read as 0).
// Every element, tails included, goes through the same vector conversions, so the bits written
// (NaN payloads too) do not depend on where an element falls in a run.
template <typename T>
inline void load2(const T* p, VecF& a, VecF& b, int64_t n = 2 * W) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == 2 * W) {
      a = VecF::loadu(p);
      b = VecF::loadu(p + W);
    } else {
      a = VecF::loadu(p, std::min(n, W));
      b = n > W ? VecF::loadu(p + W, n - W) : VecF(0.f);
    }
  } else {
    const auto v = n == 2 * W ? at::vec::Vectorized<T>::loadu(p) : at::vec::Vectorized<T>::loadu(p, n);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
}
template <typename T>
inline void store2(T* p, VecF a, VecF b, int64_t n = 2 * W) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == 2 * W) {
      a.store(p);
      b.store(p + W);
    } else {
      a.store(p, std::min(n, W));
      if (n > W) b.store(p + W, n - W);
    }
  } else {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
}

// The step of a run of n elements: one scalar (a row of an [outer, C, inner] block with
// inner > 1, or a per-tensor step), or one per element (inner == 1: consecutive channels).
struct Steps {
  const float* lane;  // per element when non-null
  float scalar;
  // The W steps from element i, n of them real (n <= 0 allowed): lanes past n read as step 1,
  // so padding lanes stay finite and add nothing to dstep.
  VecF vec(int64_t i, int64_t n) const {
    if (!lane) return VecF(scalar);
    if (n >= W) return VecF::loadu(lane + i);
    float buf[W];
    for (int64_t j = 0; j < W; ++j) buf[j] = j < n ? lane[i + j] : 1.f;
    return VecF::loadu(buf);
  }
};

template <typename T>
void forward_run(const T* x, T* y, Steps s, int64_t n, float qmin, float qmax) {
  const VecF vqmin(qmin), vqmax(qmax);
  for (int64_t i = 0; i < n; i += 2 * W) {
    const int64_t m = std::min(2 * W, n - i);
    VecF x0, x1;
    load2(x + i, x0, x1, m);
    const VecF s0 = s.vec(i, m), s1 = s.vec(i + W, m - W);
    store2(y + i, quantize(scaled(x0, s0), s0, vqmin, vqmax),
           quantize(scaled(x1, s1), s1, vqmin, vqmax), m);
  }
}

// dx for the m <= 2W elements at offset 0 with steps (s0, s1); with kStepGrad also adds their
// dstep terms dy * t(v) into (sum0, sum1). Padding lanes (m < 2W) have x = dy = 0 and step 1,
// so their terms are 0.
template <typename T, bool kStepGrad>
inline void backward_vec(const T* dy, const T* x, T* dx, VecF s0, VecF s1, int64_t m, VecF vqmin,
                         VecF vqmax, VecF& sum0, VecF& sum1) {
  VecF x0, x1, g0, g1;
  load2(x, x0, x1, m);
  load2(dy, g0, g1, m);
  const VecF v0 = scaled(x0, s0), v1 = scaled(x1, s1);
  store2(dx, grad_input(v0, g0, s0, vqmin, vqmax), grad_input(v1, g1, s1, vqmin, vqmax), m);
  if constexpr (kStepGrad) {
    sum0 = sum0 + g0 * grad_step_term(v0, vqmin, vqmax);
    sum1 = sum1 + g1 * grad_step_term(v1, vqmin, vqmax);
  }
}

// dx for a run of n elements; with kStepGrad, returns the float sum of its dstep terms.
template <typename T, bool kStepGrad>
float backward_run(const T* dy, const T* x, T* dx, Steps s, int64_t n, float qmin, float qmax) {
  const VecF vqmin(qmin), vqmax(qmax);
  VecF sum0(0.f), sum1(0.f);
  for (int64_t i = 0; i < n; i += 2 * W) {
    const int64_t m = std::min(2 * W, n - i);
    backward_vec<T, kStepGrad>(dy + i, x + i, dx + i, s.vec(i, m), s.vec(i + W, m - W), m, vqmin,
                               vqmax, sum0, sum1);
  }
  if constexpr (!kStepGrad) return 0.f;
  float lanes[W];
  (sum0 + sum1).store(lanes);
  float total = 0.f;
  for (const float l : lanes) total += l;
  return total;
}

// x as rows of C consecutive channels (inner == 1: channels_last, (N, C)), each element with its
// own channel's step; otherwise as runs of one step (inner > 1, or a per-tensor step).
inline bool channels_innermost(const Blocks& b) { return b.inner == 1 && b.channels > 1; }

// With channels innermost the steps repeat with period C. A tile is a whole number of rows,
// `steps` repeating the C steps across it, processed as one run.
struct Tile {
  int64_t size;
  std::vector<float> steps;
  Tile(const float* step, int64_t C, int64_t size_) : size(size_), steps(size_) {
    for (const auto j : c10::irange(size)) steps[j] = step[j % C];
  }
};

// Elementwise passes: lcm(C, 2W) elements, so a tile splits into whole vectors even when C is
// not a multiple of 2W (rows shorter than a vector would each take the masked path), up to
// kMaxTile; single rows beyond that.
constexpr int64_t kMaxTile = 4096;
inline int64_t elementwise_tile(int64_t C) {
  const int64_t lcm = C / std::gcd(C, 2 * W) * (2 * W);
  return lcm <= kMaxTile ? lcm : C;
}
// The step-gradient pass walks a tile in 2W-lane columns, strided by the tile size. Measured on
// AVX2, single-row tiles beat longer ones except where C divides 2W (one full column).
inline int64_t step_grad_tile(int64_t C) { return (2 * W) % C == 0 ? 2 * W : C; }

// Calls f(offset, count, channel) for the runs of one step that make up elements [begin, end)
// of a block that is not channels_innermost.
template <typename F>
void for_each_run(const Blocks& b, int64_t begin, int64_t end, F&& f) {
  for (int64_t i = begin; i < end;) {
    const int64_t r = i / b.inner, n = std::min(end - i, (r + 1) * b.inner - i);
    f(i, n, b.channels == 1 ? 0 : r % b.channels);
    i += n;
  }
}

// Runs f(offset, count, steps) over all elements in parallel: tiles of whole rows when channels
// are innermost, runs of one step otherwise.
template <typename F>
void parallel_runs(const Blocks& b, const float* sp, int64_t numel, F&& f) {
  if (channels_innermost(b)) {
    const Tile tile(sp, b.channels, elementwise_tile(b.channels));
    const int64_t T = tile.size, tiles = (numel + T - 1) / T;
    at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / T), [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) f(t * T, std::min(T, numel - t * T), Steps{tile.steps.data(), 0.f});
    });
  } else {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_run(b, begin, end, [&](int64_t i, int64_t n, int64_t c) { f(i, n, Steps{nullptr, sp[c]}); });
    });
  }
}

at::Tensor fake_quantize_cpu(const at::Tensor& x, const at::Tensor& step, int64_t qmin,
                             int64_t qmax, int64_t channel_dim, double /*grad_scale*/,
                             double min_step) {
  const int64_t dim = check_args(x, step, qmin, qmax, channel_dim, min_step);
  const std::vector<float> steps = effective_steps(step, min_step);
  const at::Tensor xd = dense(x);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const Blocks b = blocks_of(xd, dim, step);
  const float* sp = steps.data();
  const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  DQA_DISPATCH(xd.scalar_type(), "dqa_forward", [&] {
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    parallel_runs(b, sp, xd.numel(), [&](int64_t i, int64_t n, Steps st) {
      forward_run(xp + i, yp + i, st, n, fmin, fmax);
    });
  });
  return y;
}

// Channels innermost: the chunk's n elements as rows of one tile each (the last may be short),
// taken in blocks of R rows (about 4096 elements, so a block of x, dy and dx stays in cache).
// Within a block, one 2W-lane column at a time with its steps and dstep sums in registers;
// between blocks the sums wait in acc (one per tile lane), which is folded into out[lane % C]
// every kFlush rows.
template <typename T>
void backward_tiles(const T* dy, const T* x, T* dx, const Tile& tile, int64_t n, int64_t C,
                    float qmin, float qmax, double* out, std::vector<float>& acc) {
  const int64_t P = tile.size, rows = (n + P - 1) / P;
  int64_t R = 1;
  while (R * 2 * P <= 4096 && R * 2 <= kFlush) R *= 2;  // a power of two, so it divides kFlush
  const VecF vqmin(qmin), vqmax(qmax);
  const Steps st{tile.steps.data(), 0.f};
  acc.assign(P, 0.f);
  for (int64_t rb = 0; rb < rows; rb += R) {
    const int64_t re = std::min(rows, rb + R);
    for (int64_t j = 0; j < P; j += 2 * W) {
      const int64_t m = std::min(2 * W, P - j);
      const VecF s0 = st.vec(j, m), s1 = st.vec(j + W, m - W);
      VecF a0, a1;
      load2(acc.data() + j, a0, a1, m);
      for (int64_t r = rb; r < re; ++r) {
        const int64_t o = r * P + j, mm = std::min(m, n - o);
        if (mm <= 0) break;  // only the last row is short
        backward_vec<T, true>(dy + o, x + o, dx + o, s0, s1, mm, vqmin, vqmax, a0, a1);
      }
      store2(acc.data() + j, a0, a1, m);
    }
    if (re % kFlush == 0 || re == rows) {
      for (const auto j : c10::irange(P)) out[j % C] += acc[j];
      acc.assign(P, 0.f);
    }
  }
}

// Runs of one step: each run's float sums cover at most kFlush vectors per lane.
template <typename T>
void backward_runs(const T* dy, const T* x, T* dx, const Blocks& b, const float* sp,
                   int64_t begin, int64_t end, float qmin, float qmax, double* out) {
  for_each_run(b, begin, end, [&](int64_t i, int64_t n, int64_t c) {
    for (int64_t j = 0; j < n; j += kFlush * 2 * W) {
      out[c] += backward_run<T, true>(dy + i + j, x + i + j, dx + i + j, Steps{nullptr, sp[c]},
                                      std::min(n - j, kFlush * 2 * W), qmin, qmax);
    }
  });
}

// Elements per dstep chunk: fixed by the shape alone (whole rows when channels are innermost),
// so the partial sums, and their fixed-order total, do not depend on the thread count.
int64_t step_grad_chunk(const Blocks& b, int64_t numel) {
  const int64_t chunk = std::max(kGrain, (numel + kMaxChunks - 1) / kMaxChunks);
  if (!channels_innermost(b)) return chunk;
  return (chunk + b.channels - 1) / b.channels * b.channels;
}

// Writes dx, and partial[k * C + c]: chunk k's sum of dy * t over channel c (double).
template <typename T>
void backward_with_step_grad(const T* dyp, const T* xp, T* dxp, const Blocks& b,
                             const float* sp, int64_t numel, float qmin, float qmax,
                             int64_t chunk, std::vector<double>& partial) {
  const int64_t C = b.channels;
  const int64_t nchunks = (numel + chunk - 1) / chunk;
  const Tile tile(sp, C, channels_innermost(b) ? step_grad_tile(C) : 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t kbeg, int64_t kend) {
    std::vector<float> acc;
    for (int64_t k = kbeg; k < kend; ++k) {
      double* out = partial.data() + k * C;
      const int64_t begin = k * chunk, end = std::min(numel, begin + chunk);
      if (!channels_innermost(b)) {
        backward_runs(dyp, xp, dxp, b, sp, begin, end, qmin, qmax, out);
      } else {
        backward_tiles(dyp + begin, xp + begin, dxp + begin, tile, end - begin, C, qmin, qmax, out, acc);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin,
    int64_t qmax, int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step) {
  const int64_t dim = check_args(x, step, qmin, qmax, channel_dim, min_step);
  check_backward_args(grad_y, x, grad_scale);
  const std::vector<float> steps = effective_steps(step, min_step);
  const at::Tensor xd = dense(x);
  const at::Tensor dyd = with_layout_of(grad_y, xd);
  at::Tensor dx = at::empty_like(xd);
  at::Tensor dstep = need_step_grad ? at::empty(step.sizes(), step.options())
                                    : at::empty({0}, step.options());
  const int64_t numel = xd.numel();
  if (numel == 0) return {dx, dstep.zero_()};
  const Blocks b = blocks_of(xd, dim, step);
  const float* sp = steps.data();
  const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  const int64_t chunk = step_grad_chunk(b, numel);
  std::vector<double> partial;
  if (need_step_grad) partial.assign(((numel + chunk - 1) / chunk) * b.channels, 0.0);

  DQA_DISPATCH(xd.scalar_type(), "dqa_backward", [&] {
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dyd.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (need_step_grad) {
      backward_with_step_grad(dyp, xp, dxp, b, sp, numel, fmin, fmax, chunk, partial);
    } else {
      parallel_runs(b, sp, numel, [&](int64_t i, int64_t n, Steps st) {
        backward_run<scalar_t, false>(dyp + i, xp + i, dxp + i, st, n, fmin, fmax);
      });
    }
  });
  if (need_step_grad) {
    // Chunk by chunk, so the partials are read in memory order; each channel's sum still adds
    // its chunks in the same fixed order.
    float* dp = dstep.mutable_data_ptr<float>();
    const int64_t C = b.channels, nchunks = static_cast<int64_t>(partial.size()) / C;
    std::vector<double> total(partial.begin(), partial.begin() + C);
    for (int64_t k = 1; k < nchunks; ++k) {
      const double* row = partial.data() + k * C;
      for (const auto c : c10::irange(C)) total[c] += row[c];
    }
    // The gradient with respect to the raw step: times d effective_step / d step (-1, 0 or 1).
    const at::Tensor raw = step.contiguous();
    const float* rp = raw.const_data_ptr<float>();
    const float m = static_cast<float>(min_step);
    for (const auto c : c10::irange(C)) {
      dp[c] = static_cast<float>(grad_scale * total[c]) * effective_step_grad(rp[c], m);
    }
  }
  return {dx, dstep};
}

}  // namespace

TORCH_LIBRARY_IMPL(dqa_ext, CPU, m) {
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
}

}  // namespace dqa
