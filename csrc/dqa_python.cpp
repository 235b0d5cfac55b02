// The Python module dqa_ext._C: importing it loads this library, which registers the ops
// (dqa_ops.cpp, the kernels, the autograd). It also holds one function, the eager entry of the
// forward op: pybind11 converts its seven arguments in a fraction of the time torch.ops' generic
// argument parser takes (about 2 us of a 6 us call on a small tensor). It calls the same
// dispatcher op, so autograd, the profiler and dispatch modes see the same op; dqa_ext takes
// torch.ops instead under torch.compile, functorch, tensor subclasses and __torch_function__
// modes (dqa_ext/functional.py).
#include <torch/python.h>

#include "dqa_ops.h"

namespace {

at::Tensor fake_quantize_entry(const at::Tensor& x, const at::Tensor& step, int64_t qmin,
                               int64_t qmax, int64_t channel_dim, double grad_scale,
                               double min_step) {
  const pybind11::gil_scoped_release no_gil;  // as torch's own bindings do
  return dqa::call_fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("fake_quantize", &fake_quantize_entry,
        "torch.ops.dqa_ext.fake_quantize for eager calls on plain tensors");
}
