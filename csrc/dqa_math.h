// The per-element math of dqa_ext's fake quantizer: the one definition used by the CPU kernels
// (on float and on at::vec::Vectorized<float>) and by the CUDA kernels (on float).
// dqa_ext/reference.py mirrors it line for line.
//
// Each function is a template over the value type V. V = float needs nothing more; a SIMD type
// must provide `rne(V)` (round half to even) and `select(mask, a, b)` overloads in namespace dqa,
// declared before this header is included, plus the usual arithmetic and comparison operators.
#pragma once

#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define DQA_HD __host__ __device__ __forceinline__
#else
#define DQA_HD inline
#endif

namespace dqa {

// Round half to even. rintf and std::nearbyint both use the current rounding mode, which is
// round-to-nearest-even unless a program changes it. (roundf rounds half away from zero: wrong.)
DQA_HD float rne(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

DQA_HD float select(bool c, float a, float b) { return c ? a : b; }

// A step that is not finite and > 0 becomes NaN, so that everything computed from it is NaN.
// The CPU path rejects such steps before any work; the CUDA path cannot check without a host
// sync, so its kernels apply this once per channel instead.
DQA_HD float checked_step(float s) { return (s > 0.f && s <= FLT_MAX) ? s : NAN; }

// The step in use. A learned step (min_step > 0) is used as max(|s|, min_step), so it stays
// positive under any optimizer without constraints; a NaN step stays NaN (the comparison with
// NaN is false). A given step (min_step == 0) is used as it is.
DQA_HD float effective_step(float s, float min_step) {
  if (!(min_step > 0.f)) return s;
  const float a = s < 0.f ? -s : s;  // |s|; a NaN stays NaN
  return a < min_step ? min_step : a;
}

// d effective_step / d s, which multiplies the step gradient (exactly: it is -1, 0 or 1):
// sign(s) * [|s| >= min_step] for a learned step, as torch's abs then clamp_min give; 1 for a
// given step.
DQA_HD float effective_step_grad(float s, float min_step) {
  if (!(min_step > 0.f)) return 1.f;
  if (!(s >= min_step || s <= -min_step)) return 0.f;
  return s > 0.f ? 1.f : -1.f;
}

// v = x / s: IEEE division, never x * (1/s), so every backend gets the same v.
template <typename V>
DQA_HD V scaled(V x, V s) { return x / s; }

// Forward: y = clamp(rne(v), qmin, qmax) * s. The comparisons are false for NaN, so NaN stays NaN
// (fminf/fmaxf and std::min/max would drop it); +-inf clamps to qmax/qmin.
template <typename V>
DQA_HD V quantize(V v, V s, V qmin, V qmax) {
  V q = rne(v);
  q = select(q < qmin, qmin, q);
  q = select(q > qmax, qmax, q);
  return q * s;
}

// Straight-through input gradient: dy strictly inside (qmin, qmax), else 0 (NaN v gives 0).
// The zero is written as 0 * s so that a NaN step (see checked_step) gives a NaN gradient.
template <typename V>
DQA_HD V grad_input(V v, V dy, V s, V qmin, V qmax) {
  return select((v > qmin) & (v < qmax), dy, s * V(0.f));
}

// LSQ's per-element step-gradient factor t(v); dstep[c] = grad_scale * sum_c dy * t(v).
// NaN v falls through both comparisons and gives rne(NaN) - NaN = NaN.
template <typename V>
DQA_HD V grad_step_term(V v, V qmin, V qmax) {
  return select(v <= qmin, qmin, select(v >= qmax, qmax, rne(v) - v));
}

}  // namespace dqa
