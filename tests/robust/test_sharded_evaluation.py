"""Sharded evaluation (torchrun's way, two CPU processes over gloo): every per-example result, the
worst case and the checks equal one process's; every rank gets the whole result."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dqa_ext.robust.attacks import Budget
from dqa_ext.robust.attacks.shard import Shard
from dqa_ext.robust.checkpoint import load_model
from dqa_ext.robust.config import TrainConfig
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.evaluate import evaluate_models, merge_shards
from dqa_ext.robust.train import train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ARCH = {"channels": [8, 16], "hidden": 32, "kernel": 3}
# Every attack of the default suite at a toy budget; n is odd so that the ranks' parts differ.
TINY = Budget(n=31, apgd_steps=8, apgd_restarts=1, apgd_t_targets=2, apgd_t_restarts=1, square_queries=60,
              repair_queries=30, twin_steps=8, twin_restarts=1, twin_targets=2, anneal_steps=8, anneal_restarts=2,
              near_steps=8, near_pgd_steps=8, transfer_steps=5, sweep_n=17, sweep_steps=5, pgd_steps=5, cw_n=6,
              cw_steps=10, cw_search=2, zoo_n=2, zoo_steps=5,
              sub_seeds=60, sub_rounds=2, sub_epochs=2)
EPS = 0.15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(paths, shard):
    ds = load_mnist5k()
    models = {name: load_model(path) for name, path in paths.items()}
    return evaluate_models(models, ds, eps=EPS, budget=TINY, seed=3, log=lambda *_: None,
                           shard=shard)


def _worker(rank, world, port, paths, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dqa_ext.robust.attacks.shard import shard_from_env
    from dqa_ext.robust.distributed import leave_process_group

    shard, _ = shard_from_env(torch.device("cpu"))
    assert (shard.rank, shard.world) == (rank, world)
    results = _evaluate(paths, shard)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, default=str)
    leave_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    mnist = load_mnist5k()
    paths = {}
    for act in ("relu", "fixed2"):
        out = tmp_path_factory.mktemp(act) / "m.pt"
        train(TrainConfig(activation=act, arch_kwargs=ARCH, epochs=1, n_train=1500, out=str(out), progress=False),
              dataset=mnist, log=lambda *_: None)
        paths[f"{act}-standard"] = str(out)
    return paths


def _per_example(ev):
    """Everything of one model's evaluation that is per example or derived from it (not timings)."""
    return {"clean": ev["clean"]["correct"], "worst": ev["worst_case"],
            "cascade": {k: (r["status"], r["attacked"], r["broke"], r["robust_after"], r.get("broken_by"))
                        for k, r in ev["cascade"].items()},
            "paper": {k: r["correct"] for k, r in ev["paper"].items()},
            "sanity": ev["checks"]["sanity"], "sweep": ev["checks"]["sweep"],
            "gaps": {k: v for k, v in ev["checks"].items() if k not in ("sanity", "sweep")}}


