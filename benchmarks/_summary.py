"""The session's results: per-case medians collected by the tests, the summary tables (terminal and
benchmarks/results/<machine>.md), the targets with met/missed, and the JSON record."""

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

from _cases import FLOOR_PASS, IMPL_NAMES, KEY_SHAPE, PASSES, SHAPES
from _measure import SPREAD_FLAG

RESULTS_DIR = Path(__file__).parent / "results"
PEERS = ("eager", "compile", "torch_fq")

CONVENTIONS = """\
- **ext** and **eager** compute the same function: `y` and `dx` are asserted bitwise equal to
  `dqa_ext.reference` for ext; eager (and its `torch.compile`) computes `dx` as `(dy*s)/s` through
  autograd, asserted within a few ulps, and its clamp passes `dy` at `v == qmin` and `v == qmax`
  exactly (counted, excluded). dstep: within 1e-4 of `sum|g*dy*t(v)|` per step (summation order).
- **torch_fq** (`torch._fake_quantize_learnable_per_*_affine`, quant_min 0, zero point 0) multiplies
  by `1/s` instead of dividing, so `y` may differ from ours by one step where `x/s` is within an ulp
  of a half-integer (asserted: rare, exactly one step). Its `dx` masks on the rounded value, so it
  passes gradient for `v` in `[-1/2, 0]` and `[qmax, qmax+1/2)` where ours gives 0; its dscale uses
  `t = rne(v)-v` there instead of `qmin`/`qmax`. Asserted: `y`, `dx` and dscale equal its own
  convention written out in PyTorch ops; `dx` equal to ours outside those bands. It has one
  backward, which always computes dscale and dzero_point: its `bwd_nostep` is that same backward.
  It also syncs with the host (`.item()`) on every call.
- **relu** and **copy** are checked against their own definitions only (they are the floor and the
  ceiling, not the same function).
"""


class Collector:
    def __init__(self):
        self.kernels = {}  # (device, dtype, shape, gran, layout, impl, pass) -> record
        self.training = {}  # (device, net, variant) -> record
        self.overheads = {}  # (device, net, variant, compiled) -> paired overhead record
        self.calls = {}  # (device, impl, pass) -> per-call record (a small tensor: the host cost)
        self.notes = {}  # (impl, topic) -> [(test id, detail)]

    def add_kernel(self, spec, timing, peak=None, note=None):
        """timing: a _measure.Timing (median over interleaved rounds, spread, rounds)."""
        c = spec.case
        key = (c.device, _dt(c.dtype), c.shape, c.gran, c.layout, spec.impl, spec.pass_)
        rec = {"device": c.device, "dtype": _dt(c.dtype), "shape": c.shape, "dims": list(c.dims),
               "gran": c.gran, "layout": c.layout, "impl": spec.impl, "pass": spec.pass_,
               "median_s": timing.median_s, "spread": timing.spread, "rounds": timing.rounds,
               "iterations": timing.iterations, "bytes": spec.bytes_moved(), "peak_bytes": peak}
        self.kernels[key] = rec
        for topic, detail in note or ():
            self.notes.setdefault((spec.impl, topic), []).append((spec.id, detail))

    def add_overhead(self, device, net, variant, ratios, compiled=False, step_s=None):
        """DQAReLU's step time over nn.ReLU's, paired round by round (ratios, one per round): the
        overhead is their median minus 1, the spread their interquartile range."""
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
        self.overheads[(device, net, variant, compiled)] = {
            "device": device, "net": net, "variant": variant, "compiled": compiled,
            "overhead": statistics.median(ratios) - 1, "iqr": q3 - q1, "rounds": len(ratios),
            "step_s": step_s}

    def add_call(self, device, impl, pass_, timing, shape):
        """One activation call on a small tensor: what a user pays per call in host time."""
        self.calls[(device, impl, pass_)] = {"device": device, "impl": impl, "pass": pass_, "shape": shape,
                                             "median_s": timing.median_s, "spread": timing.spread,
                                             "rounds": timing.rounds, "iterations": timing.iterations}

    def add_training(self, device, net, variant, median_s, batch):
        self.training[(device, net, variant)] = {"device": device, "net": net, "variant": variant,
                                                 "median_s": median_s, "batch": batch}

    # --- lookups ---
    def t(self, device, dtype, shape, gran, layout, impl, pass_):
        rec = self.rec(device, dtype, shape, gran, layout, impl, pass_)
        return rec["median_s"] if rec else None

    def rec(self, device, dtype, shape, gran, layout, impl, pass_):
        """The record of a kernel figure; relu and copy (one backward, no step) by their own keys."""
        if impl == "relu":
            gran, pass_ = "pc", FLOOR_PASS[pass_]
        elif impl == "copy":
            gran, layout, pass_ = None, None, FLOOR_PASS[pass_]
        return self.kernels.get((device, dtype, shape, gran, layout, impl, pass_))

    def groups(self):
        """The (device, dtype) pairs with results, CPU first."""
        seen = sorted({(k[0], k[1]) for k in self.kernels} | {(k[0], "f32") for k in self.training})
        return sorted(seen, key=lambda g: (g[0] != "cpu", g[0], ["f32", "bf16", "f16"].index(g[1])))


