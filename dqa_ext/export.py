"""Export of models with DQAReLU: ONNX (standard QuantizeLinear/DequantizeLinear), torch.export,
torch.jit.trace; and what does not export, said in one line.

ONNX: `dqa_ext::fake_quantize` becomes the QDQ pattern that TensorRT, onnxruntime and the
quantization toolkits (Brevitas, NNCF, pytorch-quantization) use:

    Cast(x, float32) -> Max(., qmin*s) -> Min(., qmax*s) -> QuantizeLinear(s, zero_point=0, axis)
        -> DequantizeLinear(s, 0, axis) -> Cast(x's dtype)

with per-axis scales for a per-channel step (axis = channel_dim) and uint8 (int8 when qmin < 0)
levels. The clamp bounds are float32 products qmin*s, qmax*s: x/s of a clamped value rounds to
exactly qmin or qmax (the product is within one rounding of the bound, far under half a level),
so the levels are those of the PyTorch op. ONNX needs levels that fit 8 bits (DQAReLU: bits <= 8).

Both ONNX exporters work after `import dqa_ext`, with nothing else to import or pass:
torch.onnx.export(..., dynamo=True) finds the translation in onnxscript's torchlib table, where
dqa_ext adds it when onnxscript is imported; the TorchScript exporter (dynamo=False) finds the
same graph as a custom-op symbolic, registered when torch.onnx is imported. `onnx_export(model,
args, ...)` is torch.onnx.export(..., dynamo=True) with the translation passed explicitly."""

import math

import torch

from . import _backend
from ._after_import import after_import

_OP = "dqa_ext::fake_quantize"


def _onnx_levels(qmin, qmax):
    """The ONNX integer type that holds qmin..qmax, or a clear error."""
    from onnxscript import ir

    if 0 <= qmin and qmax <= 255:
        return ir.DataType.UINT8
    if -128 <= qmin and qmax <= 127:
        return ir.DataType.INT8
    raise NotImplementedError(f"dqa_ext ONNX export: levels qmin={qmin}..qmax={qmax} do not fit 8 bits "
                              "(ONNX QuantizeLinear at opset 18 has uint8/int8 only)")


