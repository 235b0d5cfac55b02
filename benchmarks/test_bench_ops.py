"""Kernel benchmarks: dqa_ext's ops against the eager reference, torch.compile of it, PyTorch's
learnable fake quantization, torch.relu and a copy, on identical inputs; each asserts parity first."""

import pytest
import torch

import _peers
from _cases import kernel_specs
from _measure import measure, peak_bytes

SPECS = kernel_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_kernel(spec, benchmark, bench):
    case = spec.case
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    benchmark.group = f"{case.id}-{spec.pass_}"
    benchmark.extra_info.update(impl=spec.impl, pass_=spec.pass_, bytes=spec.bytes_moved())
    inputs = None if spec.impl == "copy" else bench.inputs.get(case)
    try:
        fn, check = _peers.build(spec, inputs)
        out = fn()
    except (RuntimeError, NotImplementedError) as exc:
        if spec.impl == "torch_fq" and case.dtype != torch.float32:
            pytest.skip(f"torch_fq does not run on {case.dtype}: {str(exc).splitlines()[0]}")
        raise
    note = check(out)  # parity first; a benchmark of a wrong result is worthless
    del out
    median = measure(benchmark, fn, case.device, bench.budget_s)
    if median is None:
        return
    peak = peak_bytes(fn, case.device) if spec.pass_ == "fwdbwd" else None
    bench.results.add_kernel(spec, median, peak, note)
