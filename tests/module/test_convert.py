"""convert: every activation site its own DQAReLU (module ReLUs, reused ones, functional calls),
classes kept where no rewrite is needed, a report of what was left and why, skip options."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import dqa_ext
from dqa_ext.convert import ConvertReport

from support.devices import DEVICES


# --- torchvision-shaped ResNet: BasicBlock and Bottleneck reuse one inplace self.relu ---

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2, down))
        self.layer2 = nn.Sequential(Bottleneck(16, 4, 1, None), Bottleneck(16, 8, 2, nn.Sequential(
            nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET_SITES = 1 + 2 * 2 + 2 * 3  # stem, two BasicBlocks, two Bottlenecks


def calls_per_activation(model, x):
    """How many times each DQAReLU runs in one forward."""
    counts = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
               for name, m in model.named_modules() if isinstance(m, dqa_ext.DQAReLU)]
    model(x)
    for h in handles:
        h.remove()
    return counts


def test_resnet_every_site_gets_its_own_dqarelu():
    torch.manual_seed(0)
    model = ResNet()
    keys = set(model.state_dict())
    out, report = dqa_ext.convert(model, bits=2, return_report=True)
    assert out is model and type(model) is ResNet  # the root needed no rewrite
    assert isinstance(report, ConvertReport) and len(report.converted) == RESNET_SITES
    assert not report.left and not report.skipped
    assert sorted(report.rewritten) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert all(isinstance(b, fx.GraphModule) for b in (*model.layer1, *model.layer2))
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    acts = [m for m in model.modules() if isinstance(m, dqa_ext.DQAReLU)]
    assert len(acts) == len({id(a) for a in acts}) == RESNET_SITES
    x = torch.randn(2, 3, 16, 16)
    counts = calls_per_activation(model, x)
    assert len(counts) == RESNET_SITES and set(counts.values()) == {1}
    assert keys <= set(model.state_dict())  # every original key is kept
    # A Bottleneck's three sites see 4, 4 and 16 channels: one shared module could not hold them.
    assert [model.layer2[0].get_submodule(n).num_channels for n in ("relu", "relu_1", "relu_2")] == [4, 4, 16]


@pytest.mark.parametrize("device", DEVICES)
def test_resnet_trains_saves_and_loads_on_another_device(device):
    torch.manual_seed(0)
    model = dqa_ext.convert(ResNet(), bits=2)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("step")}
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(p, steps_before[n]) for n, p in model.named_parameters() if n.endswith("step"))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = dqa_ext.convert(ResNet(), bits=2).to(device)  # lazy steps, moved before loading
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.to(device)).cpu(), model(x), rtol=1e-5, atol=1e-5)
    assert all(p.device.type == device for p in fresh.parameters())


# --- functional ReLUs ---

class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        a = F.relu(self.l1(x))
        b = torch.relu(self.l2(a))
        c = self.l3(b).relu()
        d = self.l4(c)
        d.relu_()  # inplace: the readers of d below see the activation
        e = F.relu(d * 2, inplace=True)
        return e + d


def functional_expected(model, x, step, bits):
    """Functional's forward with each ReLU a quantized ReLU of the given per-channel step."""
    def q(t):
        return dqa_ext.functional.quantized_relu(t, step, bits, -1)

    a = q(model.l1(x))
    b = q(model.l2(a))
    c = q(model.l3(b))
    d = q(model.l4(c))
    return q(d * 2) + d


def test_functional_relus_are_converted():
    torch.manual_seed(0)
    model = Functional()
    out, report = dqa_ext.convert(model, bits=3, mode="fixed", channel_dim=-1, return_report=True)
    kinds = sorted(s.kind for s in report.converted)
    assert kinds == ["F.relu", "F.relu", "Tensor.relu", "Tensor.relu_", "torch.relu"]
    assert isinstance(out, fx.GraphModule)  # its own forward had to be rewritten
    assert report.rewritten == [""]
    x = torch.randn(4, 6)
    counts = calls_per_activation(out, x)
    assert len(counts) == 5 and set(counts.values()) == {1}
    with torch.no_grad():
        expected = functional_expected(model, x, torch.full((6,), 1 / 7), 3)
        assert torch.equal(out(x), expected)
        assert not torch.equal(model(x), expected)  # the original still runs plain ReLUs


# --- a forward that does not trace ---

class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing fails here."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            x = self.act(self.lin(x))
        return F.relu(self.block(x))


