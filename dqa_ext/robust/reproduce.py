"""The paper's experiment matrix (activation x training), trained, attacked and reported in one go.

Presets:
  default  embedded MNIST subset, relu / fixed2 / dqa2, standard and PGD training, the full attack
           suite with budgets sized for <= 10 minutes on a 2-core CPU (recorded in the report);
  paper    bits 1, 2 and 3 on full MNIST and CIFAR-10 with full-size models and budgets (for a GPU);
  smoke    a tiny run that exercises every stage (tests, CI).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from .attacks import DEFAULT_ATTACKS, Budget, evaluate
from .data import load_dataset
from .errors import UserError
from .train import TrainConfig, default_eps, train

SUITE = DEFAULT_ATTACKS + ("pgd_zero",)

PRESETS = {
    "default": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "fixed2", "dqa2"],
        "train": {"arch_kwargs": {"channels": [16, 32], "hidden": 128, "kernel": 3}, "batch_size": 64},
        "epochs": {"standard": 3, "pgd": 5},
        # PGD training fine-tunes the standard model (init_from) with eps ramped up over one epoch.
        "adv": {"pgd_steps": 5, "eps_warmup": 1.0, "init_from_standard": True},
        "budget": {"n": 200, "pgd_steps": 40, "apgd_steps": 40, "cw_n": 50, "cw_steps": 100, "cw_search": 5,
                   "zoo_n": 5, "zoo_steps": 50, "square_n": 100, "square_queries": 300, "sweep_n": 100},
        "attacks": list(SUITE),
    },
    "paper": {
        "datasets": ["mnist", "cifar10"],
        "activations": ["relu", "fixed1", "fixed2", "fixed3", "dqa1", "dqa2", "dqa3"],
        "train": {"mnist": {"arch_kwargs": {"channels": [32, 64], "hidden": 1024, "kernel": 5}, "batch_size": 128},
                  "cifar10": {"arch_kwargs": {}, "batch_size": 128}},
        "epochs": {"mnist": {"standard": 20, "pgd": 40}, "cifar10": {"standard": 100, "pgd": 100}},
        "adv": {"mnist": {"pgd_steps": 40, "pgd_step_size": 0.01, "eps_warmup": 5.0},
                "cifar10": {"pgd_steps": 7, "pgd_step_size": 2 / 255}},
        "budget": {"n": 1000, "pgd_steps": 100, "pgd_restarts": 5, "apgd_steps": 100, "apgd_restarts": 5,
                   "cw_n": 500, "cw_steps": 100, "cw_search": 9, "zoo_n": 100, "zoo_steps": 200,
                   "square_n": 1000, "square_queries": 5000, "sweep_n": 1000},
        "attacks": list(SUITE),
    },
    "smoke": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "dqa2"],
        "train": {"arch_kwargs": {"channels": [8, 16], "hidden": 32, "kernel": 3}, "batch_size": 64, "n_train": 400},
        "epochs": {"standard": 1, "pgd": 1},
        "adv": {"pgd_steps": 2},
        "budget": {"n": 30, "pgd_steps": 3, "apgd_steps": 3, "cw_n": 4, "cw_steps": 3, "cw_search": 1,
                   "zoo_n": 2, "zoo_steps": 2, "zoo_parallel": 16, "square_queries": 5, "sub_seeds": 20,
                   "sub_rounds": 2, "sub_epochs": 1, "sweep_n": 10},
        "attacks": list(SUITE),
    },
}


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
            "torch": torch.__version__, "numpy": numpy.__version__, "seed": seed,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
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
              device: str = "auto", seed: int = 0, resume: bool = False, budget_overrides: dict | None = None,
              command: str = "dqa reproduce", log=print) -> list[Path]:
    """Run the preset's matrix; returns the report.md paths (one per dataset)."""
    from .report import write_report

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    P = PRESETS[preset]
    out = Path(out)
    reports = []
    t_all = time.time()
    for ds_name in P["datasets"]:
        t0 = time.time()
        ds = load_dataset(ds_name, data_dir)
        log(f"== {ds.describe()}")
        folder = out if len(P["datasets"]) == 1 else out / ds_name
        eps = default_eps(ds.input_shape)
        budget = Budget(**{**_per(P["budget"], ds_name), **(budget_overrides or {})}).validate()
        tr = dict(_per(P["train"], ds_name))
        settings = {"preset": preset, "data": ds.describe(), "eps": eps, "attack_grad": "bpda",
                    "attacks": P["attacks"], "activations": P["activations"], "device": device,
                    "train": tr, "epochs": _per(P["epochs"], ds_name), "adv": _per(P["adv"], ds_name)}
        results = {"tool": "dqa_ext.robust", "command": command, "settings": settings,
                   "provenance": provenance(seed), "models": []}
        for act in P["activations"]:
            for training in ("standard", "pgd"):
                name = f"{act}-{training}"
                epochs = _per(P["epochs"], ds_name)[training]
                adv = dict(_per(P["adv"], ds_name)) if training == "pgd" else {}
                if adv.pop("init_from_standard", False):
                    adv["init_from"] = str(folder / "models" / f"{act}-standard.pt")
                cfg = TrainConfig(data=ds_name, data_dir=data_dir, activation=act, adv=training == "pgd",
                                  epochs=epochs, seed=seed, device=device, resume=resume,
                                  out=str(folder / "models" / f"{name}.pt"), **tr, **adv)
                t1 = time.time()
                model = train(cfg, dataset=ds, log=log)
                train_s = time.time() - t1
                log(f"-- attacking {name}")
                ev = evaluate(model.cpu() if device == "cpu" else model, ds, attacks=P["attacks"], eps=eps,
                              budget=budget, seed=seed, log=log)
                results["models"].append({"name": name, "activation": act, "training": training,
                                          "checkpoint": cfg.out, "eval": ev,
                                          "train": {"seconds": train_s, "history": model.dqa_meta["history"],
                                                    "config": model.dqa_meta["config"]}})
                results["wall_seconds"] = time.time() - t0
                write_report(results, folder)  # partial reports survive an interrupted run
        paths = write_report(results, folder)
        log(f"wrote {paths['report']} ({results['wall_seconds']:.0f} s)")
        reports.append(paths["report"])
    log(f"done in {time.time() - t_all:.0f} s")
    return reports
