"""`dqa reproduce`: a preset's experiment matrix (presets.py), trained, attacked and reported in one go.

All models of a dataset are trained first, then attacked: each is also attacked with the
adversarial points of all the others (transfer). Every checkpoint and every model's evaluation is
saved as it finishes, and the report is rewritten after each model (marked partial until the last),
so `resume=True` continues a killed run: trained models are not retrained, finished evaluations are
not rerun, an evaluation made with other settings is refused, and the wall time counts every session.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import adversarial
from .attacks import catalog
from .attacks.budget import Budget
from .attacks.common import device_of
from .attacks.shard import shard_from_env
from .config import TrainConfig
from .data import default_eps, load_dataset
from .devices import resolve_device
from .distributed import leave_process_group, world_from_env
from .errors import UserError
from .evaluate import evaluate_models
from .outputs import check_output_dir, write_text_atomic
from .presets import PRESETS, per_dataset, quick_version
from .provenance import portable_command
from .report import FILES, write_report
from .results import add_model, claim_folder, new_results
from .train import train

DEFAULT_OUT = "dqa-report"
TRAININGS = ("standard", "pgd")


def _folders(P: dict, out: Path) -> dict:
    """The report folder of each dataset: --out itself for one dataset, a subfolder each else."""
    return {ds: (out if len(P["datasets"]) == 1 else out / ds) for ds in P["datasets"]}


def check_reproduce(preset: str, out, data_dir, *, device: str, resume: bool, force: bool, quick: bool,
                    budget_overrides: dict | None) -> tuple[dict, dict, dict]:
    """Every argument and output location, before any work: (preset, folders, budgets)."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if resume and force:
        raise UserError("--resume continues the run under --out and --force retrains it: give one of them")
    if preset == "paper" and not data_dir:
        raise UserError("--preset paper needs --data-dir with the MNIST IDX files and cifar-10-batches-py")
    resolve_device(device)
    P = quick_version(PRESETS[preset]) if quick else PRESETS[preset]
    folders = _folders(P, Path(out))
    budgets = {ds: Budget(**{**per_dataset(P["budget"], ds), **(budget_overrides or {})}).validate()
               for ds in P["datasets"]}
    for folder in folders.values():
        check_output_dir(folder, [*FILES, "models/", "evals/"], what="--out")
        check_output_dir(folder / "models", [f"{a}-{t}.pt" for a in P["activations"] for t in TRAININGS], what="--out")
        claim_folder(folder, "reproduce", FILES)
    if not (resume or force):
        found = sorted(str(p) for f in folders.values() for p in (f / "models").glob("*.pt"))
        if found:
            raise UserError(f"--out {out} already holds checkpoints ({found[0]}{', ...' if len(found) > 1 else ''}); "
                            "use --resume to reuse them or --force to retrain")
    return P, folders, budgets