def test_forward_that_does_not_trace_is_reported():
    model = Gate()
    with pytest.warns(UserWarning, match="convert left 1 site"):
        out, report = dqa_ext.convert(model, bits=2, return_report=True)
    assert out is model and type(model) is Gate
    assert isinstance(model.act, dqa_ext.DQAReLU) and isinstance(model.block[1], dqa_ext.DQAReLU)
    (left,) = report.left
    assert left.name == "" and "not traced" in left.how and "TraceError" in left.how
    line = Gate.forward.__code__.co_firstlineno + 3  # the F.relu line
    assert f"[{line}]" in left.how
    assert "<root>" in str(report) and "left" in str(report)


# --- skip options, reports, arguments ---

def test_skip_by_name_and_predicate():
    model = dqa_ext.convert(ResNet(), bits=2, skip=["relu", "layer2.1.relu_2"])
    assert isinstance(model.relu, nn.ReLU)
    last = model.layer2[1]
    assert isinstance(last.relu, nn.ReLU)  # the skipped last call still runs it
    assert sum(isinstance(m, dqa_ext.DQAReLU) for m in last.children()) == 2
    counts = calls_per_activation(model, torch.randn(2, 3, 16, 16))
    assert len(counts) == RESNET_SITES - 2
    functional = dqa_ext.convert(Functional(), bits=2, channel_dim=-1,
                                 skip=lambda site: site.kind.startswith("Tensor."))
    assert len(calls_per_activation(functional, torch.randn(2, 6))) == 3


def test_reused_module_with_one_call_skipped():
    block = BasicBlock(4, 4)
    out, report = dqa_ext.convert(block, bits=2, skip="relu_1", return_report=True)
    assert [s.name for s in report.skipped] == ["relu_1"]
    assert isinstance(out.relu, nn.ReLU)  # the skipped call still uses it
    assert len(calls_per_activation(out, torch.randn(2, 4, 5, 5))) == 1
    assert not report.left


def test_sequential_models_keep_their_class_and_convert_in_place():
    from dqa_ext.robust.models import MnistCNN, ResNet20

    for model in (MnistCNN(channels=(4, 8), hidden=16), ResNet20(width=4)):
        relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
        cls = type(model)
        out, report = dqa_ext.convert(model, bits=2, return_report=True)
        assert out is model and type(out) is cls and not report.rewritten
        assert len(report.converted) == relus and not any(isinstance(m, nn.ReLU) for m in model.modules())


class Spare(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        self.spare = nn.ReLU()  # registered but never called by forward

    def forward(self, x):
        return self.body(x)


def test_unused_relu_is_left_and_reported(capsys):
    model = Spare()
    with pytest.warns(UserWarning, match="spare: never called by forward"):
        dqa_ext.convert(model, bits=2)
    assert isinstance(model.spare, nn.ReLU) and isinstance(model.body[1], dqa_ext.DQAReLU)
    other = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dqa_ext.convert(other, bits=2, verbose=True)
    assert "1 activation site(s) converted" in capsys.readouterr().out


def test_bad_arguments_change_nothing():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match="bits must be an integer in 1..8, got 9"):
        dqa_ext.convert(model, bits=9)
    with pytest.raises(TypeError, match="skip must be None, a name pattern"):
        dqa_ext.convert(model, bits=2, skip=[3])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dqa_ext.convert("model", bits=2)
    assert isinstance(model[1], nn.ReLU)
    lone = dqa_ext.convert(nn.ReLU(), bits=1, per_channel=False)
    assert isinstance(lone, dqa_ext.DQAReLU) and not lone.per_channel


class InplaceReader(nn.Module):
    """An inplace ReLU module whose result is read through its input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.lin(x)
        self.act(h)
        return h * 2


def test_inplace_module_relu_read_through_its_input():
    torch.manual_seed(0)
    model = InplaceReader()
    out = dqa_ext.convert(model, bits=2, mode="fixed", channel_dim=-1)
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = dqa_ext.functional.quantized_relu(model.lin(x), torch.full((3,), 1 / 3), 2, -1) * 2
        assert torch.equal(out(x), expected)
    assert isinstance(out.act, dqa_ext.DQAReLU)


class Mixed(nn.Module):
    """The root and its child both need a rewrite: the root's must hold the rewritten child."""

    def __init__(self):
        super().__init__()
        self.block = BasicBlock(4, 4)

    def forward(self, x):
        return F.relu(self.block(x) - 1)


def test_root_and_child_rewritten_together():
    out, report = dqa_ext.convert(Mixed(), bits=2, return_report=True)
    assert sorted(report.rewritten) == ["", "block"] and len(report.converted) == 3
    counts = calls_per_activation(out, torch.randn(2, 4, 5, 5))
    assert len(counts) == 3 and set(counts.values()) == {1}
    assert not any(isinstance(m, nn.ReLU) for m in out.modules())


