"""`dqa attack`: trained checkpoints attacked together (each also with the others' adversarial
points, the transfer attack) and reported. Every argument, checkpoint and the output folder are
checked before the first attack runs."""
from __future__ import annotations

import math
import time
from pathlib import Path

from . import adversarial
from .attacks import catalog
from .attacks.budget import Budget
from .attacks.shard import shard_from_env
from .checkpoint import load_model
from .data import load_dataset
from .devices import resolve_device
from .distributed import leave_process_group
from .errors import AttackError
from .evaluate import evaluate_models
from .outputs import check_output_dir
from .provenance import portable_command
from .report import FILES, write_report
from .results import add_model, claim_folder, new_results

DEFAULT_OUT = "dqa-attack"  # not `dqa reproduce`'s folder: one command never replaces another's report


def _positive(flag: str, value, *, allow_zero: bool = False) -> None:
    """None (the default) or a finite number > 0 (>= 0 with allow_zero)."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise AttackError(f"{flag} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def attack_checkpoints(checkpoints, *, data: str = "mnist5k", data_dir=None, attacks=None, eps: float | None = None,
                       attack_grad: str = "bpda", n_images: int | None = None, budget: dict | None = None,
                       sweep: bool = True, sweep_eps=None, seed: int = 0, device: str = "auto",
                       out=DEFAULT_OUT, argv=(), log=print, progress_bar: bool | None = None) -> Path | None:
    """Attack every checkpoint and write results.json, report.md and the figures into ``out``; returns
    the report's path (None on the ranks other than 0 under torchrun, which only attack their share).
    ``budget``: budget settings by name; ``argv``: the command line, recorded (paths reduced to names)."""
    t0 = time.time()
    attacks = catalog.check_attacks(attacks)
    if n_images is not None and (isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1):
        raise AttackError(f"--n-images must be an integer >= 1, got {n_images!r}")
    budget = Budget(**{**(budget or {}), **({"n": n_images} if n_images is not None else {})}).validate()
    if attack_grad not in ("bpda", "zero"):
        raise AttackError(f"--attack-grad must be bpda or zero, got {attack_grad!r}")
    _positive("--eps", eps)
    if eps is not None and eps > 1:
        raise AttackError(f"--eps must be at most 1 (pixels are in [0, 1]; 1 already covers every image), got {eps!r}")
    for e in sweep_eps or []:
        _positive("--sweep-eps", e, allow_zero=True)
    device = resolve_device(device)
    check_output_dir(out, FILES, what="--out")
    claim_folder(out, "attack", FILES)
    import art  # noqa: F401  (the optional dependencies: a missing one is reported before any work)
    import matplotlib  # noqa: F401
    import tqdm  # noqa: F401  (the progress bar)

    # Under torchrun every rank attacks its share of the images (the same per-example results as
    # one process) and rank 0 writes the report.
    shard, device = shard_from_env(device)
    loaded = [(path, load_model(path, device)) for path in checkpoints]  # all checked before any attack
    ds = load_dataset(data, data_dir)
    named = {}
    for path, model in loaded:
        meta = model.dqa_meta
        if tuple(meta["input_shape"]) != ds.input_shape:
            raise AttackError(f"{path} was trained on {meta['dataset']} {meta['input_shape']}, not {ds.describe()}")
        name = f"{meta['activation']}-{meta['training']}"
        if name in named:  # two checkpoints of one kind: tell them apart by file
            name = f"{name} ({Path(path).name})"
        named[name] = (path, model)
    points = {}
    evals = evaluate_models({k: m for k, (_, m) in named.items()}, ds, attacks=attacks, eps=eps, budget=budget,
                            attack_grad=attack_grad, sweep=sweep, sweep_eps=sweep_eps, seed=seed, shard=shard, log=log,
                            progress_bar=progress_bar, on_points=points.__setitem__)
    if not shard.main:
        leave_process_group()
        return None
    settings = {"data": ds.describe(), "eps": next(iter(evals.values()))["eps"], "attack_grad": attack_grad,
                "attacks": attacks, "device": str(device), "processes": shard.world}
    results = new_results("attack", portable_command(argv), settings, seed=seed, expected_models=len(named))
    for name, (path, model) in named.items():
        meta = model.dqa_meta
        add_model(results, name=name, activation=meta["activation"], training=meta["training"], checkpoint=path,
                  ev=evals[name], history=meta["history"], config=meta["config"], folder=out)
    results["wall_seconds"] = time.time() - t0
    paths = write_report(results, out)
    adversarial.clear(out)  # an earlier run's images in this (our own) folder would read as this one's
    for name, (path, _) in named.items():
        adversarial.save(out, name, points[name], eps=settings["eps"], checkpoint=path)
    log(f"wrote {paths['report']} and the adversarial images behind it ({adversarial.FOLDER}/)")
    leave_process_group()
    return paths["report"]
