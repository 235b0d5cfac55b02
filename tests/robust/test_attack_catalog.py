"""The attack catalog is the one list of attacks: an attack added there (one entry, its runner in a
file of its own) appears in the CLI help, runs from `dqa attack`, and shows in results.json and the
report with its label, description and budget; the budget is made of the attacks' settings."""
import dataclasses
import json

import pytest
import torch

from dqa_ext.robust.attacks import catalog
from dqa_ext.robust.attacks.budget import Budget, knobs
from dqa_ext.robust.attacks.common import example_uniform, project_linf
from dqa_ext.robust.attacks.spec import AttackSpec, Knob, Outcome, Target
from dqa_ext.robust.errors import AttackError
from support.robust import dqa, untrained_checkpoint


def run_corners(t: Target) -> Outcome:
    """Random corners of the epsilon ball, ``corner_tries`` per image (the toy attack's own file)."""
    broken, x_adv = torch.zeros(len(t.x), dtype=torch.bool), t.x.clone()
    for k in range(t.budget.corner_tries):
        sign = torch.randint(0, 2, t.x.shape, generator=torch.Generator().manual_seed(t.seed + k)) * 2.0 - 1
        cand = project_linf(t.x + t.eps * sign.to(t.x.device), t.x, t.eps)
        with torch.no_grad():
            wrong = (t.model(cand).argmax(1) != t.y).cpu() & ~broken
        x_adv[wrong.to(t.x.device)] = cand[wrong.to(t.x.device)]
        broken |= wrong
    return Outcome(broken, x_adv, {"tries": t.budget.corner_tries})


CORNERS = AttackSpec("corners", "Random corners", "black-box", "cascade", run_corners,
                     "random corners of the epsilon ball", knobs=(Knob("corner_tries", 3, "corners per image"),),
                     default=False)


@pytest.fixture
def with_corners(monkeypatch):
    """The catalog with one more entry, as a contributor would add it."""
    monkeypatch.setattr(catalog, "CATALOG", catalog.CATALOG + (CORNERS,))


def test_an_attack_added_to_the_catalog_runs_everywhere(with_corners, capsys, tmp_path):
    with pytest.raises(SystemExit):
        dqa(["attack", "--help"])
    help_text = capsys.readouterr().out
    assert "corners" in help_text and "corner_tries" in help_text
    ckpt, out = untrained_checkpoint(tmp_path / "m.pt"), tmp_path / "rep"
    assert dqa(["attack", ckpt, "--attacks", "fgsm,corners", "--budget", "corner_tries=2", "--n-images", "30",
                "--no-sweep", "--out", out]) == 0
    ev = json.loads((out / "results.json").read_text())["models"][0]["eval"]
    r = ev["cascade"]["corners"]
    assert (r["label"], r["budget"], r["tries"]) == ("Random corners", {"corner_tries": 2}, 2)
    assert r["attacked"] == sum(ev["clean"]["correct"]) and ev["budget"]["corner_tries"] == 2
    assert "corners" in ev["worst_case"]["attacks"]
    md = (out / "report.md").read_text()
    assert "| Random corners |" in md and "- **Random corners**: random corners of the epsilon ball." in md
    assert "| corner_tries | 2 |" in md


def test_the_default_suite_and_labels_come_from_the_catalog(with_corners):
    assert "corners" in catalog.attack_names() and "corners" not in catalog.default_attacks()
    assert catalog.label("corners") == "Random corners" and catalog.label("rerun_2x") == "Rerun x2"
    assert Budget().corner_tries == 3 and "corner_tries" in knobs()


def test_every_setting_is_declared_by_exactly_one_attack(monkeypatch):
    specs = catalog.specs()
    names = [k.name for s in specs for k in s.knobs]
    assert len(names) == len(set(names))
    assert all(s.label and s.description and s.family and s.runner for s in specs)
    twice = dataclasses.replace(CORNERS, knobs=(Knob("apgd_steps", 3, "again"),))
    monkeypatch.setattr(catalog, "CATALOG", catalog.CATALOG + (twice,))
    with pytest.raises(RuntimeError, match="apgd_steps.* declared by apgd_ce and corners"):
        catalog.specs()


