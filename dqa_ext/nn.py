"""DQAReLU: a drop-in replacement for nn.ReLU that quantizes its output onto 2**bits levels."""

import math
import warnings

import torch
from torch import nn

from . import reference
from . import functional
from .functional import check_bits

_MODES = ("dynamic", "fixed")
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max
_Lazy = nn.parameter.UninitializedTensorMixin


def _lazy_like(lazy, device):
    """A fresh uninitialised learned step on device, float32."""
    return type(lazy)(requires_grad=lazy.requires_grad, device=device, dtype=torch.float32)


def _is_placeholder(step):
    """A step not made yet: a lazy learned step (torch's UninitializedParameter), or the empty
    buffer a fixed step waits in. The fixed one is a real tensor so that torch.export,
    torch.onnx.export and torch.jit.trace, which read every buffer first, work before the first
    forward: the fixed step's value is known."""
    return isinstance(step, _Lazy) or (isinstance(step, torch.Tensor) and step.numel() == 0)


_EXTRA_FORMAT = 1  # the first field of the extra-state tensor


def _extra_state_dict(state):
    """The extra state as a dict ({} when absent): today's int64 tensor, or the dict that
    dqa_ext 0.1 saved ({"initialized", "bits"}, no mode)."""
    if state is None:
        return {}
    if isinstance(state, dict):
        return state
    if isinstance(state, torch.Tensor) and state.dim() == 1 and state.numel() == 4 and int(state[0]) == _EXTRA_FORMAT \
            and 0 <= int(state[3]) < len(_MODES):
        return {"initialized": bool(state[1]), "bits": int(state[2]), "mode": _MODES[int(state[3])]}
    raise ValueError(f"the state_dict's _extra_state is not one dqa_ext wrote: {state!r}")


def _where(prefix):
    return f"DQAReLU {prefix[:-1]!r}" if prefix else "DQAReLU"


def _warn_if_distributed():
    """A step made before the first forward (num_channels given) can already be in a DDP model,
    and DDP never re-syncs parameters: a first forward under DDP gives each rank its own step.
    Warns without any collective (a forward on one rank must not wait for the others)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn("DQAReLU: a step initialised by a first forward under torch.distributed comes from "
                      "this rank's own batch, and DDP does not re-sync parameters after wrapping: call "
                      "dqa_ext.calibrate(model, batches) on every rank, or run the first forward before "
                      "wrapping the model in DDP", stacklevel=2)


def _exporting():
    """torch.export / torch.onnx.export(dynamo=True), or TorchScript tracing (the other exporter)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting()) or torch.jit.is_tracing()


def _step_applied(fn, t):
    """fn (a Module._apply function: .to, .cuda, .half, to_empty...) applied to a step, which keeps
    float32 whatever the model is cast to: small learned-step updates must not vanish in half."""
    out = fn(t)
    if out.dtype != torch.float32:
        out = t.to(device=out.device)
    return out


