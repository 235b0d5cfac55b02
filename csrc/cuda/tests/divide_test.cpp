// The kernels' fast division (dqa_divide.h) against the IEEE quotient, on the host, with the
// header's own host branch (each operation IEEE round-to-nearest, as the device's __fmul_rn,
// __fmaf_rn and __frcp_rn): the finite part of the proof in dqa_divide.h, and more.
//   1. every hard case: for each divisor significand B in [2^23, 2^24) every dividend
//      significand A with A * 2^25 mod B in [-13, 13] (the only pairs where the error bound
//      allows a wrong rounding);
//   2. every dividend significand for a sample of divisor significands (edges and random);
//   3. random x and s over the whole fast range, both signs (scaling and symmetry), and zeros of
//      both signs (their sign kept);
//   4. the guard: what it lets through and what it sends to the IEEE division, against the
//      range the proof covers (its bounds written here, not taken from the header).
// Built and run by scripts/check_cuda_kernels.sh and tests/test_cuda_planner.py.
// Usage: divide_test [sampled divisors, default 24]
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "cuda/dqa_divide.h"

using namespace dqa_cuda;

// The range this proof covers; the header's guard must not let more through.
static_assert(kFastXMin >= 0x1p-60f && kFastXMax <= 0x1p60f, "x range beyond the proof");
static_assert(kFastStepMin >= 0x1p-40f && kFastStepMax <= 0x1p40f, "step range beyond the proof");

