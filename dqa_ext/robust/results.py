"""The results.json schema, in one place: how `dqa attack` and `dqa reproduce` build it, how it is
read back and checked, and which results a folder holds (outputs of one command never replace
another command's).

  tool, schema       "dqa_ext.robust", SCHEMA (files without "schema" are version 1)
  producer           "attack", "reproduce" or "merge": the command that wrote it
  command            the command line, paths reduced to names (provenance.portable_command)
  settings           data, eps, attacks, device, processes, ... (the producer's own)
  provenance         versions, CPU model, cores, threads, GPU (provenance.provenance)
  models             per model: name, activation, training, checkpoint (relative to the folder),
                     checkpoint_sha256 (its content, so that runs on one checkpoint can be merged),
                     eval (evaluate.evaluate_model's result), train (history, config), flags
  expected_models    how many models the run evaluates; complete: all of them are in
  wall_seconds       the run's time, summed over the sessions of a resumed run (resumed_seconds:
                     the part from earlier sessions)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import checks
from .errors import UserError
from .provenance import portable_config, portable_path, provenance

SCHEMA = 2
PRODUCERS = ("attack", "reproduce", "merge")
REQUIRED_EVAL = ("eps", "n", "clean", "worst_case", "cascade", "budget")


class ResultsError(UserError):
    """A results file that cannot be read, or a folder that holds another command's results."""


def new_results(producer: str, command: str, settings: dict, *, seed: int, expected_models: int) -> dict:
    if producer not in PRODUCERS:
        raise ValueError(f"producer must be one of {PRODUCERS}, got {producer!r}")
    return {"tool": "dqa_ext.robust", "schema": SCHEMA, "producer": producer, "command": command,
            "settings": settings, "provenance": provenance(seed), "models": [], "expected_models": expected_models,
            "complete": False, "wall_seconds": 0.0}


def add_model(results: dict, *, name: str, activation: str, training: str, checkpoint, ev: dict, history: list,
              config: dict, folder, seconds: float | None = None) -> dict:
    """One model's entry, with its flags (checks.flags) and its paths relative to the results' folder."""
    train = {"history": history, "config": portable_config(config, folder)}
    if seconds is not None:
        train = {"seconds": seconds, "checkpoint": portable_path(checkpoint, folder), **train}
    entry = {"name": name, "activation": activation, "training": training,
             "checkpoint": portable_path(checkpoint, folder), "checkpoint_sha256": file_sha256(checkpoint), "eval": ev,
             "train": train, "flags": checks.flags(ev)}
    results["models"].append(entry)
    results["complete"] = len(results["models"]) >= results.get("expected_models", 0)
    return entry


def file_sha256(path) -> str | None:
    """The content hash of a checkpoint (None when there is no such file)."""
    p = Path(path) if path is not None else None
    if p is None or not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def producer_of(results: dict) -> str | None:
    """The command that wrote ``results`` (version-1 files say it only in their command line)."""
    if results.get("producer") in PRODUCERS:
        return results["producer"]
    command = str(results.get("command", ""))
    return next((p for p in PRODUCERS if command.startswith(f"dqa {p}")), None)


def load_results(path: str | Path) -> dict:
    """A results.json written by `dqa attack` / `dqa reproduce`, checked for what the report needs."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ResultsError(f"no results file {p} (run `dqa attack` or `dqa reproduce` first)")
    try:
        results = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(results, dict):
        raise ResultsError(f"{p} is not a dqa results file (a JSON object with settings and models)")
    if results.get("schema", 1) not in (1, SCHEMA):
        raise ResultsError(f"{p} has results schema {results['schema']!r}; this dqa_ext reads 1 and {SCHEMA} "
                           "(upgrade dqa_ext)")
    for key, typ in (("settings", dict), ("models", list)):
        if not isinstance(results.get(key), typ):
            raise ResultsError(f"{p} is not a dqa results file: '{key}' is missing or not a {typ.__name__}")
    if "eps" not in results["settings"]:
        raise ResultsError(f"{p} is not a dqa results file: settings has no 'eps'")
    for i, m in enumerate(results["models"]):
        if not isinstance(m, dict) or "name" not in m or not isinstance(m.get("eval"), dict):
            raise ResultsError(f"{p}: models[{i}] needs a 'name' and an 'eval' object")
        missing = [k for k in REQUIRED_EVAL if k not in m["eval"]]
        if missing:
            raise ResultsError(f"{p}: models[{i}] ({m['name']}) has no {', '.join(missing)} "
                               "(written by an older dqa_ext? rerun `dqa attack`)")
    return results


def claim_folder(folder, producer: str | None, files, *, what: str = "--out", command: str | None = None) -> None:
    """Refuses (one line) to write ``producer``'s report into a folder whose report files belong to
    another command, or to no dqa results at all; for `dqa report` (producer "report"), the folder's
    results must be the ones re-rendered (the same ``command``); producer None (results made through
    the API): any dqa results."""
    folder = Path(folder)
    present = [f for f in files if (folder / f).is_file()]
    if not present:
        return
    if "results.json" not in present:
        raise ResultsError(f"{what} {folder} holds {present[0]} but no results.json: it is not a dqa report "
                           "folder; choose another folder")
    try:
        theirs = json.loads((folder / "results.json").read_text())
        if not isinstance(theirs, dict) or theirs.get("tool") != "dqa_ext.robust":
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise ResultsError(f"{what} {folder} holds a results.json that dqa did not write; choose another "
                           "folder") from None
    owner = producer_of(theirs)
    if producer == "report":
        if theirs.get("command") != command:
            raise ResultsError(f"{what} {folder} holds other results (`{theirs.get('command', '?')}`); re-render into "
                               "their own folder or an empty one")
    elif producer is not None and owner != producer:
        raise ResultsError(f"{what} {folder} holds the results of `{theirs.get('command', 'another command')}`; "
                           f"`dqa {producer}` does not replace them: choose another --out")
