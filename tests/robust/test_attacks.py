"""The attacks on trained models: each lowers an undefended model's accuracy; the twin attack beats
a straight-through gradient that points the wrong way (in a user's own DQAReLU subclass); the
convergence check fires on an under-budgeted run; our APGD, Square and C&W hold their own against
ART's; the paper's attacks and the substitute run; the true gradient masks a quantized model."""
import numpy as np
import pytest
import torch

import dqa_ext
from dqa_ext.robust.attacks import Budget, TrueGradient, true_gradient
from dqa_ext.robust.attacks.adaptive import Variant, quantizers_as, surrogate
from dqa_ext.robust.attacks.common import input_gradients_only
from dqa_ext.robust.attacks.scorebased import square_linf
from dqa_ext.robust.attacks.substitute import train_substitute
from dqa_ext.robust.attacks.transfer import transfer_candidates
from dqa_ext.robust.attacks.whitebox import apgd
from dqa_ext.robust.checks import flags
from dqa_ext.robust.config import TrainConfig
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.errors import AttackError
from dqa_ext.robust.evaluate import evaluate, evaluate_model, run_attack, run_cascade_attack
from dqa_ext.robust.models import dqa_modules
from dqa_ext.robust.train import train

pytestmark = [pytest.mark.slow]

ARCH = {"channels": [16, 32], "hidden": 64, "kernel": 3}
FAST = Budget(n=100, apgd_steps=20, apgd_restarts=1, apgd_t_targets=3, square_queries=300, repair_queries=100,
              twin_steps=20, twin_targets=2, anneal_steps=20, anneal_restarts=1, transfer_steps=10, sweep_n=40,
              sweep_steps=10, pgd_steps=10, cw_n=20, cw_steps=30, cw_search=3, zoo_n=3, zoo_steps=20, sub_seeds=150,
              sub_rounds=3, sub_epochs=5)
EPS = 0.3


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


def _xy(mnist, n):
    return mnist.x_test[:n], mnist.y_test[:n]


def _clean(model, mnist, n):
    x, y = _xy(mnist, n)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _cascade(name, model, mnist, n, budget=FAST, eps=EPS, sources=None):
    x, y = _xy(mnist, n)
    with input_gradients_only(model):
        broken, _, info = run_cascade_attack(name, model, x, y, torch.arange(n), eps, budget, sources=sources)
    assert "unverified" not in info
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    return float((clean & ~broken).float().mean()), broken, info


@pytest.mark.parametrize("name,limit", [("apgd_ce", 0.05), ("apgd_t", 0.05), ("square", 0.6)])
def test_each_attack_lowers_an_undefended_relu_model(relu_model, mnist, name, limit):
    assert _clean(relu_model, mnist, 100) > 0.85
    acc, broken, _ = _cascade(name, relu_model, mnist, 100)
    assert acc < limit


@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t", "twin_clip", "twin_sig_low", "twin_sig_high", "bpda_sig",
                                  "twin_anneal"])
def test_each_gradient_attack_lowers_an_undefended_dqa_model(dqa_model, mnist, name):
    assert _clean(dqa_model, mnist, 100) > 0.85
    acc, _, _ = _cascade(name, dqa_model, mnist, 100)
    assert acc < 0.3


def test_transfer_from_a_relu_model_breaks_an_undefended_dqa_model(relu_model, dqa_model, mnist):
    x, y = _xy(mnist, 100)
    cand = transfer_candidates(relu_model, x, y, torch.arange(100), EPS, steps=10)
    assert (cand - x).abs().max() <= EPS + 1e-6 and cand.min() >= 0 and cand.max() <= 1
    acc, _, info = _cascade("transfer", dqa_model, mnist, 100, sources={"relu": cand})
    assert acc < _clean(dqa_model, mnist, 100) - 0.3 and info["sources"] == ["relu"]


class _GradientTimes(torch.autograd.Function):
    """Identity forward, the gradient times ``scale`` backward: -1 is a straight-through estimate
    that points the wrong way, 0 a masked one."""

    @staticmethod
    def forward(ctx, y, scale):
        ctx.scale = scale
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class WrongWayQuantizer(dqa_ext.DQAReLU):
    """A user's subclass (another class name: the attacks must find it by type)."""

    def forward(self, x):
        return _GradientTimes.apply(super().forward(x), -1.0)


