"""The paper's experiment matrix (activation x training), trained, attacked and reported in one go.

Presets:
  default  embedded MNIST subset, relu / fixed2 / dqa2, standard and PGD training, the adaptive suite
           at AutoAttack strength plus the paper's attacks, sized for <= 15 minutes on a 2-core CPU
           (every budget recorded in the report);
  paper    bits 1, 2 and 3 on full MNIST and CIFAR-10 with full-size models and budgets (for a GPU);
  matrix   the embedded subset at every bit width: relu, fixed1-3, dqa1-3, each with standard and PGD
           training (14 models), with the default preset's budgets;
  smoke    a tiny run that exercises every stage (tests, CI).

``quick=True`` (`--quick`) keeps a preset's matrix (datasets x activations x training) and shrinks
epochs, training data, model widths and attack budgets to a smoke run, so a long preset can be
checked end to end in minutes before it is run for real.

All models of a dataset are trained first, then attacked: each is also attacked with the
adversarial points of all the others (transfer). Every checkpoint and every model's evaluation is
saved as it finishes, so `resume=True` continues a killed run: trained models are not retrained,
finished evaluations are not rerun, and an evaluation made with other settings is refused.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from .attacks import DEFAULT_ATTACKS, Budget, evaluate_models
from .attacks.common import device_of
from .attacks.shard import shard_from_env
from .distributed import world_from_env
from .data import load_dataset
from .errors import UserError
from .outputs import write_text_atomic
from .report import FILES, write_report
from .train import TrainConfig, default_eps, train

PRESETS = {
    "default": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "fixed2", "dqa2"],
        "train": {"arch_kwargs": {"channels": [16, 32], "hidden": 128, "kernel": 3}, "batch_size": 64},
        "epochs": {"standard": 3, "pgd": 5},
        # PGD training fine-tunes the standard model (init_from) with eps ramped up over one epoch.
        "adv": {"pgd_steps": 5, "eps_warmup": 1.0, "init_from_standard": True},
        "budget": {"n": 200, "twin_targets": 3, "cw_n": 50, "zoo_n": 10, "sweep_n": 100},
        "attacks": list(DEFAULT_ATTACKS),
    },
    "matrix": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "fixed1", "fixed2", "fixed3", "dqa1", "dqa2", "dqa3"],
        "train": {"arch_kwargs": {"channels": [16, 32], "hidden": 128, "kernel": 3}, "batch_size": 64},
        "epochs": {"standard": 3, "pgd": 5},
        "adv": {"pgd_steps": 5, "eps_warmup": 1.0, "init_from_standard": True},
        "budget": {"n": 200, "twin_targets": 3, "cw_n": 50, "zoo_n": 10, "sweep_n": 100},
        "attacks": list(DEFAULT_ATTACKS),
    },
    "paper": {
        "datasets": ["mnist", "cifar10"],
        "activations": ["relu", "fixed1", "fixed2", "fixed3", "dqa1", "dqa2", "dqa3"],
        "train": {"mnist": {"arch_kwargs": {"channels": [32, 64], "hidden": 1024, "kernel": 5}, "batch_size": 128},
                  "cifar10": {"arch_kwargs": {}, "batch_size": 128}},
        "epochs": {"mnist": {"standard": 20, "pgd": 40}, "cifar10": {"standard": 100, "pgd": 100}},
        "adv": {"mnist": {"pgd_steps": 40, "pgd_step_size": 0.01, "eps_warmup": 5.0},
                "cifar10": {"pgd_steps": 7, "pgd_step_size": 2 / 255}},
        "budget": {"n": 1000, "pgd_steps": 100, "pgd_restarts": 5, "cw_n": 500, "cw_search": 9, "zoo_n": 100,
                   "zoo_steps": 200, "sweep_n": 1000},
        "attacks": list(DEFAULT_ATTACKS),
    },
    "smoke": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "dqa2"],
        "train": {"arch_kwargs": {"channels": [8, 16], "hidden": 32, "kernel": 3}, "batch_size": 64, "n_train": 400},
        "epochs": {"standard": 1, "pgd": 1},
        "adv": {"pgd_steps": 2},
        "budget": {"n": 30, "apgd_steps": 3, "apgd_restarts": 1, "apgd_t_targets": 2, "square_queries": 10,
                   "twin_steps": 3, "twin_targets": 1, "anneal_steps": 3, "anneal_restarts": 1, "transfer_steps": 3,
                   "sweep_n": 10, "sweep_steps": 2,
                   "pgd_steps": 3, "cw_n": 4, "cw_steps": 3, "cw_search": 1, "zoo_n": 2, "zoo_steps": 2,
                   "zoo_parallel": 16, "sub_seeds": 20, "sub_rounds": 2, "sub_epochs": 1},
        "attacks": list(DEFAULT_ATTACKS),
    },
}


# --quick: the smoke run's sizes for any preset (the matrix itself is kept).
QUICK = {
    "train": {"mnist_cnn": {"channels": [4, 8], "hidden": 16, "kernel": 3}, "resnet20": {"width": 4}},
    "n_train": 128, "batch_size": 64, "epochs": {"standard": 1, "pgd": 1}, "pgd_steps": 2,
    "budget": {"n": 12, "apgd_steps": 2, "apgd_restarts": 1, "apgd_t_targets": 1, "square_queries": 4,
               "twin_steps": 2, "twin_targets": 1, "anneal_steps": 2, "anneal_restarts": 1, "transfer_steps": 2,
               "sweep_n": 8, "sweep_steps": 2,
               "pgd_steps": 2, "cw_n": 2, "cw_steps": 2, "cw_search": 1, "zoo_n": 1, "zoo_steps": 1,
               "zoo_parallel": 8, "sub_seeds": 10, "sub_rounds": 2, "sub_epochs": 1},
}


def quick_version(preset: dict) -> dict:
    """The same matrix, with smoke-run epochs, data, widths and budgets."""
    q = {k: v for k, v in preset.items()}
    per_ds = {}
    for ds in preset["datasets"]:
        tr = dict(_per(preset["train"], ds))
        arch = "resnet20" if ds == "cifar10" else "mnist_cnn"
        tr.update(arch_kwargs=QUICK["train"][arch], n_train=QUICK["n_train"], batch_size=QUICK["batch_size"])
        adv = dict(_per(preset["adv"], ds), pgd_steps=QUICK["pgd_steps"])
        adv.pop("pgd_step_size", None)
        adv.pop("eps_warmup", None)
        per_ds[ds] = (tr, adv)
    q["train"] = {ds: v[0] for ds, v in per_ds.items()}
    q["adv"] = {ds: v[1] for ds, v in per_ds.items()}
    q["epochs"] = dict(QUICK["epochs"])
    q["budget"] = dict(QUICK["budget"])
    return q


def _per(value, dataset: str):
    """Preset entries are either one value or a dict keyed by dataset name."""
    if isinstance(value, dict) and dataset in value:
        return value[dataset]
    if isinstance(value, dict) and any(k in ("mnist", "cifar10", "mnist5k") for k in value):
        return value.get("mnist" if dataset == "mnist5k" else dataset, {})
    return value


def provenance(seed: int) -> dict:
    import numpy
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": numpy.__version__,
            "seed": seed, "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import art

        info["adversarial-robustness-toolbox"] = art.__version__
    except ImportError:
        pass
    try:
        import dqa_ext

        info["dqa_ext"] = dqa_ext.backend_info()
    except Exception as e:  # the report should still say what failed
        info["dqa_ext"] = f"unavailable: {e}"
    return info


def reproduce(preset: str = "default", out: str | Path = "dqa-report", data_dir: str | None = None,
              device: str = "auto", seed: int = 0, resume: bool = False, force: bool = False,
              budget_overrides: dict | None = None, command: str = "dqa reproduce", quick: bool = False,
              log=print) -> list[Path]:
    """Run the preset's matrix; returns the report.md paths (one per dataset).

    Under torchrun, training is DDP and the evaluation sharded over the ranks (attacks/shard.py):
    every rank runs this, rank 0 alone logs and writes (``out`` on a file system every node sees)."""
    main = world_from_env()[1] == 0
    log = log if main else (lambda *_: None)
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    P = quick_version(PRESETS[preset]) if quick else PRESETS[preset]
    out = Path(out)
    folders = {ds: (out if len(P["datasets"]) == 1 else out / ds) for ds in P["datasets"]}
    budgets = {ds: Budget(**{**_per(P["budget"], ds), **(budget_overrides or {})}).validate() for ds in P["datasets"]}
    from .outputs import check_output_dir

    for folder in folders.values():  # every output location is checked before any work
        check_output_dir(folder, FILES)
        check_output_dir(folder / "models", [f"{a}-{t}.pt" for a in P["activations"] for t in ("standard", "pgd")])
    reports = []
    t_all = time.time()
    for ds_name in P["datasets"]:
        t0 = time.time()
        ds = load_dataset(ds_name, data_dir)
        log(f"== {ds.describe()}")
        folder, budget = folders[ds_name], budgets[ds_name]
        eps = default_eps(ds.input_shape)
        tr = dict(_per(P["train"], ds_name))
        settings = {"preset": preset, "quick": quick, "data": ds.describe(), "eps": eps, "attacks": P["attacks"],
                    "activations": P["activations"], "device": device, "train": tr,
                    "epochs": _per(P["epochs"], ds_name), "adv": _per(P["adv"], ds_name)}
        results = {"tool": "dqa_ext.robust", "command": command, "settings": settings,
                   "provenance": provenance(seed), "models": []}
        models, train_info = {}, {}
        for act in P["activations"]:
            for training in ("standard", "pgd"):
                name = f"{act}-{training}"
                adv = dict(_per(P["adv"], ds_name)) if training == "pgd" else {}
                if adv.pop("init_from_standard", False):
                    adv["init_from"] = str(folder / "models" / f"{act}-standard.pt")
                cfg = TrainConfig(data=ds_name, data_dir=data_dir, activation=act, adv=training == "pgd",
                                  epochs=_per(P["epochs"], ds_name)[training], seed=seed, device=device,
                                  resume=resume, force=force, out=str(folder / "models" / f"{name}.pt"), **tr, **adv)
                t1 = time.time()
                models[name] = train(cfg, dataset=ds, log=log)
                train_info[name] = {"seconds": time.time() - t1, "checkpoint": cfg.out,
                                    "history": models[name].dqa_meta["history"],
                                    "config": models[name].dqa_meta["config"]}
        results["train_seconds"] = time.time() - t0
        shard, _ = shard_from_env(device_of(next(iter(models.values()))))
        settings["processes"] = shard.world

        # What an evaluation depends on besides the model: a resumed run reuses a saved evaluation
        # only if this matches, and refuses to mix settings otherwise.
        key = {"attacks": P["attacks"], "eps": eps, "seed": seed, "budget": budget.__dict__, "data": ds.describe()}
        cached = _saved_evaluations(folder, models, key, resume, log, main)

        def done(name, ev):
            if not main:
                return
            if name not in cached:
                write_text_atomic(folder / "evals" / f"{name}.json",
                                  json.dumps({"key": key, "epoch": models[name].dqa_meta["epoch"], "eval": ev},
                                             default=str))
            act, training = name.rsplit("-", 1)
            results["models"].append({"name": name, "activation": act, "training": training,
                                      "checkpoint": train_info[name]["checkpoint"], "eval": ev,
                                      "train": train_info[name]})
            results["wall_seconds"] = time.time() - t0
            write_report(results, folder)  # partial reports survive an interrupted run

        evaluate_models(models, ds, attacks=P["attacks"], eps=eps, budget=budget, seed=seed, log=log, on_result=done,
                        cached=cached, shard=shard)
        results["wall_seconds"] = time.time() - t0
        if main:
            paths = write_report(results, folder)
            log(f"wrote {paths['report']} ({results['wall_seconds']:.0f} s)")
            reports.append(paths["report"])
    log(f"done in {time.time() - t_all:.0f} s")
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
