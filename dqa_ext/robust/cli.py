"""The `dqa` command (also `python -m dqa_ext.robust`): train, attack, report, reproduce and info.

Each command parses its arguments and calls one library function. Every user error (bad arguments,
missing data, bad names or files) prints one line `dqa: error: ...` on stderr and exits 2; Ctrl-C
prints one line and exits 130; a closed stdout (`dqa info | head`) ends quietly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .._extras import missing_robust_extra
from .attacks import catalog
from .attacks.budget import knobs
from .errors import USER_ERRORS, quote

DESCRIPTION = "Train fixed and dynamic quantized-activation networks and measure their robustness honestly."


class UsageError(Exception):
    """A user error found by the parser: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: `--n` for `--n-train` works here but not under torchrun, whose own parser
        # reads every option of the command line first (tests/robust checks each flag through it).
        super().__init__(*args, allow_abbrev=False, formatter_class=_Help, **kwargs)

    def error(self, message):  # argparse would print the usage and exit; we want one line
        raise UsageError(message)


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (when it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


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


def _add_data(p):
    p.add_argument("--data", default="mnist5k", metavar="NAME", help="mnist5k (embedded), mnist or cifar10")
    p.add_argument("--data-dir", metavar="DIR", help="folder with the MNIST IDX files or cifar-10-batches-py")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random stream")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_budget(p):
    p.add_argument("--budget", action="append", metavar="KEY=VALUE",
                   help=f"override a budget setting; repeatable. Keys: {', '.join(knobs())}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; its help is read from the attack catalog when it is built."""
    from .._backend import _version as package_version
    from .attack_checkpoints import DEFAULT_OUT as ATTACK_OUT
    from .merge import DEFAULT_OUT as MERGE_OUT
    from .presets import PRESETS
    from .reproduce import DEFAULT_OUT as REPRODUCE_OUT

    parser = _Parser(prog="dqa", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dqa_ext {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train one model (standard or PGD adversarial training)")
    _add_data(t)
    t.add_argument("--act", "--activation", dest="activation", default="relu", metavar="NAME",
                   help="relu, fixed<b> or dqa<b>, b in 1..3")
    t.add_argument("--adv", action="store_true", help="PGD adversarial training (Madry et al.); from scratch it "
                   "collapses at MNIST's eps: start from a standard model (--init-from) with --eps-warmup")
    t.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's weights (a standard model of "
                   "the same architecture: the warm start of `dqa reproduce`'s PGD models)")
    t.add_argument("--arch", choices=["mnist_cnn", "resnet20"], help="default: by the data's channels")
    t.add_argument("--channels", type=_ints, metavar="C1,C2", help="mnist_cnn conv channels (32,64)")
    t.add_argument("--hidden", type=int, metavar="N", help="mnist_cnn hidden units (256)")
    t.add_argument("--kernel", type=int, metavar="K", help="mnist_cnn kernel size (5)")
    t.add_argument("--width", type=int, metavar="N", help="resnet20 base width (16)")
    t.add_argument("--epochs", type=int, default=5, metavar="N", help="epochs to train (in all, with --resume)")
    t.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per step")
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="default: adam for MNIST, sgd for CIFAR-10")
    t.add_argument("--lr", type=float, metavar="RATE", help="default: 1e-3 (adam), 0.1 (sgd)")
    t.add_argument("--eps", type=float, metavar="EPS", help="training epsilon (default 0.3 MNIST, 8/255 CIFAR-10)")
    t.add_argument("--pgd-steps", type=int, default=7, metavar="N", help="PGD steps per training batch")
    t.add_argument("--pgd-step-size", type=float, metavar="SIZE", help="default 2.5 * eps / steps")
    t.add_argument("--eps-warmup", type=float, default=0.0, metavar="EPOCHS",
                   help="epochs over which eps ramps up from 0")
    t.add_argument("--n-train", type=int, metavar="N", help="use only the first N training images")
    t.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    t.add_argument("--out", default="model.pt", metavar="PATH", help="checkpoint path (written atomically each epoch)")
    t.add_argument("--resume", action="store_true", help="continue from --out's last epoch (same settings; "
                   "--epochs may grow for Adam runs)")
    t.add_argument("--force", action="store_true", help="overwrite an existing --out instead of refusing")

    a = sub.add_parser("attack", help="attack trained checkpoints and write results.json + report.md")
    a.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by `dqa train`")
    _add_data(a)
    a.add_argument("--attacks", default=None, type=lambda v: [x for x in v.split(",") if x], metavar="NAMES",
                   help=f"comma-separated names (default: {','.join(catalog.default_attacks())}; "
                        f"all: {','.join(catalog.attack_names())})")
    a.add_argument("--eps", type=float, metavar="EPS", help="L-inf epsilon (default 0.3 MNIST, 8/255 CIFAR-10)")
    a.add_argument("--attack-grad", choices=["bpda", "zero"], default="bpda",
                   help="bpda: straight-through gradients; zero: the quantizer's true derivative")
    a.add_argument("--n-images", type=int, metavar="N", help="test images for the bounded attacks (the budget's n)")
    _add_budget(a)
    a.add_argument("--sweep-eps", type=_floats, metavar="E1,E2,...",
                   help="epsilons for the accuracy curves (default: 0 to 4/3 of --eps)")
    a.add_argument("--no-sweep", action="store_true", help="skip the accuracy-vs-epsilon curves")
    a.add_argument("--out", default=ATTACK_OUT, metavar="DIR", help="output folder")

    r = sub.add_parser("report", help="re-render report.md and plots from a results.json")
    r.add_argument("path", nargs="?", default=REPRODUCE_OUT, metavar="PATH",
                   help="folder holding results.json, or the file")
    r.add_argument("--out", metavar="DIR", help="output folder (default: the results' folder)")

    g = sub.add_parser("merge", help="merge several runs' per-image results on the same checkpoints into one "
                                     "worst case")
    g.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files (or their folders) of "
                   "`dqa attack` / `dqa reproduce` runs on the same checkpoints and images")
    g.add_argument("--out", default=MERGE_OUT, metavar="DIR", help="output folder")

    v = sub.add_parser("verify", help="check every saved adversarial image of a report again on its checkpoint")
    v.add_argument("path", nargs="?", default=REPRODUCE_OUT, metavar="PATH",
                   help="report folder (results.json, the checkpoints it names, adversarial/)")
    v.add_argument("--checkpoint-dir", metavar="DIR", help="folder of the checkpoints that results.json names "
                   "(default: the report's folder; `dqa reproduce` keeps them there)")
    v.add_argument("--data-dir", metavar="DIR", help="folder with the MNIST IDX files or cifar-10-batches-py")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    sub.add_parser("info", help="print the backend and versions (JSON)")

    p = sub.add_parser("reproduce", help="the paper's experiment matrix, trained, attacked and reported")
    p.add_argument("--out", default=REPRODUCE_OUT, metavar="DIR", help="output folder")
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="default: relu/fixed2/dqa2 on the embedded MNIST subset; matrix: bits 1-3 there; "
                        "paper: bits 1-3 on full MNIST and CIFAR-10 (for a GPU); smoke: a tiny run")
    p.add_argument("--quick", action="store_true",
                   help="keep the preset's matrix, shrink epochs, data and budgets to a smoke run")
    p.add_argument("--data-dir", metavar="DIR",
                   help="for --preset paper: folder with MNIST IDX files and cifar-10-batches-py")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random stream")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="reuse/continue the checkpoints under --out")
    p.add_argument("--force", action="store_true", help="retrain over existing checkpoints under --out")
    _add_budget(p)
    return parser


