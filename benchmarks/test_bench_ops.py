"""Kernel benchmarks: dqa_ext's ops against the eager reference, torch.compile of it, PyTorch's
learnable fake quantization, torch.relu and a copy, on identical inputs; each asserts parity first.
The implementations and passes of one case are timed together, interleaved round by round
(_measure.CaseRounds), when the next case starts or the session ends."""

import pytest
import torch

import _peers
from _cases import kernel_specs
from _measure import peak_bytes

SPECS = kernel_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_kernel(spec, benchmark, bench):
    case = spec.case
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not benchmark.disabled:
        bench.rounds.starting(case)
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
    if benchmark.disabled:
        return
    peak = peak_bytes(fn, case.device) if spec.pass_ == "fwdbwd" else None
    bench.rounds.add(spec, fn, (peak, note))  # timed with the rest of its case
