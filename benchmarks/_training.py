"""The training step that the benchmarks, the CPU profile (_profile.py) and the GPU measurement
(scripts/gpu_train_step.py) time: dqa_ext.robust.models' MNIST CNN or ResNet-20 with nn.ReLU, or
with DQAReLU (learned or fixed step), one SGD step of forward, cross-entropy and backward."""

import torch
import torch.nn.functional as F

# input shape, batch per device: ResNet-20 trains at batch 256 on a GPU (the GPU targets),
# 128 on a CPU (a step of seconds on 2 cores).
NETS = {"mnist_cnn": ((1, 28, 28), {"cpu": 256, "cuda": 256}),
        "resnet20": ((3, 32, 32), {"cpu": 128, "cuda": 256})}
VARIANTS = {"relu": "relu", "dqa_dynamic": "dqa2", "dqa_fixed": "fixed2"}


def build(net, variant, device, batch=None):
    """(model, optimizer, x, y), seeded; batch defaults to NETS' for the device type."""
    from dqa_ext.robust.models import build_model, materialize

    shape, batches = NETS[net]
    batch = batch or batches[torch.device(device).type]
    torch.manual_seed(0)
    model = build_model(net, VARIANTS[variant], input_shape=shape).to(device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((batch, *shape), generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    materialize(model, x)  # lazy DQA steps exist before the optimizer is built
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, x, y


def train_step(model, opt, x, y):
    """A function doing one step (returns the loss)."""
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step
