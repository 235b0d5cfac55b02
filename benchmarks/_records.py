"""What a benchmark session measured: the records the tests add (kernels, training steps, paired
overheads, activation calls) and the lookups the tables and targets read."""

import statistics

import torch

from _cases import FLOOR_PASS

CALL_IMPLS = {"torch.relu": "torch.relu (function)", "nn.ReLU": "nn.ReLU (module)",
              "dqa_fixed": "DQAReLU fixed", "dqa_dynamic": "DQAReLU dynamic"}


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


def overhead(col, device, net, variant, compiled=False):
    """Paired overhead when measured (robust to drifting load), else the ratio of the medians."""
    rec = col.overheads.get((device, net, variant, compiled))
    if rec:
        return rec["overhead"]
    if compiled:
        return None
    relu, dqa = col.training.get((device, net, "relu")), col.training.get((device, net, variant))
    return dqa["median_s"] / relu["median_s"] - 1 if relu and dqa else None


def call_ratio(col, device, impl, base, pass_="fwdbwd"):
    a, b = col.calls.get((device, impl, pass_)), col.calls.get((device, base, pass_))
    return a["median_s"] / b["median_s"] if a and b else None


def devices_of(col):
    found = ({k[0] for k in col.kernels} | {k[0] for k in col.training} | {k[0] for k in col.overheads}
             | {k[0] for k in col.calls})
    return sorted(found, key=lambda d: d != "cpu")
