"""results.json -> report.md and PNG plots, with gradient-masking flags computed from the numbers.

The flags follow Carlini et al. 2019's checklist: a gradient-free or transfer attack beating the
white-box ones, single-step beating iterative, accuracy not falling as epsilon grows, an unbounded
attack not reaching 100%, and (ours) the true-gradient PGD reporting far more than the BPDA one.
They are symptoms to investigate, not verdicts; each names the numbers that raised it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .attacks import GRADIENT_FREE, LABELS, MINIMAL_L2, WHITE_BOX
from .errors import UserError


def _tol(n: int) -> float:
    """Differences smaller than 2 points or 2 images are noise at these sample sizes."""
    return max(0.02, 2.0 / max(1, n))


def _prefix_acc(r: dict, k: int) -> float:
    return float(np.mean(r["correct"][:k])) if k else float("nan")


def masking_flags(ev: dict) -> list[str]:
    atk = ev.get("attacks", {})
    flags = []
    wb = {a: atk[a] for a in WHITE_BOX if a in atk}
    for g in GRADIENT_FREE:
        if g not in atk or not wb:
            continue
        k = min([atk[g]["n"]] + [r["n"] for r in wb.values()])
        g_acc = _prefix_acc(atk[g], k)
        best = min(wb, key=lambda a: _prefix_acc(wb[a], k))
        w_acc = _prefix_acc(wb[best], k)
        if g_acc < w_acc - _tol(k):
            flags.append(f"{LABELS[g]} ({g_acc:.1%}) beats the best white-box attack {LABELS[best]} "
                         f"({w_acc:.1%}) on the first {k} images")
    if "fgsm" in atk and "pgd" in atk:
        k = min(atk["fgsm"]["n"], atk["pgd"]["n"])
        f, p = _prefix_acc(atk["fgsm"], k), _prefix_acc(atk["pgd"], k)
        if f < p - _tol(k):
            flags.append(f"single-step FGSM ({f:.1%}) beats iterative PGD ({p:.1%})")
    sw = ev.get("sweep")
    if sw:
        for a in ("fgsm", "pgd"):
            accs, eps = sw[a], sw["eps"]
            tol = _tol(sw["n"])
            rises = [(eps[i], eps[i + 1]) for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tol]
            if rises:
                flags.append(f"{LABELS[a]} accuracy rises with epsilon ({rises[0][0]:g} -> {rises[0][1]:g})")
            elif len(accs) > 1 and accs[-1] >= accs[0] - tol:
                flags.append(f"{LABELS[a]} accuracy does not fall as epsilon grows "
                             f"({accs[0]:.1%} at 0, {accs[-1]:.1%} at {eps[-1]:g})")
    if "cw" in atk and atk["cw"].get("success_rate") is not None and atk["cw"]["success_rate"] < 1 - _tol(atk["cw"]["n"]):
        flags.append(f"unbounded C&W-L2 reaches only {atk['cw']['success_rate']:.1%} success "
                     f"({atk['cw']['budget']['cw_steps']} steps x {atk['cw']['budget']['cw_search']} searches)")
    if "pgd_zero" in atk and "pgd" in atk:
        k = min(atk["pgd_zero"]["n"], atk["pgd"]["n"])
        z, p = _prefix_acc(atk["pgd_zero"], k), _prefix_acc(atk["pgd"], k)
        if z > p + _tol(k):
            flags.append(f"true-gradient PGD reports {z:.1%} where BPDA PGD finds {p:.1%}: "
                         "the quantizer masks gradients; only BPDA numbers count")
    return flags


# ------------------------------------------------------------------ markdown
def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _cell(ev: dict, a: str) -> str:
    r = ev["attacks"].get(a)
    if r is None:
        return "-"
    if a in MINIMAL_L2:
        l2 = "-" if r.get("median_l2") is None else f"{r['median_l2']:.2f}"
        return f"{_pct(r['success_rate'])} / {l2}"
    return _pct(r["acc"])


def table(results: dict) -> str:
    models = results["models"]
    present = [a for a in list(WHITE_BOX) + list(GRADIENT_FREE) + ["pgd_zero", "cw_art"]
               if any(a in m["eval"]["attacks"] for m in models)]
    head = ["Model", "Clean"]
    for a in present:
        head.append(f"{LABELS[a]} succ % / med L2" if a in MINIMAL_L2 else LABELS[a])
    head += ["Worst case, all attacks", "Worst case, attacks on all n", "Flags"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        ev = m["eval"]
        wc = ev["worst_case"]
        cells = [m["name"], _pct(ev["clean"]["acc"])] + [_cell(ev, a) for a in present]
        cells += [f"{_pct(wc['all']['acc'])} (n={wc['all']['n']})", f"{_pct(wc['full']['acc'])} (n={wc['full']['n']})",
                  str(len(m.get("flags", [])))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _minutes(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def markdown(results: dict, plots: dict) -> str:
    s = results["settings"]
    lines = ["# dqa_ext robustness report", "",
             f"Command: `{results.get('command', '?')}`  ",
             f"Data: {s.get('data', '?')}; L-inf epsilon {s['eps']:g}; white-box gradients: "
             f"{'straight-through (BPDA)' if s.get('attack_grad', 'bpda') == 'bpda' else 'true derivative (zero; masking demonstration)'}; "
             f"wall time {_minutes(results.get('wall_seconds', 0))}.", "",
             "Accuracies in % on a test-set prefix (bounded attacks at epsilon; C&W and ZOO are unbounded "
             "L2 attacks, shown as success rate and median L2, and enter the worst case projected onto the "
             "epsilon ball). Worst-case: an image counts only if it survives every attack; "
             "'all attacks' is over the images every attack saw, 'attacks on all n' over the full prefix with "
             "the attacks that ran on all of it.", "", table(results), ""]
    lines += ["## Gradient-masking flags (Carlini et al. 2019)", ""]
    for m in results["models"]:
        fl = m.get("flags", [])
        lines.append(f"- **{m['name']}**: " + ("none" if not fl else "; ".join(fl)))
    lines.append("")
    if plots.get("eps"):
        lines += ["## Accuracy against epsilon", "", f"![accuracy against epsilon]({plots['eps']})", ""]
    if plots.get("steps"):
        lines += ["## Learned steps of the dynamic models", "", f"![learned steps]({plots['steps']})", ""]
    lines += ["## Budgets", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["models"][0]["eval"]["budget"].items()] if results["models"] else []
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
def plot_eps(results: dict, path: Path) -> bool:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    models = [m for m in results["models"] if m["eval"].get("sweep")]
    if not models:
        return False
    fig = Figure(figsize=(10, 4))
    for i, a in enumerate(("fgsm", "pgd")):
        ax = fig.add_subplot(1, 2, i + 1)
        for m in models:
            sw = m["eval"]["sweep"]
            ax.plot(sw["eps"], [100 * v for v in sw[a]], marker="o", label=m["name"])
        ax.set_title(f"{LABELS[a]} (n={models[0]['eval']['sweep']['n']})")
        ax.set_xlabel("L-inf epsilon")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_steps(results: dict, path: Path) -> bool:
    from matplotlib.figure import Figure

    models = [m for m in results["models"] if m["eval"].get("steps")]
    if not models:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for j, m in enumerate(models):
        steps = m["eval"]["steps"]
        names = list(steps)
        mean = [float(np.mean(steps[k])) for k in names]
        lo = [mean[i] - float(np.min(steps[k])) for i, k in enumerate(names)]
        hi = [float(np.max(steps[k])) - mean[i] for i, k in enumerate(names)]
        x = np.arange(len(names)) + 0.08 * (j - (len(models) - 1) / 2)
        ax.errorbar(x, mean, yerr=[lo, hi], marker="o", capsize=3, label=m["name"])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, fontsize=7)
    ax.set_ylabel("step (mean, min-max over channels)")
    ax.set_title("Learned quantization steps per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_report(results: dict, out_dir: str | Path) -> dict:
    """Write results.json, report.md and the plots into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in results["models"]:
        m["flags"] = masking_flags(m["eval"])
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots = {}
    if plot_eps(results, out / "acc_vs_eps.png"):
        plots["eps"] = "acc_vs_eps.png"
    if plot_steps(results, out / "steps.png"):
        plots["steps"] = "steps.png"
    (out / "report.md").write_text(markdown(results, plots))
    return {"results": out / "results.json", "report": out / "report.md", **{k: out / v for k, v in plots.items()}}


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"no results file {p} (run `dqa attack` or `dqa reproduce` first)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e}") from e