def _sabotaged(model):
    import copy

    m = copy.deepcopy(model)
    for name, mod in dqa_modules(m):
        bad = WrongWayQuantizer(bits=mod.bits, mode=mod.mode, num_channels=mod.num_channels)
        bad.load_state_dict(mod.state_dict())
        parent = m
        *path, last = name.split(".")
        for p in path:
            parent = getattr(parent, p)
        setattr(parent, last, bad)
    return m.eval()


def test_twin_attack_finds_what_a_wrong_way_straight_through_gradient_hides(dqa_model, mnist):
    model = _sabotaged(dqa_model)
    x, y = _xy(mnist, 100)
    with torch.no_grad():  # same forward as the model it came from
        assert torch.equal(model(x), dqa_model(x))
    ste, _, _ = _cascade("apgd_ce", model, mnist, 100)
    twin, _, _ = _cascade("twin_clip", model, mnist, 100)
    assert twin < 0.3 and twin < ste - 0.3, (ste, twin)
    ev = evaluate_model(model, x, y, eps=EPS, budget=FAST, attacks=["apgd_ce", "twin_clip"], sweep=False,
                        log=lambda *_: None)
    gap = ev["checks"]["ste_vs_quant_aware"]["only_quant_aware"]
    assert gap == ev["cascade"]["twin_clip"]["broke"] >= 30
    assert any("straight-through gradients are masked" in f for f in flags(ev))


def test_twin_forwards_are_the_surrogates_and_are_restored(dqa_model, mnist):
    x = mnist.x_test[:8]
    with torch.no_grad():
        exact = dqa_model(x)
        with quantizers_as(dqa_model, "bpda", "sigmoid", 0.5):
            assert torch.equal(dqa_model(x), exact)  # BPDA keeps the exact forward
        twin = Variant(dqa_model, "twin", "sigmoid", 1e-3)(x)
        assert (twin.argmax(1) == exact.argmax(1)).float().mean() > 0.8  # a near-quantizer at low T
        assert torch.equal(dqa_model(x), exact)
    assert all("forward" not in m.__dict__ for _, m in dqa_modules(dqa_model))
    s = torch.tensor([0.5])
    v = torch.linspace(-1, 3, 101)
    torch.testing.assert_close(surrogate("clip", v, s, 3), v.clamp(0, 1.5))
    q = (v / s).round().clamp(0, 3) * s
    far = ((v / s) - (v / s).round()).abs() < 0.4  # away from the thresholds
    torch.testing.assert_close(surrogate("sigmoid", v, s, 3, 0.01)[far], q[far], atol=1e-4, rtol=0)


def test_annealed_twin_runs_each_start_on_its_own_schedule(dqa_model, mnist, monkeypatch):
    """The starts of one image run side by side, each annealing from its own t0 (smooth or sharp)
    down to t_end; the temperatures the twin runs at are recorded from inside the surrogate."""
    from dqa_ext.robust.attacks import adaptive, anneal

    plans = [anneal.start_plan(r, 1.0, 0.1) for r in range(8)]
    # the historical restarts first: uniform starts, CE/DLR/margin in turn, smooth and sharp alternating
    assert [(p["loss"], p["t0"], p["start"]) for p in plans[:4]] == [
        (0, 1.0, "uniform"), (1, 0.1, "uniform"), (2, 1.0, "uniform"), (0, 0.1, "uniform")]
    later = [anneal.start_plan(r, 1.0, 0.1) for r in range(40, 112)]
    assert {(p["loss"], p["t0"]) for p in later[:8]} == {(k, t) for k in range(4) for t in (1.0, 0.1)}
    assert {p["start"] for p in later} == {"uniform", "image", "vertex"} and len({p["step"] for p in later}) == 3
    seen = []
    real = adaptive.surrogate
    monkeypatch.setattr(adaptive, "surrogate", lambda kind, x, s, q, temp=0.1, leak=0.0:
                        seen.append(temp) or real(kind, x, s, q, temp, leak))
    x, y = mnist.x_test[:2], mnist.y_test[:2]
    with torch.no_grad():
        right = dqa_model(x).argmax(1) == y
    x, y = x[right][:1], y[right][:1]
    # An epsilon of 0 keeps the image robust, so every start runs all its steps.
    broken, _, hits = anneal.anneal_starts(dqa_model, x, y, torch.arange(1), 0.0, steps=5, restarts=8, t_start=1.0,
                                             t_end=0.01, t_start_low=0.1)
    assert not broken.any() and hits.tolist() == [0]
    per_step = torch.stack(seen[::len(dqa_modules(dqa_model))]).reshape(5, 8)
    for r, p in enumerate(plans):
        run = per_step[:, r].tolist()
        assert run[0] == pytest.approx(p["t0"]) and run[-1] == pytest.approx(0.01)
        assert all(a > b for a, b in zip(run, run[1:]))  # falls geometrically


