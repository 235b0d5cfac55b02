"""How a benchmark is timed (pytest-benchmark's pedantic mode, rounds sized to a time budget) and
how peak memory is taken."""

import math
import time

import torch

MIN_ROUNDS = 3
MAX_ROUNDS = 200
# A round lasts at least this long (several calls where one is shorter): CPU timer noise, and
# on CUDA the launch queue stays full between the synchronisations that bracket a round.
MIN_ROUND_S = {"cpu": 2e-4, "cuda": 2e-3}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def synced_timer():
    """perf_counter after the GPU has finished what was queued (the CUDA rounds' timer)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def measure(benchmark, fn, device, budget_s):
    """Times fn (already called once) with benchmark.pedantic; returns the median seconds per
    call, or None when benchmarking is disabled (the parity check was the only call)."""
    if benchmark.disabled:
        return None
    if device == "cuda":
        benchmark._timer = synced_timer  # pytest-benchmark has no public per-test timer option
    # The parity check already ran fn once (the warm-up: lazy initialisation, compilation); one
    # more call sizes the rounds.
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    iterations = max(1, math.ceil(MIN_ROUND_S[device] / once))
    per_round = once * iterations
    rounds = int(min(max(MIN_ROUNDS, budget_s / per_round), MAX_ROUNDS))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    return benchmark.stats.stats.median


def peak_bytes(fn, device):
    """Peak bytes allocated above what was live before one call of fn, everything the call
    allocates (outputs, saved tensors, temporaries) until fn returns.

    CUDA: the caching allocator's max_memory_allocated. CPU: the allocation and free events of
    PyTorch's CPU allocator as torch.profiler(profile_memory=True) records them, replayed in
    time order (this sees every tensor, including torch.compile's buffers, but not memory
    allocated outside PyTorch's allocator)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for node in nodes:
            if str(getattr(node, "tag", "")).endswith("Allocation"):
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    try:
        walk(prof.profiler.kineto_results.experimental_event_tree())
    except Exception:  # the event tree is an experimental API; report "n/a" rather than fail
        return None
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak
