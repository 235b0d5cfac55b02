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

`onnx_export(model, args, ...)` is torch.onnx.export(..., dynamo=True) with the translation;
`register_onnx()` adds it to the exporter's default table, so a plain
torch.onnx.export(model, args, dynamo=True) works too (dqa_ext.export registers on import)."""

import math

import torch

from . import _backend

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


def register_onnx():
    """Adds the translation to onnxscript's torchlib table, which torch.onnx.export(dynamo=True)
    reads on every call; False when onnxscript is not installed or the kernels are not loaded (the
    reference path exports as plain aten ops, which need no translation)."""
    if not _backend.LOADED:
        return False
    try:
        from onnxscript.function_libs.torch_lib import registration
    except ImportError:
        return False
    if _OP not in registration.default_registry:
        registration.torch_op(_OP, trace_only=True)(fake_quantize_onnx)
    return True


REGISTERED = register_onnx()