def test_two_ranks_give_the_one_process_result(checkpoints, tmp_path):
    torch.set_num_threads(1)
    one = json.loads(json.dumps(_evaluate(checkpoints, Shard()), default=str))
    mp.spawn(_worker, args=(2, _free_port(), checkpoints, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert list(one) == list(ranks[0]) == list(ranks[1])
    for name in one:
        expected = _per_example(one[name])
        for r in ranks:
            assert _per_example(r[name]) == expected, name
    # Not a vacuous comparison: the images split into survivors and broken ones, the cascade ran
    # past its first attack, and the paper's attacks ran on the other rank too.
    fixed = one["fixed2-standard"]
    robust = fixed["worst_case"]["robust"]
    assert 0 < sum(fixed["clean"]["correct"]) and sum(robust) < sum(fixed["clean"]["correct"])
    assert any(r["attacked"] for k, r in fixed["cascade"].items() if k != "apgd_ce")
    assert set(fixed["paper"]) >= {"fgsm", "pgd", "cw", "zoo", "substitute"}


def _budget_args(budget):
    defaults = Budget()
    return [a for k, v in budget.as_dict().items() if v != getattr(defaults, k) for a in ("--budget", f"{k}={v}")]


def test_torchrun_attack_writes_one_report_equal_to_one_process(checkpoints, tmp_path):
    """`torchrun --nproc_per_node 2 -m dqa_ext.robust attack` (the documented command, gloo on CPU): rank 0
    writes the report, with the per-example results of `dqa attack` in one process."""
    import subprocess
    import sys

    args = ["-m", "dqa_ext.robust", "attack", *checkpoints.values(), "--eps", str(EPS), "--seed", "3", "--device", "cpu",
            *_budget_args(TINY)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (a["settings"]["processes"], b["settings"]["processes"]) == (1, 2)
    assert [m["name"] for m in a["models"]] == [m["name"] for m in b["models"]]
    for ma, mb in zip(a["models"], b["models"]):
        assert _per_example(ma["eval"]) == _per_example(mb["eval"]), ma["name"]
    assert "on 2 processes" in (tmp_path / "two" / "report.md").read_text()


def test_torchrun_reproduce_trains_with_ddp_and_evaluates_sharded(tmp_path):
    """`torchrun --nproc_per_node 2 -m dqa_ext.robust reproduce --preset smoke`: DDP training, then the
    sharded evaluation; one report, written by rank 0, over every image."""
    import subprocess
    import sys

    out = tmp_path / "rep"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "dqa_ext.robust", "reproduce", "--preset", "smoke",
                          "--device", "cpu", "--out", str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote ") == 1
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["processes"] == 2
    for m in res["models"]:
        ev = m["eval"]
        assert len(ev["worst_case"]["robust"]) == ev["n"]
        assert all((st is None) == (not ok) for st, ok in zip(ev["cascade"]["apgd_ce"]["status"],
                                                               ev["clean"]["correct"]))
    ckpt = torch.load(out / "models" / "relu-pgd.pt", weights_only=True)
    assert ckpt["meta"]["world_size"] == 2


def test_merge_keeps_what_a_rank_without_survivors_lacks():
    """A rank whose images were all broken earlier ran no transfer: the merged entry still has the
    attack's details (from the rank that ran it), the statuses in place and the counts summed."""
    import numpy as np

    base = {"attack": "transfer", "label": "Transfer", "budget": {}, "sources": ["relu-pgd"]}
    idle = {**base, "attacked": 0, "broke": 0, "status": [None], "robust_after": 0.0, "seconds": 0.1}
    ran = {**base, "attacked": 2, "broke": 1, "status": [1, 0], "robust_after": 0.5, "seconds": 0.3,
           "broken_by": {"relu-pgd": 1}}
    merged = merge_shards([([0], {"transfer": idle}), ([1, 2], {"transfer": ran})], np.array([False, True, True]))
    t = merged["transfer"]
    assert t["status"] == [None, 1, 0] and (t["attacked"], t["broke"]) == (2, 1)
    assert t["broken_by"] == {"relu-pgd": 1} and t["robust_after"] == 1 / 3 and t["seconds"] == 0.3


def test_merge_adds_up_each_ranks_near_misses_and_start_counts():
    import numpy as np

    base = {"attack": "twin_anneal_near", "label": "Twin (annealed, near misses)", "budget": {}, "starts": 8}
    a = {**base, "attacked": 2, "broke": 1, "status": [1, 0], "robust_after": 0.5, "seconds": 1.0,
         "near_misses": 2, "start_hits": [[3, 1]]}
    b = {**base, "attacked": 1, "broke": 1, "status": [0], "robust_after": 0.0, "seconds": 2.0,
         "near_misses": 1, "start_hits": [[0, 5]]}
    merged = merge_shards([([0, 3], {"near": a}), ([1], {"near": b})], np.array([True, True, False, True]))
    r = merged["near"]
    assert r["near_misses"] == 3 and r["start_hits"] == [[0, 5], [3, 1]] and r["seconds"] == 2.0
