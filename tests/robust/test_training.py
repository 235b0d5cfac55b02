"""Models' shapes and activations, training lowers the loss and writes a checkpoint that loads back
the same model, PGD training stays in the ball, and a run that collapses to chance stops and says
what to do."""
import pytest
import torch

import dqa_ext
from dqa_ext.robust.checkpoint import load_model, read_checkpoint
from dqa_ext.robust.config import TrainConfig
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.models import ModelError, build_model, learned_steps, materialize, parse_activation
from dqa_ext.robust.train import pgd_attack, train
from support.robust import SMALL_ARCH as SMALL
from support.robust import dqa, one_line_error


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


@pytest.mark.slow
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


def test_pgd_attack_stays_in_the_ball_and_raises_the_loss(mnist):
    torch.manual_seed(0)
    model = build_model("mnist_cnn", "relu", (1, 28, 28), **SMALL).eval()
    x, y = mnist.x_test[:32], mnist.y_test[:32]
    adv = pgd_attack(model, x, y, 0.3, 5, 0.1)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)


@pytest.mark.slow
def test_pgd_training_from_scratch_stops_at_chance_and_says_what_to_do(capsys, tmp_path):
    """PGD training from scratch at MNIST's eps 0.3 sits on the constant-prediction plateau (test
    accuracy 0.100): the second epoch at chance after the warm-up stops the run, keeps its checkpoint
    and names the warm start and the eps warm-up."""
    out = tmp_path / "m.pt"
    err = one_line_error(capsys, ["train", "--act", "dqa2", "--adv", "--epochs", "10", "--out", out])
    assert "test accuracy 0.100 is at chance 2 epoch(s) after the eps warm-up: the model collapsed" in err
    assert "--init-from std.pt --eps-warmup 1" in err
    ckpt = read_checkpoint(out)
    assert ckpt["epoch"] == 2 and [h.get("collapsed") for h in ckpt["history"]] == [True, True]


@pytest.mark.slow
def test_the_documented_warm_start_trains_a_robust_model(tmp_path):
    """docs/robust.md's example (on the first 1000 training images: the whole of it takes minutes):
    a standard model, then PGD training from it with the eps ramped up."""
    std, adv, first = tmp_path / "std.pt", tmp_path / "m.pt", ["--n-train", "1000"]
    assert dqa(["train", "--act", "dqa2", "--epochs", "3", "--out", std] + first) == 0
    assert dqa(["train", "--act", "dqa2", "--adv", "--init-from", std, "--eps-warmup", "1", "--epochs", "5",
                "--out", adv] + first) == 0
    history = read_checkpoint(adv)["history"]
    assert history[-1]["test_acc"] > 0.8 and history[-1]["train_acc"] > 0.3  # adversarial training accuracy
    assert not any(h.get("collapsed") for h in history)
