"""Rendering of a session's records (_records.py): the summary tables (terminal and
benchmarks/results/<machine>.md) with the targets (_targets.py), and the JSON record."""

import json
import re
from pathlib import Path

from _cases import IMPL_NAMES, PASSES, SHAPES
from _machine import _busy
from _measure import SPREAD_FLAG
from _records import CALL_IMPLS, overhead
from _targets import targets, targets_table

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


