"""How a benchmark is timed and how peak memory is taken.

Kernel benchmarks (time_interleaved): every implementation and pass of one case is timed in the
same rounds, round by round in rotating order, so load that drifts over seconds on a shared
machine hits them alike; each figure is the median over rounds, reported with its spread (the
interquartile range over the median) and flagged when the spread exceeds SPREAD_FLAG.
Training steps (measure): pytest-benchmark's pedantic mode, rounds sized to a time budget."""

import math
import statistics
import time
from dataclasses import dataclass

import torch

MIN_ROUNDS = 3
MAX_ROUNDS = 200
INTERLEAVED_MIN_ROUNDS = 7
INTERLEAVED_MAX_ROUNDS = 100
# A spread (IQR / median over rounds) above this marks a figure as noisy in the tables.
SPREAD_FLAG = 0.10
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


@dataclass
class Timing:
    """Seconds per call: the median over rounds, the spread (IQR / median), the rounds."""

    median_s: float
    spread: float
    rounds: int
    iterations: int
    per_round_s: list

    @property
    def noisy(self):
        return self.spread > SPREAD_FLAG


def spread_of(samples):
    """Interquartile range over the median; 0 for fewer than 2 samples."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med if med > 0 else 0.0


def _one_call_s(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return max(time.perf_counter() - t0, 1e-7)


def time_interleaved(fns, device, budget_s, min_rounds=INTERLEAVED_MIN_ROUNDS,
                     max_rounds=INTERLEAVED_MAX_ROUNDS):
    """Times each fn of {key: fn} (each already called once: the warm-up) in shared rounds.

    A round calls every fn `iterations` times (enough to last MIN_ROUND_S), one fn after the
    other, starting one further along the list each round. Rounds: as many as budget_s allows,
    clamped to [min_rounds, max_rounds]. Returns {key: Timing}."""
    if not fns:
        return {}
    if budget_s <= 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    keys = list(fns)
    once = {k: _one_call_s(fns[k], device) for k in keys}
    iterations = {k: max(1, math.ceil(MIN_ROUND_S[device] / once[k])) for k in keys}
    round_s = sum(once[k] * iterations[k] for k in keys)
    rounds = int(min(max(min_rounds, budget_s / round_s), max_rounds))
    samples = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            fn, n = fns[k], iterations[k]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: Timing(statistics.median(s), spread_of(s), rounds, iterations[k], s)
            for k, s in samples.items()}


class CaseRounds:
    """Collects the timed functions of one case as its tests run (each test builds its own and
    checks parity), and times them together, interleaved, when the next case starts or the
    session ends (flush)."""

    def __init__(self, budget_s, on_result):
        self.budget_s = budget_s
        self.on_result = on_result  # on_result(spec, Timing, extra) for each spec timed
        self.case = None
        self.pending = {}  # spec -> (fn, extra)

    def starting(self, case):
        """Call before building a case's inputs: times the previous case first, so that its
        inputs (held by its functions) are freed before the next case's are allocated."""
        if case != self.case:
            self.flush()
            self.case = case

    def add(self, spec, fn, extra):
        self.starting(spec.case)
        self.pending[spec] = (fn, extra)

    def flush(self):
        if not self.pending:
            return
        pending, self.pending, case = self.pending, {}, self.case
        self.case = None
        timings = time_interleaved({s: fn for s, (fn, _) in pending.items()}, case.device,
                                   self.budget_s * len(pending))
        for spec, timing in timings.items():
            self.on_result(spec, timing, pending[spec][1])


def measure(benchmark, fn, device, budget_s):
    """Times fn (already called once) with benchmark.pedantic; returns the median seconds per
    call, or None when benchmarking is disabled (the parity check was the only call)."""
    if benchmark.disabled:
        return None
    if device == "cuda":
        benchmark._timer = synced_timer  # pytest-benchmark has no public per-test timer option
    # The parity check already ran fn once (the warm-up: lazy initialisation, compilation); one
    # more call sizes the rounds.
    once = _one_call_s(fn, device)
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
