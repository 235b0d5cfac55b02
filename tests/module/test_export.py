"""Export of converted models: ONNX through the dynamo exporter (standard QuantizeLinear /
DequantizeLinear, run by onnxruntime), torch.export and torch.jit.trace; jit.script refused in one
line."""

import logging

import pytest
import torch
from torch import nn

import dqa_ext

from support.devices import needs_extension
from support.fresh import run_fresh
from support.parity import bitwise_equal

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install '.[test]')")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install '.[test]')")
from dqa_ext import export  # noqa: E402

STANDARD = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Max", "Min", "Clip", "Relu", "Reshape", "Flatten", "Cast",
            "QuantizeLinear", "DequantizeLinear", "GlobalAveragePool", "ReduceMean", "Constant", "Identity",
            "BatchNormalization", "Expand", "Shape", "Sub", "Div"}


@pytest.fixture(autouse=True)
def _quiet_exporter():
    logging.disable(logging.WARNING)  # the exporter logs each torchvision op it cannot find
    yield
    logging.disable(logging.NOTSET)


def run_onnx(model, x, dynamo=True):
    """torch.onnx.export as its documentation shows it (nothing of dqa_ext passed), run by onnxruntime."""
    if dynamo:
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    else:
        import io

        import onnx

        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return proto, torch.from_numpy(out)


def assert_onnx_matches(ours, theirs, x):
    """Bit for bit, except where ONNX cannot: NaN inputs quantize to 0 (QuantizeLinear saturates
    NaN), and a zero level dequantizes to +0 where PyTorch keeps -0.0 (inputs in (-s/2, 0])."""
    zero = ours == 0
    nan_in = torch.isnan(ours)
    keep = ~(zero | nan_in)
    bitwise_equal(theirs[keep], ours[keep])
    assert (theirs[zero] == 0).all()
    assert (theirs[nan_in] == 0).all()


class Net(nn.Module):
    """Per-channel 4-D, per-channel (N, C) with channel_dim=-1, and a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x):
        h = self.act(self.conv(x))
        return torch.nn.functional.relu(self.fc(h.flatten(1)))


def converted_net():
    torch.manual_seed(0)
    model = dqa_ext.convert(Net(), bits=2)
    model.get_submodule("relu").channel_dim = -1
    model(torch.randn(16, 3, 8, 8) * 2)  # initialise the steps
    return model.eval()


def test_onnx_is_standard_qdq_and_onnxruntime_matches_pytorch():
    needs_extension("cpu")
    model = converted_net()
    x = torch.randn(4, 3, 8, 8) * 3
    # finite x: a NaN or inf through a convolution gives NaN, which ONNX quantizes to 0 (see below)
    proto, out = run_onnx(model, x)
    ops = [n.op_type for n in proto.graph.node]
    assert set(ops) <= STANDARD and not any(n.domain for n in proto.graph.node), ops
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2 and ops.count("DequantizeLinear") == 2
    assert all(any(a.name == "axis" for a in n.attribute) for n in qs)  # per-axis scales
    with torch.no_grad():
        ours = model(x)
    assert_onnx_matches(ours, out, x)


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_torchscript_onnx_exporter_gives_the_same_qdq_graph(mode):
    """torch.onnx.export(..., dynamo=False): the op's symbolic, registered when torch.onnx loads."""
    needs_extension("cpu")
    torch.manual_seed(0)
    model = dqa_ext.convert(Net(), bits=2, mode=mode)
    model.get_submodule("relu").channel_dim = -1
    model(torch.randn(16, 3, 8, 8) * 2)
    model.eval()
    x = torch.randn(4, 3, 8, 8) * 3
    proto, out = run_onnx(model, x, dynamo=False)
    ops = [n.op_type for n in proto.graph.node]
    assert set(ops) <= STANDARD | {"Abs"} and ops.count("QuantizeLinear") == 2, ops
    with torch.no_grad():
        assert_onnx_matches(model(x), out, x)


