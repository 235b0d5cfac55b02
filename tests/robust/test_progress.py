"""A long evaluation says where it is: every finished step with the share of the work done and the
time left (a bar with both on a terminal), the plan cut down as the cascade leaves fewer images."""
import io

import torch

from dqa_ext.robust.attacks.budget import Budget
from dqa_ext.robust.checkpoint import load_model
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.evaluate import evaluate_models
from dqa_ext.robust.progress import Progress
from support.robust import untrained_checkpoint


def test_lines_carry_the_share_done_and_the_time_left():
    lines, now = [], iter([0.0, 10.0, 70.0, 80.0])
    p = Progress(100, log=lines.append, bar=False, clock=lambda: next(now))
    p.advance(25, "  step one")
    p.replan(-25)  # the cascade found fewer survivors: 75 units in all
    p.advance(25, "  step two")
    assert lines == ["  step one [25% done, ~30 s left]", "  step two [67% done, ~35 s left]"]


def test_on_a_terminal_a_bar_shows_the_time_left(capsys):
    out = io.StringIO()
    p = Progress(10, bar=True, file=out)
    p.doing("APGD-CE on 7 images")
    p.advance(5, "  a finished step")
    p.close()
    text = out.getvalue()
    assert "APGD-CE on 7 images" in text and "50%" in text and "<00:00]" in text
    assert capsys.readouterr().out == "  a finished step\n"  # the lines above the bar, on stdout


def test_an_evaluation_reports_each_attack_with_the_time_left(tmp_path):
    torch.manual_seed(0)
    models = {name: load_model(untrained_checkpoint(tmp_path / f"{name}.pt", act, seed=k))
              for k, (name, act) in enumerate([("relu-standard", "relu"), ("dqa2-standard", "dqa2")])}
    lines = []
    budget = Budget(n=24, apgd_steps=2, apgd_restarts=1, apgd_t_targets=1, square_queries=2, repair_queries=2, twin_steps=2,
                    twin_targets=1, anneal_steps=2, anneal_restarts=1, transfer_steps=2, sweep_n=8, sweep_steps=1,
                    pgd_steps=2)
    evaluate_models(models, load_mnist5k(), attacks=["fgsm", "pgd", "apgd_ce", "twin_clip", "transfer"],
                    budget=budget, sweep_eps=[0, 0.3], log=lines.append, progress_bar=False)
    steps = [line for line in lines if line.startswith(("  ", "-- transfer"))
             and "adaptive worst case" not in line and "warning" not in line]
    # the candidates of both models; FGSM, PGD, APGD-CE, transfer and a rerun for each; the twin and its rerun
    assert len(steps) == 2 + 2 * 5 + 2, steps
    assert all("% done, ~" in line and line.endswith("left]") for line in steps), steps
    shares = [int(line.rsplit("[", 1)[1].split("%")[0]) for line in steps]
    assert shares == sorted(shares) and 0 < shares[0] and shares[-1] <= 100