def fake_quantize_onnx(x, step, qmin, qmax, channel_dim=1, grad_scale=1.0, min_step=0.0):
    """ONNX Script (trace-only) translation of dqa_ext::fake_quantize; grad_scale is training-only."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    levels = _onnx_levels(qmin, qmax)
    rank = len(x.shape)
    # The op takes a step of any shape holding 1 or x.shape[channel_dim] elements (0-d, (C,),
    # (C, 1, 1)); QuantizeLinear wants a scalar or a 1-D per-axis scale.
    dims = list(step.shape) if step.shape is not None else [None]
    if not all(isinstance(d, int) for d in dims):
        raise NotImplementedError(f"dqa_ext ONNX export: the step needs a static shape, got {step.shape}")
    per_channel = math.prod(dims) != 1
    dim = channel_dim % rank if per_channel else 0
    dtype = x.type.dtype
    if min_step > 0:  # a learned step is used as max(|step|, min_step)
        step = op.Max(op.Abs(step), op.Constant(value_float=float(min_step)))
    xf = op.Cast(x, to=ir.DataType.FLOAT) if dtype != ir.DataType.FLOAT else x
    if per_channel:  # the clamp bounds broadcast along the channel axis
        shape = [1] * rank
        shape[dim] = -1
        scale = op.Reshape(step, op.Constant(value_ints=[-1]))
        bound = op.Reshape(scale, op.Constant(value_ints=shape))
    else:
        bound = scale = op.Reshape(step, op.Constant(value_ints=[]))  # a scalar: per-tensor Q/DQ
    lo = op.Mul(bound, op.Constant(value_float=float(qmin)))
    hi = op.Mul(bound, op.Constant(value_float=float(qmax)))
    clamped = op.Min(op.Max(xf, lo), hi)
    zero = op.Cast(op.Constant(value_int=0), to=levels)
    if per_channel:
        zero = op.Expand(zero, op.Shape(scale))
        q = op.QuantizeLinear(clamped, scale, zero, axis=dim)
        y = op.DequantizeLinear(q, scale, zero, axis=dim)
    else:
        q = op.QuantizeLinear(clamped, scale, zero)
        y = op.DequantizeLinear(q, scale, zero)
    return op.Cast(y, to=dtype) if dtype != ir.DataType.FLOAT else y


def _symbolic(g, x, step, qmin, qmax, channel_dim, grad_scale, min_step):
    """The same graph for the TorchScript exporter (torch.onnx.export(..., dynamo=False))."""
    from torch.onnx import symbolic_helper as sh

    qmin, qmax, channel_dim = (sh._get_const(v, "i", n) for v, n in
                               ((qmin, "qmin"), (qmax, "qmax"), (channel_dim, "channel_dim")))
    min_step = sh._get_const(min_step, "f", "min_step")
    levels = torch.uint8 if 0 <= qmin and qmax <= 255 else torch.int8
    if levels == torch.int8 and not (-128 <= qmin and qmax <= 127):
        _onnx_levels(qmin, qmax)  # the same error as the dynamo path
    sizes, rank = sh._get_tensor_sizes(step), sh._get_tensor_rank(x)
    if sizes is None or any(d is None for d in sizes) or rank is None:
        raise NotImplementedError("dqa_ext ONNX export: the step and x need static shapes")
    per_channel = math.prod(sizes) != 1
    dim = channel_dim % rank if per_channel else 0
    dtype = x.type().scalarType()

    def const(value, dtype=torch.float32):
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    xf = g.op("Cast", x, to_i=sh.cast_pytorch_to_onnx["Float"]) if dtype != "Float" else x
    if min_step > 0:
        step = g.op("Max", g.op("Abs", step), const(min_step))
    if per_channel:
        shape = [1] * rank
        shape[dim] = -1
        scale = g.op("Reshape", step, const([-1], torch.int64))
        bound = g.op("Reshape", scale, const(shape, torch.int64))
        zero = const([0] * math.prod(sizes), levels)
    else:
        bound = scale = g.op("Reshape", step, const([], torch.int64))
        zero = const(0, levels)
    clamped = g.op("Min", g.op("Max", xf, g.op("Mul", bound, const(float(qmin)))),
                   g.op("Mul", bound, const(float(qmax))))
    axis = {"axis_i": dim} if per_channel else {}
    y = g.op("DequantizeLinear", g.op("QuantizeLinear", clamped, scale, zero, **axis), scale, zero, **axis)
    return g.op("Cast", y, to_i=sh.cast_pytorch_to_onnx[dtype]) if dtype != "Float" else y


def onnx_translation_table():
    """{op: ONNX translation}: pass as torch.onnx.export(..., custom_translation_table=...)."""
    table = {}
    if _backend.LOADED:
        table[torch.ops.dqa_ext.fake_quantize.default] = fake_quantize_onnx
    return table


def onnx_export(model, args, f=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True) with dqa_ext's translation; returns the
    ONNXProgram. Other keyword arguments go to torch.onnx.export."""
    table = dict(onnx_translation_table())
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)


def _register_translation(registration):
    """Adds the translation to onnxscript's torchlib table, which torch.onnx.export(dynamo=True)
    reads on every call (the reference path exports as plain aten ops and needs none)."""
    if _backend.LOADED and _OP not in registration.default_registry:
        registration.torch_op(_OP, trace_only=True)(fake_quantize_onnx)


def _register_symbolic(onnx):
    if _backend.LOADED:
        onnx.register_custom_op_symbolic(_OP, _symbolic, 13)  # per-axis QuantizeLinear: opset 13


after_import("onnxscript.function_libs.torch_lib.registration", _register_translation)
after_import("torch.onnx", _register_symbolic)