# ------------------------------------------------------------------ the commands
def _train(ns, argv) -> int:
    from .config import TrainConfig
    from .train import train

    arch_kwargs = {k: v for k, v in (("channels", ns.channels), ("hidden", ns.hidden), ("kernel", ns.kernel),
                                     ("width", ns.width)) if v is not None}
    model = train(TrainConfig(data=ns.data, data_dir=ns.data_dir, activation=ns.activation, adv=ns.adv, arch=ns.arch,
                              arch_kwargs=arch_kwargs, epochs=ns.epochs, batch_size=ns.batch_size,
                              optimizer=ns.optimizer, lr=ns.lr, eps=ns.eps, pgd_steps=ns.pgd_steps,
                              pgd_step_size=ns.pgd_step_size, eps_warmup=ns.eps_warmup, n_train=ns.n_train,
                              init_from=ns.init_from, seed=ns.seed, device=ns.device, amp=not ns.no_amp, out=ns.out,
                              resume=ns.resume, force=ns.force))
    from .distributed import world_from_env

    # epochs_run 0: a resumed checkpoint that was already finished; under torchrun rank 0 wrote it.
    if model.dqa_meta["epochs_run"] and world_from_env()[1] == 0:
        print(f"wrote {ns.out}")
    return 0


def _attack(ns, argv) -> int:
    from .attack_checkpoints import attack_checkpoints
    from .attacks.budget import parse_budget_items

    attack_checkpoints(ns.checkpoints, data=ns.data, data_dir=ns.data_dir, attacks=ns.attacks, eps=ns.eps,
                       attack_grad=ns.attack_grad, n_images=ns.n_images, budget=parse_budget_items(ns.budget),
                       sweep=not ns.no_sweep, sweep_eps=ns.sweep_eps, seed=ns.seed, device=ns.device, out=ns.out,
                       argv=argv)
    return 0


