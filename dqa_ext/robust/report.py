"""results.json -> report.md and the PNG figures (plots.py). The report only renders: the worst case,
the checks and the flags are the judge's (checks.py), computed when the results were made.

Writing a report claims its folder first (results.claim_folder: one command's outputs never
replace another's), and leaves no figure of an earlier report beside the new one.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import checks
from .attacks import catalog
from .comparisons import compare
from .stats import ALPHA, proportion_interval
from .errors import AttackError
from .outputs import check_output_dir, write_bytes_atomic, write_text_atomic
from .plots import PLOTS, baseline
from .results import claim_folder, load_results, producer_of

FILES = ("results.json", "report.md") + tuple(name for name, _, _ in PLOTS) + ("adversarial/",)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _label(name: str, r: dict | None = None) -> str:
    """The catalog's label; a results file may name an attack this version lacks (its own label then)."""
    try:
        return catalog.label(name)
    except AttackError:
        return (r or {}).get("label", name)


def _flags(m: dict) -> list[str]:
    return m["flags"] if "flags" in m else checks.flags(m["eval"])


def ranked(results: dict) -> list[dict]:
    return sorted(results["models"], key=lambda m: -m["eval"]["worst_case"]["acc"])


# ------------------------------------------------------------------ markdown
def headline_table(results: dict) -> list[str]:
    base = next((s for s in catalog.specs() if s.baseline), None)
    alone = f"{base.label} alone" if base else "Baseline alone"
    rows = [f"| Rank | Model | Clean | **Adaptive worst case** | 95% interval | {alone} | Only quant.-aware | "
            "Only black-box | Rerun x2 found | Large-eps | Flags |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, m in enumerate(ranked(results), 1):
        ev, ch = m["eval"], m["eval"].get("checks", {})
        q = ch.get("ste_vs_quant_aware", {})
        conv = ch.get("convergence")
        wc = ev["worst_case"]
        lo, hi = proportion_interval(sum(wc["robust"]), wc["n"]) if "robust" in wc else (None, None)
        reruns = " and ".join(_label(a) for a in conv.get("attacks", [conv["attack"]])) if conv else ""
        rows.append("| " + " | ".join([
            str(i), m["name"], _pct(ev["clean"]["acc"]), f"**{_pct(wc['acc'])}**",
            f"{_pct(lo)}-{_pct(hi)}" if lo is not None else "-",
            _pct(baseline(ev)) if baseline(ev) is not None else "-",
            str(q.get("only_quant_aware")) if q.get("ran") else "-",
            str(ch.get("black_box_vs_gradient", {}).get("only_black_box", "-")),
            f"{conv['extra_broken']} ({reruns})" if conv else "-",
            _pct(ch["sanity"]["acc"]) if "sanity" in ch else "-",
            str(len(_flags(m)))]) + " |")
    n = results["models"][0]["eval"]["n"] if results["models"] else 0
    black = [s.label for s in catalog.specs() if s.family == catalog.BLACK]
    rows += ["", f"- **Clean**, **Adaptive worst case**, **{alone}**, **Large-eps**: accuracy in % on the first {n} "
             "test images.",
             "- **Adaptive worst case**: an image counts only if the model classifies it correctly and no attack "
             "of this report (all columns below) breaks it. Models are ranked by it; **95% interval**: its exact "
             "(Clopper-Pearson) interval over these images.",
             f"- **{alone}**: the paper's {base.label if base else 'attack'} with straight-through gradients, as the "
             "paper evaluated.",
             "- **Only quant.-aware**: images that attacks through a smooth twin or a surrogate backward broke and no "
             "straight-through attack did (masked straight-through gradients); `-` for models without quantizers.",
             f"- **Only black-box**: images that {', '.join(black)} broke and no gradient attack did.",
             "- **Rerun x2 found**: images that the straight-through and the quantization-aware attack with the "
             "highest break rate, rerun on the survivors with fresh seeds and twice the starts, broke in addition "
             "(counted in the worst case; any such image raises the 'not converged' flag).",
             "- **Large-eps**: APGD-CE at an epsilon covering the whole pixel range; it must reach 0.",
             "- **Flags**: the number of warnings listed below the tables."]
    return rows


def comparison_table(results: dict) -> list[str]:
    """The paired comparisons (comparisons.py): a difference is a finding only where it is significant."""
    every = compare(results["models"])
    rows = [r for r in every if r["a_only"] + r["b_only"]]
    same = len(every) - len(rows)
    if not every:
        return []
    out = ["| Comparison | Model A | Model B | A | B | Only A keeps | Only B keeps | p (exact McNemar) | "
           "p (Holm) | Significant |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join([r["what"], r["a"], r["b"], _pct(r["acc_a"]), _pct(r["acc_b"]), str(r["a_only"]),
                                      str(r["b_only"]), _p(r["p"]), _p(r["p_holm"]),
                                      "**yes**" if r["significant"] else "no"]) + " |")
    out += ["", "Every model is attacked on the same images, so two models are compared image by image: **Only A "
            "keeps** counts the images that A classifies right under every attack and B does not. The exact "
            "McNemar test asks whether those discordant images split more unevenly than chance; **p (Holm)** "
            f"adjusts it for the comparisons of this report that have a discordant image. A difference is "
            f"significant when p (Holm) < {ALPHA:g}; otherwise these images do not show one either way."]
    if same:
        out += ["", f"Left out: {same} comparison(s) of models that keep exactly the same images (no difference to "
                "test), such as standard-trained models that are all at 0%."]
    return out


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.2f}"