def test_budget_checks_each_setting():
    with pytest.raises(AttackError, match="zoo_n must be >= 1"):
        Budget(zoo_n=0).validate()
    with pytest.raises(AttackError, match="apgd_t_targets must be <= 9"):
        Budget(apgd_t_targets=12).validate()
    with pytest.raises(AttackError, match="an integer"):
        Budget(apgd_steps=2.5).validate()
    with pytest.raises(AttackError, match="anneal_t_start_low <= anneal_t_start"):
        Budget(anneal_t_start_low=2.0).validate()
    with pytest.raises(AttackError, match="unknown budget setting 'speed'"):
        Budget(speed=3)
    doubled = Budget().scaled(2)
    assert doubled.apgd_steps == 2 * Budget().apgd_steps and doubled.square_queries == Budget().square_queries


def test_random_streams_are_keyed_by_example_not_by_batch():
    a = example_uniform([3, 7, 9], (2, 2), seed=1, tag="t")
    b = example_uniform([9, 3], (2, 2), seed=1, tag="t")
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


def test_the_convergence_rerun_is_the_attack_with_the_highest_break_rate():
    from dqa_ext.robust.evaluate import most_effective

    ran = ["twin_clip", "twin_sig_low", "twin_anneal"]
    # twin_clip broke the most images, but twin_anneal still breaks a third of what it sees
    assert most_effective(ran, {"twin_clip": 22, "twin_sig_low": 14, "twin_anneal": 21},
                          {"twin_clip": 82, "twin_sig_low": 60, "twin_anneal": 46}) == "twin_anneal"
    assert most_effective(ran, {"twin_clip": 5, "twin_sig_low": 0, "twin_anneal": 0},
                          {"twin_clip": 10, "twin_sig_low": 5, "twin_anneal": 5}) == "twin_clip"
    # nothing broke anything (or nothing was left to attack): the family's last, strongest attack
    assert most_effective(ran, dict.fromkeys(ran, 0), dict.fromkeys(ran, 0)) == "twin_anneal"


@pytest.mark.parametrize("kind,grad", [("identity", [1.0, 1.0, 1.0]), ("leaky_clip", [0.1, 1.0, 0.1]),
                                       ("leaky_sigmoid", [0.1, None, 0.1])])
def test_non_saturating_backwards_reach_dead_and_saturated_units(kind, grad):
    import dqa_ext
    from dqa_ext.robust.attacks.adaptive import quantizers_as

    net = torch.nn.Sequential(dqa_ext.DQAReLU(bits=2, mode="fixed")).eval()  # step 1/3: saturates at 1
    x = torch.tensor([[-1.0, 0.2, 5.0]], requires_grad=True)  # a dead, a live and a saturated unit
    exact = net(x)
    exact.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 0.0]]  # the straight-through estimate: nothing from two of them
    x.grad = None
    with quantizers_as(net, "bpda", kind, 0.2, 0.1):
        out = net(x)
    out.sum().backward()
    assert torch.equal(out, exact)  # BPDA: the exact forward
    assert all(g is None or abs(a - g) < 1e-6 for a, g in zip(x.grad[0].tolist(), grad))
    assert (x.grad != 0).all()


class _Staircase(torch.nn.Module):
    """Piecewise constant in the mean pixel (steps of 0.05, class 1 from 0.55 on): zero gradient
    everywhere, so only a search on the model itself can cross to the next step."""

    def forward(self, x):
        s = torch.floor(20 * x.flatten(1).mean(1)) / 20
        return torch.stack([0.525 - s, s - 0.525], 1)


def test_near_misses_keep_the_closest_point_and_the_repair_crosses_plateaus_from_it():
    from dqa_ext.robust.attacks.near import NearMisses
    from dqa_ext.robust.attacks.repair import run_repair

    x, y, ids = torch.full((2, 1, 4, 4), 0.3), torch.zeros(2, dtype=torch.long), torch.tensor([7, 9])
    near = NearMisses()
    near.offer(ids[:1], torch.tensor([0.5]), x[:1] + 0.1)
    near.offer(ids[:1], torch.tensor([0.05]), x[:1] + 0.24)  # mean 0.54: one step short, margin 0.05
    near.offer(ids[:1], torch.tensor([0.2]), x[:1] + 0.2)    # farther: not kept
    near.offer(ids[1:], torch.tensor([-0.1]), x[1:] + 0.3)   # a break, not a near miss
    assert near.margin(7) == pytest.approx(0.05) and torch.allclose(near.point(7), x[0] + 0.24) and near.point(9) is None
    assert torch.equal(near.gradient_point(7), near.point(7))
    # A score-based search's closer point becomes the closest one, but not the gradient attacks'.
    near.offer(ids[:1], torch.tensor([0.04]), x[:1] + 0.245, source="search")
    assert near.margin(7) == pytest.approx(0.04) and torch.allclose(near.point(7), x[0] + 0.245)
    assert torch.allclose(near.gradient_point(7), x[0] + 0.24)
    with pytest.raises(ValueError, match="source must be"):
        near.offer(ids[:1], torch.tensor([0.01]), x[:1], source="mystery")
    model = _Staircase()
    assert (model(near.point(7)[None]).argmax(1) == 0).all()
    # Any single pixel moved leaves the margin unchanged: only a search that accepts ties gets anywhere.
    o = run_repair(Target(model, x, y, ids, 0.3, Budget(repair_queries=300), near=near))
    assert o.broken.tolist() == [True, False] and o.info["near_misses"] == 1  # image 9 had no near miss
    assert (model(o.x_adv[:1]).argmax(1) == 1).all() and (o.x_adv - x).abs().max() <= 0.3 + 1e-6


