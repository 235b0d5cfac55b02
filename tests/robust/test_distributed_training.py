"""Two-process DDP (gloo on CPU): training ends with identical parameters on both ranks; a forward
on one rank never waits for the others; dqa_ext.calibrate gives every rank the same steps."""
import os
import socket

import pytest

import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SMALL = {"channels": [4, 8], "hidden": 16, "kernel": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dqa_ext.robust.config import TrainConfig
    from dqa_ext.robust.train import train

    # eps ramped over both epochs: two epochs at chance after the warm-up would stop the run
    cfg = TrainConfig(activation="dqa2", adv=True, pgd_steps=1, eps_warmup=2.0, arch_kwargs=SMALL, epochs=2,
                      n_train=256, batch_size=32, device="cpu", out=os.path.join(out, "ddp.pt"), progress=False)
    model = train(cfg, log=lambda *_: None)
    torch.save({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_ddp_gives_identical_parameters(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and any(k.endswith("step") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = torch.load(tmp_path / "ddp.pt", weights_only=True)  # written by rank 0 only
    init = {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(init[k], a[k]) for k in a)
    assert ckpt["epoch"] == 2


def _batch(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(4, 3, 5, 5, generator=g) * (rank + 1)


def _init_worker(rank, port, queue, alone_done):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import dqa_ext
    from dqa_ext.calibrate import calibrate

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:  # a forward on one rank only (a summary, a load) must not wait for the others
            lone = dqa_ext.DQAReLU(bits=2)
            lone(_batch(rank))
            alone_done.set()
        else:
            queue.put(("alone", alone_done.wait(timeout=180)))
        model = torch.nn.Sequential(torch.nn.Identity(), dqa_ext.DQAReLU(bits=2))
        calibrate(model, [_batch(rank)])  # the explicit, collective way: on every rank
        queue.put(("calibrated", rank, model[1].step.detach().clone()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_first_forward_has_no_collective_and_calibrate_agrees_across_ranks():
    ctx = mp.get_context("spawn")
    queue, alone_done = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_init_worker, args=(r, port, queue, alone_done)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        got = [queue.get(timeout=300) for _ in range(3)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    alone = [g for g in got if g[0] == "alone"]
    steps = {g[1]: g[2] for g in got if g[0] == "calibrated"}
    assert alone == [("alone", True)], "a forward on one rank waited for the other (a hidden collective)"
    assert torch.equal(steps[0], steps[1])
    both = torch.cat([_batch(0), _batch(1)]).abs()
    torch.testing.assert_close(steps[0], 2 * both.mean(dim=(0, 2, 3)) / 3**0.5)
    assert all(p.exitcode == 0 for p in procs)
