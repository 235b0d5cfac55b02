// x / s for many x and one s, bitwise equal to the IEEE quotient RN(x / s) that dqa::scaled
// computes, in three rounded operations per x once RN(1/s) is known:
//   r = RN(1 / s)   (once per step)     q0 = RN(x * r)     e = RN(s * q0 - x)     q = RN(q0 - e * r)
// On the guarded range (s in [2^-40, 2^40]; x = +-0 or |x| in [2^-60, 2^60]: no infinity, NaN,
// subnormal, overflow, and every intermediate normal or zero) q == RN(x / s) for every x and s,
// the sign of a zero included. Proof (csrc/cuda/tests/divide_test.cpp checks its finite part;
// docs/cuda.md has it in full):
//  0. x = +-0: q0 = +-0 (the sign of x, r > 0), e = RN(s q0 - x) = +0 (an exact zero sum of
//     opposite signs), q = RN(q0 - 0 r) = q0: the sign of x, as x / s. (With e = RN(x - s q0)
//     and q = RN(q0 + e r), x = -0 would give q = +0.)
//  1. Else scaling by powers of two is exact on that range, and the sequence is odd in x, so it
//     suffices to take a = A 2^-23 and b = B 2^-23 in [1, 2) (A, B integers in [2^23, 2^24)).
//  2. |b r - 1| < 2^-24, |q0 - a/b| < 3 2^-24, |e + (a - b q0)| <= 2^-46 (RN is odd), so the
//     fma's exact sum t = q0 - e r satisfies |t - a/b| < 7 2^-48. RN(t) != RN(a/b) needs a
//     rounding midpoint m = M 2^-25 within 7 2^-48 of a/b, i.e. |A 2^25 - B M| < 14: the residue
//     of A 2^25 modulo B lies in [-13, 13].
//  3. The test enumerates, for every B, every A with such a residue (about 2.1e8 pairs) and
//     finds the sequence equal to the IEEE quotient for each.
// Outside the range (and for a bad step, which is NaN) the kernels use the IEEE division itself.
// Plain C++ plus DQA_HD: the host branch is the test's emulation, operation for operation.
#pragma once

#include <cmath>

#include "../dqa_math.h"  // DQA_HD

namespace dqa_cuda {

constexpr float kFastStepMin = 0x1p-40f;
constexpr float kFastStepMax = 0x1p40f;
constexpr float kFastXMin = 0x1p-60f;
constexpr float kFastXMax = 0x1p60f;

struct Divisor {
  float s;
  float r;   // RN(1 / s)
  float hi;  // kFastXMax when s is in the fast range, else -inf (no x is then fast)
};

DQA_HD Divisor make_divisor(float s) {
  const bool fast = s >= kFastStepMin && s <= kFastStepMax;  // false for NaN
#if defined(__CUDA_ARCH__)
  const float r = __frcp_rn(s);
#else
  const float r = 1.0f / s;
#endif
  return {s, r, fast ? kFastXMax : -INFINITY};
}

// The quotient candidate: exact where fast(x, d).
DQA_HD float fast_quotient(float x, const Divisor& d) {
#if defined(__CUDA_ARCH__)
  const float q0 = __fmul_rn(x, d.r);
  const float e = __fmaf_rn(d.s, q0, -x);  // the negations are operand modifiers: free
  return __fmaf_rn(-e, d.r, q0);
#else
  const float q0 = x * d.r;
  const float e = std::fma(d.s, q0, -x);
  return std::fma(-e, d.r, q0);
#endif
}

// x (and d) in the range where fast_quotient is the IEEE quotient: exact zeros (ReLU-like
// inputs have many) included.
DQA_HD bool fast(float x, const Divisor& d) {
#if defined(__CUDA_ARCH__)
  const float a = fabsf(x);  // an operand modifier of the comparisons: free
#else
  const float a = std::fabs(x);
#endif
  return (a >= kFastXMin || a == 0.f) && a <= d.hi;  // false for NaN
}

}  // namespace dqa_cuda
