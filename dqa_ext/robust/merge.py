"""`dqa merge`: the per-example results of several runs on the same checkpoints as one worst case.

Attacks are random: a rerun with other seeds (`dqa attack --seed`), another budget or another
version of the suite may break images an earlier run left robust. An image is robust in the merged
results only if every run that attacked its model left it robust. Runs are matched model by model
(by name); they must have attacked the same images at the same epsilon, and the same checkpoint:
the same content hash where both runs recorded one, and in every case the same clean prediction
on every image (a different model or other images would not give it).

The merged entry keeps the first run's per-attack results and records, per run, its worst case and
the images that only it broke; an image one run broke and another left robust is a flag (the
suite did not converge on it).
"""
from __future__ import annotations

import copy
import time

import numpy as np

from .outputs import check_output_dir
from .provenance import portable_path
from .report import FILES, write_report
from .results import ResultsError, claim_folder, load_results, new_results

DEFAULT_OUT = "dqa-merge"


def _robust(m: dict) -> np.ndarray:
    wc = m["eval"]["worst_case"]
    if "robust" not in wc:
        raise ResultsError(f"{m['name']}: its results have no per-image worst case (written by an older dqa_ext); "
                           "they cannot be merged")
    return np.asarray(wc["robust"], bool)


def _same_model(path: str, m: dict, first: dict, first_path: str) -> None:
    """Refuses (one line) runs that did not attack the same checkpoint on the same images."""
    a, b = first["eval"], m["eval"]
    if a["eps"] != b["eps"] or a["n"] != b["n"]:
        raise ResultsError(f"{path}: {m['name']} was attacked on {b['n']} images at epsilon {b['eps']:g}, "
                           f"{first_path} on {a['n']} at {a['eps']:g}: only runs on the same images merge")
    ha, hb = first.get("checkpoint_sha256"), m.get("checkpoint_sha256")
    if ha and hb and ha != hb:
        raise ResultsError(f"{path}: {m['name']} is another checkpoint than in {first_path} (content differs)")
    if a["clean"]["correct"] != b["clean"]["correct"]:
        raise ResultsError(f"{path}: {m['name']} classifies the clean images differently than in {first_path}: "
                           "not the same checkpoint or not the same images")


def merge_results(paths, *, command: str = "dqa merge", folder=None) -> dict:
    """The merged results of the results.json files (or their folders) at ``paths``: the first one's
    models, each with the per-image intersection of every run's worst case. ``folder``: where the
    merged results go (the runs' paths are recorded relative to it)."""
    if len(paths) < 2:
        raise ResultsError("dqa merge needs at least two results files")
    runs = [(str(p), load_results(p)) for p in paths]
    first_path, first = runs[0]
    merged = new_results("merge", command, copy.deepcopy(first["settings"]), seed=0,
                         expected_models=len(first["models"]))
    merged["settings"]["merged"] = [r.get("command", p) for p, r in runs]
    merged["wall_seconds"] = sum(r.get("wall_seconds", 0.0) for _, r in runs)
    for m0 in first["models"]:
        mine = [(p, r, next((m for m in r["models"] if m["name"] == m0["name"]), None)) for p, r in runs]
        mine = [(p, r, m) for p, r, m in mine if m is not None]
        for p, _, m in mine[1:]:
            _same_model(p, m, m0, first_path)
        robust = [_robust(m) for _, _, m in mine]
        together = np.logical_and.reduce(robust)
        entry = copy.deepcopy(m0)
        wc = entry["eval"]["worst_case"]
        wc.update(acc=float(together.mean()), robust=together.astype(int).tolist())
        per_run = []
        for i, ((p, run, _), r) in enumerate(zip(mine, robust)):
            others = [q for j, q in enumerate(robust) if j != i]
            only = np.flatnonzero(~r & np.logical_and.reduce(others)) if others else np.array([], int)
            per_run.append({"results": portable_path(p, folder), "command": run.get("command", "?"), "acc": float(r.mean()),
                            "broke_alone": only.tolist()})
        entry["eval"]["runs"] = per_run
        disagree = sorted({i for run in per_run for i in run["broke_alone"]})
        entry["flags"] = list(entry.get("flags", []))
        if disagree:
            entry["flags"].append(f"not converged across runs: {len(disagree)} image(s) broken in one run and left "
                                  f"robust in another (test-set positions {', '.join(map(str, disagree[:20]))}"
                                  f"{', ...' if len(disagree) > 20 else ''})")
        merged["models"].append(entry)
    merged["complete"] = True
    return merged


def merge_runs(paths, out=DEFAULT_OUT, *, command: str = "dqa merge", log=print):
    """`dqa merge`: write the merged results, report and figures into ``out`` (a folder that holds
    nothing or an earlier merge)."""
    t0 = time.time()
    check_output_dir(out, FILES, what="--out")
    claim_folder(out, "merge", FILES)
    merged = merge_results(paths, command=command, folder=out)
    merged["merge_seconds"] = time.time() - t0
    written = write_report(merged, out)
    log(f"wrote {written['report']}")
    return written["report"]