def test_annealed_twin_counts_the_starts_that_break_each_image(dqa_model, mnist):
    from dqa_ext.robust.attacks import adaptive, anneal

    x, y = _xy(mnist, 20)
    broken, x_adv, hits = anneal.anneal_starts(dqa_model, x, y, torch.arange(20), EPS, steps=10, restarts=6,
                                                 t_start=1.0, t_end=0.03, t_start_low=0.3)
    assert broken.any() and torch.equal(broken, hits > 0) and int(hits.max()) <= 6
    with torch.no_grad():
        assert (dqa_model(x_adv[broken]).argmax(1) != y[broken]).all()
    assert (x_adv - x).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("name", ["twin_anneal_near", "pgd_near"])
def test_near_miss_starts_break_from_near_points_and_skip_images_without_one(relu_model, dqa_model, mnist,
                                                                             monkeypatch, name):
    """twin_anneal_near (through the twin) and pgd_near (the model's own gradients: a ReLU model's
    too) start each image around its near miss (sharp temperatures, cosine steps with momentum);
    images with no near miss are not attacked."""
    from dqa_ext.robust.attacks import adaptive, anneal
    from dqa_ext.robust.attacks.near import NearMisses
    from dqa_ext.robust.attacks.spec import Target

    plans = [anneal.near_plan(r, 0.3, 0.01) for r in range(8)]
    assert {p["start"] for p in plans} == {"near"} and {p["loss"] for p in plans} == {0, 1, 2, 3}
    assert sorted({p["t0"] for p in plans}) == pytest.approx([0.1, 0.3]) and all(
        p["momentum"] > 0 and p["schedule"] == "cosine" for p in plans)
    for origin in (0, 1):  # each origin gets every loss and both temperatures
        mine = [p for p in plans if p["origin"] == origin]
        assert {p["loss"] for p in mine} == {0, 1, 2, 3} and len({p["t0"] for p in mine}) == 2
    model = relu_model if name == "pgd_near" else dqa_model
    if name == "pgd_near":  # no twin: the model's own gradients
        monkeypatch.setattr(anneal, "Variant", None)
    x, y = _xy(mnist, 40)
    found, x_apgd = apgd(model, x, y, torch.arange(40), EPS, steps=20, restarts=1, loss="ce")
    assert found.sum() >= 4
    near = NearMisses()
    broke = torch.nonzero(found).flatten()
    # points a little short of APGD's breaks, on the real model's right side of the boundary
    for i in broke.tolist():
        for a in (0.9, 0.8, 0.6, 0.4, 0.2):
            p = x[i] + a * (x_apgd[i] - x[i])
            with torch.no_grad():
                m = model(p[None]).float()[0]
            gap = m[y[i]] - m[torch.arange(10) != y[i]].max()
            if gap > 0:
                near.offer(torch.tensor([i]), gap[None], p[None])
                break
    have = [i for i in range(40) if near.point(i) is not None]
    assert len(have) >= 3
    budget = FAST.replace(near_steps=20, near_pgd_steps=20, near_restarts=4)
    t = Target(model, x, y, torch.arange(40), EPS, budget, near=near)
    out = getattr(anneal, f"run_{name}")(t)
    assert out.info["near_misses"] == len(have) and out.info["starts"] == 4
    assert ("temperature" in out.info) == (name == "twin_anneal_near")
    assert not out.broken[[i for i in range(40) if i not in have]].any()
    assert out.broken.any()
    with torch.no_grad():
        assert (model(out.x_adv[out.broken]).argmax(1) != y[out.broken]).all()
    assert (out.x_adv - x).abs().max() <= EPS + 1e-6
    assert sorted(i for i, _ in out.info["start_hits"]) == torch.nonzero(out.broken).flatten().tolist()


