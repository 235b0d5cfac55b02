"""The report's figures (matplotlib, no global state): accuracy against epsilon, robust accuracy
against the activations' bits, and the learned steps. Each returns False when the results hold
nothing to draw."""
from __future__ import annotations

from pathlib import Path

from .attacks import catalog
from .models import ModelError, parse_activation

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


def baseline(ev):
    """The accuracy under the paper's own evaluation (the catalog's baseline attack), or None."""
    for s in catalog.specs():
        if s.baseline and s.name in ev.get("paper", {}):
            return ev["paper"][s.name]["acc"]
    return None


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
    if any(baseline(ev) is not None for pts in lines.values() for _, ev in pts):
        panels.append((baseline, f"{_baseline_label()} alone, straight-through (the paper's evaluation)"))
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




def _baseline_label() -> str:
    return next((s.label for s in catalog.specs() if s.baseline), "baseline")


# file name -> the function that draws it, and the report's key for it
PLOTS = (("acc_vs_eps.png", "eps", plot_eps), ("steps.png", "steps", plot_steps),
         ("robust_vs_bits.png", "bits", plot_bits))