namespace {

long failures = 0;
long checks = 0;

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The significand A * 2^-23 in [1, 2).
float significand(uint64_t A) { return from_bits(0x3f800000u | static_cast<uint32_t>(A & 0x7fffffu)); }

void expect_exact(float x, float s) {
  ++checks;
  const Divisor d = make_divisor(s);
  const float q = fast_quotient(x, d);
  const float want = x / s;
  if (to_bits(q) != to_bits(want)) {
    if (++failures <= 20) std::printf("FAIL: %a / %a: fast %a, IEEE %a\n", x, s, q, want);
  }
}

void expect_guard(float x, float s, bool want) {
  ++checks;
  if (fast(x, make_divisor(s)) != want) {
    if (++failures <= 20) std::printf("FAIL: guard(%a, %a) is %d\n", x, s, !want);
  }
}

uint64_t mulmod(uint64_t a, uint64_t b, uint64_t m) { return (a * b) % m; }  // a, b < 2^24

uint64_t powmod(uint64_t a, unsigned e, uint64_t m) {
  uint64_t r = 1 % m;
  for (; e; e >>= 1) {
    if (e & 1) r = mulmod(r, a, m);
    a = mulmod(a, a, m);
  }
  return r;
}

// 1. For B = 2^t Bo (Bo odd): A * 2^25 == rho (mod B) needs 2^t | rho, then
//    A == (rho / 2^t) * (2^(25-t))^-1 (mod Bo).
long hard_cases() {
  long n = 0;
  for (uint64_t B = uint64_t{1} << 23; B < (uint64_t{1} << 24); ++B) {
    const float s = significand(B);
    const unsigned t = static_cast<unsigned>(__builtin_ctzll(B));
    const uint64_t Bo = B >> t;
    const uint64_t inv = Bo == 1 ? 0 : powmod((Bo + 1) / 2, 25 - t, Bo);
    for (int64_t rho = -13; rho <= 13; ++rho) {
      if (rho % (int64_t{1} << t) != 0) continue;
      const int64_t rr = rho / (int64_t{1} << t);
      const uint64_t rm = static_cast<uint64_t>(((rr % static_cast<int64_t>(Bo)) + static_cast<int64_t>(Bo)) %
                                                static_cast<int64_t>(Bo));
      const uint64_t A0 = Bo == 1 ? 0 : mulmod(rm, inv, Bo);
      const uint64_t lo = uint64_t{1} << 23;
      uint64_t A = A0 >= lo ? A0 : A0 + ((lo - A0 + Bo - 1) / Bo) * Bo;
      for (; A < (uint64_t{1} << 24); A += Bo) {
        const int64_t res = static_cast<int64_t>((A << 25) % B);
        if (res != ((rho % static_cast<int64_t>(B)) + static_cast<int64_t>(B)) % static_cast<int64_t>(B)) {
          std::printf("FAIL: hard-case enumeration: A=%llu B=%llu residue %lld, want %lld\n",
                      (unsigned long long)A, (unsigned long long)B, (long long)res, (long long)rho);
          ++failures;
          return n;
        }
        expect_exact(significand(A), s);
        ++n;
      }
    }
  }
  return n;
}

// 2. Every A for sampled B.
void all_dividends(int sampled) {
  std::mt19937_64 rng(19);
  const uint64_t edges[] = {uint64_t{1} << 23, (uint64_t{1} << 23) + 1, (uint64_t{1} << 24) - 1,
                            (uint64_t{1} << 24) - 2, 3ull << 22, 0xaaaaaaull, 0xd55555ull, 0xb504f3ull};
  int done = 0;
  for (uint64_t B : edges) {
    if (done++ >= sampled) return;
    for (uint64_t A = uint64_t{1} << 23; A < (uint64_t{1} << 24); ++A) expect_exact(significand(A), significand(B));
  }
  for (; done < sampled; ++done) {
    const uint64_t B = (uint64_t{1} << 23) | (rng() & 0x7fffffu);
    for (uint64_t A = uint64_t{1} << 23; A < (uint64_t{1} << 24); ++A) expect_exact(significand(A), significand(B));
  }
}

// 3. The whole fast range: exponents and signs.
void scaled() {
  std::mt19937_64 rng(23);
  std::uniform_int_distribution<int> ex(-60, 59), es(-40, 39);
  for (int i = 0; i < 2000000; ++i) {
    const float x = std::ldexp(significand(rng()), ex(rng)) * (rng() & 1 ? -1.f : 1.f);
    const float s = std::ldexp(significand(rng()), es(rng));
    expect_exact(x, s);
  }
  for (float s : {kFastStepMin, kFastStepMax, 1.f, 0.3f, 1e-6f}) {
    for (float x : {kFastXMin, -kFastXMin, kFastXMax, -kFastXMax, 1.f, 3.f, -0.5f, 0.f, -0.f}) expect_exact(x, s);
  }
  for (int i = 0; i < 100000; ++i) {  // zeros of both signs: the quotient keeps the sign
    expect_exact(i & 1 ? -0.f : 0.f, std::ldexp(significand(rng()), es(rng)));
  }
}

// 4. The guard.
void guard() {
  const float inf = INFINITY, nan = NAN, sub = from_bits(0x00400000u);
  // Outside the proof's range, whatever the header's constants say.
  for (float x : {inf, -inf, nan, sub, -sub, std::nextafter(0x1p-60f, 0.f), -std::nextafter(0x1p-60f, 0.f),
                  std::nextafter(0x1p60f, inf), -std::nextafter(0x1p60f, inf), 3e38f, 0x1p-100f}) {
    expect_guard(x, 1.f, false);
  }
  for (float x : {kFastXMin, -kFastXMin, kFastXMax, -kFastXMax, 1.f, -2.5f, 0.f, -0.f}) expect_guard(x, 1.f, true);
  for (float s : {nan, 0.f, -0.f, -1.f, inf, std::nextafter(0x1p-40f, 0.f), std::nextafter(0x1p40f, inf), 1e-45f}) {
    for (float x : {1.f, 0.f, -0.f}) expect_guard(x, s, false);  // a step out of range: no x at all
  }
  for (float s : {kFastStepMin, kFastStepMax}) {
    for (float x : {1.f, 0.f, -0.f}) expect_guard(x, s, true);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int sampled = argc > 1 ? std::atoi(argv[1]) : 24;
  const long hard = hard_cases();
  all_dividends(sampled);
  scaled();
  guard();
  std::printf("divide_test: %ld checks (%ld hard cases, %d divisors x 2^23 dividends), %ld failed\n",
              checks, hard, sampled, failures);
  return failures == 0 ? 0 : 1;
}
