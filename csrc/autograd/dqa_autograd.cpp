// Autograd of dqa_ext's ops in C++: an eager call goes from the op to its backward node without
// returning to Python. The node is written as PyTorch's generated autograd kernels write theirs
// (torch/csrc/autograd/generated/Functions.h): a Node subclass holding the saved x and raw step as
// SavedVariables and the scalar arguments as fields, made only when something requires grad. A
// torch::autograd::Function (torchvision's csrc/ops/autograd/ pattern) did the same work with a
// generic node, input and output records and a string-keyed map of saved arguments: about 9 us of
// a 40 us forward+backward on a small tensor (benchmarks/test_bench_call.py).
// The backward is the fake_quantize_backward op, itself wrapped in a Function whose own backward
// raises (the straight-through surrogate has no second derivative in the kernels). torch.compile
// and torch.export trace through these kernels down to the ops (their fakes are in
// dqa_ext/ops.py); Inductor then decomposes the ops into code it can fuse.
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <type_traits>

#include "../dqa_ops.h"

namespace dqa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::Variable;
using torch::autograd::variable_list;

constexpr const char* kNoDoubleBackward =
    "dqa_ext: the extension's fake_quantize backward is not differentiable, so double backward "
    "(create_graph=True, gradient penalties, hessians) is not supported on it; "
    "DQA_EXT_BACKEND=reference (dqa_ext.set_backend('reference')) computes it in plain PyTorch";

constexpr const char* kNoForwardAD =
    "dqa_ext: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported by "
    "fake_quantize: use reverse mode (backward, torch.autograd.grad, torch.func.grad)";

// The backward op as a Function: under create_graph=True its outputs get a node whose backward
// raises one clear line, instead of a second derivative silently dropped.
class FakeQuantizeBackwardFunction
    : public torch::autograd::Function<FakeQuantizeBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Variable& grad_y, const Variable& x,
                               const Variable& step, int64_t qmin, int64_t qmax,
                               int64_t channel_dim, double grad_scale, bool need_step_grad,
                               double min_step) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dstep] = call_fake_quantize_backward(grad_y, x, step, qmin, qmax, channel_dim,
                                                 grad_scale, need_step_grad, min_step);
    return {dx, dstep};
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false, kNoDoubleBackward);
  }
};

// fake_quantize's backward node: next edges (x, step).
struct FakeQuantizeBackward final : public Node {
  SavedVariable x_, step_;
  int64_t qmin_ = 0, qmax_ = 0, channel_dim_ = 0;
  double grad_scale_ = 1.0, min_step_ = 0.0;

  std::string name() const override { return "FakeQuantizeBackward"; }

  void release_variables() override {
    x_.reset_data();
    step_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const bool need_x_grad = task_should_compute_output(0);
    const bool need_step_grad = task_should_compute_output(1);
    // unpack() raises PyTorch's own line on a second backward without retain_graph, and on an
    // x or step modified in place since the forward.
    const Variable x = x_.unpack(), step = step_.unpack();
    if (!grads[0].defined() || !(need_x_grad || need_step_grad)) return {Variable(), Variable()};
    at::Tensor dx, dstep;
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True: a node that raises
      auto out = FakeQuantizeBackwardFunction::apply(grads[0], x, step, qmin_, qmax_, channel_dim_,
                                                     grad_scale_, need_step_grad, min_step_);
      dx = out[0];
      dstep = out[1];
    } else {  // the usual backward: no graph to record
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dstep) = call_fake_quantize_backward(grads[0], x, step, qmin_, qmax_, channel_dim_,
                                                        grad_scale_, need_step_grad, min_step_);
    }
    return {need_x_grad ? dx : Variable(), need_step_grad ? dstep : Variable()};
  }

  // Compiled autograd (torch._dynamo.compiled_autograd): what identifies this node's backward, and
  // its apply run on the traced stand-ins of the saved tensors.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(x_, false);
    args.collect(step_, false);
    args.collect(qmin_);
    args.collect(qmax_);
    args.collect(channel_dim_);
    args.collect(grad_scale_);
    args.collect(min_step_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(x_);
    saved.before(step_);
    auto out = apply(variable_list(grads));
    saved.after(x_);
    saved.after(step_);
    return out;
  }
};

// A node owned the way this torch owns nodes: std::shared_ptr with torch's deleter (which frees a
// long chain of nodes without deep recursion) before torch 2.13, c10::intrusive_ptr since.
using NodePtr = decltype(torch::autograd::Edge{}.function);

template <typename T>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    // deleteNode found by argument-dependent lookup: declared only where nodes are shared_ptrs.
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

at::Tensor fake_quantize_autograd(const at::Tensor& x, const at::Tensor& step, int64_t qmin,
                                  int64_t qmax, int64_t channel_dim, double grad_scale,
                                  double min_step) {
  // The refusals come before any work.
  TORCH_CHECK(!x._fw_grad(/*level=*/0).defined() && !step._fw_grad(/*level=*/0).defined(), kNoForwardAD);
  const bool record = torch::autograd::compute_requires_grad(x, step);
  // Under torch.func the op is not differentiable (dqa_ext.functional runs the reference there):
  // the same refusal a C++ Function gives.
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor(); record && functorch_tls) {
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = call_fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
  }
  // Nothing to record (no_grad, inference, or no input that requires grad): the kernel alone.
  if (!record) return y;
  auto node = make_node<FakeQuantizeBackward>();
  auto* n = static_cast<FakeQuantizeBackward*>(node.get());
  n->set_next_edges(torch::autograd::collect_next_edges(x, step));
  n->x_ = SavedVariable(x, /*is_output=*/false);
  n->step_ = SavedVariable(step, /*is_output=*/false);
  n->qmin_ = qmin;
  n->qmax_ = qmax;
  n->channel_dim_ = channel_dim;
  n->grad_scale_ = grad_scale;
  n->min_step_ = min_step;
  torch::autograd::set_history(y, node);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& step, int64_t qmin,
    int64_t qmax, int64_t channel_dim, double grad_scale, bool need_step_grad, double min_step) {
  auto out = FakeQuantizeBackwardFunction::apply(grad_y, x, step, qmin, qmax, channel_dim,
                                                 grad_scale, need_step_grad, min_step);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dqa_ext, Autograd, m) {
  m.impl("fake_quantize", &fake_quantize_autograd);
  m.impl("fake_quantize_backward", &fake_quantize_backward_autograd);
}

}  // namespace dqa
