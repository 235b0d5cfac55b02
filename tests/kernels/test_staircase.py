"""The fused sigmoid staircase (dqa_ext::sigmoid_staircase, the annealed twin's quantizer stand-in)
computes what the same formula in PyTorch ops and autograd compute, in every layout the twins use,
and refuses bad input with one line naming the argument."""
import pytest
import torch

from dqa_ext.robust.attacks.adaptive import _Staircase, _fused_staircase, staircase_reference, surrogate

from support.devices import needs_extension

CASES = [((7, 16, 9, 9), (1, 16, 1, 1), False), ((7, 16, 9, 9), (1, 16, 1, 1), True), ((5, 33), (1, 33), False),
         ((6, 3, 5, 5), (1,), True), ((1, 1), (1,), False)]


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
    torch.testing.assert_close(surrogate("sigmoid", x, s, 3, 0.2), staircase_reference(x, s, 3, 0.2))
    leaky = surrogate("leaky_sigmoid", x, s, 3, 0.2, leak=0.1)
    torch.testing.assert_close(leaky, staircase_reference(x, s, 3, 0.2) + 0.1 * x)


def test_non_finite_inputs_follow_the_formula():
    needs_extension("cpu")
    v = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.5, 1e30, -1e30]])
    u, d = torch.ops.dqa_ext.sigmoid_staircase(v, torch.tensor([0.1]), 3)
    assert u[0, 0].isnan() and d[0, 0] == 0  # NaN stays NaN and passes no gradient
    torch.testing.assert_close(u[0, 1:], staircase_reference(v, torch.ones(1), 3, 0.1)[0, 1:])
    assert torch.equal(d[0, [1, 2, 4, 5]], torch.zeros(4))


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 3, dtype=torch.float64), torch.ones(1), 3), "v must be float32"),
    ((torch.zeros(()), torch.ones(1), 3), "v must have a batch dim"),
    ((torch.zeros(4, 6)[:, ::2], torch.ones(1), 3), "v must be contiguous or channels_last"),
    ((torch.zeros(2, 3), torch.ones(3), 3), "temp must be a float32 vector of 1 or 2"),
    ((torch.zeros(2, 3), torch.ones(2, 1), 3), "temp must be a float32 vector"),
    ((torch.zeros(2, 3), torch.ones(1, dtype=torch.float64), 3), "temp must be a float32 vector"),
    ((torch.zeros(2, 3), torch.ones(1), 0), r"qmax must be in \[1, 255\]"),
])
def test_bad_input_is_refused_with_one_line(args, match):
    needs_extension("cpu")
    with pytest.raises(RuntimeError, match=match) as err:
        torch.ops.dqa_ext.sigmoid_staircase(*args)
    assert "sigmoid_staircase" in str(err.value).splitlines()[0]