def runs_table(results: dict) -> list[str]:
    """`dqa merge`'s results: each run's worst case beside the merged one, and what only it broke."""
    merged = [m for m in ranked(results) if m["eval"].get("runs")]
    if not merged:
        return []
    runs = merged[0]["eval"]["runs"]
    out = ["| Model | **Merged** | " + " | ".join(f"Run {i + 1}" for i in range(len(runs))) + " |",
           "|---" * (len(runs) + 2) + "|"]
    for m in merged:
        cells = [f"{_pct(r['acc'])} ({len(r['broke_alone'])} only here)" for r in m["eval"]["runs"]]
        out.append(f"| {m['name']} | **{_pct(m['eval']['worst_case']['acc'])}** | " + " | ".join(cells) + " |")
    out += [""] + [f"- Run {i + 1}: `{r['command']}`" for i, r in enumerate(runs)]
    out += ["", "An image counts in **Merged** only if every run left it robust. *Only here*: images that this "
            "run broke and every other run left robust (a sign that neither run has converged on them). The "
            "tables below are the first run's."]
    return out


def _names_in(results: dict, key: str, names: list[str]) -> list[str]:
    """``names`` (catalog order) that some model's results hold, then any others they hold."""
    held = list(dict.fromkeys(a for m in results["models"] for a in m["eval"].get(key, {})))
    return [a for a in names if a in held] + [a for a in held if a not in names]