def _report(ns, argv) -> int:
    from .report import rerender

    print(f"wrote {rerender(ns.path, ns.out)['report']}")
    return 0


def _merge(ns, argv) -> int:
    from .merge import merge_runs
    from .provenance import portable_command

    merge_runs(ns.results, ns.out, command=portable_command(argv))
    return 0


def _verify(ns, argv) -> int:
    from .adversarial import verify
    from .devices import resolve_device

    verify(ns.path, checkpoint_dir=ns.checkpoint_dir, data_dir=ns.data_dir, device=resolve_device(ns.device))
    print("every saved adversarial image holds")
    return 0


def _info(ns, argv) -> int:
    import dqa_ext

    print(json.dumps(dqa_ext.backend_info(), indent=2, default=str), flush=True)
    return 0


def _reproduce(ns, argv) -> int:
    from .attacks.budget import parse_budget_items
    from .reproduce import reproduce

    reproduce(preset=ns.preset, out=ns.out, data_dir=ns.data_dir, device=ns.device, seed=ns.seed, resume=ns.resume,
              budget_overrides=parse_budget_items(ns.budget), argv=argv, force=ns.force, quick=ns.quick)
    return 0


COMMANDS = {"train": _train, "attack": _attack, "report": _report, "merge": _merge, "verify": _verify,
            "info": _info, "reproduce": _reproduce}
INTERRUPTED = {"train": "training checkpoints are kept; rerun with --resume",
               "reproduce": "checkpoints and finished evaluations are kept; rerun with --resume"}


def _error(message: str) -> int:
    print(f"dqa: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Entry point of `dqa` and `python -m dqa_ext.robust`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        ns = build_parser().parse_args(argv)
        command = ns.command
        return COMMANDS[command](ns, argv)
    except (UsageError, *USER_ERRORS) as e:
        return _error(quote(e, limit=2000))  # one line; our own messages are not cut
    except ModuleNotFoundError as e:
        msg = missing_robust_extra(e)
        if msg is None:
            raise
        return _error(msg)
    except KeyboardInterrupt:
        why = INTERRUPTED.get(command)
        print(f"dqa: interrupted ({why})" if why else "dqa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`dqa info | head`): nothing more to say, and nothing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
