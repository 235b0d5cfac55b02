"""DQAReLU: a drop-in replacement for nn.ReLU that quantizes its output onto 2**bits levels."""

import math

import torch
from torch import nn

from . import reference
from .functional import check_bits, quantized_relu

_MODES = ("dynamic", "fixed")


def _average_across_ranks(t):
    """Under torch.distributed, every rank initialises from the mean of all ranks' first batches,
    so the steps agree even when the module is initialised inside DDP."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()


class DQAReLU(nn.Module):
    """Quantized ReLU with a fixed or learned (dynamic) step, per channel or per tensor.

    y = clamp(round(x / s), 0, 2**bits - 1) * s, with the straight-through estimator for x and
    LSQ's gradient for s (Esser et al. 2020). Works on inputs of any rank (2-D and 4-D NCHW or
    channels_last are the usual) along `channel_dim`.

    Args:
        bits: 1..8.
        mode: "dynamic": s is an nn.Parameter, initialised from the first batch with LSQ's
            2*mean(|x|)/sqrt(qmax) per channel unless init_step is given; "fixed": s is a buffer,
            default 1/qmax (outputs in [0, 1]).
        num_channels: the size of x along channel_dim; None infers it at the first forward
            (then run one forward before creating the optimizer, wrapping in DDP, or compiling
            with fullgraph=True).
        channel_dim: the channel axis of x (negative allowed).
        per_channel: one step per channel, or one for the whole tensor.
        init_step: a positive float to start s from, skipping the data-driven initialisation.
        grad_scale: "lsq" for 1/sqrt(M*qmax), M the elements per sample sharing one step, or a float.
        min_step: the smallest step used. A learned step is used as max(|s|, min_step), so
            it stays positive under any optimizer and its gradient only stops at exactly 0.
    """

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
        if not (isinstance(min_step, (int, float)) and min_step > 0):
            raise ValueError(f"DQAReLU: min_step must be a float > 0, got {min_step!r}")
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
        n = num_channels if per_channel else 1
        if mode == "dynamic":
            step = nn.UninitializedParameter() if n is None else nn.Parameter(self._start(n))
            self.register_parameter("step", step)
        else:
            step = nn.UninitializedBuffer() if n is None else self._start(n)
            self.register_buffer("step", step)

    def _start(self, n, device=None):
        value = self.init_step if self.init_step is not None else 1.0 / self.qmax
        return torch.full((n,), float(value), dtype=torch.float32, device=device)

    @property
    def num_channels(self):
        return None if isinstance(self.step, nn.parameter.UninitializedTensorMixin) else self.step.numel()

    def _initialize(self, x, dim):
        # inference_mode(False): a step made during an inference-mode forward must still train.
        with torch.inference_mode(False), torch.no_grad():
            if isinstance(self.step, nn.parameter.UninitializedTensorMixin):
                self.step.materialize((x.shape[dim] if self.per_channel else 1,), device=x.device,
                                      dtype=torch.float32)
                self.step.copy_(self._start(self.step.numel(), x.device))
            if not self.initialized:
                a = x.detach().float().abs()
                mean_abs = reference.sum_but(a, dim) / (a.numel() // a.shape[dim]) if self.per_channel else a.mean()
                _average_across_ranks(mean_abs)
                self.step.copy_((2 * mean_abs / math.sqrt(self.qmax)).clamp_min(self.min_step).reshape(-1))
                self.initialized = True

    def _grad_scale(self, x, dim):
        if self.grad_scale != "lsq":
            return float(self.grad_scale)
        shared = x.numel() // max(1, self.step.numel())  # elements per step in this batch
        batch = x.shape[0] if x.dim() > 1 and dim != 0 else 1
        per_sample = max(1, shared // max(1, batch))
        return 1.0 / math.sqrt(per_sample * self.qmax)

    def forward(self, x):
        dim = reference.wrap_channel_dim(x, self.channel_dim)
        if not self.initialized or isinstance(self.step, nn.parameter.UninitializedTensorMixin):
            self._initialize(x, dim)
        if self.per_channel and self.step.numel() != x.shape[dim]:
            raise ValueError(
                f"DQAReLU: this module has {self.step.numel()} per-channel steps but got an input with "
                f"{x.shape[dim]} channels along channel_dim={self.channel_dim}; a ReLU module reused at "
                "places with different channel counts needs separate modules or per_channel=False")
        step = self.step.float()  # the op takes a float32 step, also in a model cast to half
        if self.mode == "dynamic":
            step = step.abs().clamp_min(self.min_step)
        return quantized_relu(x, step, self.bits, self.channel_dim, self._grad_scale(x, dim))

    def _apply(self, fn, recurse=True):
        # A lazy step has no data to move or cast (Module.to, .half(), memory formats); it is
        # made on the input's device, in float32, at the first forward.
        if not isinstance(self.step, nn.parameter.UninitializedTensorMixin):
            return super()._apply(fn, recurse)
        table = self._parameters if "step" in self._parameters else self._buffers
        lazy = table.pop("step")
        try:
            return super()._apply(fn, recurse)
        finally:
            table["step"] = lazy

    # The state_dict keeps whether the step was initialised, so a loaded model never re-initialises.
    def get_extra_state(self):
        return {"initialized": self.initialized}

    def set_extra_state(self, state):
        self.initialized = bool(state["initialized"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "step"
        if key in state_dict and isinstance(self.step, nn.parameter.UninitializedTensorMixin):
            with torch.no_grad():
                self.step.materialize(state_dict[key].shape, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        channels = self.num_channels if self.per_channel else "per-tensor"
        return (f"bits={self.bits}, mode={self.mode}, channels={channels if channels else 'lazy'}, "
                f"channel_dim={self.channel_dim}")
