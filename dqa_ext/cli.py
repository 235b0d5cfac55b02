"""The `dqa` command: train, attack, report, info and reproduce.

Every user error (bad arguments, missing data, bad names) prints one line `dqa: error: ...` on
stderr and exits 2; heavy imports (torch's training stack, ART, matplotlib) happen per command.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import sys

# What `dqa attack`, `report` and `reproduce` write into --out (checked before any work).
# report.FILES (spelled out: importing the report loads the attacks; a test keeps them equal)
REPORT_FILES = ("results.json", "report.md", "acc_vs_eps.png", "steps.png", "robust_vs_bits.png")


class UsageError(Exception):
    """A user error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit; we want one line
        raise UsageError(message)


def _floats(text: str):
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _budget_items(items):
    """--budget key=value pairs -> dict of numbers (validated against Budget's fields)."""
    from .robust.attacks import Budget

    fields = {f.name: f.type for f in __import__("dataclasses").fields(Budget)}
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--budget {item!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            out[key] = int(value) if fields[key] in (int, "int") else float(value)
        except ValueError:
            raise UsageError(f"--budget {item!r}: {value!r} is not a number") from None
    return out


def _need(*modules: str) -> None:
    """Import a command's optional dependencies up front: a missing one is reported (one line, see
    main) before any work, not after an epoch."""
    for name in modules:
        importlib.import_module(name)


def _positive(flag: str, value, *, allow_zero: bool = False) -> None:
    """None (the default) or a finite number > 0 (>= 0 with allow_zero)."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{flag} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _add_data(p):
    p.add_argument("--data", default="mnist5k", help="mnist5k (embedded, default), mnist or cifar10")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files or cifar-10-batches-py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dqa", description="Train fixed and dynamic quantized-activation networks and "
                     "measure their robustness honestly.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train one model (standard or PGD adversarial training)")
    _add_data(t)
    t.add_argument("--act", "--activation", dest="activation", default="relu",
                   help="relu, fixed<b> or dqa<b>, b in 1..3 (default relu)")
    t.add_argument("--adv", action="store_true", help="PGD adversarial training (Madry et al.)")
    t.add_argument("--arch", choices=["mnist_cnn", "resnet20"], help="default: by the data's channels")
    t.add_argument("--channels", type=_ints, help="mnist_cnn conv channels, e.g. 32,64")
    t.add_argument("--hidden", type=int, help="mnist_cnn hidden units")
    t.add_argument("--kernel", type=int, help="mnist_cnn kernel size")
    t.add_argument("--width", type=int, help="resnet20 base width (16)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", choices=["adam", "sgd"])
    t.add_argument("--lr", type=float)
    t.add_argument("--eps", type=float, help="training epsilon (default 0.3 MNIST, 8/255 CIFAR-10)")
    t.add_argument("--pgd-steps", type=int, default=7)
    t.add_argument("--pgd-step-size", type=float, help="default 2.5 * eps / steps")
    t.add_argument("--eps-warmup", type=float, default=0.0, help="epochs over which eps ramps up from 0")
    t.add_argument("--n-train", type=int, help="use only the first N training images")
    t.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    t.add_argument("--out", default="model.pt", help="checkpoint path (written atomically each epoch)")
    t.add_argument("--resume", action="store_true", help="continue from --out's last epoch (same settings; "
                   "--epochs may grow for Adam runs)")
    t.add_argument("--force", action="store_true", help="overwrite an existing --out instead of refusing")

    a = sub.add_parser("attack", help="attack trained checkpoints and write results.json + report.md")
    a.add_argument("checkpoints", nargs="+", help="checkpoints written by `dqa train`")
    _add_data(a)
    a.add_argument("--attacks", default=None,
                   help="comma-separated names (default: the adaptive suite apgd_ce,apgd_t,twin_clip,twin_sig_low,"
                        "twin_sig_high,bpda_sig,twin_anneal,square,transfer and the paper's fgsm,pgd,cw,zoo,substitute,pgd_zero; "
                        "cross-checks against ART: apgd_art,square_art,cw_art)")
    a.add_argument("--eps", type=float, help="L-inf epsilon (default 0.3 MNIST, 8/255 CIFAR-10)")
    a.add_argument("--attack-grad", choices=["bpda", "zero"], default="bpda",
                   help="bpda: straight-through gradients (default); zero: the quantizer's true derivative")
    a.add_argument("--n", type=int, help="test images for the bounded attacks (budget n)")
    a.add_argument("--budget", action="append", metavar="KEY=VALUE", help="override a budget setting; repeatable")
    a.add_argument("--sweep-eps", type=_floats, help="epsilons for the accuracy curves")
    a.add_argument("--no-sweep", action="store_true", help="skip the accuracy-vs-epsilon curves")
    a.add_argument("--out", default="dqa-report", help="output folder")

    r = sub.add_parser("report", help="re-render report.md and plots from a results.json")
    r.add_argument("path", nargs="?", default="dqa-report", help="folder holding results.json, or the file")
    r.add_argument("--out", help="output folder (default: the results' folder)")

    sub.add_parser("info", help="print the backend and versions (JSON)")

    p = sub.add_parser("reproduce", help="the paper's experiment matrix, trained, attacked and reported")
    p.add_argument("--out", default="dqa-report", help="output folder (default ./dqa-report)")
    p.add_argument("--preset", default="default", choices=["default", "matrix", "paper", "smoke"],
                   help="default: relu/fixed2/dqa2 on the embedded MNIST subset; matrix: bits 1-3 there; "
                        "paper: bits 1-3 on full MNIST and CIFAR-10 (for a GPU); smoke: a tiny run")
    p.add_argument("--quick", action="store_true",
                   help="keep the preset's matrix, shrink epochs, data and budgets to a smoke run")
    p.add_argument("--data-dir", help="for --preset paper: folder with MNIST IDX files and cifar-10-batches-py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="reuse/continue the checkpoints under --out")
    p.add_argument("--force", action="store_true", help="retrain over existing checkpoints under --out")
    p.add_argument("--budget", action="append", metavar="KEY=VALUE", help="override a budget setting; repeatable")
    return parser


def _cmd_train(ns) -> int:
    from .robust.models import default_arch
    from .robust.outputs import check_output_file
    from .robust.train import TrainConfig, check_arch_kwargs, train

    arch_kwargs = {k: v for k, v in (("channels", ns.channels), ("hidden", ns.hidden), ("kernel", ns.kernel),
                                     ("width", ns.width)) if v is not None}
    cfg = TrainConfig(data=ns.data, data_dir=ns.data_dir, activation=ns.activation, adv=ns.adv, arch=ns.arch,
                      arch_kwargs=arch_kwargs, epochs=ns.epochs, batch_size=ns.batch_size, optimizer=ns.optimizer,
                      lr=ns.lr, eps=ns.eps, pgd_steps=ns.pgd_steps, pgd_step_size=ns.pgd_step_size,
                      eps_warmup=ns.eps_warmup, n_train=ns.n_train, seed=ns.seed, device=ns.device,
                      amp=not ns.no_amp, out=ns.out, resume=ns.resume, force=ns.force).validate()
    # The architecture follows from the data's channels, so its settings can be checked now.
    check_arch_kwargs(arch_kwargs, ns.arch or default_arch((3 if ns.data == "cifar10" else 1, 1, 1)))
    check_output_file(ns.out, what="--out")
    _need("tqdm")
    model = train(cfg)
    if model.dqa_meta["epochs_run"]:  # 0: a resumed checkpoint that was already finished
        print(f"wrote {ns.out}")
    return 0


def _cmd_attack(ns) -> int:
    import time

    from .robust.attacks import ATTACKS, DEFAULT_ATTACKS, Budget, evaluate_models
    from .robust.attacks.shard import shard_from_env
    from .robust.distributed import leave_process_group
    from .robust.data import load_dataset
    from .robust.outputs import check_output_dir
    from .robust.report import write_report
    from .robust.reproduce import provenance
    from .robust.train import load_model, resolve_device

    attacks = ns.attacks.split(",") if ns.attacks else list(DEFAULT_ATTACKS)
    bad = [x for x in attacks if x not in ATTACKS]
    if bad:
        raise UsageError(f"--attacks: unknown {', '.join(bad)}; choose from {', '.join(ATTACKS)}")
    over = _budget_items(ns.budget)
    if ns.n is not None:
        if ns.n < 1:
            raise UsageError(f"--n must be an integer >= 1, got {ns.n}")
        over["n"] = ns.n
    budget = Budget(**over).validate()
    _positive("--eps", ns.eps)
    for e in ns.sweep_eps or []:
        _positive("--sweep-eps", e, allow_zero=True)
    t0 = time.time()
    device = resolve_device(ns.device)
    check_output_dir(ns.out, REPORT_FILES, what="--out")
    _need("art", "matplotlib")
    # Under torchrun every rank attacks its share of the images (the same per-example results as
    # one process) and rank 0 writes the report.
    shard, device = shard_from_env(device)
    # Every checkpoint is read and checked before the first attack runs.
    loaded = [(path, load_model(path, device)) for path in ns.checkpoints]
    ds = load_dataset(ns.data, ns.data_dir)
    for path, model in loaded:
        meta = model.dqa_meta
        if tuple(meta["input_shape"]) != ds.input_shape:
            raise UsageError(f"{path} was trained on {meta['dataset']} {meta['input_shape']}, not {ds.describe()}")
    named = {}
    for path, model in loaded:
        meta = model.dqa_meta
        name = f"{meta['activation']}-{meta['training']}"
        if name in named:  # two checkpoints of one kind: tell them apart by file
            name = f"{name} ({path})"
        named[name] = (path, model)
    # Every model is also attacked with the others' adversarial points (transfer).
    evals = evaluate_models({k: m for k, (_, m) in named.items()}, ds, attacks=attacks, eps=ns.eps, budget=budget,
                            attack_grad=ns.attack_grad, sweep=not ns.no_sweep, sweep_eps=ns.sweep_eps, seed=ns.seed,
                            shard=shard)
    if not shard.main:
        leave_process_group()
        return 0
    models = []
    for name, (path, model) in named.items():
        meta = model.dqa_meta
        models.append({"name": name, "activation": meta["activation"], "training": meta["training"],
                       "checkpoint": path, "eval": evals[name],
                       "train": {"history": meta["history"], "config": meta["config"]}})
    results = {"tool": "dqa_ext.robust", "command": "dqa " + shlex.join(sys.argv[1:] if ns._argv is None else ns._argv),
               "settings": {"data": ds.describe(), "eps": models[0]["eval"]["eps"], "attack_grad": ns.attack_grad,
                            "attacks": attacks, "device": str(device), "processes": shard.world},
               "provenance": provenance(ns.seed), "models": models, "wall_seconds": time.time() - t0}
    paths = write_report(results, ns.out)
    print(f"wrote {paths['report']}")
    leave_process_group()
    return 0


def _cmd_report(ns) -> int:
    from pathlib import Path

    from .robust.outputs import check_output_dir
    from .robust.report import load_results, write_report

    results = load_results(ns.path)
    src = Path(ns.path)
    out = ns.out or (src if src.is_dir() else src.parent)
    check_output_dir(out, REPORT_FILES, what="--out" if ns.out else "report folder")
    _need("matplotlib")
    paths = write_report(results, out)
    print(f"wrote {paths['report']}")
    return 0


def _cmd_info(ns) -> int:
    import dqa_ext

    print(json.dumps(dqa_ext.backend_info(), indent=2, default=str))
    return 0


def _reproduce_folders(preset: str) -> list[str]:
    """Subfolders of --out that a preset writes into: "" for one dataset, one per dataset else."""
    from .robust.reproduce import PRESETS

    datasets = PRESETS.get(preset, {}).get("datasets", [None])
    return [""] if len(datasets) <= 1 else [f"{d}/" for d in datasets]


def _check_reproduce_out(ns) -> None:
    """--out must take the reports and models/ checkpoints; existing checkpoints need --resume or --force."""
    from pathlib import Path

    from .robust.outputs import check_output_dir

    folders = _reproduce_folders(ns.preset)
    check_output_dir(ns.out, [f + n for f in folders for n in (*REPORT_FILES, "models/")], what="--out")
    if ns.resume or ns.force:
        return
    found = sorted(str(p) for f in folders for p in (Path(ns.out) / f / "models").glob("*.pt"))
    if found:
        raise UsageError(f"--out {ns.out} already holds checkpoints ({found[0]}{', ...' if len(found) > 1 else ''}); "
                         "use --resume to reuse them or --force to retrain")


def _cmd_reproduce(ns) -> int:
    from .robust.reproduce import reproduce
    from .robust.train import resolve_device

    if ns.preset == "paper" and not ns.data_dir:
        raise UsageError("--preset paper needs --data-dir with the MNIST IDX files and cifar-10-batches-py")
    budget = _budget_items(ns.budget)
    resolve_device(ns.device)
    _check_reproduce_out(ns)
    _need("art", "matplotlib", "tqdm")
    argv = ns._argv if ns._argv is not None else sys.argv[1:]
    reproduce(preset=ns.preset, out=ns.out, data_dir=ns.data_dir, device=ns.device, seed=ns.seed,
              resume=ns.resume, budget_overrides=budget, command="dqa " + shlex.join(argv), force=ns.force,
              quick=ns.quick)
    from .robust.distributed import leave_process_group

    leave_process_group()  # under torchrun (training joined the group)
    return 0


COMMANDS = {"train": _cmd_train, "attack": _cmd_attack, "report": _cmd_report, "info": _cmd_info,
            "reproduce": _cmd_reproduce}


def main(argv=None) -> int:
    """Entry point of `dqa` and `python -m dqa_ext`; returns the exit status."""
    from .robust.errors import USER_ERRORS

    try:
        ns = build_parser().parse_args(argv)
        ns._argv = list(argv) if argv is not None else None
        return COMMANDS[ns.command](ns)
    except (UsageError, *USER_ERRORS) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dqa: error: {msg}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        from ._extras import missing_robust_extra

        msg = missing_robust_extra(e)
        if msg is None:
            raise
        print(f"dqa: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dqa: interrupted (training checkpoints are kept; rerun with --resume)", file=sys.stderr)
        return 130
