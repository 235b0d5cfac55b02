#include "dqa_args.h"

#include "dqa_math.h"

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace dqa {

namespace {
// Quantization levels are held in float32 by the kernels: keep them exact.
constexpr int64_t kMaxLevel = int64_t{1} << 24;
}  // namespace

int64_t check_args(const at::Tensor& x, const at::Tensor& step, int64_t qmin, int64_t qmax,
                   int64_t channel_dim, double min_step) {
  TORCH_CHECK(x.defined(), "dqa_ext: x must be a defined tensor");
  TORCH_CHECK(step.defined(), "dqa_ext: step must be a defined tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
              "dqa_ext: x must be float32, float16 or bfloat16, got ", xt);
  TORCH_CHECK(x.dim() >= 1, "dqa_ext: x must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(step.scalar_type() == at::kFloat, "dqa_ext: step must be float32, got ",
              step.scalar_type());
  TORCH_CHECK(step.device() == x.device(), "dqa_ext: step must be on x's device (", x.device(),
              "), got ", step.device());
  TORCH_CHECK(qmin < qmax, "dqa_ext: qmin must be < qmax, got qmin=", qmin, ", qmax=", qmax);
  TORCH_CHECK(qmin >= -kMaxLevel && qmax <= kMaxLevel,
              "dqa_ext: qmin and qmax must lie in [-2**24, 2**24] (exact in float32), got qmin=",
              qmin, ", qmax=", qmax);
  // The kernels use min_step in float32: it must stay > 0 (or be exactly 0) there.
  const float min_step_f = static_cast<float>(min_step);
  TORCH_CHECK(min_step == 0.0 || (min_step_f > 0.f && std::isfinite(min_step_f)),
              "dqa_ext: min_step must be 0 or a positive finite float32, got ", min_step);
  const int64_t ndim = x.dim();
  TORCH_CHECK(channel_dim >= -ndim && channel_dim < ndim, "dqa_ext: channel_dim must be in [",
              -ndim, ", ", ndim - 1, "] for x of shape ", x.sizes(), ", got ", channel_dim);
  const int64_t dim = channel_dim < 0 ? channel_dim + ndim : channel_dim;
  const int64_t channels = x.size(dim);
  TORCH_CHECK(step.numel() == 1 || step.numel() == channels,
              "dqa_ext: step must have 1 element (per-tensor) or x.shape[channel_dim] = ", channels,
              " elements (per-channel), got ", step.numel(), " (shape ", step.sizes(), ")");
  return dim;
}

void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, double grad_scale) {
  TORCH_CHECK(grad_y.defined(), "dqa_ext: grad_y must be a defined tensor");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "dqa_ext: grad_y must have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "dqa_ext: grad_y must have x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), "dqa_ext: grad_y must be on x's device (",
              x.device(), "), got ", grad_y.device());
  TORCH_CHECK(std::isfinite(grad_scale), "dqa_ext: grad_scale must be finite, got ", grad_scale);
}

// A learned step that is NaN or inf was written by an optimizer step: say where it came from.
constexpr const char* kLearnedStepHint =
    "; a learned step becomes NaN or inf after a training step whose input, loss or gradients "
    "had NaN or inf values (torch.autograd.detect_anomaly() finds where): reload a checkpoint or "
    "re-initialise the steps (dqa_ext.calibrate)";

std::vector<float> effective_steps(const at::Tensor& step, double min_step) {
  const at::Tensor s = step.contiguous();
  const float* p = s.const_data_ptr<float>();
  const float m = static_cast<float>(min_step);
  std::vector<float> out(static_cast<size_t>(s.numel()));
  for (const auto i : c10::irange(s.numel())) {
    out[i] = effective_step(p[i], m);
    TORCH_CHECK(std::isfinite(out[i]) && out[i] > 0.f, "dqa_ext: step must be finite and > 0",
                m > 0.f ? " (as max(|step|, min_step))" : "", ", got step[", i, "] = ", p[i],
                m > 0.f ? kLearnedStepHint : "");
  }
  return out;
}

at::Tensor dense(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  return x.contiguous(x.suggest_memory_format());
}

at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  // The stride of a dimension of size 1 never addresses an element (e.g. [N, C, 1, 1] in
  // channels_last has H and W strides of either format): t has ref's layout when every other
  // dimension has ref's stride, and then no copy is needed.
  if (t.sizes() == ref.sizes()) {
    bool same = true;
    for (const auto d : c10::irange(t.dim())) {
      same = same && (t.size(d) == 1 || t.stride(d) == ref.stride(d));
    }
    if (same) return t;
  }
  return at::empty_like(ref).copy_(t);
}

Blocks blocks_of(const at::Tensor& x, int64_t dim, const at::Tensor& step) {
  const int64_t numel = x.numel();
  if (step.numel() == 1) return {1, 1, numel};
  // Sort the dims of size > 1 by stride, outermost first: for a dense tensor that order is its
  // memory order, so the dims before the channel dim make `outer` and those after make `inner`.
  // An insertion sort on the stack (stable; a handful of dims): std::stable_sort would allocate a
  // buffer on every call.
  c10::SmallVector<int64_t, 8> order;
  for (const auto d : c10::irange(x.dim())) {
    if (d != dim && x.size(d) <= 1) continue;
    order.push_back(d);
    for (auto k = order.size() - 1; k > 0 && x.stride(order[k]) > x.stride(order[k - 1]); --k) {
      std::swap(order[k], order[k - 1]);
    }
  }
  Blocks b{1, x.size(dim), 1};
  bool after = false;
  for (const int64_t d : order) {
    if (d == dim) {
      after = true;
    } else {
      (after ? b.inner : b.outer) *= x.size(d);
    }
  }
  return b;
}

}  // namespace dqa
