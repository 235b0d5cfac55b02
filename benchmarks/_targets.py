"""The targets each run is judged against (met / missed, and by how much)."""

from _cases import KEY_SHAPE, SHAPES
from _records import CALL_IMPLS, call_ratio, overhead


def _ratio(a, b):
    return a / b if a and b else None


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
