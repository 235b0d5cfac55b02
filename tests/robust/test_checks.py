"""The judge (checks.py): flags come from the numbers, the worst case is the per-example intersection
over the attacks that count, a model with degenerate predictions is flagged, and the statistics of
an accuracy on n images."""
import json

import pytest

from dqa_ext.robust.checks import at_chance, flags, worst_case
from support.robust import dqa, evaluation, untrained_checkpoint


def test_an_honest_looking_result_raises_no_flags():
    assert flags(evaluation()) == []


def test_each_weakness_is_flagged_with_its_numbers():
    ev = evaluation(convergence={"attack": "apgd_t", "extra_broken": 3, "survivors": 40, "n": 100,
                                 "images": [4, 17, 52]},
                    ste_vs_quant_aware={"only_quant_aware": 7, "n": 100, "ran": True},
                    black_box_vs_gradient={"only_black_box": 2, "n": 100},
                    sanity={"eps": 1.0, "acc": 0.05, "n": 100},
                    sweep={"eps": [0, 0.1, 0.3], "n": 100, "acc": [0.99, 0.5, 0.7], "attack": "APGD-CE", "steps": 50})
    ev["paper"]["fgsm"]["correct"] = [1] * 20 + [0] * 80
    ev["paper"]["cw"] = {"acc": 0.3, "n": 50, "correct": [1] * 15 + [0] * 35, "success_rate": 0.6}
    text = " | ".join(flags(ev))
    assert ("not converged: APGD-T rerun with fresh seeds and twice the starts broke 3 more of 40 survivors "
            "(images 4, 17, 52), 3.0 points") in text
    assert "quantization-aware attacks broke 7 images (7.0 points)" in text
    assert "gradient-free or transfer attacks broke 2 images (2.0 points)" in text
    assert "APGD-CE at epsilon 1 leaves 5.0% robust" in text
    assert "accuracy rises with epsilon (0.1 -> 0.3)" in text
    assert "single-step FGSM (20.0%) beats iterative PGD (40.0%)" in text
    assert "unbounded C&W-L2 reaches only 60.0% success" in text
    # no tolerance: a single image the rerun found is one the run had missed
    one = flags(evaluation(convergence={"attack": "apgd_ce", "extra_broken": 1, "survivors": 39, "n": 100,
                                        "images": [7]}))
    assert len(one) == 1 and "broke 1 more of 39 survivors (images 7), 1.0 points" in one[0]
    assert flags(evaluation(convergence={"attack": "apgd_ce", "extra_broken": 0, "survivors": 39, "n": 100})) == []


@pytest.mark.parametrize("predictions,clean,match", [
    ({"top_class": 1, "top_share": 1.0, "finite": True}, 0.1, "predicts class 1 for 100.0% of the images"),
    ({"top_class": 0, "top_share": 0.5, "finite": False}, 0.5, "logits are not finite"),
    ({"top_class": 2, "top_share": 0.3, "finite": True}, 0.11, "degenerate model"),  # at chance
])
def test_a_model_with_degenerate_predictions_is_flagged(predictions, clean, match):
    ev = evaluation(predictions={**predictions, "n": 100, "num_classes": 10})
    ev["clean"]["acc"] = clean
    assert match in flags(ev)[0]


def test_worst_case_is_the_per_example_intersection_of_the_attacks_that_count():
    ev = {"n": 5, "clean": {"correct": [1, 1, 1, 1, 0]},
          "cascade": {"a": {"status": [1, 0, 1, 1, None]}, "b": {"status": [1, None, 0, 1, None]}},
          "paper": {"pgd": {"correct": [1, 1, 1, 0, 0]}, "cw": {"correct": [0, 1]},
                    "apgd_art": {"correct": [0, 0, 0, 0, 0]}}}  # a cross-check: not part of the worst case
    wc = worst_case(ev)
    assert wc["robust"] == [0, 0, 0, 0, 0] and wc["acc"] == 0.0 and "apgd_art" not in wc["attacks"]
    ev["paper"]["cw"]["correct"] = [1, 1]
    assert worst_case(ev)["robust"] == [1, 0, 0, 0, 0]


def test_chance_level():
    assert at_chance(0.100, 1000, 10) and at_chance(0.12, 1000, 10) and not at_chance(0.15, 1000, 10)
    assert not at_chance(0.3, 30, 10) and at_chance(0.25, 30, 10)  # few images: a wider band


def test_an_evaluation_flags_a_collapsed_model(tmp_path):
    """An untrained network (as a collapsed one) is reported as degenerate, not as merely non-robust."""
    ckpt = untrained_checkpoint(tmp_path / "m.pt")
    assert dqa(["attack", ckpt, "--attacks", "fgsm", "--n-images", "30", "--no-sweep", "--out", tmp_path / "rep"]) == 0
    model = json.loads((tmp_path / "rep" / "results.json").read_text())["models"][0]
    assert model["flags"][0].startswith("degenerate model: it predicts class")
    assert "degenerate model" in (tmp_path / "rep" / "report.md").read_text()


def test_images_broken_by_few_starts_are_flagged_as_rare_points():
    ev = evaluation()
    ev["cascade"]["twin_anneal"] = {"label": "Twin (annealed T)", "attacked": 10, "broke": 3, "status": [],
                                    "starts": 40, "start_hits": [[3, 1], [8, 30], [9, 4]]}
    rare = [f for f in flags(ev) if f.startswith("rare points")]
    assert len(rare) == 1 and "broke 2 of its 3 images" in rare[0] and "image 3: 1 of 40" in rare[0]
    assert "with at most 4 of its 40 starts" in rare[0]
    ev["cascade"]["twin_anneal"]["start_hits"] = [[8, 30]]
    assert not [f for f in flags(ev) if f.startswith("rare points")]
    # with few starts, an image that one start found is still a rare point
    ev["cascade"]["twin_anneal_near"] = {"label": "Twin (annealed, near misses)", "attacked": 5, "broke": 2,
                                         "status": [], "starts": 8, "start_hits": [[10, 1], [71, 2]]}
    rare = [f for f in flags(ev) if f.startswith("rare points")]
    assert len(rare) == 1 and "broke 1 of its 2 images with at most 1 of its 8 starts (image 10: 1 of 8)" in rare[0]
