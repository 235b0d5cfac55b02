"""A DQAReLU step's life: initialised from the first batch (finite values only), moved and cast
with the model, set by calibrate, saved and loaded, with no hidden collective under DDP."""

import math
import warnings

import pytest
import torch
from torch import nn

import dqa_ext

from support.devices import DEVICES, needs_extension


# --- the first batch: only finite values of a non-empty batch initialise the step ---

@pytest.mark.parametrize("bad", ["empty", "nan", "inf", "mixed"])
def test_batch_without_finite_values_leaves_step_uninitialised(bad):
    x = {"empty": torch.empty(0, 3, 4, 4), "nan": torch.full((2, 3, 4, 4), math.nan),
         "inf": torch.full((2, 3, 4, 4), math.inf),
         "mixed": torch.tensor([math.nan, math.inf, -math.inf]).repeat(2, 3, 2, 1)[..., :2]}[bad]
    m = dqa_ext.DQAReLU(bits=2)
    with pytest.warns(UserWarning, match="ha(s|ve) no finite values .* left uninitialised"):
        m(x)
    assert not m.initialized and m.num_channels == 3
    assert torch.equal(m.step.detach(), torch.full((3,), 1 / 3))  # the default, usable, finite
    good = torch.randn(4, 3, 5, 5)
    m(good)  # the next good batch initialises it
    assert m.initialized
    torch.testing.assert_close(m.step.detach(), 2 * good.abs().mean(dim=(0, 2, 3)) / math.sqrt(3))


def test_channels_without_finite_values_wait_for_the_next_batch():
    """The other channels are initialised from the first batch; the empty ones (each named) from
    the next batch that has values for them, which leaves the others as they are."""
    x = torch.randn(2, 5, 4, 4)
    x[:, 1] = math.nan
    x[:, 3] = math.inf
    m = dqa_ext.DQAReLU(bits=2)
    with pytest.warns(UserWarning, match="channels 1, 3 of the batch have no finite values"):
        m(x)
    first = 2 * x.abs().mean(dim=(0, 2, 3)) / math.sqrt(3)
    assert not m.initialized
    torch.testing.assert_close(m.step.detach()[[0, 2, 4]], first[[0, 2, 4]])
    y = torch.randn(3, 5, 4, 4) * 10
    m(y)
    assert m.initialized
    second = 2 * y.abs().mean(dim=(0, 2, 3)) / math.sqrt(3)
    torch.testing.assert_close(m.step.detach()[[0, 2, 4]], first[[0, 2, 4]])
    torch.testing.assert_close(m.step.detach()[[1, 3]], second[[1, 3]])


def test_more_channels_than_steps_is_one_clear_line_before_any_change():
    for mode in ("dynamic", "fixed"):
        m = dqa_ext.DQAReLU(bits=2, mode=mode, num_channels=4)
        before = m.step.detach().clone()
        with pytest.raises(ValueError, match="this module has 4 per-channel steps but got an input with 3 channels"):
            m(torch.randn(2, 3, 5, 5))
        assert torch.equal(m.step.detach(), before) and m.initialized == (mode == "fixed")


def test_a_step_made_nan_by_a_bad_batch_says_where_it_came_from():
    needs_extension("cpu")
    m = dqa_ext.DQAReLU(bits=2, num_channels=3, init_step=0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 3, 5, 5)
    x[0, 0, 0, 0] = math.nan  # one bad value in a training batch
    m(x).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"step\[0\] = nan; a learned step becomes NaN or inf after a training "
                                           r"step whose input, loss or gradients had NaN"):
        m(torch.randn(2, 3, 5, 5))


def test_nan_and_inf_elements_are_left_out_of_the_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    poisoned = x.clone()
    poisoned[0, :, 0, 0] = math.nan
    poisoned[1, :, 1, 1] = math.inf
    poisoned[2, :, 2, 2] = -math.inf
    keep = torch.isfinite(poisoned)
    m = dqa_ext.DQAReLU(bits=3)
    m(poisoned)
    expected = torch.stack([x[:, c][keep[:, c]].abs().mean() for c in range(3)]) * 2 / math.sqrt(7)
    assert m.initialized
    torch.testing.assert_close(m.step.detach(), expected)
    t = dqa_ext.DQAReLU(bits=3, per_channel=False)
    t(poisoned)
    torch.testing.assert_close(t.step.detach(), (2 * x[keep].abs().mean() / math.sqrt(7)).reshape(1))


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_lazy_module_state_dict_parameters_and_deepcopy_before_forward(mode):
    import copy

    model = nn.Sequential(nn.Linear(4, 5), dqa_ext.DQAReLU(bits=2, mode=mode, channel_dim=-1))
    sd = model.state_dict()  # as nn.LazyLinear: the lazy step is in it, uninitialised
    assert set(sd) == {"0.weight", "0.bias", "1.step", "1._extra_state"}
    # A learned step is torch's lazy parameter; a fixed one an empty buffer (a real tensor, which
    # the exporters can read before the first forward).
    assert nn.parameter.is_lazy(sd["1.step"]) if mode == "dynamic" else sd["1.step"].numel() == 0
    loaded = nn.Sequential(nn.Linear(4, 5), dqa_ext.DQAReLU(bits=2, mode=mode, channel_dim=-1))
    loaded.load_state_dict(sd)
    assert loaded[1].is_lazy and loaded[1].initialized == (mode == "fixed")
    params = list(model.parameters())
    assert len(params) == (3 if mode == "dynamic" else 2)
    assert sum(p.numel() for p in params if not nn.parameter.is_lazy(p)) == 4 * 5 + 5
    twin = copy.deepcopy(model)
    assert twin[1].step is not model[1].step and twin[1].is_lazy
    twin(torch.randn(2, 4))
    assert not twin[1].is_lazy and model[1].is_lazy  # the copy materialised alone
    fresh = nn.Sequential(nn.Linear(4, 5), dqa_ext.DQAReLU(bits=2, mode=mode, channel_dim=-1))
    fresh.load_state_dict(sd)  # lazy into lazy: stays lazy
    assert fresh[1].is_lazy
    fresh.load_state_dict(twin.state_dict())  # a materialised step into a lazy module
    assert torch.equal(fresh[1].step, twin[1].step)
    with pytest.raises(RuntimeError, match="saved before its first forward .* this module's step is initialised"):
        fresh.load_state_dict(sd)