def _dt(dtype):
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


# --- formatting ---

def fmt_time(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_x(r):
    return "-" if r is None else f"{r:.2f}x"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _cases_of(col, device, dtype):
    keys = {(k[2], k[3], k[4]) for k in col.kernels
            if k[0] == device and k[1] == dtype and k[5] in ("ext",) + PEERS}
    order = list(SHAPES)
    return sorted(keys, key=lambda c: (order.index(c[0]), c[2] != "nchw", c[1] != "pc"))


def spread_cell(recs):
    """The largest spread of a row's figures, flagged (**bold !**) above SPREAD_FLAG."""
    spreads = [r["spread"] for r in recs if r and r.get("spread") is not None]
    if not spreads:
        return "-"
    worst = max(spreads)
    return f"**{worst:.0%} !**" if worst > SPREAD_FLAG else f"{worst:.0%}"


def kernel_table(col, device, dtype):
    header = ["case", "pass", "ext", "GB/s", "% copy", "vs eager", "vs compile", "vs torch_fq",
              "ext / relu", "spread"]
    rows = []
    for shape, gran, layout in _cases_of(col, device, dtype):
        for p in PASSES:
            recs = {impl: col.rec(device, dtype, shape, gran, layout, impl, p)
                    for impl in ("ext", "relu", "copy") + PEERS}
            t = {impl: (r["median_s"] if r else None) for impl, r in recs.items()}
            ext = t["ext"]
            gbs = f"{recs['ext']['bytes'] / ext / 1e9:.1f}" if ext else "-"
            frac = _ratio(t["copy"], ext)
            rows.append([f"{shape} {gran} {layout}", p, fmt_time(ext), gbs,
                         "-" if frac is None else f"{frac:.0%}",
                         *(fmt_x(_ratio(t[peer], ext)) for peer in PEERS),
                         fmt_x(_ratio(ext, t["relu"])), spread_cell(recs.values())])
    return header, rows


def memory_table(col, device, dtype):
    header = ["case"] + [f"{i} (MiB)" for i in ("ext",) + PEERS + ("relu",)]
    rows = []
    for shape, gran, layout in _cases_of(col, device, dtype):
        cells = []
        for impl in ("ext",) + PEERS + ("relu",):
            g = "pc" if impl == "relu" else gran
            rec = col.kernels.get((device, dtype, shape, g, layout, impl, "fwdbwd"))
            peak = rec and rec.get("peak_bytes")
            cells.append("-" if peak is None else f"{peak / 2**20:.0f}")
        rows.append([f"{shape} {gran} {layout}"] + cells)
    return header, rows


def copy_table(col, device, dtype):
    header = ["shape", "elements", "copy GB/s (2 tensors)", "(3 tensors)", "(5 tensors)"]
    rows = []
    for shape in SHAPES:
        cells = []
        for p in ("fwd", "bwd", "fwdbwd"):
            rec = col.kernels.get((device, dtype, shape, None, None, "copy", p))
            cells.append(f"{rec['bytes'] / rec['median_s'] / 1e9:.1f}" if rec and rec["median_s"] else "-")
        if any(c != "-" for c in cells):
            n = 1
            for d in SHAPES[shape][0]:
                n *= d
            rows.append([f"{shape} {list(SHAPES[shape][0])}", f"{n:,}"] + cells)
    return header, rows


def overhead(col, device, net, variant, compiled=False):
    """Paired overhead when measured (robust to drifting load), else the ratio of the medians."""
    rec = col.overheads.get((device, net, variant, compiled))
    if rec:
        return rec["overhead"]
    if compiled:
        return None
    relu, dqa = col.training.get((device, net, "relu")), col.training.get((device, net, variant))
    return dqa["median_s"] / relu["median_s"] - 1 if relu and dqa else None


def _overhead_cell(col, device, net, variant, compiled):
    rec = col.overheads.get((device, net, variant, compiled))
    if rec is None:
        o = overhead(col, device, net, variant, compiled)
        return "-" if o is None else f"{o:+.1%}"
    if "iqr" not in rec:  # a record from before the spread was kept
        return f"{rec['overhead']:+.1%} ({rec['rounds']} rounds)"
    return f"{rec['overhead']:+.1%} (IQR {rec['iqr']:.1%}, {rec['rounds']} rounds)"


def training_rows(col, device):
    header = ["network", "batch", "nn.ReLU step", "DQAReLU dynamic", "eager overhead", "compiled overhead",
              "DQAReLU fixed", "eager overhead", "compiled overhead"]
    rows = []
    nets = {k[1] for k in col.training if k[0] == device} | {k[1] for k in col.overheads if k[0] == device}
    for net in sorted(nets):
        get = lambda v: col.training.get((device, net, v)) or {}  # noqa: E731
        cells = [net, (get("relu") or get("dqa_dynamic")).get("batch", "-"), fmt_time(get("relu").get("median_s"))]
        for v in ("dqa_dynamic", "dqa_fixed"):
            cells += [fmt_time(get(v).get("median_s")), _overhead_cell(col, device, net, v, False),
                      _overhead_cell(col, device, net, v, True)]
        rows.append(cells)
    return header, rows


CALL_IMPLS = {"torch.relu": "torch.relu (function)", "nn.ReLU": "nn.ReLU (module)",
              "dqa_fixed": "DQAReLU fixed", "dqa_dynamic": "DQAReLU dynamic"}


def call_rows(col, device):
    header = ["pass"] + [f"{name}" for name in CALL_IMPLS.values()] + ["fixed / torch.relu", "dynamic / torch.relu",
                                                                        "fixed / nn.ReLU", "dynamic / nn.ReLU"]
    rows = []
    for pass_ in ("fwd", "fwdbwd"):
        rec = {impl: col.calls.get((device, impl, pass_)) for impl in CALL_IMPLS}
        if not any(rec.values()):
            continue
        cells = [pass_]
        for impl in CALL_IMPLS:
            r = rec[impl]
            cells.append("-" if r is None else f"{fmt_time(r['median_s'])} ({r['spread']:.0%}"
                         + (" !)" if r["spread"] > SPREAD_FLAG else ")"))
        t = {impl: (r or {}).get("median_s") for impl, r in rec.items()}
        for dqa, base in (("dqa_fixed", "torch.relu"), ("dqa_dynamic", "torch.relu"),
                          ("dqa_fixed", "nn.ReLU"), ("dqa_dynamic", "nn.ReLU")):
            cells.append(fmt_x(_ratio(t[dqa], t[base])))
        rows.append(cells)
    return header, rows


def call_ratio(col, device, impl, base, pass_="fwdbwd"):
    a, b = col.calls.get((device, impl, pass_)), col.calls.get((device, base, pass_))
    return a["median_s"] / b["median_s"] if a and b else None


# --- targets ---

def _target(name, value, limit, better, unit="x"):
    """better: 'le' (value <= limit) or 'ge' (value >= limit) or 'gt'."""
    if value is None:
        return {"target": name, "value": None, "limit": limit, "status": "not measured", "by": ""}
    ok = {"le": value <= limit, "ge": value >= limit, "gt": value > limit}[better]
    by = ""
    if not ok:
        need = value / limit if better == "le" else limit / value
        by = f"ext must get {need - 1:.0%} faster" if unit in ("x", "%copy") else f"{value - limit:+.1%} over"
    shown = f"{value:.0%}" if unit == "%copy" else (f"{value:+.1%}" if unit == "%" else f"{value:.2f}x")
    return {"target": name, "value": value, "shown": shown, "limit": limit,
            "status": "met" if ok else "MISSED", "by": by}


def targets(col, device):
    k = lambda dtype, impl, p: col.t(device, dtype, KEY_SHAPE, "pc", "nchw", impl, p)  # noqa: E731
    key = f"[{','.join(map(str, SHAPES[KEY_SHAPE][0]))}] per-channel NCHW"
    out = []
    if device == "cpu":
        out.append(_target(f"f32 {key} fwd: ext time / relu time <= 1.3",
                           _ratio(k("f32", "ext", "fwd"), k("f32", "relu", "fwd")), 1.3, "le"))
        for peer, limit, better in (("eager", 10, "ge"), ("torch_fq", 5, "ge"), ("compile", 1, "gt")):
            out.append(_target(f"f32 {key} fwd+bwd: speed-up over {peer} {'>' if better == 'gt' else '>='} {limit}",
                               _ratio(k("f32", peer, "fwdbwd"), k("f32", "ext", "fwdbwd")), limit, better))
        for impl in ("dqa_fixed", "dqa_dynamic"):
            out.append(_target(f"{CALL_IMPLS[impl]} fwd+bwd on a small tensor: time / torch.relu's <= 1.5",
                               call_ratio(col, device, impl, "torch.relu"), 1.5, "le"))
        eager_limit = compiled_limit = 0.05
    else:
        dims = ",".join(map(str, SHAPES[KEY_SHAPE][0]))
        # The bandwidth targets hold in every dtype, layout and granularity of the key shape.
        for dtype in ("f32", "f16", "bf16"):
            for layout in ("nchw", "cl"):
                for gran in ("pc", "pt"):
                    for p, limit in (("fwd", 0.85), ("bwd_step", 0.80)):
                        ext = col.t(device, dtype, KEY_SHAPE, gran, layout, "ext", p)
                        out.append(_target(f"{dtype} [{dims}] {gran} {layout} {p}: fraction of copy bandwidth "
                                           f">= {limit:.0%}", _ratio(k(dtype, "copy", p), ext), limit, "ge", "%copy"))
        for dtype in ("f32", "f16", "bf16"):
            out.append(_target(f"{dtype} {key} bwd: speed-up over torch_fq backward >= 2",
                               _ratio(k(dtype, "torch_fq", "bwd_step"), k(dtype, "ext", "bwd_step")), 2, "ge"))
            out.append(_target(f"{dtype} {key} fwd+bwd: speed-up over compile > 1",
                               _ratio(k(dtype, "compile", "fwdbwd"), k(dtype, "ext", "fwdbwd")), 1, "gt"))
        for impl in ("dqa_fixed", "dqa_dynamic"):
            out.append(_target(f"{CALL_IMPLS[impl]} fwd+bwd on a small tensor (host time): "
                               "time / torch.relu's <= 1.3", call_ratio(col, device, impl, "torch.relu"), 1.3, "le"))
        eager_limit, compiled_limit = 0.10, 0.05
    for net in ("mnist_cnn", "resnet20"):
        for variant in ("dqa_dynamic", "dqa_fixed"):
            out.append(_target(f"{net} eager training step, {CALL_IMPLS[variant]} vs nn.ReLU: overhead <= "
                               f"{eager_limit:.0%}", overhead(col, device, net, variant), eager_limit, "le", "%"))
        out.append(_target(f"{net} compiled training step, DQAReLU dynamic vs nn.ReLU: overhead <= "
                           f"{compiled_limit:.0%}", overhead(col, device, net, "dqa_dynamic", True),
                           compiled_limit, "le", "%"))
    return out


def targets_table(rows):
    return (["target", "measured", "status", "missed by"],
            [[r["target"], r.get("shown", "-"), r["status"], r["by"]] for r in rows])


# --- the machine ---

def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device):
    if device == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name())
    model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", cpu_model(), flags=re.I)
    return f"cpu-{_slug(model)}-{torch.get_num_threads()}t"