class DQAReLU(nn.Module):
    """Quantized ReLU with a fixed or learned (dynamic) step, per channel or per tensor.

    y = clamp(round(x / s), 0, 2**bits - 1) * s, with the straight-through estimator for x and
    LSQ's gradient for s (Esser et al. 2020). Works on inputs of any rank (2-D and 4-D NCHW or
    channels_last are the usual) along `channel_dim`.

    Args:
        bits: 1..8.
        mode: "dynamic": s is an nn.Parameter, initialised from the first batch with LSQ's
            2*mean(|x|)/sqrt(qmax) per channel (over the finite elements) unless init_step is
            given; "fixed": s is a buffer, default 1/qmax (outputs in [0, 1]).
        num_channels: the size of x along channel_dim; None infers it at the first forward, or
            at load_state_dict (then run one forward, dqa_ext.calibrate or load_state_dict before
            creating the optimizer, wrapping in DDP, or compiling with fullgraph=True).
        channel_dim: the channel axis of x (negative allowed).
        per_channel: one step per channel, or one for the whole tensor.
        init_step: a positive float to start s from, skipping the data-driven initialisation.
        grad_scale: "lsq" for 1/sqrt(M*qmax), M the elements per sample sharing one step, or a float.
        min_step: the smallest step used. A learned step is used as max(|s|, min_step), so
            it stays positive under any optimizer and its gradient only stops at exactly 0.

    The step is always float32 (`.half()` and `.to(dtype)` move it but do not cast it). A lazy
    step remembers where `.to()/.cuda()` sent it and is made there.
    """

    _moved = False  # class defaults too: modules pickled whole by an older dqa_ext lack them
    _calibration = None

    def __init__(self, bits=2, mode="dynamic", num_channels=None, channel_dim=1, per_channel=True,
                 init_step=None, grad_scale="lsq", min_step=1e-6):
        super().__init__()
        check_bits(bits)
        if mode not in _MODES:
            raise ValueError(f"DQAReLU: mode must be 'dynamic' or 'fixed', got {mode!r}")
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"DQAReLU: num_channels must be a positive int or None, got {num_channels!r}")
        if init_step is not None and not (isinstance(init_step, (int, float)) and
                                          math.isfinite(init_step) and init_step > 0):
            raise ValueError(f"DQAReLU: init_step must be a finite float > 0 or None, got {init_step!r}")
        if not (grad_scale == "lsq" or (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale))):
            raise ValueError(f"DQAReLU: grad_scale must be 'lsq' or a finite float, got {grad_scale!r}")
        if not (isinstance(min_step, (int, float)) and _FLOAT32_TINY <= min_step <= _FLOAT32_MAX):
            raise ValueError(f"DQAReLU: min_step must be a float32 number > 0, got {min_step!r}")
        self.bits = bits
        self.mode = mode
        self.qmax = 2**bits - 1
        self.channel_dim = channel_dim
        self.per_channel = per_channel
        self.init_step = init_step
        self.grad_scale = grad_scale
        self.min_step = float(min_step)
        # Fixed steps and given init_steps need no data; dynamic ones wait for the first batch.
        self.initialized = mode == "fixed" or init_step is not None
        self._moved = False  # a lazy step moved by .to()/.cuda() is made there, else on x's device
        self._calibration = None  # [sum |x|, count] while dqa_ext.calibrate runs
        n = num_channels if per_channel else 1
        if mode == "dynamic":
            step = nn.UninitializedParameter(dtype=torch.float32) if n is None else nn.Parameter(self._start(n))
            self.register_parameter("step", step)
        else:
            step = torch.empty(0) if n is None else self._start(n)
            self.register_buffer("step", step)

    def _start(self, n, device=None):
        value = self.init_step if self.init_step is not None else 1.0 / self.qmax
        return torch.full((n,), float(value), dtype=torch.float32, device=device)

    @property
    def is_lazy(self):
        return _is_placeholder(self.step)

    @property
    def num_channels(self):
        return None if self.is_lazy else self.step.numel()

    @property
    def effective_step(self):
        """The step the forward uses (float32, detached): max(|step|, min_step) when learned;
        None while the step is lazy."""
        if self.is_lazy:
            return None
        return reference.effective_step(self.step.detach(), self._op_min_step()).clone()

    def freeze(self, frozen=True):
        """Stops (or resumes) learning the step: the backward then skips the step reduction."""
        if self.mode == "dynamic":
            self.step.requires_grad_(not frozen)
        return self

    # --- initialisation ---

    def _materialize(self, shape, device):
        with torch.no_grad():
            if isinstance(self.step, _Lazy):
                self.step.materialize(shape, device=device, dtype=torch.float32)
            else:  # a fixed step's empty placeholder
                self._buffers["step"] = torch.empty(shape, device=device, dtype=torch.float32)
            self.step.copy_(self._start(self.step.numel(), device))

    def _batch_stats(self, x, dim):
        """(sum of |x|, count) over the finite elements, per channel or for the tensor, float64."""
        a = x.detach().float().abs()
        finite = torch.isfinite(a)
        a = torch.where(finite, a, 0.0)
        if self.per_channel:
            return reference.sum_but(a, dim).double(), reference.sum_but(finite, dim).double()
        return a.sum().reshape(1).double(), finite.sum().reshape(1).double()

    _pending = None  # channels still waiting for a batch with finite values (bool, per step)

    def _set_step(self, total, count):
        """LSQ's 2*mean(|x|)/sqrt(qmax) for every channel still waiting that has finite values in
        this batch; a channel without any waits for the next batch (the module is initialised
        once every channel is)."""
        waiting = self._pending if self._pending is not None else torch.ones_like(count, dtype=torch.bool)
        ready = waiting & (count > 0)
        mean_abs = (total / count.clamp_min(1)).float().to(self.step.device)
        new = (2 * mean_abs / math.sqrt(self.qmax)).clamp_min(self.min_step).reshape(-1)
        self.step.copy_(torch.where(ready.to(self.step.device).reshape(-1), new, self.step.reshape(-1)))
        waiting = waiting & ~ready
        if bool(waiting.any()):
            empty = waiting.nonzero().reshape(-1).tolist()
            where = "the batch" if not self.per_channel else (
                f"channel{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty[:10]))}"
                + (f" (and {len(empty) - 10} more)" if len(empty) > 10 else "") + " of the batch")
            warnings.warn(f"DQAReLU: {where} ha{'ve' if len(empty) > 1 else 's'} no finite values (empty, NaN "
                          "or inf): left uninitialised, the next batch initialises "
                          f"{'them' if len(empty) > 1 else 'it'}", stacklevel=4)
            self._pending = waiting
            return
        self._pending = None
        self.initialized = True

    def _initialize(self, x, dim):
        # inference_mode(False): a step made during an inference-mode forward must still train.
        with torch.inference_mode(False), torch.no_grad():
            lazy = self.is_lazy
            if lazy:
                device = self.step.device if self._moved else x.device
                self._materialize((x.shape[dim] if self.per_channel else 1,), device)
            if self._calibration is not None:
                self._observe(x, dim)
            elif not self.initialized:
                if not lazy:
                    _warn_if_distributed()
                self._set_step(*self._batch_stats(x, dim))

    def _observe(self, x, dim):
        """dqa_ext.calibrate: accumulate this batch's statistics (summed over ranks when
        calibrate asked for it: every rank calls it) and set the step from all seen so far."""
        total, count = self._batch_stats(x, dim)
        both = torch.stack([total, count]).to(self.step.device)
        if self._calibration["distributed"]:
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.SUM)
        if self._calibration["stats"] is not None:
            both += self._calibration["stats"]
        self._calibration["stats"] = both
        self._pending = None  # the statistics so far set every channel that has any
        self._set_step(both[0], both[1])

    def _grad_scale(self, x, dim):
        if self.grad_scale != "lsq":
            return float(self.grad_scale)
        shared = x.numel() // max(1, self.step.numel())  # elements per step in this batch
        # A per-tensor step has no channel axis: the batch is dim 0 whatever channel_dim says.
        batch = x.shape[0] if x.dim() > 1 and (dim != 0 or not self.per_channel) else 1
        per_sample = max(1, shared // max(1, batch))
        return 1.0 / math.sqrt(per_sample * self.qmax)

    def forward(self, x):
        # Everything but x and the step is a function of x's shape and this module's attributes:
        # worked out once per shape (setting any attribute forgets it), so that a call costs
        # one op call, as nn.ReLU's does.
        args = self._call_args
        if args is None or args[0] != x.shape:
            if (self.is_lazy or not self.initialized) and _exporting():
                return self._export_before_first_forward(x)
            args = self._prepare_call(x)
        # The raw step and min_step go to the op, which uses max(|step|, min_step) when learned.
        # The step read from its dict (args[4]: a parameter, or a buffer): self.step would go
        # through Module.__getattr__, about 0.6 us of a call's few microseconds of Python.
        step = (self._parameters if args[4] else self._buffers)["step"]
        return functional._call(x, step, 0, self.qmax, args[1], args[2], args[3])

    _call_args = None  # (x.shape, channel axis, grad_scale, the op's min_step, step is a parameter)

    def _export_before_first_forward(self, x):
        """torch.export, torch.onnx.export or torch.jit.trace before the first forward: a fixed
        step is known (every channel init_step or 1/qmax), so it is exported as one constant and
        the module stays as it is; a learned step comes from data that tracing does not have."""
        if self.mode == "dynamic":
            raise RuntimeError("DQAReLU: the learned step is set from the first batch the module sees, and it "
                               "has seen none: run one forward (or dqa_ext.calibrate(model, batches), or "
                               "load a state_dict) before exporting")
        step = self._start(1, x.device)
        return functional._call(x, step, 0, self.qmax, self._channel_axis(x), 1.0, 0.0)

    def _prepare_call(self, x):
        dim = self._channel_axis(x)
        if self.per_channel and not self.is_lazy and self.step.numel() != x.shape[dim]:
            raise ValueError(
                f"DQAReLU: this module has {self.step.numel()} per-channel steps but got an input with "
                f"{x.shape[dim]} channels along channel_dim={self.channel_dim}; a ReLU module reused at "
                "places with different channel counts needs separate modules or per_channel=False")
        if not self.initialized or self.is_lazy or self._calibration is not None:
            self._initialize(x, dim)
        args = (x.shape, dim, self._grad_scale(x, dim), self._op_min_step(),
                "step" in self._parameters)
        ready = self.initialized and not self.is_lazy and self._calibration is None
        if ready and not torch.compiler.is_compiling():
            self.__dict__["_call_args"] = args
        return args

    def __setattr__(self, name, value):
        self.__dict__.pop("_call_args", None)  # any attribute may change the call's arguments
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self.__dict__.pop("_call_args", None)
        super().__delattr__(name)

    def _op_min_step(self):
        """The op's min_step: a learned step is used as max(|step|, min_step), a fixed one as is."""
        return self.min_step if self.mode == "dynamic" else 0.0

    def _channel_axis(self, x):
        if self.per_channel or -x.dim() <= self.channel_dim < x.dim():
            return reference.wrap_channel_dim(x, self.channel_dim)
        return 0  # a per-tensor step has no channel axis: any channel_dim will do

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say in one line what works instead.
        raise RuntimeError("dqa_ext: torch.jit.script does not support DQAReLU (its forward is Python with lazy "
                           "state); use torch.jit.trace, torch.export.export or torch.onnx.export(dynamo=True)")

    # --- devices, dtypes, copies and state_dict ---

    def _apply(self, fn, recurse=True):
        # The step is applied here, not by Module._apply: it stays float32 under casts, and a lazy
        # step (no data) only records the device it is sent to.
        table = self._parameters if "step" in self._parameters else self._buffers
        step = table.pop("step")
        try:
            out = super()._apply(fn, recurse)
        finally:
            table["step"] = step
        with torch.no_grad():
            if _is_placeholder(step) and not isinstance(step, _Lazy):  # a fixed step's placeholder
                table["step"] = _step_applied(fn, step)
                self._moved = True
            elif isinstance(step, _Lazy):
                try:
                    device = fn(torch.empty(0, device=step.device)).device
                except NotImplementedError:  # a meta placeholder cannot be copied out: ask a CPU one
                    device = fn(torch.empty(0)).device
                table["step"] = _lazy_like(step, device)
                self._moved = True
            elif isinstance(step, nn.Parameter):
                new = _step_applied(fn, step)
                if torch._has_compatible_shallow_copy_type(step, new):
                    step.data = new
                else:
                    table["step"] = step = nn.Parameter(new, step.requires_grad)
                if step.grad is not None:
                    step.grad = _step_applied(fn, step.grad)
            else:
                table["step"] = _step_applied(fn, step)
        return out

    def get_extra_state(self):
        # Whether the step was initialised (a loaded model never re-initialises), the levels and the
        # mode, as an int64 tensor: every state_dict value stays a tensor (TorchScript's ONNX
        # exporter and safetensors take nothing else).
        return torch.tensor([_EXTRA_FORMAT, int(self.initialized), self.bits, _MODES.index(self.mode)])

    def set_extra_state(self, state):
        self.initialized = bool(_extra_state_dict(state)["initialized"])
        self._pending = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not isinstance(self.step, _Lazy):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # A lazy step is saved as it is, as torch's lazy modules do (nn.LazyLinear).
        destination[prefix + "step"] = self.step
        table = self._parameters if "step" in self._parameters else self._buffers
        lazy = table.pop("step")
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            table["step"] = lazy

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "step"
        try:
            extra = _extra_state_dict(state_dict.get(prefix + "_extra_state"))
        except ValueError as exc:
            error_msgs.append(f"{_where(prefix)}: {exc}")
            return
        for name in ("bits", "mode"):
            if extra.get(name, getattr(self, name)) != getattr(self, name):
                error_msgs.append(f"{_where(prefix)}: the state_dict is for {name}={extra[name]!r} but this "
                                  f"module has {name}={getattr(self, name)!r} (build it with {name}={extra[name]!r})")
                return
        loaded = state_dict.get(key)
        if _is_placeholder(loaded):
            if not self.is_lazy:
                error_msgs.append(f"{_where(prefix)}: the state_dict's step was saved before its "
                                  "first forward (uninitialised) but this module's step is initialised")
                return
            # Lazy into lazy: nothing to copy; only the extra state is loaded.
            table = self._parameters if "step" in self._parameters else self._buffers
            lazy = table.pop("step")
            try:
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
            finally:
                table["step"] = lazy
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            return
        if loaded is not None and self.is_lazy:
            # Made where the module was moved to (or where a lazy step lives: the CPU by default).
            self._materialize(loaded.shape, self.step.device)
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if loaded is not None and prefix + "_extra_state" not in state_dict and len(error_msgs) == errors:
            # No extra state (an older or third-party state_dict): a loaded step is a real one,
            # which a first forward must not overwrite.
            self.initialized = True
            self._pending = None

    def extra_repr(self):
        channels = self.num_channels if self.per_channel else "per-tensor"
        return (f"bits={self.bits}, mode={self.mode}, channels={channels if channels else 'lazy'}, "
                f"channel_dim={self.channel_dim}")
