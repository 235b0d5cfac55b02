"""The experiment matrices `dqa reproduce` runs (activations x training, per dataset), and --quick,
which keeps a preset's matrix and shrinks everything else to a smoke run.

  default  embedded MNIST subset, relu / fixed2 / dqa2, standard and PGD training, the adaptive suite
           at AutoAttack strength plus the paper's attacks, sized for <= 15 minutes on a 2-core CPU
           (every budget recorded in the report);
  paper    bits 1, 2 and 3 on full MNIST and CIFAR-10 with full-size models and budgets (for a GPU);
  matrix   the embedded subset at every bit width: relu, fixed1-3, dqa1-3, each with standard and PGD
           training (14 models), with the default preset's budgets;
  smoke    a tiny run that exercises every stage (tests, CI).

Every preset runs the catalog's default attacks (attacks/catalog.py).
"""
from __future__ import annotations

PRESETS = {
    "default": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "fixed2", "dqa2"],
        "train": {"arch_kwargs": {"channels": [16, 32], "hidden": 128, "kernel": 3}, "batch_size": 64},
        "epochs": {"standard": 3, "pgd": 5},
        # PGD training fine-tunes the standard model (init_from) with eps ramped up over one epoch.
        "adv": {"pgd_steps": 5, "eps_warmup": 1.0, "init_from_standard": True},
        "budget": {"n": 200, "twin_targets": 3, "cw_n": 50, "zoo_n": 10, "sweep_n": 100},
    },
    "matrix": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "fixed1", "fixed2", "fixed3", "dqa1", "dqa2", "dqa3"],
        "train": {"arch_kwargs": {"channels": [16, 32], "hidden": 128, "kernel": 3}, "batch_size": 64},
        "epochs": {"standard": 3, "pgd": 5},
        "adv": {"pgd_steps": 5, "eps_warmup": 1.0, "init_from_standard": True},
        "budget": {"n": 200, "twin_targets": 3, "cw_n": 50, "zoo_n": 10, "sweep_n": 100},
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
    },
    "smoke": {
        "datasets": ["mnist5k"],
        "activations": ["relu", "dqa2"],
        "train": {"arch_kwargs": {"channels": [8, 16], "hidden": 32, "kernel": 3}, "batch_size": 64, "n_train": 400},
        "epochs": {"standard": 1, "pgd": 1},
        "adv": {"pgd_steps": 2},
        "budget": {"n": 30, "apgd_steps": 3, "apgd_restarts": 1, "apgd_t_targets": 2, "square_queries": 10,
                   "repair_queries": 10,
                   "twin_steps": 3, "twin_targets": 1, "anneal_steps": 3, "anneal_restarts": 1,
                   "near_steps": 3, "near_pgd_steps": 3, "near_restarts": 1,
                   "transfer_steps": 3,
                   "sweep_n": 10, "sweep_steps": 2,
                   "pgd_steps": 3, "cw_n": 4, "cw_steps": 3, "cw_search": 1, "zoo_n": 2, "zoo_steps": 2,
                   "zoo_parallel": 16, "sub_seeds": 20, "sub_rounds": 2, "sub_epochs": 1},
    },
}


# --quick: the smoke run's sizes for any preset (the matrix itself is kept).
QUICK = {
    "train": {"mnist_cnn": {"channels": [4, 8], "hidden": 16, "kernel": 3}, "resnet20": {"width": 4}},
    "n_train": 128, "batch_size": 64, "epochs": {"standard": 1, "pgd": 1}, "pgd_steps": 2,
    "budget": {"n": 12, "apgd_steps": 2, "apgd_restarts": 1, "apgd_t_targets": 1, "square_queries": 4,
               "repair_queries": 4,
               "twin_steps": 2, "twin_targets": 1, "anneal_steps": 2, "anneal_restarts": 1,
               "near_steps": 2, "near_pgd_steps": 2, "near_restarts": 1,
               "transfer_steps": 2,
               "sweep_n": 8, "sweep_steps": 2,
               "pgd_steps": 2, "cw_n": 2, "cw_steps": 2, "cw_search": 1, "zoo_n": 1, "zoo_steps": 1,
               "zoo_parallel": 8, "sub_seeds": 10, "sub_rounds": 2, "sub_epochs": 1},
}


def quick_version(preset: dict) -> dict:
    """The same matrix, with smoke-run epochs, data, widths and budgets."""
    q = {k: v for k, v in preset.items()}
    per_ds = {}
    for ds in preset["datasets"]:
        tr = dict(per_dataset(preset["train"], ds))
        arch = "resnet20" if ds == "cifar10" else "mnist_cnn"
        tr.update(arch_kwargs=QUICK["train"][arch], n_train=QUICK["n_train"], batch_size=QUICK["batch_size"])
        adv = dict(per_dataset(preset["adv"], ds), pgd_steps=QUICK["pgd_steps"])
        adv.pop("pgd_step_size", None)
        adv.pop("eps_warmup", None)
        per_ds[ds] = (tr, adv)
    q["train"] = {ds: v[0] for ds, v in per_ds.items()}
    q["adv"] = {ds: v[1] for ds, v in per_ds.items()}
    q["epochs"] = dict(QUICK["epochs"])
    q["budget"] = dict(QUICK["budget"])
    return q


def per_dataset(value, dataset: str):
    """Preset entries are either one value or a dict keyed by dataset name."""
    if isinstance(value, dict) and dataset in value:
        return value[dataset]
    if isinstance(value, dict) and any(k in ("mnist", "cifar10", "mnist5k") for k in value):
        return value.get("mnist" if dataset == "mnist5k" else dataset, {})
    return value
