"""results.json -> report.md and PNG plots, with the evaluation's own weaknesses flagged in numbers.

The flags follow Carlini et al. 2019's checklist, measured per example: attacks with twice the
budget finding more (not converged); quantization-aware attacks breaking images that no
straight-through attack broke (masked gradients); gradient-free or transfer attacks beating every
gradient attack; accuracy not falling as epsilon grows; a large-epsilon attack not reaching 0%.
Each names the numbers that raised it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .attacks import CASCADE, DESCRIPTIONS, LABELS
from .attacks.paper import MINIMAL_L2, PAPER
from .errors import UserError
from .models import ModelError, parse_activation

FILES = ("results.json", "report.md", "acc_vs_eps.png", "steps.png", "robust_vs_bits.png")


def _tol(n: int) -> float:
    """More than 1 point counts as a difference."""
    return 0.01 if n >= 100 else 1.0 / max(1, n)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def masking_flags(ev: dict) -> list[str]:
    """The evaluation's weaknesses, each with the numbers that show it."""
    flags = []
    n = ev["n"]
    checks = ev.get("checks", {})
    c = checks.get("convergence")
    if c and c["extra_broken"] / n > _tol(n):
        flags.append(f"not converged: {_rerun_names(c)} with twice the steps and restarts broke {c['extra_broken']} "
                     f"more of {c['survivors']} survivors ({100 * c['extra_broken'] / n:.1f} points; the worst case "
                     "includes them, and more budget may find more)")
    g = checks.get("ste_vs_quant_aware")
    if g and g["only_quant_aware"] / n > _tol(n):
        flags.append(f"straight-through gradients are masked: quantization-aware attacks broke {g['only_quant_aware']} "
                     f"images ({100 * g['only_quant_aware'] / n:.1f} points) that no straight-through attack broke")
    bb = checks.get("black_box_vs_gradient")
    if bb and bb["only_black_box"] / n > _tol(n):
        flags.append(f"gradient-free or transfer attacks broke {bb['only_black_box']} images "
                     f"({100 * bb['only_black_box'] / n:.1f} points) that no gradient attack broke")
    sw = checks.get("sweep")
    if sw and len(sw["acc"]) > 1:
        accs, eps, tol = sw["acc"], sw["eps"], _tol(sw["n"])
        rises = [(eps[i], eps[i + 1]) for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tol]
        if rises:
            flags.append(f"accuracy rises with epsilon ({rises[0][0]:g} -> {rises[0][1]:g}) under {sw['attack']}")
        elif accs[-1] >= accs[0] - tol:
            flags.append(f"accuracy does not fall as epsilon grows ({_pct(accs[0])}% at 0, {_pct(accs[-1])}% at {eps[-1]:g})")
    s = checks.get("sanity")
    if s and s["acc"] > 0:
        flags.append(f"APGD-CE at epsilon {s['eps']:g} leaves {_pct(s['acc'])}% robust (should be 0): gradients do "
                     "not lead the attack")
    p = ev.get("paper", {})
    if "fgsm" in p and "pgd" in p:
        k = min(p["fgsm"]["n"], p["pgd"]["n"])
        f, q = _mean(p["fgsm"]["correct"][:k]), _mean(p["pgd"]["correct"][:k])
        if f < q - _tol(k):
            flags.append(f"single-step FGSM ({_pct(f)}%) beats iterative PGD ({_pct(q)}%)")
    if "cw" in p and p["cw"].get("success_rate") is not None and p["cw"]["success_rate"] < 1 - _tol(p["cw"]["n"]):
        flags.append(f"unbounded C&W-L2 reaches only {_pct(p['cw']['success_rate'])}% success")
    return flags


def _rerun_names(c: dict) -> str:
    return " and ".join(LABELS[a] for a in c.get("attacks", [c["attack"]]))


def _mean(v) -> float:
    return sum(v) / len(v) if len(v) else float("nan")


def ranked(results: dict) -> list[dict]:
    return sorted(results["models"], key=lambda m: -m["eval"]["worst_case"]["acc"])