def test_the_annealed_twin_counts_only_the_breaks_the_model_itself_confirms(dqa_model, mnist, monkeypatch):
    """Iterates are checked on a faster copy of the model; a break counts only once the model agrees."""
    from dqa_ext.robust.attacks import adaptive, anneal

    class Liar(torch.nn.Module):  # a "copy" that misclassifies everything the model gets right
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return -self.inner(x)

    monkeypatch.setattr(anneal, "_twin_layout", Liar)
    x, y = _xy(mnist, 10)
    with torch.no_grad():
        right = dqa_model(x).argmax(1) == y
    x, y = x[right][:3], y[right][:3]
    broken, _, hits = anneal.anneal_starts(dqa_model, x, y, torch.arange(len(x)), 0.0, steps=3, restarts=2,
                                             t_start=1.0, t_end=0.1)
    assert not broken.any() and hits.sum() == 0


def test_a_twin_runs_a_channels_last_copy_and_leaves_the_model_alone(dqa_model, mnist):
    """On a CPU the twin differentiates a channels_last copy (faster convolutions); its gradients are
    the model's twin's, and the model itself is not converted or touched."""
    from dqa_ext.robust.attacks import adaptive, anneal

    x, y = _xy(mnist, 8)
    before = {k: (v.clone(), v.stride()) for k, v in dqa_model.state_dict().items()}
    twin = Variant(dqa_model, "twin", "sigmoid", 0.2)
    assert twin.model is not dqa_model
    assert next(m for m in twin.model.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last)
    plain = Variant(dqa_model, "twin", "sigmoid", 0.2)
    plain.model = dqa_model  # the same twin on the model as it is
    grads = []
    for v in (twin, plain):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(v(xr), y), xr)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3 * grads[1].abs().max().item())
    assert all(torch.equal(v, before[k][0]) and v.stride() == before[k][1] for k, v in dqa_model.state_dict().items())
    assert adaptive.Variant(dqa_model, "bpda", "sigmoid", 0.2).model is dqa_model  # the exact forward: the model


def test_convergence_check_fires_on_an_under_budgeted_run(relu_model, mnist):
    x, y = _xy(mnist, 100)
    tiny = FAST.replace(apgd_steps=1, apgd_restarts=1)
    ev = evaluate_model(relu_model, x, y, eps=0.08, budget=tiny, attacks=["apgd_ce"], sweep=False, log=lambda *_: None)
    conv = ev["checks"]["convergence"]
    assert conv["attack"] == "apgd_ce" and conv["extra_broken"] > 1
    assert conv["images"] == [i for i, s in enumerate(ev["cascade"]["rerun_2x"]["status"]) if s == 0]
    assert any(f.startswith("not converged") for f in flags(ev))
    # the rerun attacked exactly the survivors, and the worst case counts what it broke
    first, rerun = ev["cascade"]["apgd_ce"], ev["cascade"]["rerun_2x"]
    survivors = [i for i, s in enumerate(first["status"]) if s == 1]
    assert [i for i, s in enumerate(rerun["status"]) if s is not None] == survivors
    assert rerun["budget"]["apgd_steps"] == 2 and rerun["budget"]["apgd_restarts"] == 2
    assert ev["worst_case"]["acc"] == pytest.approx(first["robust_after"] - rerun["broke"] / 100)


class _Masked(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_GradientTimes.apply(x, 0.0))  # no input gradient anywhere


def test_the_large_epsilon_check_can_fail(relu_model, mnist):
    # Started from a random point of the eps=1 box (a random image) it would read 0% whatever the
    # gradients do; from the image itself a model with no input gradient keeps every image.
    x, y = _xy(mnist, 40)
    ev = evaluate_model(_Masked(relu_model).eval(), x, y, eps=0.1, budget=FAST.replace(n=40, apgd_steps=5),
                        attacks=["apgd_ce"], sweep=False, log=lambda *_: None)
    assert ev["checks"]["sanity"]["acc"] == pytest.approx(ev["clean"]["acc"]) and ev["clean"]["acc"] > 0.5
    assert any(f.startswith("APGD-CE at epsilon 1 leaves") for f in flags(ev))


def test_evaluate_keeps_per_example_results(relu_model, mnist):
    ev = evaluate(relu_model, (mnist.x_test, mnist.y_test), attacks=["fgsm", "pgd", "apgd_ce", "square"],
                  budget=FAST.replace(n=60), sweep_eps=[0, 0.1, 0.3], log=lambda *_: None)
    assert ev["n"] == 60 and len(ev["worst_case"]["robust"]) == 60
    robust = np.array(ev["clean"]["correct"], bool)
    for r in ev["cascade"].values():
        robust &= np.array([s != 0 for s in r["status"]])
    for a in ("fgsm", "pgd"):
        robust &= np.array(ev["paper"][a]["correct"], bool)
    assert ev["worst_case"]["robust"] == robust.astype(int).tolist()
    sw = ev["checks"]["sweep"]
    assert sw["eps"] == [0, 0.1, 0.3] and sw["acc"][0] >= sw["acc"][-1]
    assert ev["checks"]["sanity"]["acc"] == 0.0
    with pytest.raises(AttackError, match="unknown attack"):
        evaluate(relu_model, mnist, attacks=["deepfool"])
    with pytest.raises(AttackError, match=r"\[0, 1\]"):
        evaluate(relu_model, (mnist.x_test * 255, mnist.y_test), attacks=["fgsm"])


