"""What one activation call costs on a small tensor, where the host (Python, dispatch, autograd)
is the whole cost: DQAReLU (fixed and learned step) against torch.relu and nn.ReLU, forward under
no_grad and forward+backward, timed in interleaved rounds."""

import pytest
import torch
from torch import nn

import dqa_ext
from _measure import time_interleaved
from dqa_ext import reference

SHAPE = (8, 16, 8, 8)
DEVICES = ["cpu", "cuda"]


def _activations(device):
    return {"torch.relu": torch.relu, "nn.ReLU": nn.ReLU(),
            "dqa_fixed": dqa_ext.DQAReLU(2, "fixed", num_channels=SHAPE[1]).to(device),
            "dqa_dynamic": dqa_ext.DQAReLU(2, "dynamic", num_channels=SHAPE[1], init_step=0.5).to(device)}


def _calls(act, x, dy):
    def fwd():
        with torch.no_grad():
            act(x)

    def fwdbwd():
        act(x).backward(dy)

    return {"fwd": fwd, "fwdbwd": fwdbwd}


@pytest.mark.parametrize("device", DEVICES)
def test_activation_call(device, bench, benchmark):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(device).requires_grad_()
    dy = torch.randn(SHAPE, generator=g).to(device)
    acts = _activations(device)
    # Parity first: the modules compute the reference's function (and relu its own).
    for name in ("dqa_fixed", "dqa_dynamic"):
        m = acts[name]
        assert torch.equal(m(x).detach(), reference.fake_quantize_forward(x.detach(), m.effective_step, 0, 3, 1))
    assert torch.equal(acts["nn.ReLU"](x), torch.relu(x))
    fns = {(name, pass_): fn for name, act in acts.items() for pass_, fn in _calls(act, x, dy).items()}
    for fn in fns.values():
        fn()  # warm-up
    if benchmark.disabled:
        return
    benchmark.group = f"call-{device}"
    timings = time_interleaved(fns, device, bench.budget_s * len(fns))
    for (name, pass_), timing in timings.items():
        bench.results.add_call(device, name, pass_, timing, list(SHAPE))
