"""Each attack lowers an undefended model's accuracy on the embedded data; the true-gradient mode
shows gradient masking on a DQA model; the substitute attack and the public API run end to end."""
import numpy as np
import pytest
import torch

from dqa_ext.robust.attacks import AttackError, Budget, TrueGradient, evaluate, run_attack, true_gradient
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.models import dqa_modules
from dqa_ext.robust.substitute import train_substitute
from dqa_ext.robust.train import TrainConfig, train

ARCH = {"channels": [16, 32], "hidden": 64, "kernel": 3}
FAST = Budget(n=200, pgd_steps=10, apgd_steps=10, cw_n=20, cw_steps=30, cw_search=3, zoo_n=3, zoo_steps=20,
              zoo_parallel=128, square_queries=100, sub_seeds=150, sub_rounds=3, sub_epochs=5, sweep_n=50)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def _trained(mnist, tmp_path_factory, act):
    out = tmp_path_factory.mktemp(act) / "m.pt"
    cfg = TrainConfig(activation=act, arch_kwargs=ARCH, epochs=2, out=str(out), progress=False)
    return train(cfg, dataset=mnist, log=lambda *_: None)


@pytest.fixture(scope="module")
def relu_model(mnist, tmp_path_factory):
    return _trained(mnist, tmp_path_factory, "relu")


@pytest.fixture(scope="module")
def dqa_model(mnist, tmp_path_factory):
    return _trained(mnist, tmp_path_factory, "dqa2")


def _attack(name, model, mnist, n, **kw):
    return run_attack(name, model, mnist.x_test[:n], mnist.y_test[:n], 0.3, FAST,
                      x_seed=mnist.x_test[-FAST.sub_seeds:], **kw)


def _clean(model, mnist, n):
    with torch.no_grad():
        return (model(mnist.x_test[:n]).argmax(1) == mnist.y_test[:n]).float().mean().item()


def test_pgd_drives_an_undefended_cnn_under_ten_percent(relu_model, mnist):
    assert _clean(relu_model, mnist, 200) > 0.9
    r = _attack("pgd", relu_model, mnist, 200)
    assert r["acc"] < 0.10 and r["n"] == 200 and r["budget"]["pgd_steps"] == 10


@pytest.mark.parametrize("name,n,limit", [("fgsm", 200, 0.5), ("apgd", 100, 0.1), ("square", 50, 0.7)])
def test_bounded_attacks_lower_accuracy(relu_model, mnist, name, n, limit):
    assert _attack(name, relu_model, mnist, n)["acc"] < min(limit, _clean(relu_model, mnist, n) - 0.2)


def test_cw_is_unbounded_and_succeeds(relu_model, mnist):
    r = _attack("cw", relu_model, mnist, 20)
    assert r["success_rate"] > 0.9 and 0 < r["median_l2"] < 4


def test_art_cw_cross_checks_the_project_cw(relu_model, mnist):
    """ART's CarliniL2Method (slow, so on 4 images) agrees that the undefended model falls."""
    import dataclasses

    b = dataclasses.replace(FAST, cw_steps=20, cw_search=2, cw_const=5.0)
    x, y = mnist.x_test[:4], mnist.y_test[:4]
    art = run_attack("cw_art", relu_model, x, y, 0.3, b)
    ours = run_attack("cw", relu_model, x, y, 0.3, b)
    assert art["grad"] == "bpda" and art["budget"] == ours["budget"]
    assert art["success_rate"] >= 0.5 and ours["success_rate"] >= 0.5


def test_zoo_finds_adversarials_without_gradients(relu_model, mnist):
    r = _attack("zoo", relu_model, mnist, 3)
    assert r["success_rate"] > 0 and r["grad"] == "none"


def test_substitute_attack_end_to_end(relu_model, mnist):
    r = _attack("substitute", relu_model, mnist, 100)
    assert r["queries"] == 150 * 2 ** (FAST.sub_rounds - 1)
    assert r["agreement"] > 0.5
    assert r["acc"] <= min(r["acc_fgsm"], r["acc_pgd"]) and r["acc"] < _clean(relu_model, mnist, 100) - 0.1


def test_substitute_only_sees_labels(mnist):
    calls = []

    class Oracle(torch.nn.Module):
        def forward(self, x):
            calls.append(x.requires_grad)
            return torch.nn.functional.one_hot((x.mean((1, 2, 3)) * 100).long() % 10, 10).float()

    sub, queries = train_substitute(Oracle(), mnist.x_test[:20], rounds=2, epochs=1)
    assert queries == 40 and not any(calls)


def test_true_gradient_masks_a_dqa_model(dqa_model, mnist):
    """The quantizer's true derivative is zero: PGD then reports near-clean accuracy, BPDA does not."""
    clean = _clean(dqa_model, mnist, 200)
    assert clean > 0.8
    zero = _attack("pgd", dqa_model, mnist, 200, attack_grad="zero")
    bpda = _attack("pgd", dqa_model, mnist, 200)
    # Only the random start moves the input: accuracy stays near clean (uniform noise of 0.3 costs a
    # few points), while the same PGD with straight-through gradients breaks the model.
    assert zero["grad"] == "zero" and zero["acc"] > clean - 0.12
    assert bpda["acc"] < 0.3 and bpda["acc"] < zero["acc"] - 0.5
    assert _attack("fgsm", dqa_model, mnist, 200, attack_grad="zero")["acc"] == pytest.approx(clean)
    x = mnist.x_test[:4].clone().requires_grad_(True)
    TrueGradient(dqa_model)(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    with true_gradient(dqa_model):
        pass
    assert all(not m._forward_hooks for _, m in dqa_modules(dqa_model))  # hooks removed


def test_evaluate_api_worst_case_and_sweep(relu_model, mnist):
    b = Budget(n=60, pgd_steps=5, cw_n=10, cw_steps=10, cw_search=2, apgd_steps=5, sweep_n=30)
    res = evaluate(relu_model, (mnist.x_test, mnist.y_test), attacks=["fgsm", "pgd", "cw"], budget=b,
                   sweep_eps=[0, 0.1, 0.3], log=lambda *_: None)
    wc = res["worst_case"]
    assert wc["full"]["n"] == 60 and wc["all"]["n"] == 10 and wc["full"]["attacks"] == ["fgsm", "pgd"]
    per = np.minimum.reduce([np.array(res["attacks"][a]["correct"][:10]) for a in ("fgsm", "pgd", "cw")])
    assert wc["all"]["acc"] == pytest.approx(per.mean())
    assert wc["full"]["acc"] <= min(res["attacks"]["fgsm"]["acc"], res["attacks"]["pgd"]["acc"])
    assert res["sweep"]["eps"] == [0, 0.1, 0.3] and res["sweep"]["pgd"][0] >= res["sweep"]["pgd"][-1]
    assert res["budget"]["pgd_steps"] == 5 and res["eps"] == 0.3
    with pytest.raises(AttackError, match="unknown attack"):
        evaluate(relu_model, mnist, attacks=["deepfool"])
    with pytest.raises(AttackError, match=r"\[0, 1\]"):
        evaluate(relu_model, (mnist.x_test * 255, mnist.y_test), attacks=["fgsm"])