def test_our_apgd_is_at_least_as_strong_as_arts(relu_model, mnist):
    x, y = _xy(mnist, 100)
    b = FAST.replace(apgd_steps=20, apgd_restarts=1)
    art = run_attack("apgd_art", relu_model, x, y, 0.1, b)
    with input_gradients_only(relu_model):
        broken, _ = apgd(relu_model, x, y, torch.arange(100), 0.1, steps=20, restarts=1, loss="ce")
    with torch.no_grad():
        ours = ((relu_model(x).argmax(1) == y) & ~broken).float().mean().item()
    assert ours <= art["acc"] + 0.03, (ours, art["acc"])


def test_our_square_is_at_least_as_strong_as_arts(relu_model, mnist):
    x, y = _xy(mnist, 60)
    b = FAST.replace(square_queries=200)
    art = run_attack("square_art", relu_model, x, y, EPS, b)
    broken, adv = square_linf(relu_model, x, y, torch.arange(60), EPS, queries=200)
    assert (adv - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        ours = ((relu_model(x).argmax(1) == y) & ~broken).float().mean().item()
    assert ours <= art["acc"] + 0.05, (ours, art["acc"])


# ------------------------------------------------------------------ the paper's attacks
def _paper(name, model, mnist, n, **kw):
    x, y = _xy(mnist, n)
    return run_attack(name, model, x, y, EPS, FAST, x_seed=mnist.x_test[-FAST.sub_seeds:], **kw)


@pytest.mark.parametrize("name,n,limit", [("fgsm", 100, 0.5), ("pgd", 100, 0.1)])
def test_paper_bounded_attacks_lower_accuracy(relu_model, mnist, name, n, limit):
    assert _paper(name, relu_model, mnist, n)["acc"] < limit


def test_cw_is_unbounded_and_succeeds(relu_model, mnist):
    r = _paper("cw", relu_model, mnist, 20)
    assert r["success_rate"] > 0.9 and 0 < r["median_l2"] < 4


def test_art_cw_cross_checks_the_project_cw(relu_model, mnist):
    """ART's CarliniL2Method (slow, so on 4 images) agrees that the undefended model falls."""
    b = FAST.replace(cw_steps=20, cw_search=2, cw_const=5.0)
    x, y = mnist.x_test[:4], mnist.y_test[:4]
    art = run_attack("cw_art", relu_model, x, y, EPS, b)
    ours = run_attack("cw", relu_model, x, y, EPS, b)
    assert art["grad"] == "ste" and art["budget"] == ours["budget"]
    assert art["success_rate"] >= 0.5 and ours["success_rate"] >= 0.5


def test_zoo_finds_adversarials_without_gradients(relu_model, mnist):
    r = _paper("zoo", relu_model, mnist, 3)
    assert r["success_rate"] > 0 and r["grad"] == "none"


def test_substitute_attack_end_to_end(relu_model, mnist):
    r = _paper("substitute", relu_model, mnist, 100)
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
    """The quantizer's true derivative is zero: PGD then reports near-clean accuracy, STE does not."""
    clean = _clean(dqa_model, mnist, 100)
    assert clean > 0.8
    zero = _paper("pgd", dqa_model, mnist, 100, attack_grad="zero")
    ste = _paper("pgd", dqa_model, mnist, 100)
    # Only the random start moves the input: accuracy stays near clean (uniform noise of 0.3 costs a
    # few points), while the same PGD with straight-through gradients breaks the model.
    assert zero["grad"] == "zero" and zero["acc"] > clean - 0.12
    assert ste["acc"] < 0.3 and ste["acc"] < zero["acc"] - 0.5
    x = mnist.x_test[:4].clone().requires_grad_(True)
    TrueGradient(dqa_model)(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    with true_gradient(dqa_model):
        pass
    assert all("forward" not in m.__dict__ for _, m in dqa_modules(dqa_model))
