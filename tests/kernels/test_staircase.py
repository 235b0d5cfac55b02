"""The fused sigmoid staircase (dqa_ext::sigmoid_staircase, the annealed twin's quantizer stand-in)
computes what the same formula in PyTorch ops and autograd compute, in every layout the twins use,
and refuses bad input with one line naming the argument."""
import pytest
import torch

from dqa_ext.robust.attacks.adaptive import _Staircase, _fused_staircase, staircase_reference, surrogate

from support.devices import needs_extension

CASES = [((7, 16, 9, 9), (1, 16, 1, 1), False), ((7, 16, 9, 9), (1, 16, 1, 1), True), ((5, 33), (1, 33), False),
         ((6, 3, 5, 5), (1,), True), ((6, 3, 5, 5), (1, 3, 1, 1), True), ((6, 3, 5, 5), (1, 1, 5, 1), False),
         ((4, 5, 3), (1, 5, 1), False), ((2, 7, 9), (1, 1, 9), False), ((1, 1), (1,), False)]


@pytest.mark.parametrize("shape,step_shape,channels_last", CASES)
@pytest.mark.parametrize("qmax", [1, 3, 15])
@pytest.mark.parametrize("per_example", [False, True])
def test_fused_staircase_matches_the_formula(shape, step_shape, channels_last, qmax, per_example):
    needs_extension("cpu")
    gen = torch.Generator().manual_seed(qmax)
    x = torch.randn(shape, generator=gen) * 2
    x.view(-1)[0] = -100.0  # a dead unit: every logit clamped
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    s = torch.rand(step_shape, generator=gen) + 0.2
    temp = torch.rand(shape[0], generator=gen) * 0.5 + 0.01 if per_example else 0.3
    weights = torch.randn(shape, generator=gen)
    assert _fused_staircase(x, s)
    fused = _Staircase.apply(x, s, temp, qmax)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), x)
    formula = staircase_reference(x, s, qmax, temp)
    (g_formula,) = torch.autograd.grad((formula * weights).sum(), x)
    assert fused.stride() == x.stride()
    torch.testing.assert_close(fused, formula, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, g_formula, rtol=1e-5, atol=1e-6 * g_formula.abs().max().item())
    # the same units pass no gradient (dead and saturated ones, far from every threshold)
    assert torch.equal(g_fused == 0, g_formula == 0) and g_fused.reshape(-1)[0] == 0


def test_the_twin_surrogate_takes_the_fused_op_on_a_cpu_and_the_formula_elsewhere():
    needs_extension("cpu")
    x, s = torch.randn(2, 3, 4, 4), torch.full((1, 3, 1, 1), 0.5)
    assert _fused_staircase(x, s)
    assert not _fused_staircase(x.double(), s) and not _fused_staircase(x[:, :, ::2], s)
    assert not _fused_staircase(x, s.clone().requires_grad_(True))  # the op gives no step gradient
    assert not _fused_staircase(x, torch.full((1, 3, 4, 1), 0.5))  # not one step per channel of one dim
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _fused_staircase(cl, s) and not _fused_staircase(cl, torch.full((1, 1, 4, 1), 0.5))
    torch.testing.assert_close(surrogate("sigmoid", x, s, 3, 0.2), staircase_reference(x, s, 3, 0.2))
    leaky = surrogate("leaky_sigmoid", x, s, 3, 0.2, leak=0.1)
    torch.testing.assert_close(leaky, staircase_reference(x, s, 3, 0.2) + 0.1 * x)


def test_non_finite_inputs_follow_the_formula():
    needs_extension("cpu")
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.5, 1e30, -1e30]])
    y, d = torch.ops.dqa_ext.sigmoid_staircase(x, torch.ones(1), torch.tensor([0.1]), 3, 0)
    assert y[0, 0].isnan() and d[0, 0] == 0  # NaN stays NaN and passes no gradient
    torch.testing.assert_close(y[0, 1:], staircase_reference(x, torch.ones(1), 3, 0.1)[0, 1:])
    assert torch.equal(d[0, [1, 2, 4, 5]], torch.zeros(4))


ONE = torch.ones(1)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 3, dtype=torch.float64), ONE, ONE, 3, 1), "x must be float32"),
    ((torch.zeros(()), ONE, ONE, 3, 0), "x must have a batch dim"),
    ((torch.zeros(4, 6)[:, ::2], ONE, ONE, 3, 1), "x must be contiguous or channels_last"),
    ((torch.zeros(2, 3), ONE, ONE, 3, 2), "channel_dim 2 is out of range"),
    ((torch.zeros(2, 3), torch.ones(2), ONE, 3, 1), "step must be float32 on x's device with 1 or 3 values"),
    ((torch.zeros(2, 3), ONE.double(), ONE, 3, 1), "step must be float32"),
    ((torch.zeros(2, 3), ONE, torch.ones(3), 3, 1), "temp must be a float32 vector of 1 or 2"),
    ((torch.zeros(2, 3), ONE, torch.ones(2, 1), 3, 1), "temp must be a float32 vector"),
    ((torch.zeros(2, 3), ONE, ONE.double(), 3, 1), "temp must be a float32 vector"),
    ((torch.zeros(2, 3), ONE, ONE, 0, 1), r"qmax must be in \[1, 255\]"),
    ((torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.ones(4), ONE, 3, 2),
     "a channels_last x takes per-channel steps along dim 1 only"),
])
def test_bad_input_is_refused_with_one_line(args, match):
    needs_extension("cpu")
    with pytest.raises(RuntimeError, match=match) as err:
        torch.ops.dqa_ext.sigmoid_staircase(*args)
    assert "sigmoid_staircase" in str(err.value).splitlines()[0]
