"""pytest-benchmark setup for `pytest benchmarks/`: options, the session-wide result store, and the
summary printed at the end of the run and written to benchmarks/results/<machine>.{md,json}."""

import os
import shlex
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import _machine  # noqa: E402
import _measure  # noqa: E402
import _records  # noqa: E402
import _summary  # noqa: E402
import _cases  # noqa: E402
from _cases import InputCache  # noqa: E402

PARITY_BATCH = 2

SHORT_COLUMNS = ["median", "iqr", "rounds", "iterations"]


def pytest_addoption(parser):
    group = parser.getgroup("dqa_ext benchmarks")
    group.addoption("--bench-budget", type=float, default=float(os.environ.get("DQA_BENCH_BUDGET", 0.3)),
                    help="seconds of timed rounds per kernel benchmark (at least 3 rounds); "
                         "default 0.3 or $DQA_BENCH_BUDGET")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's; the machine name "
                         "of the results files carries the count)")
    group.addoption("--bench-write", action="store_true",
                    help="write benchmarks/results/<machine>.{md,json} even for a filtered run "
                         "(-k, -m, node ids); a full run always writes them")
    group.addoption("--bench-parity-full", action="store_true",
                    help="with --benchmark-disable, check parity on the full shapes (default: batch "
                         f"dimension cut to {PARITY_BATCH}, same channels, spatial sizes and layouts)")
    group.addoption("--bench-results", default=str(_summary.RESULTS_DIR),
                    help="directory for the results files (default benchmarks/results)")


class Bench:
    """What the benchmark tests share: settings, the results, the last case's inputs."""

    def __init__(self, config):
        self.budget_s = config.getoption("bench_budget")
        self.results = _records.Collector()
        self.rounds = _measure.CaseRounds(
            self.budget_s, lambda spec, timing, extra: self.results.add_kernel(spec, timing, *extra))
        self.inputs = InputCache()
        self.started = time.perf_counter()
        self.load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def pytest_configure(config):
    if config.getoption("bench_threads"):
        import torch

        torch.set_num_threads(config.getoption("bench_threads"))
    config._dqa_bench = Bench(config)
    if config.getoption("benchmark_disable", False) and not config.getoption("bench_parity_full"):
        _cases.PARITY_BATCH = PARITY_BATCH
    # With --benchmark-disable the tests run their parity checks and skip the fixture.
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")


def pytest_sessionstart(session):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and not session.config.getoption("benchmark_columns", None):
        bs.columns = SHORT_COLUMNS  # hundreds of rows: keep pytest-benchmark's own table narrow


@pytest.fixture(scope="session")
def bench(request):
    return request.config._dqa_bench


@pytest.fixture(autouse=True)
def extension_backend():
    """The extension, never a silent fallback to the reference, is what the "ext" rows and the
    DQAReLU training steps time (DQA_EXT_BACKEND=extension, for these tests only)."""
    from dqa_ext import _backend

    before = _backend.get_backend()
    _backend.set_backend("extension")
    yield
    _backend.set_backend(before)


def _filtered(config):
    opt = config.option
    return bool(getattr(opt, "keyword", "") or getattr(opt, "markexpr", "") or getattr(opt, "deselect", None)
                or any("::" in str(a) for a in config.args) or getattr(opt, "lf", False)
                or getattr(opt, "exitfirst", False))


def _portable(arg):
    """A command-line argument as a reader can use it: paths inside the repository relative to
    it, other absolute paths by their last part (no machine's folders in the results files)."""
    root = Path(__file__).resolve().parents[1]
    if not os.path.isabs(arg):
        return arg
    path = Path(arg)
    return str(path.relative_to(root)) if path.is_relative_to(root) else f".../{path.name}"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    b = getattr(config, "_dqa_bench", None)
    if b is None or config.getoption("benchmark_disable", False):
        return
    from dqa_ext import _backend

    before = _backend.get_backend()
    _backend.set_backend("extension")  # as extension_backend does for the tests
    try:
        b.rounds.flush()  # the last case's interleaved rounds
    finally:
        _backend.set_backend(before)
    col = b.results
    devices = _records.devices_of(col)
    if not devices:
        return
    elapsed = time.perf_counter() - b.started
    settings = {"command": "pytest " + shlex.join(map(_portable, config.invocation_params.args)), "budget_s": b.budget_s,
                "elapsed_s": elapsed, "load_start": b.load_start}
    envs = {d: _machine.environment(d, settings) for d in devices}
    tr = terminalreporter
    tr.write_sep("=", "dqa_ext benchmark summary")
    for d in devices:
        for line in _summary.report_lines(col, d, envs[d], with_header=False):
            tr.write_line(line)
    if _filtered(config) and not config.getoption("bench_write"):
        tr.write_line("(filtered run: results files not written; pass --bench-write to write them)")
        return
    for path in _summary.write_results(col, envs, Path(config.getoption("bench_results"))):
        tr.write_line(f"wrote {path}")