# --- devices and dtypes: a lazy step remembers .to(); the step stays float32 ---

def test_lazy_step_remembers_the_device_it_was_moved_to():
    src = dqa_ext.DQAReLU(bits=2)
    src(torch.randn(2, 3, 4, 4))
    m = dqa_ext.DQAReLU(bits=2).to("meta")  # .to() before load_state_dict
    assert m.is_lazy and m.step.device.type == "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into a meta tensor is a no-op
        m.load_state_dict(src.state_dict())
    assert m.step.device.type == "meta" and m.step.shape == (3,) and m.step.dtype == torch.float32
    back = dqa_ext.DQAReLU(bits=2).to("meta").to(torch.float64).cpu()  # cast while lazy: still float32
    y = back(torch.randn(2, 3, 4, 4))
    assert back.step.device.type == "cpu" and back.step.dtype == torch.float32 and y.dtype == torch.float32
    fixed = dqa_ext.DQAReLU(bits=2, mode="fixed").to("meta")
    assert fixed.step.device.type == "meta" and fixed.is_lazy


@pytest.mark.parametrize("order", ["to-load-forward", "load-to-forward", "to-forward"])
@pytest.mark.parametrize("device", DEVICES)
def test_to_before_or_after_load_state_dict(order, device):
    torch.manual_seed(0)
    src = dqa_ext.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), bits=2)
    src(torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8, device=device)
    model = dqa_ext.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), bits=2)
    if order == "to-load-forward":
        model.to(device).load_state_dict(src.state_dict())
    elif order == "load-to-forward":
        model.load_state_dict(src.state_dict())
        model.to(device)
    else:
        model.to(device)
    y = model(x)
    assert model[1].step.device == x.device and y.device == x.device
    if order != "to-forward":
        assert torch.equal(model[1].step.cpu(), src[1].step)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_step_stays_float32_under_model_casts(dtype):
    m = nn.Sequential(nn.Linear(4, 3), dqa_ext.DQAReLU(bits=2, num_channels=3, channel_dim=-1, init_step=0.5))
    step = m[1].step
    m[1](torch.randn(2, 3)).sum().backward()
    m.to(dtype)
    assert m[1].step is step and step.dtype == torch.float32 and step.grad.dtype == torch.float32
    assert m[0].weight.dtype == dtype
    with torch.no_grad():
        step += 1e-5  # an LSQ-sized update: lost if the step were cast to a 16-bit type
    assert (step - 0.5).min().item() > 0
    if dtype != torch.float64:  # x is float32, float16 or bfloat16
        assert m(torch.randn(2, 4, dtype=dtype)).dtype == dtype


# --- calibrate and freeze: the explicit way to initialise; no hidden collectives ---

def test_first_forward_calls_no_collective(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the first forward called torch.distributed.all_reduce")

    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    m = dqa_ext.DQAReLU(bits=2)
    m(torch.randn(2, 3, 4, 4))
    assert m.initialized


def test_calibrate_sets_steps_from_all_batches_and_restores_the_mode():
    from dqa_ext.calibrate import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3),
                          dqa_ext.DQAReLU(bits=3, init_step=0.25, num_channels=2))
    dqa_ext.convert(model, bits=2)
    batches = [torch.randn(3, 3, 8, 8), torch.randn(5, 3, 8, 8) * 3]
    running = model[1].running_mean.clone()
    assert calibrate(model, batches, distributed=False) is model
    assert model.training and torch.equal(model[1].running_mean, running)  # ran in eval mode
    model.eval()
    with torch.no_grad():
        h = torch.cat([model[1](model[0](b)) for b in batches])
    expected = 2 * h.abs().mean(dim=(0, 2, 3)) / math.sqrt(3)
    torch.testing.assert_close(model[2].step.detach(), expected)
    assert model[2].initialized and torch.equal(model[4].step, torch.full((2,), 0.25))  # init_step kept
    with pytest.raises(ValueError, match="batches must hold at least one batch"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="batches must be an iterable of batches"):
        calibrate(model, torch.randn(2, 3, 8, 8))


