"""End to end: one training step (forward, loss, backward, SGD step) of the networks dqa_ext ships
(dqa_ext.robust.models: the MNIST CNN and ResNet-20), with DQAReLU against the same net with nn.ReLU."""

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import dqa_ext

import _cases
from _measure import measure
from _training import NETS, VARIANTS, build, train_step

TRAIN_BUDGET_FACTOR = 10  # a training step is one number per network: give it more rounds
CASES = [(d, n, v) for d in ("cpu", "cuda") for n in NETS for v in VARIANTS]


def _build(net, variant, device):
    batch = NETS[net][1][torch.device(device).type]
    return build(net, variant, device, min(batch, _cases.PARITY_BATCH or batch))  # parity runs: small


def _check_dqa_layers(model, x, y):
    """One forward+backward with hooks: every DQAReLU's output and input gradient equal the
    reference's (bitwise), and its step gradient matches within summation-order tolerance."""
    from dqa_ext import reference

    mods = [m for m in model.modules() if isinstance(m, dqa_ext.DQAReLU)]
    assert mods, "convert left no DQAReLU in the model"
    seen, hooks = {}, []
    for m in mods:
        hooks.append(m.register_forward_hook(lambda m, i, o: seen.__setitem__((m, "fwd"), (i[0].detach(), o.detach()))))
        hooks.append(m.register_full_backward_hook(
            lambda m, gi, go: seen.__setitem__((m, "bwd"), (gi[0], go[0]))))
    model.zero_grad(set_to_none=True)
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    for m in mods:
        inp, out = seen[(m, "fwd")]
        dx, dy = seen[(m, "bwd")]
        dim = m.channel_dim % inp.dim()
        step, args = m.effective_step, (m.step.detach(), 0, m.qmax, m.channel_dim)
        g = m._grad_scale(inp, dim)
        y_ref = reference.fake_quantize_forward(inp, *args, g, m._op_min_step())
        assert torch.equal(out, y_ref), f"{m}: y differs from the reference"
        ref_dx, ref_ds = reference.fake_quantize_backward(dy, inp, *args, g, True, m._op_min_step())
        assert torch.equal(dx, ref_dx), f"{m}: dx differs from the reference"
        if m.mode == "dynamic":
            v = inp.float() / reference._step_view(inp, step, dim)
            t = reference.grad_step_term(v, 0.0, float(m.qmax))
            dims = [d for d in range(inp.dim()) if d != dim] if m.per_channel else list(range(inp.dim()))
            tol = g * (dy.float() * t).abs().sum(dim=dims).reshape(ref_ds.shape) * 1e-4 + 1e-6
            err = (m.step.grad - ref_ds).abs()
            assert bool((err <= tol).all()), f"{m}: step gradient off by {float(err.max()):.3g}"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("device,net,variant", CASES, ids=[f"{d}-{n}-{v}" for d, n, v in CASES])
def test_training_step(device, net, variant, benchmark, bench):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    benchmark.group = f"train-{device}-{net}"
    model, opt, x, y = _build(net, variant, device)
    if variant != "relu":
        _check_dqa_layers(model, x, y)

    step = train_step(model, opt, x, y)
    loss = step()
    assert torch.isfinite(loss), f"{net}/{variant}: loss {loss.item()}"
    median = measure(benchmark, step, device, bench.budget_s * TRAIN_BUDGET_FACTOR)
    if median is not None:
        bench.results.add_training(device, net, variant, median, x.shape[0])


PAIRED_ROUNDS = {"cpu": 9, "cuda": 21}
# A round times this many steps of a variant back to back: one GPU step lasts milliseconds, so a
# single one would measure the timer and the synchronisation as much as the step.
STEPS_PER_ROUND = {"cpu": 1, "cuda": 10}
OVERHEAD_CASES = [(d, n, c) for d in ("cpu", "cuda") for n in NETS for c in (False, True)]


@pytest.mark.parametrize("device,net,compiled", OVERHEAD_CASES,
                         ids=[f"{d}-{n}-{'compiled' if c else 'eager'}" for d, n, c in OVERHEAD_CASES])
def test_training_overhead(device, net, compiled, benchmark, bench):
    """The overhead in percent, robust to a machine whose load drifts: every round times one
    step of each variant back to back (in rotating order); the overhead is the median over
    rounds of DQAReLU's time over nn.ReLU's in the same round. compiled: each model under
    torch.compile (the first steps compile it, outside the timed rounds)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if benchmark.disabled:
        pytest.skip("timing only (parity is checked by test_training_step and tests/module/test_compile.py)")
    steps = {}
    for v in VARIANTS:
        model, opt, x, y = _build(net, v, device)
        steps[v] = train_step(torch.compile(model) if compiled else model, opt, x, y)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in steps.values():  # warm-up: compilation, optimizer state, allocator
        for _ in range(3):
            step()
    names = list(steps)
    ratios = {v: [] for v in names if v != "relu"}
    times = {v: [] for v in names}
    for r in range(PAIRED_ROUNDS[device]):
        for v in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(STEPS_PER_ROUND[device]):
                steps[v]()
            sync()
            times[v].append((time.perf_counter() - t0) / STEPS_PER_ROUND[device])
        for v in ratios:
            ratios[v].append(times[v][-1] / times["relu"][-1])
    for v, rs in ratios.items():
        bench.results.add_overhead(device, net, v, rs, compiled, statistics.median(times[v]))
