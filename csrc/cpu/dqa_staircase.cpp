// The sigmoid staircase (schema in dqa_ops.cpp) in one pass: an annealed-twin attack spends most
// of its time here, and the same formula in PyTorch ops takes about 19 passes over the tensor
// forward and 22 backward; this one reads x once and writes y and dy/dx once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace dqa {
namespace {

using VecF = at::vec::Vectorized<float>;
constexpr int64_t W = VecF::size();
constexpr float kClamp = 30.f;  // sigmoid'(30) ~ 1e-13: beyond it the derivative adds nothing
constexpr int64_t kGrain = 16384;

// One element (the vector loop does the same operations lane by lane): v = x / s,
// z_k = (v - (k - 1/2)) / T clamped to [-30, 30], y = s * sum sigmoid(z_k),
// d = sum sigmoid'(z_k) [|z_k| <= 30] / T = dy/dx.
inline void stairs_scalar(float x, float s, float inv_t, int64_t qmax, float& y, float& d) {
  const float v = x / s;
  float acc = 0.f, slope = 0.f;
  for (int64_t k = 1; k <= qmax; ++k) {
    const float z = (v - (static_cast<float>(k) - 0.5f)) * inv_t;
    const float sg = 1.f / (1.f + std::exp(-std::min(std::max(z, -kClamp), kClamp)));
    acc += sg;
    if (std::abs(z) <= kClamp) slope += sg * (1.f - sg);
  }
  y = s * acc;
  d = slope * inv_t;
}

inline void stairs_vec(const VecF& x, const VecF& s, const VecF& inv_t, int64_t qmax, VecF& y, VecF& d) {
  const VecF one(1.f), lo(-kClamp), hi(kClamp);
  const VecF v = x / s;
  VecF acc(0.f), slope(0.f);
  for (int64_t k = 1; k <= qmax; ++k) {
    const VecF z = (v - VecF(static_cast<float>(k) - 0.5f)) * inv_t;
    const VecF inside = z.abs() <= hi;  // all-ones lanes; NaN lanes are 0
    // exp to 20 ulp (PyTorch's fast vector exp): a twin needs its gradient's direction, not the
    // last bits, and the exponential at 1 ulp is half of this loop's time
    const VecF sg = (one + at::vec::clamp(z, lo, hi).neg().exp_u20()).reciprocal();
    acc = acc + sg;
    slope = slope + ((sg * (one - sg)) & inside);
  }
  y = s * acc;
  d = slope * inv_t;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_staircase_cpu(const at::Tensor& x, const at::Tensor& step,
                                                         const at::Tensor& temp, int64_t qmax,
                                                         int64_t channel_dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "dqa_ext.sigmoid_staircase: x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "dqa_ext.sigmoid_staircase: x must have a batch dim, got a 0-d tensor");
  const bool cl = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || cl, "dqa_ext.sigmoid_staircase: x must be contiguous or channels_last");
  TORCH_CHECK(channel_dim >= -x.dim() && channel_dim < x.dim(), "dqa_ext.sigmoid_staircase: channel_dim ",
              channel_dim, " is out of range for x of dim ", x.dim());
  const int64_t dim = channel_dim < 0 ? channel_dim + x.dim() : channel_dim;
  const int64_t C = x.size(dim);
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.device() == x.device() &&
                  (step.numel() == 1 || step.numel() == C),
              "dqa_ext.sigmoid_staircase: step must be float32 on x's device with 1 or ", C,
              " values (x's size along channel_dim), got ", step.sizes(), " ", step.scalar_type());
  TORCH_CHECK(temp.scalar_type() == at::kFloat && temp.dim() == 1 && temp.device() == x.device() &&
                  (temp.numel() == 1 || temp.numel() == x.size(0)),
              "dqa_ext.sigmoid_staircase: temp must be a float32 vector of 1 or ", x.size(0),
              " values on x's device, got ", temp.sizes(), " ", temp.scalar_type());
  TORCH_CHECK(qmax >= 1 && qmax <= 255, "dqa_ext.sigmoid_staircase: qmax must be in [1, 255], got ", qmax);
  auto y = at::empty_like(x);
  auto d = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {y, d};
  const int64_t per = n / x.size(0);  // elements of one example: N is outermost in both layouts
  std::vector<float> inv_t(temp.numel());
  const auto t = temp.contiguous();
  for (int64_t i = 0; i < t.numel(); ++i) inv_t[i] = 1.f / t.const_data_ptr<float>()[i];
  // The steps: one value, or one per channel. Memory order has the channel innermost (channels_last
  // on 4-d, or a 2-d [N, C]): lanes then take the steps from a tiled copy, loaded at i % C; else
  // each channel's run of `inner` elements shares one step.
  const auto sc = step.contiguous();
  const float* sp = sc.const_data_ptr<float>();
  const bool per_channel = step.numel() > 1;
  int64_t inner = 1;
  for (int64_t k = dim + 1; k < x.dim(); ++k) inner *= x.size(k);
  TORCH_CHECK(!(cl && per_channel && dim != 1), "dqa_ext.sigmoid_staircase: a channels_last x takes "
              "per-channel steps along dim 1 only, got channel_dim ", channel_dim);
  const bool lanes = per_channel && (cl || inner == 1);
  std::vector<float> tiled;
  if (lanes) {
    tiled.resize(C + W);
    for (int64_t j = 0; j < C + W; ++j) tiled[j] = sp[j % C];
  }
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  float* dp = d.mutable_data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t ex = i / per;
      const float it = inv_t[inv_t.size() == 1 ? 0 : ex];
      int64_t stop = std::min(end, (ex + 1) * per);  // one temperature up to here
      if (lanes) {
        for (; i + W <= stop; i += W) {
          VecF a, b;
          stairs_vec(VecF::loadu(xp + i), VecF::loadu(tiled.data() + i % C), VecF(it), qmax, a, b);
          a.store(yp + i);
          b.store(dp + i);
        }
        for (; i < stop; ++i) stairs_scalar(xp[i], sp[i % C], it, qmax, yp[i], dp[i]);
        continue;
      }
      float s = sp[0];
      if (per_channel) {  // a run of `inner` elements of one channel
        s = sp[(i / inner) % C];
        stop = std::min(stop, (i / inner + 1) * inner);
      }
      const VecF svec(s), tvec(it);
      for (; i + W <= stop; i += W) {
        VecF a, b;
        stairs_vec(VecF::loadu(xp + i), svec, tvec, qmax, a, b);
        a.store(yp + i);
        b.store(dp + i);
      }
      for (; i < stop; ++i) stairs_scalar(xp[i], s, it, qmax, yp[i], dp[i]);
    }
  });
  return {y, d};
}

}  // namespace

TORCH_LIBRARY_IMPL(dqa_ext, CPU, m) { m.impl("sigmoid_staircase", &sigmoid_staircase_cpu); }

}  // namespace dqa
