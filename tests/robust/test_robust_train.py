"""Models' shapes, training lowers the loss, checkpoints resume exactly, PGD training stays in the ball."""
import pytest
import torch

import dqa_ext
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.models import ModelError, build_model, learned_steps, materialize, parse_activation
from dqa_ext.robust.train import TrainConfig, TrainError, load_model, pgd_attack, read_checkpoint, train

SMALL = {"channels": [8, 16], "hidden": 32, "kernel": 3}


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


@pytest.mark.parametrize("arch,shape,n_dqa", [("mnist_cnn", (1, 28, 28), 3), ("resnet20", (3, 32, 32), 19)])
@pytest.mark.parametrize("act", ["relu", "fixed2", "dqa1", "dqa3"])
def test_model_shapes_and_activations(arch, shape, n_dqa, act):
    model = build_model(arch, act, shape, 10, **({"width": 4} if arch == "resnet20" else SMALL))
    x = torch.rand(2, *shape)
    materialize(model, x)
    assert model(x).shape == (2, 10)
    dqa = [m for m in model.modules() if isinstance(m, dqa_ext.DQAReLU)]
    assert len(dqa) == (0 if act == "relu" else n_dqa)
    if act != "relu":
        mode, bits = parse_activation(act)
        assert all(m.bits == bits and m.mode == mode for m in dqa)
        assert bool(learned_steps(model)) == (mode == "dynamic")


@pytest.mark.parametrize("name", ["relu4", "dqa", "fixed0", "DQA2", "gelu"])
def test_bad_activation_names(name):
    with pytest.raises(ModelError, match="relu, fixed<b> or dqa<b>"):
        parse_activation(name)


def test_short_run_lowers_the_loss(mnist, tmp_path):
    cfg = TrainConfig(activation="dqa2", arch_kwargs=SMALL, epochs=2, n_train=1000, out=str(tmp_path / "m.pt"),
                      progress=False)
    model = train(cfg, dataset=mnist, log=lambda *_: None)
    hist = model.dqa_meta["history"]
    assert hist[1]["loss"] < hist[0]["loss"] < 2.3
    assert hist[1]["test_acc"] > 0.3  # chance is 0.1
    loaded = load_model(tmp_path / "m.pt")
    assert not loaded.training
    x = mnist.x_test[:50]
    assert torch.equal(loaded(x), model(x))  # both in eval mode
    assert read_checkpoint(tmp_path / "m.pt")["epoch"] == 2


def test_interrupted_run_resumes_to_identical_parameters(mnist, tmp_path):
    base = dict(activation="dqa2", adv=True, pgd_steps=2, arch_kwargs=SMALL, epochs=2, n_train=256,
                batch_size=64, progress=False)
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


def test_pgd_attack_stays_in_the_ball_and_raises_the_loss(mnist):
    torch.manual_seed(0)
    model = build_model("mnist_cnn", "relu", (1, 28, 28), **SMALL).eval()
    x, y = mnist.x_test[:32], mnist.y_test[:32]
    adv = pgd_attack(model, x, y, 0.3, 5, 0.1)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(TrainError, match="cannot read checkpoint"):
        load_model(tmp_path / "junk.pt")


def test_resume_refuses_another_world_size_and_accepts_checkpoints_without_it(mnist, tmp_path, monkeypatch):
    # Each rank trains on its shard of the data: another WORLD_SIZE is another run.
    import torch.distributed as dist

    base = dict(activation="dqa2", arch_kwargs=SMALL, n_train=64, batch_size=32, progress=False,
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
