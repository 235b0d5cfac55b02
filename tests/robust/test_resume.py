"""A run continues where it stopped: --resume replays the same epochs to identical parameters,
refuses changed settings (naming them), another WORLD_SIZE, or a schedule it would stretch; an
existing checkpoint is only replaced with --force."""
import pytest
import torch

from dqa_ext.robust.checkpoint import read_checkpoint
from dqa_ext.robust.config import TrainConfig
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.errors import TrainError
from dqa_ext.robust.train import train
from support.robust import SMALL_ARCH, dqa, one_line_error

pytestmark = [pytest.mark.slow]

TINY = ["--channels", "8,16", "--hidden", "32", "--kernel", "3", "--n-train", "128", "--epochs", "1"]


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


BASE = dict(activation="dqa2", arch_kwargs={"channels": [8, 16], "hidden": 32, "kernel": 3}, epochs=2, n_train=128,
            batch_size=64, progress=False)


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A finished 2-epoch checkpoint (Adam)."""
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    train(TrainConfig(**BASE, out=str(path)), dataset=mnist, log=lambda *_: None)
    return path


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("change,names", [
    ({"lr": 0.01}, ["lr"]), ({"optimizer": "sgd"}, ["optimizer"]), ({"batch_size": 32}, ["batch_size"]),
    ({"seed": 1}, ["seed"]), ({"n_train": 64}, ["n_train"]), ({"adv": True, "pgd_steps": 3}, ["adv", "pgd_steps"]),
    ({"arch_kwargs": {"channels": [4, 16], "hidden": 32, "kernel": 3}}, ["arch_kwargs"]),
])
def test_resume_refuses_changed_settings(mnist, trained, tmp_path, change, names):
    path = _copy(trained, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(TrainError, match="--resume") as e:
        train(TrainConfig(**{**BASE, **change}, out=str(path), resume=True), dataset=mnist,
                        log=lambda *_: None)
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value)
    assert path.read_bytes() == before


def test_resume_with_changed_channels_on_the_command_line(capsys, trained, tmp_path):
    path = _copy(trained, tmp_path / "m.pt")
    args = ["train", "--act", "dqa2", "--hidden", "32", "--kernel", "3", "--n-train", "128", "--epochs", "2",
            "--out", path, "--resume"]
    err = one_line_error(capsys, args + ["--channels", "4,16"])
    assert "arch_kwargs" in err and "size mismatch" not in err
    assert "lr 0.001 -> 0.01" in one_line_error(capsys, args + ["--channels", "8,16", "--lr", "0.01"])
    before = path.read_bytes()
    assert dqa(args + ["--channels", "8,16"]) == 0  # the same settings: already finished, nothing to do
    out = capsys.readouterr().out
    assert "already trained for 2 epochs" in out and "wrote" not in out and path.read_bytes() == before


def test_resume_epochs(mnist, trained, tmp_path):
    path = _copy(trained, tmp_path / "m.pt")
    cfg = dict(BASE, out=str(path), resume=True)
    with pytest.raises(TrainError, match="already trained for 2 epochs, more than --epochs 1"):
        train(TrainConfig(**{**cfg, "epochs": 1}), dataset=mnist, log=lambda *_: None)
    logs = []
    done = train(TrainConfig(**cfg), dataset=mnist, log=logs.append)
    assert "nothing to do" in logs[-1] and len(done.dqa_meta["history"]) == 2 and done.dqa_meta["epochs_run"] == 0
    more = train(TrainConfig(**{**cfg, "epochs": 3}), dataset=mnist, log=logs.append)
    assert [h["epoch"] for h in more.dqa_meta["history"]] == [1, 2, 3]
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["meta"]["config"]["epochs"] == 3


def test_resume_cannot_stretch_an_sgd_schedule(mnist, tmp_path):
    path = tmp_path / "sgd.pt"
    cfg = dict(BASE, epochs=1, optimizer="sgd", out=str(path))
    train(TrainConfig(**cfg), dataset=mnist, log=lambda *_: None)
    with pytest.raises(TrainError, match="cosine schedule over 1 epochs"):
        train(TrainConfig(**{**cfg, "epochs": 2}, resume=True), dataset=mnist, log=lambda *_: None)


def test_existing_checkpoint_needs_resume_or_force(capsys, mnist, trained, tmp_path):
    path = _copy(trained, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(TrainError, match="already exists .*trained for 2 epoch.*--resume.*--force"):
        train(TrainConfig(**BASE, out=str(path)), dataset=mnist, log=lambda *_: None)
    assert "--force" in one_line_error(capsys, ["train", "--out", path] + TINY)
    assert path.read_bytes() == before
    model = train(TrainConfig(**{**BASE, "epochs": 1}, out=str(path), force=True), dataset=mnist,
                            log=lambda *_: None)
    assert len(model.dqa_meta["history"]) == 1 and read_checkpoint(path)["epoch"] == 1


def test_interrupted_run_resumes_to_identical_parameters(mnist, tmp_path):
    # eps ramped over both epochs: two epochs at chance after the warm-up would stop the run
    base = dict(activation="dqa2", adv=True, pgd_steps=2, eps_warmup=2.0, arch_kwargs=SMALL_ARCH, epochs=2,
                n_train=256, batch_size=64, progress=False)
    full = train(TrainConfig(**base, out=str(tmp_path / "full.pt")), dataset=mnist, log=lambda *_: None)

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    path = str(tmp_path / "cut.pt")
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=path), dataset=mnist, log=lambda *_: None, on_epoch_end=interrupt)
    assert read_checkpoint(path)["epoch"] == 1
    logs = []
    resumed = train(TrainConfig(**base, out=path, resume=True), dataset=mnist, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert [h["epoch"] for h in resumed.dqa_meta["history"]] == [1, 2]
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
    with pytest.raises(TrainError, match="activation"):
        train(TrainConfig(**{**base, "activation": "relu"}, out=path, resume=True), dataset=mnist,
              log=lambda *_: None)


def test_resume_refuses_another_world_size_and_accepts_checkpoints_without_it(mnist, tmp_path, monkeypatch):
    # Each rank trains on its shard of the data: another WORLD_SIZE is another run.
    import torch.distributed as dist

    base = dict(activation="dqa2", arch_kwargs=SMALL_ARCH, n_train=64, batch_size=32, progress=False,
                optimizer="adam")
    path = tmp_path / "m.pt"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(TrainConfig(**base, epochs=1, out=str(path)), dataset=mnist, log=lambda *_: None)
    ckpt = read_checkpoint(path)
    assert ckpt["meta"]["world_size"] == 1

    def no_process_group(*args, **kwargs):
        raise AssertionError("the world size must be checked before the process group starts")

    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match="WORLD_SIZE=1 but this run has WORLD_SIZE=2") as e:
        train(TrainConfig(**base, epochs=2, out=str(path), resume=True), dataset=mnist, log=lambda *_: None)
    assert "\n" not in str(e.value)
    monkeypatch.delenv("WORLD_SIZE")

    ckpt["meta"]["world_size"] = 4
    torch.save(ckpt, path)
    with pytest.raises(TrainError, match="WORLD_SIZE=4 but this run has WORLD_SIZE=1"):
        train(TrainConfig(**base, epochs=2, out=str(path), resume=True), dataset=mnist, log=lambda *_: None)

    del ckpt["meta"]["world_size"]  # written before the field existed
    torch.save(ckpt, path)
    resumed = train(TrainConfig(**base, epochs=2, out=str(path), resume=True), dataset=mnist,
                    log=lambda *_: None)
    assert [h["epoch"] for h in resumed.dqa_meta["history"]] == [1, 2]
    assert read_checkpoint(path)["meta"]["world_size"] == 1