# ------------------------------------------------------------------ markdown
def headline_table(results: dict) -> list[str]:
    rows = ["| Rank | Model | Clean | **Adaptive worst case** | PGD alone | Only quant.-aware | Only black-box | "
            "Rerun x2 found | Large-eps | Flags |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, m in enumerate(ranked(results), 1):
        ev, ch = m["eval"], m["eval"].get("checks", {})
        n = ev["n"]
        q = ch.get("ste_vs_quant_aware", {})
        conv = ch.get("convergence")
        rows.append("| " + " | ".join([
            str(i), m["name"], _pct(ev["clean"]["acc"]), f"**{_pct(ev['worst_case']['acc'])}**",
            _pct(ev["paper"]["pgd"]["acc"]) if "pgd" in ev.get("paper", {}) else "-",
            str(q.get("only_quant_aware")) if q.get("ran") else "-",
            str(ch.get("black_box_vs_gradient", {}).get("only_black_box", "-")),
            f"{conv['extra_broken']} ({_rerun_names(conv)})" if conv else "-",
            _pct(ch["sanity"]["acc"]) if "sanity" in ch else "-",
            str(len(m.get("flags", [])))]) + " |")
    n = results["models"][0]["eval"]["n"] if results["models"] else 0
    rows += ["", f"- **Clean**, **Adaptive worst case**, **PGD alone**, **Large-eps**: accuracy in % on the first {n} "
             "test images.",
             "- **Adaptive worst case**: an image counts only if the model classifies it correctly and no attack "
             "of this report (all columns below) breaks it. Models are ranked by it.",
             "- **PGD alone**: the paper's PGD with straight-through gradients, as the paper evaluated.",
             "- **Only quant.-aware**: images that attacks through a smooth twin or a surrogate backward broke and no "
             "straight-through attack did (masked straight-through gradients); `-` for models without quantizers.",
             "- **Only black-box**: images that Square, transfer, ZOO or the substitute broke and no gradient attack did.",
             "- **Rerun x2 found**: images that the strongest straight-through and the strongest quantization-aware "
             "attack, rerun on the survivors with twice the steps and restarts, broke in addition (counted in the "
             "worst case; more than 1 point raises the 'not converged' flag).",
             "- **Large-eps**: APGD-CE at an epsilon covering the whole pixel range; it must reach 0.",
             "- **Flags**: the number of warnings listed below the tables."]
    return rows


def cascade_table(results: dict) -> list[str]:
    names = [a for a in list(CASCADE) + ["rerun_2x", "rerun_2x_quant"]
             if any(a in m["eval"]["cascade"] for m in results["models"])]
    if not names:
        return []
    rows = ["| Model | " + " | ".join(LABELS[a] for a in names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in ranked(results):
        cells = []
        for a in names:
            r = m["eval"]["cascade"].get(a)
            cells.append("-" if r is None else f"{r['broke']} / {r['attacked']} -> {_pct(r['robust_after'])}")
        rows.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    rows += ["", "Each attack runs only on the images that every attack to its left left robust: a cell is "
             "*broken / attacked -> robust accuracy (%) after it*. `-`: not run (the twin and BPDA attacks need "
             "quantized activations).", ""]
    rows += [f"- **{LABELS[a]}**: {DESCRIPTIONS[a]}." for a in names]
    return rows


def paper_table(results: dict) -> list[str]:
    names = [a for a in PAPER if any(a in m["eval"].get("paper", {}) for m in results["models"])]
    if not names:
        return []
    first = next(m["eval"]["paper"] for m in results["models"] if m["eval"].get("paper"))
    head = []
    for a in names:
        k = first[a]["n"] if a in first else "?"
        head.append(f"{LABELS[a]} succ % / med L2 (n={k})" if a in MINIMAL_L2 else f"{LABELS[a]} (n={k})")
    rows = ["| Model | " + " | ".join(head) + " |", "|---" * (len(names) + 1) + "|"]
    for m in ranked(results):
        cells = []
        for a in names:
            r = m["eval"]["paper"].get(a)
            if r is None:
                cells.append("-")
            elif a in MINIMAL_L2:
                l2 = "-" if r.get("median_l2") is None else f"{r['median_l2']:.2f}"
                cells.append(f"{_pct(r['success_rate'])} / {l2}")
            else:
                cells.append(_pct(r["acc"]))
        rows.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    rows += ["", "Each attack alone, on its own test-set prefix (n in the header), as the paper ran them. FGSM, "
             "PGD and C&W-L2 use straight-through gradients; *PGD, true gradient* uses the quantizer's true "
             "derivative (zero almost everywhere): what an evaluation blind to gradient masking would report. "
             "C&W-L2 and ZOO are unbounded L2 attacks (success rate among the correctly classified images and "
             "median L2); they enter the worst case projected onto the epsilon ball. ZOO estimates gradients by "
             "finite differences, which are zero on a piecewise-constant network: its 0% on quantized models "
             "says nothing about robustness. Substitute: label-only transfer from a substitute trained by "
             "Jacobian-based augmentation (FGSM and PGD on it)."]
    return rows


def _minutes(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def markdown(results: dict, plots: dict) -> str:
    s = results["settings"]
    lines = ["# dqa_ext robustness report", "",
             f"Command: `{results.get('command', '?')}`  ",
             f"Data: {s.get('data', '?')}; L-inf epsilon {s['eps']:g}; wall time "
             f"{_minutes(results.get('wall_seconds', 0))}"
             + (f" on {s['processes']} processes" if s.get("processes", 1) > 1 else "") + ".", "",
             "## Robust accuracy under adaptive attack", ""] + headline_table(results)
    lines += ["", "## The adaptive suite, attack by attack", ""] + cascade_table(results)
    paper = paper_table(results)
    if paper:
        lines += ["", "## The paper's attacks", ""] + paper
    lines += ["", "## Flags: where this evaluation may be weak", ""]
    for m in ranked(results):
        fl = m.get("flags", [])
        lines.append(f"- **{m['name']}**: " + ("none" if not fl else "; ".join(fl)))
    lines.append("")
    if plots.get("bits"):
        lines += ["## Robust accuracy against activation bits", "", f"![robust accuracy against bits]({plots['bits']})",
                  "", "Left, the adaptive worst case; right (when the paper's PGD ran), the paper's evaluation "
                  "(PGD with straight-through gradients) of the same models. Horizontal lines: the ReLU models.", ""]
    if plots.get("eps"):
        lines += ["## Accuracy against epsilon", "", f"![accuracy against epsilon]({plots['eps']})", ""]
    if plots.get("steps"):
        lines += ["## Learned steps of the dynamic models", "", f"![learned steps]({plots['steps']})", ""]
    if results["models"]:
        lines += ["## Budgets", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results["models"][0]["eval"]["budget"].items()]
    lines += ["", "## Training", "", "| Model | Epochs | Final loss | Clean test acc (training log) | Seconds |",
              "|---|---|---|---|---|"]
    for m in results["models"]:
        h = (m.get("train") or {}).get("history") or []
        if h:
            lines.append(f"| {m['name']} | {h[-1]['epoch']} | {h[-1]['loss']:.4f} | {_pct(h[-1]['test_acc'])} | "
                         f"{sum(e['seconds'] for e in h):.0f} |")
    lines += ["", "## Provenance", "", "```json", json.dumps(results.get("provenance", {}), indent=1, default=str),
              json.dumps(s, indent=1, default=str), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]


def plot_eps(results: dict, path: Path) -> bool:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    models = [m for m in results["models"] if m["eval"].get("checks", {}).get("sweep")]
    if not models:
        return False
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for j, m in enumerate(models):
        sw = m["eval"]["checks"]["sweep"]
        marker, style = _STYLES[j % len(_STYLES)]
        # Overlapping curves (several models at 0%) stay apart by marker, line style and a small offset.
        off = 0.6 * (j - (len(models) - 1) / 2)
        ax.plot(sw["eps"], [100 * v + off for v in sw["acc"]], marker=marker, linestyle=style, label=m["name"],
                alpha=0.85)
    eps = results["settings"]["eps"]
    ax.axvline(eps, color="grey", linestyle=":", linewidth=1)
    ax.annotate(f"nominal eps {eps:g}", (eps, 101), fontsize=7, ha="center", va="bottom", color="grey")
    sw0 = models[0]["eval"]["checks"]["sweep"]
    ax.set_title(f"Robust accuracy against L-inf epsilon (APGD-CE, and on the clipped twin for quantized "
                 f"models; {sw0['steps']} steps, n={sw0['n']})", fontsize=8)
    ax.set_xlabel("L-inf epsilon")
    ax.set_ylabel("robust accuracy (%; curves offset by < 2 points to stay visible)", fontsize=8)
    ax.set_ylim(-4, 106)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return True


_FAMILY_NAMES = {"fixed": "fixed step", "dynamic": "learned step (DQA)"}


def _pgd_alone(ev):
    r = ev.get("paper", {}).get("pgd")
    return None if r is None else r["acc"]


def plot_bits(results: dict, path: Path) -> bool:
    """Robust accuracy against the activations' bits, one line per family (fixed, dynamic) and
    training, the ReLU models as horizontal lines: the adaptive worst case and, beside it, PGD
    alone. Only for runs with quantized models at two bit widths or more."""
    from matplotlib.figure import Figure

    lines, relu = {}, {}
    for m in results["models"]:
        training = m.get("training", "")
        try:
            family, bits = parse_activation(m.get("activation", ""))
        except ModelError:
            continue  # not one of ours: no place on the bits axis
        if bits is None:
            relu[training] = m["eval"]
        else:
            lines.setdefault((family, training), []).append((bits, m["eval"]))
    if len({b for pts in lines.values() for b, _ in pts}) < 2:
        return False
    panels = [(lambda ev: ev["worst_case"]["acc"], "adaptive worst case (every attack of the report)")]
    if any(_pgd_alone(ev) is not None for pts in lines.values() for _, ev in pts):
        panels.append((_pgd_alone, "PGD alone, straight-through (the paper's evaluation)"))
    fig = Figure(figsize=(5 * len(panels), 4.2))
    axes = [fig.add_subplot(1, len(panels), k + 1) for k in range(len(panels))]
    bits = sorted({b for pts in lines.values() for b, _ in pts})
    handles = {}
    for ax, (value, title) in zip(axes, panels):
        for j, ((family, training), pts) in enumerate(sorted(lines.items())):
            pts = sorted((b, value(ev)) for b, ev in pts if value(ev) is not None)
            if not pts:
                continue
            marker, style = _STYLES[j % len(_STYLES)]
            off = 0.6 * (j - (len(lines) - 1) / 2)  # lines that coincide (at 0%) stay visible
            (h,) = ax.plot([b for b, _ in pts], [100 * v + off for _, v in pts], marker=marker, linestyle=style,
                           color=f"C{j}", alpha=0.85)  # one colour per line in both panels
            handles.setdefault(f"{_FAMILY_NAMES[family]}, {training} training", h)
        for k, (training, ev) in enumerate(sorted(relu.items())):
            v = value(ev)
            if v is None:
                continue
            h = ax.axhline(100 * v, color="black" if training == "pgd" else "grey", linewidth=1,
                           linestyle=("-", "--")[k % 2])
            handles.setdefault(f"ReLU, {training} training", h)
        ax.set_xticks(bits)
        ax.set_xlabel("activation bits")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-4, 106)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    n = results["models"][0]["eval"]["n"]
    fig.suptitle(f"Robust accuracy against activation bits (L-inf eps {results['settings']['eps']:g}, n={n}; "
                 "coinciding lines offset by < 2 points)", fontsize=9)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", ncol=3 if len(panels) > 1 else 2)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110, format="png")
    return True


def plot_steps(results: dict, path: Path) -> bool:
    from matplotlib.figure import Figure

    models = [m for m in results["models"] if m["eval"].get("steps")]
    if not models:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    names = []
    for j, m in enumerate(models):
        steps = m["eval"]["steps"]
        names = list(steps)
        mean = [sum(v) / len(v) for v in steps.values()]
        lo = [mean[i] - min(v) for i, v in enumerate(steps.values())]
        hi = [max(v) - mean[i] for i, v in enumerate(steps.values())]
        x = [i + 0.1 * (j - (len(models) - 1) / 2) for i in range(len(names))]
        marker, _ = _STYLES[j % len(_STYLES)]
        ax.errorbar(x, mean, yerr=[lo, hi], marker=marker, linestyle="none", capsize=3, label=m["name"])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"layer {k}" for k in names], rotation=30, fontsize=7)
    ax.set_xlabel("activation (module name in the model)")
    ax.set_ylabel("effective step (mean, min-max over channels)")
    ax.set_title("Learned quantization steps per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return True


def write_report(results: dict, out_dir: str | Path) -> dict:
    """Write results.json, report.md and the plots into out_dir; returns their paths."""
    from .outputs import check_output_dir, write_bytes_atomic, write_text_atomic

    out = check_output_dir(out_dir, FILES)
    out.mkdir(parents=True, exist_ok=True)
    for m in results["models"]:
        m["flags"] = masking_flags(m["eval"])
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    plots = {}
    for key, name, fn in (("eps", "acc_vs_eps.png", plot_eps), ("steps", "steps.png", plot_steps),
                          ("bits", "robust_vs_bits.png", plot_bits)):
        tmp = out / f".{name}.render"
        try:
            if fn(results, tmp):
                write_bytes_atomic(out / name, tmp.read_bytes())
                plots[key] = name
        finally:
            tmp.unlink(missing_ok=True)
    write_text_atomic(out / "report.md", markdown(results, plots))
    return {"results": out / "results.json", "report": out / "report.md", **{k: out / v for k, v in plots.items()}}


REQUIRED_EVAL = ("eps", "n", "clean", "worst_case", "cascade", "budget")


def load_results(path: str | Path) -> dict:
    """A results.json written by `dqa attack` / `dqa reproduce`, checked for what the report needs."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"no results file {p} (run `dqa attack` or `dqa reproduce` first)")
    try:
        results = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(results, dict):
        raise UserError(f"{p} is not a dqa results file (a JSON object with settings and models)")
    for key, typ in (("settings", dict), ("models", list)):
        if not isinstance(results.get(key), typ):
            raise UserError(f"{p} is not a dqa results file: '{key}' is missing or not a {typ.__name__}")
    if "eps" not in results["settings"]:
        raise UserError(f"{p} is not a dqa results file: settings has no 'eps'")
    for i, m in enumerate(results["models"]):
        if not isinstance(m, dict) or "name" not in m or not isinstance(m.get("eval"), dict):
            raise UserError(f"{p}: models[{i}] needs a 'name' and an 'eval' object")
        missing = [k for k in REQUIRED_EVAL if k not in m["eval"]]
        if missing:
            raise UserError(f"{p}: models[{i}] ({m['name']}) has no {', '.join(missing)} "
                            "(written by an older dqa_ext? rerun `dqa attack`)")
    return results
