"""DQAReLU and convert: initialisation, learning, fixed mode, state_dict, layouts, AMP, backends."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dqa_ext
from dqa_ext import _backend, reference

from support.devices import DEVICES, needs_extension
from support.parity import bitwise_equal


def test_lsq_initialisation_per_channel_and_per_tensor():
    x = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    m = dqa_ext.DQAReLU(bits=2)
    m(x)
    expected = 2 * x.abs().mean(dim=(0, 2, 3)) / math.sqrt(3)
    torch.testing.assert_close(m.step.detach(), expected)
    assert m.num_channels == 3 and isinstance(m.step, nn.Parameter)
    t = dqa_ext.DQAReLU(bits=3, per_channel=False)
    t(x)
    torch.testing.assert_close(t.step.detach(), (2 * x.abs().mean() / math.sqrt(7)).reshape(1))
    steps_after_init = m.step.detach().clone()
    m(x * 10)  # initialised once only
    assert torch.equal(m.step.detach(), steps_after_init)


def test_fixed_mode_defaults_and_no_step_gradient():
    m = dqa_ext.DQAReLU(bits=2, mode="fixed", num_channels=4)
    assert not isinstance(m.step, nn.Parameter) and torch.equal(m.step, torch.full((4,), 1 / 3))
    assert list(m.parameters()) == []
    calls = []

    class Spy(TorchDispatchMode):  # sees the ops the C++ autograd kernel calls
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.dqa_ext.fake_quantize_backward.default:
                calls.append(args[7])  # need_step_grad
            return func(*args, **(kwargs or {}))

    x = torch.rand(2, 4, 3, 3, requires_grad=True) * 2
    x.retain_grad()
    with Spy():
        y = m(x)
        y.sum().backward()
    assert m.step.grad is None
    assert calls == [False]  # the backward skipped the step-gradient reduction
    assert y.max() <= 1.0 and set(torch.unique(y * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_grad_scale_lsq():
    m = dqa_ext.DQAReLU(bits=2, num_channels=3, init_step=0.5)
    x = torch.randn(4, 3, 6, 5)
    assert m._grad_scale(x, 1) == pytest.approx(1 / math.sqrt(30 * 3))
    assert dqa_ext.DQAReLU(bits=2, init_step=0.5, per_channel=False)._grad_scale(x, 1) == pytest.approx(1 / math.sqrt(90 * 3))
    assert dqa_ext.DQAReLU(bits=2, init_step=0.5, num_channels=6, channel_dim=-1)._grad_scale(torch.randn(7, 6), 1) == pytest.approx(1 / math.sqrt(3))
    assert dqa_ext.DQAReLU(bits=2, grad_scale=0.25)._grad_scale(x, 1) == 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_reference_backend(device, backend):
    """The module through the extension equals the module through the reference, bit for bit."""
    needs_extension(device)
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 7, 7, device=device) * 2).to(memory_format=torch.channels_last)
    out = {}
    for name in ("extension", "reference"):
        backend(name)
        m = dqa_ext.DQAReLU(bits=2, num_channels=6, init_step=0.4).to(device)
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * torch.arange(y.numel(), device=device).reshape(y.shape).sin()).sum().backward()
        out[name] = (y.detach(), xx.grad, m.step.grad)
    bitwise_equal(out["extension"][0], out["reference"][0])
    bitwise_equal(out["extension"][1], out["reference"][1])
    torch.testing.assert_close(out["extension"][2], out["reference"][2], rtol=1e-5, atol=1e-7)
    assert out["extension"][0].is_contiguous(memory_format=torch.channels_last)


def test_dqa_relu_learns():
    """A tiny regression: the loss falls and the learned steps move."""
    torch.manual_seed(0)
    x = torch.rand(256, 8) * 4 - 1
    target = (x @ torch.randn(8, 1)).relu()
    model = nn.Sequential(nn.Linear(8, 32), dqa_ext.DQAReLU(bits=3, channel_dim=-1), nn.Linear(32, 1))
    model(x)  # materialise and initialise the lazy step before building the optimizer
    act = model[1]
    start = act.step.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (act.step.detach() - start).abs().max() > 1e-3
    assert act in [m for m in model.modules() if isinstance(m, dqa_ext.DQAReLU)]


def test_learned_step_stays_positive():
    m = dqa_ext.DQAReLU(bits=2, num_channels=2, init_step=0.5)
    with torch.no_grad():
        m.step.copy_(torch.tensor([-0.5, 0.0]))
    y = m(torch.full((1, 2), 0.6))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.tensor([[0.5, 3e-6]]), rtol=0, atol=1e-6)


def test_state_dict_round_trip_and_lazy_load():
    torch.manual_seed(0)
    m = dqa_ext.DQAReLU(bits=2)
    m(torch.randn(4, 5, 3, 3))
    sd = m.state_dict()
    assert set(sd) == {"step", "_extra_state"}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # safetensors and TorchScript take tensors only
    fresh = dqa_ext.DQAReLU(bits=2)  # lazy, not initialised
    fresh.load_state_dict(sd)
    assert fresh.initialized and torch.equal(fresh.step, m.step)
    fresh(torch.randn(4, 5, 3, 3) * 100)  # a loaded model is never re-initialised
    assert torch.equal(fresh.step, m.step)
    fixed = dqa_ext.DQAReLU(bits=1, mode="fixed", num_channels=5)
    again = dqa_ext.DQAReLU(bits=1, mode="fixed")
    again.load_state_dict(fixed.state_dict())
    assert torch.equal(again.step, fixed.step)


def test_extra_repr():
    assert repr(dqa_ext.DQAReLU(3, "fixed", num_channels=4)) == "DQAReLU(bits=3, mode=fixed, channels=4, channel_dim=1)"
    assert "channels=lazy" in repr(dqa_ext.DQAReLU())
    assert "channels=per-tensor" in repr(dqa_ext.DQAReLU(per_channel=False))


def test_convert_replaces_every_relu():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 24 * 24, 3), nn.ReLU())
    out = dqa_ext.convert(model, bits=3, mode="fixed")
    assert out is model
    acts = [m for m in model.modules() if isinstance(m, dqa_ext.DQAReLU)]
    assert len(acts) == 3 and not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert all(a.bits == 3 and a.mode == "fixed" for a in acts)
    y = model(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 3) and (y >= 0).all()
    lone = dqa_ext.convert(nn.ReLU(), bits=1, per_channel=False)
    assert isinstance(lone, dqa_ext.DQAReLU) and not lone.per_channel


def test_autocast_bfloat16_cpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), dqa_ext.DQAReLU(2), nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 3, 9, 9)
    model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[1](model[0](x))
        assert h.dtype == torch.bfloat16
        model(x).float().sum().backward()
    assert model[1].step.grad is not None and torch.isfinite(model[1].step.grad).all()


def test_backend_selection(backend, monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "fake_quantize", lambda *a: calls.append(a) or a[0])
    backend("reference")
    dqa_ext.functional.fake_quantize(torch.ones(3), torch.ones(1), 0, 3, 0)
    assert len(calls) == 1
    if _backend.BUILT_FOR["cpu"]:
        backend("auto")
        dqa_ext.functional.fake_quantize(torch.ones(3), torch.ones(1), 0, 3, 0)
        assert len(calls) == 1  # the extension ran
    backend("extension")
    with pytest.raises(RuntimeError, match="DQA_EXT_BACKEND=extension, but the extension cannot run on mps"):
        _backend.use_extension("mps")
    backend("auto")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="using the pure-PyTorch reference on mps"):
        assert not _backend.use_extension("mps")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _backend.use_extension("mps")


def test_backend_info():
    info = dqa_ext.backend_info()
    assert info["torch"] == torch.__version__
    assert info["cpu_kernels"] == _backend.BUILT_FOR["cpu"]
    assert {"cuda_kernels", "extension_loaded", "backend"} <= set(info)


def test_convert_splits_a_relu_shared_by_two_sequential_slots():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    assert dqa_ext.convert(model, bits=2) is model and type(model) is nn.Sequential
    assert isinstance(model[1], dqa_ext.DQAReLU) and isinstance(model[3], dqa_ext.DQAReLU)
    assert model[1] is not model[3]  # two call sites: two sets of steps


def test_reused_module_with_other_channel_count_gets_clear_error():
    m = dqa_ext.DQAReLU(bits=2)
    m(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="has 4 per-channel steps but got an input with 8 channels"):
        m(torch.randn(2, 8, 3, 3))


def test_lazy_module_survives_to_and_casts():
    model = dqa_ext.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), bits=2)
    model.to(memory_format=torch.channels_last).half().float()  # lazy step: nothing to cast
    y = model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert model[1].step.dtype == torch.float32 and model[1].num_channels == 4
    assert y.is_contiguous(memory_format=torch.channels_last)
    model.to(torch.bfloat16)  # the weights are cast; the step stays float32
    assert model[1].step.dtype == torch.float32
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_first_forward_in_inference_mode_then_train():
    for mode in ("dynamic", "fixed"):
        m = dqa_ext.DQAReLU(bits=2, mode=mode)
        with torch.inference_mode():
            m(torch.randn(2, 3, 4, 4))
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        m(x).sum().backward()
        assert x.grad is not None


def test_bad_channel_dim_leaves_module_untouched():
    m = dqa_ext.DQAReLU(bits=2)
    with pytest.raises(RuntimeError, match="channel_dim must be in"):
        m(torch.randn(3))  # channel_dim=1 on a 1-D input
    assert not m.initialized and m.num_channels is None


def test_qmin_qmax_must_be_integers():
    with pytest.raises(TypeError, match="qmin must be an integer, got 0.5"):
        dqa_ext.functional.fake_quantize(torch.ones(3), torch.ones(1), 0.5, 3, 0)
    with pytest.raises(TypeError, match="qmax must be an integer, got 3.5"):
        dqa_ext.functional.fake_quantize(torch.ones(3), torch.ones(1), 0, 3.5, 0)


# --- levels, channel_dim, double backward, torch.func ---

def test_state_dict_of_other_bits_is_refused():
    src = dqa_ext.DQAReLU(bits=2, num_channels=3, init_step=0.5)
    for target in (dqa_ext.DQAReLU(bits=3, num_channels=3), dqa_ext.DQAReLU(bits=3)):
        with pytest.raises(RuntimeError, match="state_dict is for bits=2 but this module has bits=3"):
            target.load_state_dict(src.state_dict())
    model = nn.Sequential(nn.Linear(2, 3), dqa_ext.DQAReLU(bits=3, channel_dim=-1))
    src_model = nn.Sequential(nn.Linear(2, 3), dqa_ext.DQAReLU(bits=2, channel_dim=-1, num_channels=3))
    with pytest.raises(RuntimeError, match="DQAReLU '1': the state_dict is for bits=2"):
        model.load_state_dict(src_model.state_dict(), strict=False)
    old = {"step": torch.full((3,), 0.5), "_extra_state": {"initialized": True}}  # saved before bits was kept
    dqa_ext.DQAReLU(bits=3).load_state_dict(old)
    old = {"step": torch.full((3,), 0.5), "_extra_state": {"initialized": True, "bits": 3}}  # the dict format
    assert dqa_ext.DQAReLU(bits=3).load_state_dict(old) is not None


@pytest.mark.parametrize("saved,target", [("fixed", "dynamic"), ("dynamic", "fixed")])
def test_state_dict_of_the_other_mode_is_refused(saved, target):
    src = dqa_ext.DQAReLU(bits=2, mode=saved, num_channels=3, init_step=0.5)
    for dst in (dqa_ext.DQAReLU(bits=2, mode=target, num_channels=3), dqa_ext.DQAReLU(bits=2, mode=target)):
        with pytest.raises(RuntimeError, match=f"state_dict is for mode='{saved}' but this module has mode='{target}'"):
            dst.load_state_dict(src.state_dict())


def test_numpy_integer_levels():
    import numpy as np

    x, s = torch.randn(2, 3, 4), torch.rand(3) + 0.1
    expected = dqa_ext.functional.fake_quantize(x, s, 0, 3)
    for qmin, qmax in ((np.int64(0), np.int64(3)), (np.int32(0), np.uint8(3))):
        assert torch.equal(dqa_ext.functional.fake_quantize(x, s, qmin, qmax), expected)
    with pytest.raises(TypeError, match="qmin must be an integer, got"):
        dqa_ext.functional.fake_quantize(x, s, np.float32(0), 3)
    with pytest.raises(TypeError, match="qmax must be an integer, got"):
        dqa_ext.functional.fake_quantize(x, s, 0, np.bool_(True))


@pytest.mark.parametrize("name", ["extension", "reference"])
def test_per_tensor_step_ignores_channel_dim(name, backend):
    if name == "extension":
        needs_extension("cpu")
    backend(name)
    x, s = torch.randn(10), torch.tensor([0.3])
    y = dqa_ext.functional.fake_quantize(x, s, 0, 3)  # channel_dim=1 on a 1-D x
    bitwise_equal(y, reference.fake_quantize_forward(x, s, 0, 3, 0))
    m = dqa_ext.DQAReLU(bits=2, per_channel=False)
    bitwise_equal(m(x), reference.fake_quantize_forward(x, m.step.detach(), 0, 3, 0))
    with pytest.raises(RuntimeError, match="channel_dim must be in"):  # a per-channel step still checks
        dqa_ext.functional.fake_quantize(x, torch.rand(10) + 0.1, 0, 3, channel_dim=1)


def test_double_backward_is_refused_by_the_kernels_and_computed_by_the_reference(backend):
    needs_extension("cpu")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    step = torch.full((3,), 0.5, requires_grad=True)
    backend("extension")
    y = dqa_ext.functional.fake_quantize(x, step, 0, 3)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="backward is not differentiable, so double backward"):
        gx.sum().backward()
    torch.autograd.grad(y.sum(), x)  # first order as usual
    backend("reference")
    y = dqa_ext.functional.fake_quantize(x, step, 0, 3)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    v = x.detach() / 0.5
    inside = (v > 0) & (v < 3)
    torch.testing.assert_close(ggx, 2 * inside.float())  # d/dx of 2*y*mask: 2*mask*mask


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_double_backward_through_the_module_gives_one_clear_line(mode, backend):
    """Fixed mode too (the step needs no gradient there): the same message, not a shape error."""
    needs_extension("cpu")
    backend("extension")
    m = dqa_ext.DQAReLU(2, mode, num_channels=3, init_step=0.5)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad((m(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="backward is not differentiable, so double backward"):
        gx.sum().backward()


def test_call_arguments_follow_attribute_changes():
    """DQAReLU works out its call's arguments once per input shape; setting an attribute (here the
    gradient scale) must be seen by the next call."""
    m = dqa_ext.DQAReLU(2, num_channels=3, init_step=0.5, grad_scale=1.0)
    x = torch.randn(2, 3, 4, 4)
    m(x).sum().backward()
    first = m.step.grad.clone()
    m.step.grad = None
    m.grad_scale = 0.25
    m(x).sum().backward()
    torch.testing.assert_close(m.step.grad, first * 0.25)
    m.step.grad = None
    m(torch.cat([x, x])).sum().backward()  # another shape: arguments worked out again
    torch.testing.assert_close(m.step.grad, first * 0.5)


def test_torch_function_modes_and_subclasses_see_the_op():
    """The eager fast entry is taken only for plain tensors with no __torch_function__ mode: a
    mode (FlopCounter, device contexts...) or a subclass goes through torch.ops and sees the op."""
    from torch.overrides import TorchFunctionMode

    needs_extension("cpu")
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    m = dqa_ext.DQAReLU(2, num_channels=3, init_step=0.5)
    x = torch.randn(2, 3, 4, 4)
    expected = m(x)
    with Record():
        y = m(x)
    assert any("fake_quantize" in name for name in seen), seen
    bitwise_equal(y, expected)

    class Tagged(torch.Tensor):
        pass

    out = m(x.as_subclass(Tagged))
    assert type(out) is Tagged
    bitwise_equal(out.as_subclass(torch.Tensor), expected)


def test_torch_func_grad_matches_autograd():
    m = dqa_ext.DQAReLU(bits=2, num_channels=3, init_step=0.5)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    m(x).sum().backward()
    g = torch.func.grad(lambda t: m(t).sum())(x.detach())
    bitwise_equal(g, x.grad)
