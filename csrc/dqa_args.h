// Argument checks and the [outer, C, inner] layout shared by every backend's Torch glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace dqa {

// x seen as a dense [outer, C, inner] block: element (o, c, i) lies at o*C*inner + c*inner + i
// from x's data pointer. A per-tensor step is the block [1, 1, numel].
struct Blocks {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// The arguments of both ops, checked once, before any work (TORCH_CHECK; the messages name the
// argument, its value and what was expected). Returns channel_dim wrapped to [0, x.dim()).
int64_t check_args(const at::Tensor& x, const at::Tensor& step, int64_t qmin, int64_t qmax,
                   int64_t channel_dim, double min_step);
// The backward's extra arguments: grad_y like x, grad_scale finite.
void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, double grad_scale);
// CPU only: the steps in use (dqa::effective_step of each), every one finite and > 0, else an
// error naming the first bad one (on CUDA this check would need a host sync; see checked_step).
std::vector<float> effective_steps(const at::Tensor& step, double min_step);

// x itself when its memory is dense (contiguous in some dim order, channels_last included),
// else a copy contiguous in x's suggested memory format. Outputs are allocated with
// at::empty_like of the result, so they keep its memory format.
at::Tensor dense(const at::Tensor& x);
// t laid out as ref: t itself when its strides equal ref's on every dimension of size > 1
// (a size-1 dimension's stride addresses nothing), else one copy with ref's strides.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& ref);
// The block view of a dense x for the given step (per-tensor when step has one element).
Blocks blocks_of(const at::Tensor& x_dense, int64_t channel_dim, const at::Tensor& step);

}  // namespace dqa
