"""Helpers of the toolkit's tests (tests/robust/): data files in the real formats, checkpoints that
need no training, synthetic evaluation results, and the `dqa` command run in-process."""
import gzip
import pickle

import numpy as np
import torch

TINY_ARCH = {"channels": [4, 8], "hidden": 16, "kernel": 3}
SMALL_ARCH = {"channels": [8, 16], "hidden": 32, "kernel": 3}


# ------------------------------------------------------------------ the command
def dqa(argv) -> int:
    from dqa_ext.robust.cli import main

    return main([str(a) for a in argv])


def forbid_work(monkeypatch) -> None:
    """Makes a command fail the test if it starts loading data (its first piece of work): every check
    of its arguments must come before."""
    import importlib

    def work(*a, **k):
        raise AssertionError("the command started working before rejecting its arguments")

    for mod in ("train", "attack_checkpoints", "reproduce"):
        monkeypatch.setattr(importlib.import_module(f"dqa_ext.robust.{mod}"), "load_dataset", work)


def one_line_error(capsys, argv) -> str:
    """Runs `dqa ARGV`, which must fail with exit status 2 and exactly one line on stderr."""
    assert dqa(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dqa: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ data in the real formats
def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=12, n_test=5, gz=False, seed=0) -> dict:
    """The four MNIST IDX files (random pixels and labels); returns the arrays by file name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in arrays.items():
        data = _idx(arr)
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def write_cifar(root, n=4, seed=0) -> dict:
    """cifar-10-batches-py under root (random pixels and labels); returns the batches by file name."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return batches


# ------------------------------------------------------------------ models without training
def untrained_checkpoint(path, activation="relu", arch_kwargs=TINY_ARCH, seed=0, training="standard"):
    """A `dqa train` checkpoint of an untrained MNIST CNN (no training: for tests of the commands)."""
    from dqa_ext.robust.checkpoint import write_checkpoint
    from dqa_ext.robust.models import build_model, materialize

    torch.manual_seed(seed)
    model = build_model("mnist_cnn", activation, (1, 28, 28), 10, **arch_kwargs)
    materialize(model, torch.rand(8, 1, 28, 28))
    meta = {"arch": "mnist_cnn", "arch_kwargs": dict(arch_kwargs), "activation": activation, "training": training,
            "dataset": "mnist5k", "input_shape": [1, 28, 28], "num_classes": 10, "world_size": 1,
            "config": {"out": str(path), "activation": activation}}
    write_checkpoint(path, meta=meta, epoch=1, history=[], model=model)
    return path


# ------------------------------------------------------------------ synthetic evaluations
def status(broke, attacked, n=100):
    return [0] * broke + [1] * (attacked - broke) + [None] * (n - attacked)


def evaluation(wc=0.3, **checks) -> dict:
    """An evaluation result of 100 images as evaluate() writes it, with honest-looking checks;
    keyword arguments replace single checks."""
    n = 100
    ev = {"eps": 0.3, "n": n, "clean": {"acc": 0.99, "n": n, "correct": [1] * 99 + [0]},
          "budget": {"n": n, "apgd_steps": 100},
          "cascade": {"apgd_ce": {"attack": "apgd_ce", "label": "APGD-CE", "attacked": 99, "broke": 60,
                                  "status": status(60, 99), "robust_after": 0.39, "budget": {}},
                      "rerun_2x": {"attack": "rerun_2x", "label": "Rerun x2", "attacked": 39, "broke": 0,
                                   "rerun_of": "apgd_ce", "status": [None] * 60 + [1] * 39 + [None],
                                   "robust_after": 0.39, "budget": {}}},
          "paper": {"fgsm": {"acc": 0.5, "n": n, "correct": [1] * 50 + [0] * 50},
                    "pgd": {"acc": 0.4, "n": n, "correct": [1] * 40 + [0] * 60}},
          "worst_case": {"acc": wc, "n": n, "robust": [1] * int(wc * n) + [0] * (n - int(wc * n))},
          "checks": {"predictions": {"top_class": 3, "top_share": 0.12, "finite": True, "n": n, "num_classes": 10},
                     "convergence": {"attack": "apgd_ce", "extra_broken": 0, "survivors": 39, "n": n},
                     "ste_vs_quant_aware": {"only_quant_aware": 0, "n": n, "ran": True},
                     "black_box_vs_gradient": {"only_black_box": 0, "n": n},
                     "sanity": {"eps": 1.0, "acc": 0.0, "n": n},
                     "sweep": {"eps": [0, 0.1, 0.3], "n": n, "acc": [0.99, 0.6, 0.3], "attack": "APGD-CE",
                               "steps": 50}},
          "steps": {"1": [0.5, 0.7], "4": [0.2, 0.3, 0.4]}}
    ev["checks"].update(checks)
    return ev


def results_of(*evs, producer="reproduce", names=("dqa2-pgd", "relu-standard", "fixed2-pgd")) -> dict:
    """A results.json of these evaluations, as `dqa reproduce` writes it."""
    return {"tool": "dqa_ext.robust", "schema": 2, "producer": producer, "command": f"dqa {producer} --out X",
            "settings": {"data": "mnist5k", "eps": 0.3}, "wall_seconds": 12.0, "provenance": {"torch": "x"},
            "expected_models": len(evs), "complete": True,
            "models": [{"name": names[i], "eval": ev, "train": {"history": [
                {"epoch": 1, "loss": 0.5, "test_acc": 0.9, "seconds": 3.0}]}} for i, ev in enumerate(evs)]}