# --- what a rewrite would freeze: self.training, and tensors held as plain attributes ---

class DropoutHead(nn.Module):
    """Reads self.training: a rewrite traced in train mode would keep dropout on after eval()."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(F.dropout(F.relu(self.fc(x)), 0.5, training=self.training))


class TrainBranch(nn.Module):
    """An `if self.training:` branch and a tensor constant whose value depends on the mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h + 1
        return F.relu(h) * torch.tensor(1.0 if self.training else 0.5)


@pytest.mark.parametrize("cls", [DropoutHead, TrainBranch])
def test_forward_reading_self_training_is_not_rewritten(cls):
    torch.manual_seed(0)
    model = cls()
    model.fc.eval()  # a mixed mode: every module's own flag comes back after tracing
    with pytest.warns(UserWarning, match="forward reads self.training"):
        out, report = dqa_ext.convert(model, bits=2, channel_dim=-1, return_report=True)
    assert out is model and type(model) is cls and not report.rewritten
    assert model.training and not model.fc.training
    (left,) = report.left
    assert left.kind == "F.relu" and "train and eval traces differ" in left.how
    x = torch.randn(8, 6)
    model.eval()
    with torch.no_grad():
        h = F.relu(model.fc(x))
        expected = model.act(h) if cls is DropoutHead else h * 0.5  # no dropout, no +1 in eval
        assert torch.equal(model(x), expected)
    if cls is DropoutHead:
        assert isinstance(model.act, dqa_ext.DQAReLU) and [s.name for s in report.converted] == ["act"]


class ConstantScale(nn.Module):
    """A tensor constant made in forward, the same in both modes: still rewritten."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.relu(self.fc(x)) * torch.tensor(2.0)


def test_mode_independent_tensor_constant_is_still_rewritten():
    model = ConstantScale()
    out, report = dqa_ext.convert(model, bits=2, mode="fixed", channel_dim=-1, return_report=True)
    assert report.rewritten == [""] and not report.left
    assert not any(k.startswith("_tensor_constant") for k in vars(model))  # tracing leaves no attribute
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = dqa_ext.functional.quantized_relu(model.fc(x), torch.full((6,), 1 / 3), 2, -1) * 2
        assert torch.equal(out(x), expected)


class Masked(nn.Module):
    """Plain tensor attributes (not buffers) read in forward, on the module and on a child."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
        self.inner = nn.Identity()
        self.inner.scale = torch.full((4,), 3.0)

    def forward(self, x):
        return F.relu(self.inner(self.fc(x))) * self.mask * self.inner.scale


def test_plain_tensor_attributes_survive_a_rewrite():
    torch.manual_seed(0)
    model = Masked()
    keys = set(model.state_dict())
    out = dqa_ext.convert(model, bits=2, mode="fixed", channel_dim=-1)
    assert isinstance(out, fx.GraphModule)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = dqa_ext.functional.quantized_relu(model.fc(x), torch.full((4,), 1 / 3), 2, -1) * model.mask * 3
        assert torch.equal(out(x), expected)
    # Kept as non-persistent buffers: they move with .to() and add no state_dict key.
    assert set(out.state_dict()) == keys | {"relu.step", "relu._extra_state"}
    assert "mask" in dict(out.named_buffers()) and "scale" not in out.inner._buffers  # the child is unchanged


CHAINS = {
    "F.relu(x).relu_()": lambda conv, x: F.relu(conv(x)).relu_(),
    "x.relu().relu_()": lambda conv, x: conv(x).relu().relu_(),
    "torch.relu(F.relu(x, inplace=True))": lambda conv, x: torch.relu(F.relu(conv(x), inplace=True)) + 1,
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_chained_relu_calls_each_get_their_own_dqarelu(chain):
    """A ReLU applied to another ReLU's output: both calls converted, in order (an earlier rewrite
    replaces the node the second call reads)."""

    class Chained(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return CHAINS[chain](self.conv, x)

    torch.manual_seed(0)
    model = Chained()
    x = torch.randn(2, 3, 5, 5)
    converted, report = dqa_ext.convert(model, bits=2, mode="fixed", return_report=True)
    assert len(report.converted) == 2 and not report.left, report
    first, second = (converted.get_submodule(s.name) for s in report.converted)
    expected = second(first(model.conv(x)))
    if chain.endswith("inplace=True))"):
        expected = expected + 1
    assert torch.equal(converted(x), expected)
