"""Model zoo: the MNIST CNN, CIFAR-10 ResNet-20 and the substitute MLP, with the activation by name.

Every model takes pixels in [0, 1] and normalises inside (``Normalize``), so attacks work in pixel
space. The activation is ``relu``, ``fixed<b>`` or ``dqa<b>`` (b in 1, 2, 3): the latter two replace
every ``nn.ReLU`` through ``dqa_ext.convert`` (fixed or dynamic, i.e. learned-step, quantization).
"""
from __future__ import annotations

import re

import torch
from torch import nn

import dqa_ext

from .errors import UserError

ACTIVATION_RE = re.compile(r"^(relu|fixed[123]|dqa[123])$")
ARCHS = ("mnist_cnn", "resnet20", "mlp")
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class ModelError(UserError):
    """Bad architecture or activation name."""


def parse_activation(name: str) -> tuple[str, int | None]:
    """'relu' -> ('relu', None); 'fixed2' -> ('fixed', 2); 'dqa3' -> ('dynamic', 3)."""
    if not isinstance(name, str) or not ACTIVATION_RE.match(name):
        raise ModelError(f"bad activation {name!r}: use relu, fixed<b> or dqa<b> with b in 1, 2, 3")
    if name == "relu":
        return "relu", None
    return ("fixed" if name.startswith("fixed") else "dynamic"), int(name[-1])


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so they travel with the state dict."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class MnistCNN(nn.Sequential):
    """conv-conv-fc-fc, as in MNIST robustness work (Madry et al. use channels (32, 64), hidden 1024,
    5x5 kernels); the defaults are narrower so that adversarial training fits a 2-core CPU budget."""

    def __init__(self, channels=(32, 64), hidden=256, kernel=5, in_channels=1, size=28, num_classes=10,
                 stats=MNIST_STATS):
        c1, c2 = channels
        flat = c2 * (size // 4) ** 2
        super().__init__(
            Normalize(*stats),
            nn.Conv2d(in_channels, c1, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class BasicBlock(nn.Module):
    """ResNet basic block with its own two nn.ReLU modules (convert gives each its own step)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # option B: projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels."""

    def __init__(self, num_classes=10, width=16, in_channels=3, stats=CIFAR_STATS):
        super().__init__()
        self.normalize = Normalize(*stats)
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(3):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(self.normalize(x))))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


class MLP(nn.Sequential):
    """Papernot et al.'s MNIST substitute (cleverhans mnist_blackbox): two hidden layers of 200."""

    def __init__(self, input_shape=(1, 28, 28), hidden=200, num_classes=10):
        n = 1
        for d in input_shape:
            n *= d
        super().__init__(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


def default_arch(input_shape) -> str:
    return "resnet20" if tuple(input_shape)[0] == 3 else "mnist_cnn"


def build_model(arch: str, activation: str = "relu", input_shape=(1, 28, 28), num_classes: int = 10,
                **arch_kwargs) -> nn.Module:
    """Build an architecture and swap its ReLUs for the named activation.

    DQA steps may be lazy: run one forward (``materialize``) before building an optimizer, loading a
    state dict or wrapping in DDP."""
    mode, bits = parse_activation(activation)
    c, h, _ = input_shape
    if arch == "mnist_cnn":
        stats = MNIST_STATS if c == 1 else CIFAR_STATS
        model = MnistCNN(in_channels=c, size=h, num_classes=num_classes, stats=stats, **arch_kwargs)
    elif arch == "resnet20":
        stats = CIFAR_STATS if c == 3 else MNIST_STATS
        model = ResNet20(num_classes=num_classes, in_channels=c, stats=stats, **arch_kwargs)
    elif arch == "mlp":
        model = MLP(input_shape=input_shape, num_classes=num_classes, **arch_kwargs)
    else:
        raise ModelError(f"bad architecture {arch!r}: use one of {', '.join(ARCHS)}")
    if mode != "relu":
        model = dqa_ext.convert(model, bits=bits, mode=mode)
    return model


@torch.no_grad()
def materialize(model: nn.Module, sample: torch.Tensor) -> None:
    """One forward pass in eval mode so that lazy DQA steps exist (BN statistics are untouched)."""
    was_training = model.training
    model.eval()
    model(sample)
    model.train(was_training)


def dqa_modules(model: nn.Module):
    """(name, module) for every quantized activation in ``model``: DQAReLU and its subclasses."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, dqa_ext.DQAReLU)]


def learned_steps(model: nn.Module) -> dict[str, list[float]]:
    """Per-layer effective steps of the dynamic (learned-step) activations: the values the
    quantizer uses (DQAReLU.effective_step), not the raw parameter."""
    return {name: [float(v) for v in m.effective_step.flatten().cpu()]
            for name, m in dqa_modules(model) if m.mode == "dynamic" and not m.is_lazy}