def reproduce(preset: str = "default", out: str | Path = DEFAULT_OUT, data_dir: str | None = None,
              device: str = "auto", seed: int = 0, resume: bool = False, force: bool = False,
              budget_overrides: dict | None = None, argv=("reproduce",), quick: bool = False, log=print,
              progress_bar: bool | None = None) -> list[Path]:
    """Run the preset's matrix; returns the report.md paths (one per dataset).

    Under torchrun, training is DDP and the evaluation sharded over the ranks (attacks/shard.py):
    every rank runs this, rank 0 alone logs and writes (``out`` on a file system every node sees)."""
    P, folders, budgets = check_reproduce(preset, out, data_dir, device=device, resume=resume, force=force,
                                          quick=quick, budget_overrides=budget_overrides)
    import art  # noqa: F401  (the optional dependencies: a missing one is reported before any work)
    import matplotlib  # noqa: F401

    main = world_from_env()[1] == 0
    log = log if main else (lambda *_: None)
    attacks = catalog.default_attacks()
    reports = []
    t_all = time.time()
    for ds_name in P["datasets"]:
        t0 = time.time()
        ds = load_dataset(ds_name, data_dir)
        log(f"== {ds.describe()}")
        folder, budget = folders[ds_name], budgets[ds_name]
        eps = default_eps(ds.input_shape)
        tr = dict(per_dataset(P["train"], ds_name))
        settings = {"preset": preset, "quick": quick, "data": ds.describe(), "eps": eps, "attacks": attacks,
                    "activations": P["activations"], "device": device, "train": tr,
                    "epochs": per_dataset(P["epochs"], ds_name), "adv": per_dataset(P["adv"], ds_name)}
        results = new_results("reproduce", portable_command(argv), settings, seed=seed,
                              expected_models=len(P["activations"]) * len(TRAININGS))
        models, seconds, earlier = {}, {}, 0.0
        for act in P["activations"]:
            for training in TRAININGS:
                name = f"{act}-{training}"
                adv = dict(per_dataset(P["adv"], ds_name)) if training == "pgd" else {}
                if adv.pop("init_from_standard", False):
                    adv["init_from"] = str(folder / "models" / f"{act}-standard.pt")
                cfg = TrainConfig(data=ds_name, data_dir=data_dir, activation=act, adv=training == "pgd",
                                  epochs=per_dataset(P["epochs"], ds_name)[training], seed=seed, device=device,
                                  resume=resume, force=force, out=str(folder / "models" / f"{name}.pt"), **tr, **adv)
                t1 = time.time()
                models[name] = train(cfg, dataset=ds, log=log)
                seconds[name] = time.time() - t1
                history = models[name].dqa_meta["history"]
                earlier += sum(h["seconds"] for h in history[:len(history) - models[name].dqa_meta["epochs_run"]])
        results["train_seconds"] = time.time() - t0
        shard, _ = shard_from_env(device_of(next(iter(models.values()))))
        settings["processes"] = shard.world

        # What an evaluation depends on besides the model: a resumed run reuses a saved evaluation
        # only if this matches, and refuses to mix settings otherwise.
        key = {"attacks": attacks, "eps": eps, "seed": seed, "budget": budget.as_dict(), "data": ds.describe()}
        cached = _saved_evaluations(folder, models, key, resume, log, main)
        earlier += sum(ev.get("seconds", 0.0) for ev in cached.values())

        def done(name, ev):
            if not main:
                return
            if name not in cached:
                write_text_atomic(folder / "evals" / f"{name}.json",
                                  json.dumps({"key": key, "epoch": models[name].dqa_meta["epoch"], "eval": ev},
                                             default=str))
            meta = models[name].dqa_meta
            add_model(results, name=name, activation=meta["activation"], training=meta["training"],
                      checkpoint=folder / "models" / f"{name}.pt", ev=ev, history=meta["history"],
                      config=meta["config"], folder=folder, seconds=seconds[name])
            results["wall_seconds"] = time.time() - t0 + earlier
            results["resumed_seconds"] = earlier or None
            write_report(results, folder)  # partial reports (marked so) survive an interrupted run

        def points_of(name, points):
            if main:
                adversarial.save(folder, name, points, eps=eps, checkpoint=folder / "models" / f"{name}.pt")

        evaluate_models(models, ds, attacks=attacks, eps=eps, budget=budget, seed=seed, log=log, on_result=done,
                        cached=cached, shard=shard, progress_bar=progress_bar, on_points=points_of)
        if main:
            paths = write_report(results, folder)
            log(f"wrote {paths['report']} ({results['wall_seconds']:.0f} s)")
            reports.append(paths["report"])
    log(f"done in {time.time() - t_all:.0f} s")
    leave_process_group()  # under torchrun (training joined the group)
    return reports


def _saved_evaluations(folder: Path, models: dict, key: dict, resume: bool, log, main: bool = True) -> dict:
    """The evaluations a resumed run can reuse: saved for the same model (epoch) and settings
    (``main``: this process may delete the stale ones; under torchrun only rank 0 does)."""
    cached = {}
    for name, model in models.items():
        path = folder / "evals" / f"{name}.json"
        if not path.is_file():
            continue
        if not resume:
            if main:
                path.unlink()  # a fresh run (checkpoints already refused or --force): start over
            continue
        try:
            saved = json.loads(path.read_text())
            same_key = json.loads(json.dumps(key, default=str)) == saved["key"]
            epoch = saved["epoch"]
            ev = saved["eval"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: cannot read {path} ({type(e).__name__}); use --force to start over") from e
        if not same_key:
            diff = [k for k in key if json.loads(json.dumps(key[k], default=str)) != saved["key"].get(k)]
            raise UserError(f"--resume: {path} was made with other settings ({', '.join(diff)}); "
                            "use --force to start over")
        if epoch == model.dqa_meta["epoch"]:
            cached[name] = ev
            log(f"-- {name}: evaluation reused from {path}")
    return cached