def cascade_table(results: dict) -> list[str]:
    names = _names_in(results, "cascade", catalog.attack_names(stage="cascade") + catalog.rerun_names())
    if not names:
        return []
    rows = ["| Model | " + " | ".join(_label(a) for a in names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in ranked(results):
        cells = []
        for a in names:
            r = m["eval"]["cascade"].get(a)
            cells.append("-" if r is None else f"{r['broke']} / {r['attacked']} -> {_pct(r['robust_after'])}")
        rows.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    rows += ["", "Each attack runs only on the images that every attack to its left left robust: a cell is "
             "*broken / attacked -> robust accuracy (%) after it*. `-`: not run (the twin and BPDA attacks need "
             "quantized activations).", ""]
    rows += [f"- **{_label(a)}**: {_description(a)}." for a in names]
    return rows


def _description(name: str) -> str:
    try:
        return catalog.description(name)
    except AttackError:
        return "an attack this version of dqa_ext does not know"


def _unbounded(name: str) -> bool:
    try:
        return catalog.spec(name).unbounded
    except AttackError:
        return False


def prefix_table(results: dict, families, title_note: str) -> list[str]:
    names = [a for a in _names_in(results, "paper", catalog.attack_names(stage="prefix"))
             if not _known(a) or catalog.spec(a).family in families]
    if not names:
        return []
    first = {}
    for m in results["models"]:
        for a, r in m["eval"].get("paper", {}).items():
            first.setdefault(a, r)
    head = [f"{_label(a)} succ % / med L2 (n={first[a]['n']})" if _unbounded(a) else f"{_label(a)} (n={first[a]['n']})"
            for a in names]
    rows = ["| Model | " + " | ".join(head) + " |", "|---" * (len(names) + 1) + "|"]
    for m in ranked(results):
        cells = []
        for a in names:
            r = m["eval"].get("paper", {}).get(a)
            if r is None:
                cells.append("-")
            elif _unbounded(a):
                l2 = "-" if r.get("median_l2") is None else f"{r['median_l2']:.2f}"
                cells.append(f"{_pct(r['success_rate'])} / {l2}")
            else:
                cells.append(_pct(r["acc"]))
        rows.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    rows += ["", title_note, ""] + [f"- **{_label(a)}**: {_description(a)}." for a in names]
    return rows


def _known(name: str) -> bool:
    return name in catalog.attack_names()


def _minutes(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def _status(results: dict) -> list[str]:
    """A report of a run that has not finished says so, and how far it got."""
    expected, done = results.get("expected_models"), len(results["models"])
    if results.get("complete", True) or expected is None:
        return []
    how = "`dqa reproduce --resume` with the same settings continues it" if producer_of(results) == "reproduce" else \
        "rerun the command"
    return [f"**Partial report: {done} of {expected} models evaluated.** The run is still going or was "
            f"interrupted ({how}).", ""]


def markdown(results: dict, plots: dict) -> str:
    s = results["settings"]
    wall = results.get("wall_seconds", 0)
    earlier = results.get("resumed_seconds")
    lines = ["# dqa_ext robustness report", ""] + _status(results) + [
             f"Command: `{results.get('command', '?')}`  ",
             f"Data: {s.get('data', '?')}; L-inf epsilon {s['eps']:g}; wall time {_minutes(wall)}"
             + (f", {_minutes(earlier)} of it before the run was resumed" if earlier else "")
             + (f" on {s['processes']} processes" if s.get("processes", 1) > 1 else "") + ".", "",
             "## Robust accuracy under adaptive attack", ""] + headline_table(results)
    runs = runs_table(results)
    if runs:
        lines += ["", "## Runs merged", ""] + runs
    paired = comparison_table(results)
    if paired:
        lines += ["", "## Which differences are real", ""] + paired
    lines += ["", "## The adaptive suite, attack by attack", ""] + cascade_table(results)
    paper = prefix_table(results, (catalog.STE, catalog.BLACK, "true-gradient"),
                         "Each attack alone, on its own test-set prefix (n in the header), as the paper ran them; they "
                         "enter the worst case too (the unbounded L2 attacks projected onto the epsilon ball: success "
                         "rate among the correctly classified images and median L2).")
    if paper:
        lines += ["", "## The paper's attacks", ""] + paper
    cross = prefix_table(results, ("cross-check",), "ART's implementations of the project's own attacks, run the "
                         "same way for comparison; not part of the worst case.")
    if cross:
        lines += ["", "## Cross-checks against ART", ""] + cross
    lines += ["", "## Flags: where this evaluation may be weak", ""]
    for m in ranked(results):
        fl = _flags(m)
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


# ------------------------------------------------------------------ files
def write_report(results: dict, out_dir: str | Path, *, what: str = "--out") -> dict:
    """Write results.json, report.md and the figures into out_dir (claimed first: it may hold only
    this command's earlier outputs); returns their paths. A figure of an earlier report that this one
    does not draw is removed."""
    out = check_output_dir(out_dir, FILES, what=what)
    claim_folder(out, producer_of(results), FILES, what=what)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    plots = {}
    for name, key, draw in PLOTS:
        tmp = out / f".{name}.render"
        try:
            if draw(results, tmp):
                write_bytes_atomic(out / name, tmp.read_bytes())
                plots[key] = name
            elif (out / name).is_file():
                (out / name).unlink()  # an earlier report's figure would read as this one's
        finally:
            tmp.unlink(missing_ok=True)
    write_text_atomic(out / "report.md", markdown(results, plots))
    return {"results": out / "results.json", "report": out / "report.md", **{k: out / v for k, v in plots.items()}}


def rerender(path, out=None) -> dict:
    """`dqa report`: report.md and the figures again from a results.json, into its own folder or ``out``
    (which may hold only these same results)."""
    import matplotlib  # noqa: F401  (the figures' optional dependency, reported before any write)

    src = Path(path)
    folder = Path(out) if out else (src if src.is_dir() else src.parent)
    what = "--out" if out else "report folder"
    check_output_dir(folder, FILES, what=what)
    results = load_results(path)
    claim_folder(folder, "report", FILES, what=what, command=results.get("command"))
    return write_report(results, folder, what=what)
