"""Two-process DDP training (gloo on CPU) ends with identical parameters on both ranks."""
import os
import socket

import torch
import torch.multiprocessing as mp

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

    from dqa_ext.robust.train import TrainConfig, train

    cfg = TrainConfig(activation="dqa2", adv=True, pgd_steps=1, arch_kwargs=SMALL, epochs=2, n_train=256,
                      batch_size=32, device="cpu", out=os.path.join(out, "ddp.pt"), progress=False)
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