@pytest.mark.parametrize("dynamo", [True, False])
def test_fixed_step_exports_before_the_first_forward(dynamo):
    """A fixed step is known before any data (1/qmax): export needs no first forward, and the
    module is left as it was (still lazy)."""
    needs_extension("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), dqa_ext.DQAReLU(2, "fixed")).eval()
    x = torch.randn(2, 3, 8, 8) * 2
    _, out = run_onnx(model, x, dynamo=dynamo)
    assert model[1].is_lazy
    with torch.no_grad():
        assert_onnx_matches(model(x), out, x)
        bitwise_equal(torch.export.export(nn.Sequential(model[0], dqa_ext.DQAReLU(2, "fixed")), (x,)).module()(x),
                      model(x))


def test_learned_step_before_the_first_forward_is_one_clear_line():
    needs_extension("cpu")
    m = dqa_ext.DQAReLU(2, "dynamic", num_channels=3)  # made, not initialised from data
    with pytest.raises(Exception, match="learned step is set from the first batch"):
        torch.export.export(m, (torch.randn(2, 3, 4, 4),))


def test_plain_onnx_export_after_import_dqa_ext_alone():
    """The documented torch.onnx.export, in a fresh process that imports only dqa_ext: the
    translation is registered when the exporter imports onnxscript."""
    needs_extension("cpu")
    code = ("import logging, sys, torch, dqa_ext\n"
            "logging.disable(logging.WARNING)\n"
            "assert 'onnxscript' not in sys.modules\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dqa_ext.DQAReLU(2, 'fixed')).eval()\n"
            "p = torch.onnx.export(m, (torch.randn(2, 3, 8, 8),), dynamo=True, verbose=False)\n"
            "ops = [n.op_type for n in p.model_proto.graph.node]\n"
            "assert 'QuantizeLinear' in ops, ops\n")
    run_fresh(code)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_onnx_levels_ties_and_dtypes(per_channel, dtype):
    needs_extension("cpu")
    m = dqa_ext.DQAReLU(bits=3, num_channels=4 if per_channel else None, per_channel=per_channel, init_step=0.5)
    if per_channel:
        with torch.no_grad():
            m.step.copy_(torch.tensor([0.5, 0.25, 0.3, 1.7]))
    ties = (torch.arange(-4, 20) + 0.5) * 0.25  # halfway between levels for steps 0.5 and 0.25
    x = torch.cat([torch.randn(3, 4, 24) * 2, ties.expand(1, 4, 24)]).to(dtype)
    x[0, :, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    _, out = run_onnx(m, x)
    with torch.no_grad():
        assert_onnx_matches(m(x), out, x)


def test_levels_beyond_8_bits_fail_clearly():
    needs_extension("cpu")

    class Wide(nn.Module):
        def forward(self, x):
            return dqa_ext.functional.fake_quantize(x, torch.tensor([0.1]), 0, 1000, 1)

    with pytest.raises(Exception, match="levels qmin=0..qmax=1000 do not fit 8 bits"):
        torch.onnx.export(Wide(), (torch.randn(2, 3),), dynamo=True, verbose=False)


def test_onnx_export_helper_passes_the_translation():
    needs_extension("cpu")
    model = converted_net()
    x = torch.randn(2, 3, 8, 8)
    program = export.onnx_export(model, (x,), verbose=False)
    assert "QuantizeLinear" in [n.op_type for n in program.model_proto.graph.node]
    assert export.onnx_translation_table()  # the op -> translation table for torch.onnx.export


@pytest.mark.parametrize("name", ["extension", "reference"])
def test_torch_export_and_jit_trace_match_eager(name, backend):
    if name == "extension":
        needs_extension("cpu")
    backend(name)
    model = converted_net()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ours = model(x)
        bitwise_equal(torch.export.export(model, (x,)).module()(x), ours)
        bitwise_equal(torch.jit.trace(model, (x,))(x), ours)


def test_jit_script_is_refused_in_one_line():
    with pytest.raises(RuntimeError, match="torch.jit.script does not support DQAReLU .* use torch.jit.trace"):
        torch.jit.script(nn.Sequential(nn.Linear(2, 2), dqa_ext.DQAReLU(bits=2, num_channels=2)))


class StepOfShape(nn.Module):
    """fake_quantize with a step of another shape than (C,): 0-d, or (C, 1, 1) for NCHW."""

    def __init__(self, step):
        super().__init__()
        self.step = nn.Parameter(step)

    def forward(self, x):
        return dqa_ext.functional.fake_quantize(x, self.step, 0, 3, 1)


@pytest.mark.parametrize("step", [torch.tensor(0.4), torch.tensor([0.5, 0.25, 0.3]).reshape(3, 1, 1)],
                         ids=["0-d", "C11"])
def test_onnx_step_of_any_shape_runs_in_onnxruntime(step):
    needs_extension("cpu")
    model = StepOfShape(step).eval()
    x = torch.randn(2, 3, 4, 5) * 2
    proto, out = run_onnx(model, x)
    assert [n.op_type for n in proto.graph.node].count("QuantizeLinear") == 1
    with torch.no_grad():  # onnxruntime ran it: its scale was a scalar or 1-D
        assert_onnx_matches(model(x), out, x)
