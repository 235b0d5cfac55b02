"""Each bad input gets a clear error naming the argument, raised before any work or write, from
the extension and from the reference alike."""

import re

import pytest
import torch

import dqa_ext
from dqa_ext import reference

from support.devices import needs_extension

X = torch.randn(2, 3, 4, 4)
S = torch.rand(3) + 0.1


def forward_ext(x, step, qmin=0, qmax=3, dim=1):
    needs_extension("cpu")
    return torch.ops.dqa_ext.fake_quantize(x, step, qmin, qmax, dim)


def backward_ext(x, step, qmin=0, qmax=3, dim=1, dy=None, grad_scale=1.0):
    needs_extension("cpu")
    dy = torch.ones_like(x) if dy is None else dy
    return torch.ops.dqa_ext.fake_quantize_backward(dy, x, step, qmin, qmax, dim, grad_scale, True)


def forward_ref(x, step, qmin=0, qmax=3, dim=1):
    return reference.fake_quantize_forward(x, step, qmin, qmax, dim)


def backward_ref(x, step, qmin=0, qmax=3, dim=1, dy=None, grad_scale=1.0):
    dy = torch.ones_like(x) if dy is None else dy
    return reference.fake_quantize_backward(dy, x, step, qmin, qmax, dim, grad_scale, True)


IMPLS = [forward_ext, backward_ext, forward_ref, backward_ref]

BAD = {
    "x_dtype": (dict(x=X.double()), "x must be float32, float16 or bfloat16, got"),
    "x_int": (dict(x=X.int()), "x must be float32, float16 or bfloat16"),
    "x_0d": (dict(x=torch.tensor(1.0), dim=0), "x must have at least 1 dimension"),
    "step_dtype": (dict(step=S.double()), "step must be float32, got"),
    "step_numel": (dict(step=torch.rand(4) + 0.1), "step must have 1 element (per-tensor) or x.shape[channel_dim] = 3"),
    "qmin_qmax": (dict(qmin=3, qmax=3), "qmin must be < qmax, got qmin=3, qmax=3"),
    "qmax_huge": (dict(qmax=2**25), "qmin and qmax must lie in [-2**24, 2**24]"),
    "channel_dim": (dict(dim=4), "channel_dim must be in [-4, 3] for x of shape [2, 3, 4, 4], got 4"),
    "channel_dim_neg": (dict(dim=-5), "channel_dim must be in [-4, 3]"),
    "step_zero": (dict(step=torch.tensor([0.5, 0.0, 1.0])), "step must be finite and > 0, got step[1] = 0"),
    "step_negative": (dict(step=torch.tensor([-0.5])), "step must be finite and > 0, got step[0] = -0.5"),
    "step_nan": (dict(step=torch.tensor([1.0, 1.0, float("nan")])), "step must be finite and > 0, got step[2] = nan"),
    "step_inf": (dict(step=torch.tensor([float("inf")])), "step must be finite and > 0, got step[0] = inf"),
}


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(impl, case):
    kwargs, message = BAD[case]
    args = dict(x=X, step=S)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        impl(**args)


BAD_BACKWARD = {
    "grad_shape": (dict(dy=torch.ones(2, 3, 4)), "grad_y must have x's shape [2, 3, 4, 4], got [2, 3, 4]"),
    "grad_dtype": (dict(dy=torch.ones(2, 3, 4, 4, dtype=torch.bfloat16)), "grad_y must have x's dtype"),
    "grad_scale": (dict(grad_scale=float("inf")), "grad_scale must be finite, got inf"),
}


@pytest.mark.parametrize("impl", [backward_ext, backward_ref], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", sorted(BAD_BACKWARD))
def test_bad_backward_input(impl, case):
    kwargs, message = BAD_BACKWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        impl(X, S, **kwargs)


def test_nothing_written_on_error():
    """The checks run before any work: a caller's tensors are untouched."""
    needs_extension("cpu")
    x, step = X.clone(), torch.tensor([1.0, -1.0, 1.0])
    dy = torch.ones_like(x)
    with pytest.raises(RuntimeError):
        torch.ops.dqa_ext.fake_quantize_backward(dy, x, step, 0, 3, 1, 1.0, True)
    assert torch.equal(x, X) and torch.equal(dy, torch.ones_like(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_on_other_device():
    x = X.cuda()
    for impl in (torch.ops.dqa_ext.fake_quantize, reference.fake_quantize_forward):
        with pytest.raises(RuntimeError, match=r"step must be on x's device \(cuda:0\), got cpu"):
            impl(x, S, 0, 3, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bad_step_gives_nan():
    """On CUDA a step that is not finite and > 0 cannot be checked without a host sync: that
    channel's outputs and gradients are NaN instead, and the other channels are unaffected."""
    x = torch.randn(2, 3, 8, 8, device="cuda")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        step = torch.tensor([0.5, bad, 0.25], device="cuda")
        y = torch.ops.dqa_ext.fake_quantize(x, step, 0, 3, 1)
        dx, ds = torch.ops.dqa_ext.fake_quantize_backward(torch.ones_like(x), x, step, 0, 3, 1, 1.0, True)
        assert y[:, 1].isnan().all() and dx[:, 1].isnan().all() and ds[1].isnan()
        assert not y[:, 0].isnan().any() and not dx[:, 2].isnan().any() and not ds[[0, 2]].isnan().any()
        yr = reference.fake_quantize_forward(x, step, 0, 3, 1)  # the reference mirrors it on CUDA
        assert yr[:, 1].isnan().all()


def test_functional_and_module_arguments():
    with pytest.raises(ValueError, match="bits must be an integer in 1..8, got 9"):
        dqa_ext.functional.quantized_relu(X, S, 9)
    with pytest.raises(ValueError, match="bits must be an integer in 1..8, got 0"):
        dqa_ext.DQAReLU(bits=0)
    with pytest.raises(ValueError, match="mode must be 'dynamic' or 'fixed', got 'learned'"):
        dqa_ext.DQAReLU(mode="learned")
    with pytest.raises(ValueError, match="num_channels must be a positive int or None, got 0"):
        dqa_ext.DQAReLU(num_channels=0)
    with pytest.raises(ValueError, match="init_step must be a finite float > 0 or None, got -1"):
        dqa_ext.DQAReLU(init_step=-1)
    with pytest.raises(ValueError, match="grad_scale must be 'lsq' or a finite float, got 'big'"):
        dqa_ext.DQAReLU(grad_scale="big")
    with pytest.raises(ValueError, match="DQA_EXT_BACKEND must be one of"):
        dqa_ext.set_backend("fast")