def test_effective_step_and_freeze():
    from dqa_ext.calibrate import freeze_steps

    m = dqa_ext.DQAReLU(bits=2, num_channels=3, init_step=0.5, min_step=0.01)
    with torch.no_grad():
        m.step.copy_(torch.tensor([-0.4, 0.0, 0.3]))
    assert torch.equal(m.effective_step, torch.tensor([0.4, 0.01, 0.3]))
    assert dqa_ext.DQAReLU(bits=2).effective_step is None
    assert torch.equal(dqa_ext.DQAReLU(bits=2, mode="fixed", num_channels=2).effective_step, torch.full((2,), 1 / 3))
    model = nn.Sequential(m)
    freeze_steps(model)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    model(x).sum().backward()
    assert m.step.grad is None and x.grad is not None
    freeze_steps(model, frozen=False)
    model(x).sum().backward()
    assert m.step.grad is not None


# --- DDP warning, old state_dicts, per-tensor grad scale, calibrate on failure ---

def _fake_two_ranks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the first forward called a torch.distributed collective")

    for name in ("all_reduce", "broadcast", "all_gather", "barrier"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)


def test_first_forward_of_a_made_step_under_distributed_warns_once(monkeypatch):
    _fake_two_ranks(monkeypatch)
    x = torch.randn(2, 3, 4, 4)
    m = dqa_ext.DQAReLU(bits=2, num_channels=3)  # made at construction: DDP may already hold it
    with pytest.warns(UserWarning, match="call dqa_ext.calibrate.*or run the first forward before wrapping") as got:
        m(x)
        m(x)
    assert m.initialized and sum("DDP does not re-sync" in str(w.message) for w in got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dqa_ext.DQAReLU(bits=2)(x)  # lazy: DDP refuses it until a forward has made it
        dqa_ext.DQAReLU(bits=2, num_channels=3, init_step=0.5)(x)  # no data-driven step
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
        dqa_ext.DQAReLU(bits=2, num_channels=3)(x)


@pytest.mark.parametrize("num_channels", [3, None])
def test_state_dict_without_extra_state_keeps_the_loaded_step(num_channels):
    m = dqa_ext.DQAReLU(bits=2, num_channels=num_channels)
    result = m.load_state_dict({"step": torch.full((3,), 0.5)}, strict=False)  # older / third-party
    assert result.missing_keys == ["_extra_state"] and m.initialized
    m(torch.randn(4, 3, 5, 5) * 7)
    assert torch.equal(m.step.detach(), torch.full((3,), 0.5))


def test_per_tensor_grad_scale_ignores_channel_dim():
    x = torch.randn(4, 3, 6, 5)
    expected = 1 / math.sqrt(3 * 6 * 5 * 3)  # elements per sample sharing the one step, times qmax
    grads = []
    for channel_dim in (1, 0, -1, 7, -9):
        m = dqa_ext.DQAReLU(bits=2, per_channel=False, init_step=0.5, channel_dim=channel_dim)
        assert m._grad_scale(x, m._channel_axis(x)) == pytest.approx(expected)
        m(x).sum().backward()
        grads.append(m.step.grad)
    assert all(torch.equal(g, grads[0]) for g in grads)


class TrainOnlyTail(nn.Module):
    """Its second activation runs in train mode only: calibrate (eval mode) never reaches it."""

    def __init__(self):
        super().__init__()
        self.a = dqa_ext.DQAReLU(bits=2, num_channels=3)
        self.b = dqa_ext.DQAReLU(bits=2, num_channels=3)

    def forward(self, x):
        x = self.a(x)
        return self.b(x) if self.training else x


def test_calibrate_that_fails_leaves_every_step_and_flag_as_it_was():
    from dqa_ext.calibrate import calibrate

    torch.manual_seed(0)
    model = TrainOnlyTail()
    model(torch.randn(4, 3, 5, 5))
    before = [m.step.detach().clone() for m in (model.a, model.b)]

    def batches():
        yield torch.randn(4, 3, 5, 5) * 10
        yield "not a batch"

    with pytest.raises(TypeError, match="each batch must be a tensor"):
        calibrate(model, batches(), distributed=False)
    with pytest.raises(RuntimeError, match="1 DQAReLU step.* b; every step was left as it was"):
        calibrate(model, [torch.randn(4, 3, 5, 5) * 10], distributed=False)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [], distributed=False)
    assert model.a.initialized and model.b.initialized and model.training
    model(torch.randn(4, 3, 5, 5) * 10)  # a plain forward does not re-initialise
    for m, step in zip((model.a, model.b), before):
        assert torch.equal(m.step.detach(), step)
