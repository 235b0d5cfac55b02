"""Masking flags come from the numbers; report.md, results.json and the plots are written."""
import json

from dqa_ext.robust.report import masking_flags, table, write_report


def _attack(acc, n=100, **kw):
    k = round(acc * n)
    return {"acc": acc, "n": n, "correct": [1] * k + [0] * (n - k), "budget": {"cw_steps": 10, "cw_search": 2}, **kw}


def _eval(**attacks):
    return {"eps": 0.3, "n": 100, "clean": {"acc": 0.99, "n": 100}, "budget": {"n": 100, "pgd_steps": 10},
            "attacks": attacks,
            "worst_case": {"all": {"acc": 0.1, "n": 20, "attacks": list(attacks)},
                           "full": {"acc": 0.1, "n": 100, "attacks": list(attacks)}},
            "sweep": {"eps": [0, 0.1, 0.3], "n": 100, "fgsm": [0.99, 0.6, 0.2], "pgd": [0.99, 0.5, 0.1]},
            "steps": {"1": [0.5, 0.7], "4": [0.2, 0.3, 0.4]}}


def test_an_honest_looking_result_raises_no_flags():
    ev = _eval(fgsm=_attack(0.3), pgd=_attack(0.1), square=_attack(0.4), cw=_attack(0.0, n=20, success_rate=1.0))
    assert masking_flags(ev) == []


def test_each_masking_symptom_is_flagged():
    ev = _eval(fgsm=_attack(0.2), pgd=_attack(0.6), square=_attack(0.3), pgd_zero=_attack(0.9),
               cw=_attack(0.5, n=20, success_rate=0.5, median_l2=1.0))
    ev["sweep"]["pgd"] = [0.99, 0.9, 0.95]
    ev["sweep"]["fgsm"] = [0.99, 0.99, 0.98]
    flags = " | ".join(masking_flags(ev))
    assert "Square (30.0%) beats the best white-box attack FGSM (20.0%)" not in flags  # FGSM is best
    assert "single-step FGSM (20.0%) beats iterative PGD (60.0%)" in flags
    assert "PGD accuracy rises with epsilon" in flags
    assert "FGSM accuracy does not fall" in flags
    assert "C&W-L2 reaches only 50.0%" in flags
    assert "true-gradient PGD reports 90.0% where BPDA PGD finds 60.0%" in flags
    ev2 = _eval(pgd=_attack(0.6), substitute=_attack(0.2))
    assert any("Substitute (20.0%) beats the best white-box attack PGD (60.0%)" in f for f in masking_flags(ev2))


def test_report_and_plots_are_written(tmp_path):
    ev = _eval(fgsm=_attack(0.3), pgd=_attack(0.1), cw=_attack(0.0, n=20, success_rate=1.0, median_l2=1.5),
               zoo=_attack(0.5, n=5, success_rate=0.4, median_l2=None))
    results = {"command": "dqa reproduce --out X", "settings": {"data": "mnist5k", "eps": 0.3}, "wall_seconds": 12.0,
               "provenance": {"torch": "x"},
               "models": [{"name": "dqa2-pgd", "eval": ev, "train": {"history": [
                   {"epoch": 1, "loss": 0.5, "test_acc": 0.9, "seconds": 3.0}]}},
                          {"name": "relu-standard", "eval": {**ev, "steps": {}}}]}
    paths = write_report(results, tmp_path)
    for key in ("results", "report", "eps", "steps"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert paths["eps"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report"].read_text()
    assert "dqa reproduce --out X" in md and "| dqa2-pgd | 99.0 | 30.0 | 10.0 | 100.0 / 1.50 | 40.0 / - |" in md
    assert "![accuracy against epsilon](acc_vs_eps.png)" in md and "pgd_steps" in md
    saved = json.loads(paths["results"].read_text())
    assert saved["models"][0]["flags"] == masking_flags(ev)
    assert "Worst" in table(results)