def test_square_offers_its_closest_points_and_runs_before_the_searches_that_start_from_them():
    from dqa_ext.robust.attacks import catalog
    from dqa_ext.robust.attacks.common import margin
    from dqa_ext.robust.attacks.near import NearMisses
    from dqa_ext.robust.attacks.scorebased import square_linf

    # From a mean pixel of 0.1 the ball (eps 0.3) reaches 0.4 at most: class 1 (0.55) is out of reach,
    # so images 7 and 8 survive with a margin of at least 0.25; image 9 (mean 0.5) can be broken.
    x = torch.cat([torch.full((2, 1, 4, 4), 0.1), torch.full((1, 1, 4, 4), 0.5)])
    y, ids = torch.zeros(3, dtype=torch.long), torch.tensor([7, 8, 9])
    model, near = _Staircase(), NearMisses()
    broken, adv = square_linf(model, x, y, ids, 0.3, queries=50, near=near)
    assert not broken[:2].any()
    for k, i in enumerate(ids.tolist()):
        if broken[k]:
            assert near.point(i) is None  # a break is not a near miss
        else:
            m = margin(model(adv[k:k + 1]), y[k:k + 1]).item()
            assert m > 0 and near.margin(i) == pytest.approx(m) and torch.equal(near.point(i), adv[k])
            assert near._gradient.get(i) is None  # a search's point, not a gradient attack's
    # The near-miss restarts start from the closest point of every attack before them, Square's and
    # the repair's included (on the default report's ReLU model that order broke two more images).
    order = [s.name for s in catalog.specs() if s.stage == "cascade"]
    assert order.index("square") < order.index("repair") < order.index("twin_anneal_near") < order.index("pgd_near")


def test_evaluations_run_with_tf32_off_and_restore_it(monkeypatch):
    from dqa_ext.robust import checks
    from dqa_ext.robust.evaluate import evaluate_model

    seen = []
    real = checks.predictions
    monkeypatch.setattr(checks, "predictions", lambda *a: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or real(*a))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        evaluate_model(model, torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), eps=0.1,
                              budget=Budget(n=4, apgd_steps=2, apgd_restarts=1), attacks=["apgd_ce"], sweep=False,
                              log=lambda *_: None, num_classes=3)
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_near_miss_restarts_take_their_own_steps(monkeypatch):
    """Through the twin the near-miss restarts take near_steps (long: the temperature falls slowly);
    with the model's own gradients near_pgd_steps. Both start from the same near misses."""
    from dqa_ext.robust.attacks import anneal
    from dqa_ext.robust.attacks.near import NearMisses

    seen = {}

    def record(model, x, y, ids, eps, *, steps, through, **kw):
        seen[through] = (steps, kw["restarts"], len(x))
        return torch.zeros(len(x), dtype=torch.bool), x.clone(), torch.zeros(len(x), dtype=torch.long)

    monkeypatch.setattr(anneal, "anneal_starts", record)
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    near = NearMisses()
    near.offer(torch.tensor([5, 7]), torch.tensor([0.3, 0.2]), x[1:] * 0.9)
    b = Budget(near_steps=7, near_pgd_steps=3, near_restarts=2)
    for runner in (anneal.run_twin_anneal_near, anneal.run_pgd_near):
        out = runner(Target(torch.nn.Identity(), x, y, torch.tensor([4, 5, 7]), 0.1, b, near=near))
        assert out.info["near_misses"] == 2 and not out.broken.any()
    assert seen == {"twin": (7, 2, 2), "model": (3, 2, 2)}
    assert Budget().near_steps == 400 and Budget().near_pgd_steps == 100