def device_text(device):
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"driver {_driver_version()}, CUDA {torch.version.cuda}")
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device, settings):
    try:
        import dqa_ext

        info = {**dqa_ext.backend_info(), "benchmarked_backend": "extension (forced for each benchmark)"}
    except Exception as exc:  # report it rather than lose the results
        info = {"error": repr(exc)}
    return {"machine": machine_name(device), "device": device_text(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": _loadavg(), "dqa_ext": info, **settings}


def _busy(env):
    """Other work ran: load before the suite started, or beyond the suite's own threads at its end."""
    start, end = (env.get("load_start") or [0])[0], (env.get("load_average") or [0])[0]
    return start > 0.7 or end > torch.get_num_threads() + 0.7


def _loadavg():
    """1/5/15-minute load averages at the end of the run: timings on a busy machine are noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --- output ---

def report_lines(col, device, env, with_header=True):
    lines = []
    if with_header:
        lines += [f"# dqa_ext benchmarks: {env['machine']}", "",
                  f"- device: {env['device']}", f"- date: {env['date']}",
                  f"- torch {env['torch']}, python {env['python']}, {env['platform']}",
                  f"- load average at start {env.get('load_start')}, at end (1/5/15 min) {env['load_average']}"
                  + (" **(busy machine: other work ran alongside, and multi-threaded timings wait at "
                     "OpenMP barriers; rerun on an idle machine or with --bench-threads 1)**"
                     if _busy(env) else ""),
                  f"- dqa_ext: {json.dumps(env['dqa_ext'])}",
                  f"- command: `{env['command']}` (budget {env['budget_s']} s per benchmark; suite "
                  f"{env['elapsed_s']:.0f} s)", "",
                  "Kernel times are medians over rounds in which every implementation and pass of a case "
                  "runs in turn (rotating order), so load that drifts hits them alike; `spread` is the "
                  "largest interquartile range over median among a row's figures, **flagged !** above "
                  f"{SPREAD_FLAG:.0%}: such a row is not to be believed without a rerun on an idle machine. "
                  "Training steps: pytest-benchmark pedantic medians. `GB/s` is the effective bandwidth: "
                  "bytes that must move (forward 2 tensors, backward 3, fwd+bwd 5, in the input dtype) over "
                  "the time; `% copy` is that over the bandwidth of a plain copy of the same bytes. "
                  "`vs X` is X's time over ext's (above 1: ext is faster). `ext / relu` is ext's time "
                  "over torch.relu's (forward, backward, fwd+bwd). pc/pt: per-channel/per-tensor step; "
                  "nchw/cl: contiguous/channels_last. Implementations: "
                  + "; ".join(f"`{k}`: {v}" for k, v in IMPL_NAMES.items()) + ".", ""]
    lines += ["## Targets", ""] + _table(*targets_table(targets(col, device))) + [""]
    for dev, dtype in col.groups():
        if dev != device:
            continue
        kt = kernel_table(col, device, dtype)
        if kt[1]:
            lines += [f"## Kernels, {device} {dtype}", ""] + _table(*kt) + [""]
            lines += [f"## Peak memory of one forward+backward, {device} {dtype}", "",
                      "Bytes allocated above what was live before the call (outputs, saved tensors, "
                      "temporaries) until it returns; "
                      + ("CUDA caching allocator's max_memory_allocated." if device == "cuda" else
                         "CPU: PyTorch allocator events recorded by torch.profiler(profile_memory=True)."),
                      ""] + _table(*memory_table(col, device, dtype)) + [""]
            lines += [f"## Copy bandwidth (the ceiling), {device} {dtype}", ""] + _table(*copy_table(col, device, dtype)) + [""]
    cr = call_rows(col, device)
    if cr[1]:
        shape = next(r["shape"] for r in col.calls.values() if r["device"] == device)
        lines += [f"## One activation call on a small tensor {shape}, {device} f32", "",
                  "What a user pays per activation call when the tensor is small: the host cost of "
                  "Python, dispatch and autograd. Medians over interleaved rounds (spread in brackets); "
                  "fwd under no_grad, fwdbwd the forward then `backward()` of its sum's gradient.",
                  ""] + _table(*cr) + [""]
    tr = training_rows(col, device)
    if tr[1]:
        lines += [f"## Training step (forward, loss, backward, SGD step), {device} f32", "",
                  "Medians of each variant's own benchmark; the overheads are paired: each round times "
                  "one step of every variant back to back (eager models in one set of rounds, "
                  "torch.compile'd ones in another), and the median over rounds of DQAReLU's time over "
                  "nn.ReLU's is reported with the interquartile range of that ratio.",
                  ""] + _table(*tr) + [""]
    return lines


def notes_lines(col):
    lines = ["## Conventions and parity", "", CONVENTIONS]
    if col.notes:
        lines += ["Parity notes from this run:", ""]
        for (impl, topic), seen in sorted(col.notes.items()):
            lines.append(f"- {impl}: {topic}: {len(seen)} benchmarks, e.g. "
                         + "; ".join(f"`{test}`: {detail}" for test, detail in seen[:2]))
        lines.append("")
    return lines


def write_results(col, env_by_device, results_dir=RESULTS_DIR):
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for device, env in env_by_device.items():
        name = env["machine"]
        lines = report_lines(col, device, env) + notes_lines(col)
        # Hand-written analysis: for this machine, or for its CPU at any thread count.
        for extra in (results_dir / f"{name}.notes.md", results_dir / f"{re.sub(r'-[0-9]+t$', '', name)}.notes.md"):
            if extra.exists():
                lines += ["## Analysis (from " + extra.name + ")", "", extra.read_text().strip(), ""]
                break
        (results_dir / f"{name}.md").write_text("\n".join(lines))
        data = {**env,
                "kernels": [r for k, r in col.kernels.items() if k[0] == device],
                "training": [r for k, r in col.training.items() if k[0] == device],
                "training_overhead": [r for k, r in col.overheads.items() if k[0] == device],
                "calls": [r for k, r in col.calls.items() if k[0] == device],
                "targets": targets(col, device),
                "parity_notes": [{"impl": i, "topic": t, "seen": [list(x) for x in v]}
                                 for (i, t), v in col.notes.items()]}
        (results_dir / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        written += [results_dir / f"{name}.md", results_dir / f"{name}.json"]
    return written


def devices_of(col):
    found = ({k[0] for k in col.kernels} | {k[0] for k in col.training} | {k[0] for k in col.overheads}
             | {k[0] for k in col.calls})
    return sorted(found, key=lambda d: d != "cpu")

