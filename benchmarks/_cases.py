"""What the kernel benchmarks measure: shapes, layouts, dtypes, implementations and passes, as one
ordered list of specs (all specs of one input tensor run back to back, so its inputs are built once),
and the inputs themselves."""

import math
import os
from dataclasses import dataclass

import torch

QMIN, QMAX = 0, 3  # 2 bits, DQAReLU's default

# name -> (shape, what it is)
SHAPES = {
    "r20c": ((128, 64, 8, 8), "ResNet-20 stage 3, CIFAR-10, batch 128"),
    "r20a": ((128, 16, 32, 32), "ResNet-20 stage 1, CIFAR-10, batch 128"),
    "mnist": ((256, 32, 28, 28), "MNIST CNN conv1, batch 256"),
    "r50a": ((32, 64, 56, 56), "ResNet-50 stem/stage 1, ImageNet, batch 32"),
    "r50b": ((32, 256, 56, 56), "ResNet-50 stage 1 (256 ch), ImageNet, batch 32"),
    "mlp": ((4096, 4096), "MLP hidden layer, 4096 x 4096"),
}
KEY_SHAPE = "r50a"  # the shape the targets are stated for

PASSES = ("fwd", "bwd_step", "bwd_nostep", "fwdbwd")
# Tensors that must move per pass, each numel elements of the input dtype: forward reads x and
# writes y; backward reads dy and x and writes dx; a training step does both.
TENSORS_MOVED = {"fwd": 2, "bwd": 3, "bwd_step": 3, "bwd_nostep": 3, "fwdbwd": 5}

# Implementations that quantize (one result per granularity) and the floors that do not.
QUANT_IMPLS = ("ext", "eager", "compile", "torch_fq")
FLOOR_IMPLS = ("relu", "copy")
IMPL_NAMES = {
    "ext": "dqa_ext extension ops",
    "eager": "reference, eager (LSQ by hand, autograd)",
    "compile": "torch.compile of the eager reference",
    "torch_fq": "torch._fake_quantize_learnable_per_{channel,tensor}_affine",
    "relu": "torch.relu (floor)",
    "copy": "copy of the same bytes (ceiling)",
}
# relu and copy have one backward; the quantizers' two backward passes are compared against it.
FLOOR_PASS = {"fwd": "fwd", "bwd_step": "bwd", "bwd_nostep": "bwd", "fwdbwd": "fwdbwd"}

# torch.compile costs seconds per graph (3 graphs and 2 backward graphs per case), so it runs on
# the key shape only; DQA_BENCH_COMPILE=all compiles every case, =0 none.
_COMPILE = os.environ.get("DQA_BENCH_COMPILE", "key").strip().lower()


def compile_wanted(shape, gran, layout):
    if _COMPILE in ("0", "no", "none", "off"):
        return False
    return _COMPILE == "all" or shape == KEY_SHAPE


# Parity-only runs (--benchmark-disable) cut the batch (first) dimension to this, keeping channels,
# spatial sizes and layouts: the same kernel paths, checked in seconds instead of minutes.
# conftest sets it; None keeps the full shapes.
PARITY_BATCH = None

DEVICES = (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.float16),
           ("cuda", torch.bfloat16))
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    """One input tensor: device, dtype, shape name, granularity ('pc'/'pt') and layout."""

    device: str
    dtype: torch.dtype
    shape: str
    gran: str = None  # None for the copy, which has no step
    layout: str = None  # 'nchw' (contiguous) or 'cl' (channels_last); None for the copy

    @property
    def dims(self):
        dims = SHAPES[self.shape][0]
        return dims if PARITY_BATCH is None else (min(PARITY_BATCH, dims[0]), *dims[1:])

    @property
    def numel(self):
        return math.prod(self.dims)

    @property
    def itemsize(self):
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def id(self):
        parts = [self.device, DTYPE_NAMES[self.dtype], self.shape, self.gran, self.layout]
        return "-".join(p for p in parts if p)


@dataclass(frozen=True)
class Spec:
    case: Case
    impl: str
    pass_: str

    @property
    def id(self):
        case = self.case.id.replace("-pc-", "-") if self.impl == "relu" else self.case.id  # no step
        return f"{case}-{self.impl}-{self.pass_}"

    def bytes_moved(self):
        return TENSORS_MOVED[self.pass_] * self.case.numel * self.case.itemsize


def layouts(shape):
    return ("nchw", "cl") if len(SHAPES[shape][0]) == 4 else ("nchw",)


def kernel_specs():
    specs = []
    for device, dtype in DEVICES:
        for shape in SHAPES:
            base = Case(device, dtype, shape)
            specs += [Spec(base, "copy", p) for p in ("fwd", "bwd", "fwdbwd")]
            for layout in layouts(shape):
                relu_case = Case(device, dtype, shape, "pc", layout)
                specs += [Spec(relu_case, "relu", p) for p in ("fwd", "bwd", "fwdbwd")]
                for gran in ("pc", "pt"):
                    case = Case(device, dtype, shape, gran, layout)
                    for impl in QUANT_IMPLS:
                        if impl == "compile" and not compile_wanted(shape, gran, layout):
                            continue
                        specs += [Spec(case, impl, p) for p in PASSES]
    return specs


class Inputs:
    """x, step and dy of one case (deterministic), and what the op needs besides."""

    def __init__(self, case):
        self.case = case
        gen = torch.Generator().manual_seed(0)
        dims = case.dims
        # v = x / s spans below 0, inside (0, qmax) and above qmax: every branch of the math runs.
        x = torch.randn(dims, generator=gen) * 1.5
        dy = torch.randn(dims, generator=gen)
        channels = dims[1] if case.gran == "pc" else 1
        step = 0.5 + torch.rand(channels, generator=gen)
        if case.layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)
        self.x = x.to(case.device, case.dtype)
        self.dy = dy.to(case.device, case.dtype)
        self.step = step.to(case.device)
        self.qmin, self.qmax, self.channel_dim = QMIN, QMAX, 1
        # LSQ's gradient scale, 1/sqrt(elements per step * qmax)
        self.grad_scale = 1.0 / math.sqrt(case.numel / channels * QMAX)
        self._ref = None
        self._memo = {}

    def memo(self, key, make):
        """make() once per case: expected values the peers' checks share across passes."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def step_view(self, step=None):
        """step shaped to broadcast against x (the hand-written reference needs it)."""
        step = self.step if step is None else step
        if step.numel() == 1:
            return step
        shape = [1] * self.x.dim()
        shape[self.channel_dim] = -1
        return step.view(shape)

    def args(self):
        return self.qmin, self.qmax, self.channel_dim

    def reference(self):
        """(y, dx, dstep, dstep tolerance) from dqa_ext.reference's explicit formulas."""
        if self._ref is None:
            from dqa_ext import reference

            x, s, dy = self.x, self.step, self.dy
            y = reference.fake_quantize_forward(x, s, *self.args())
            dx, ds = reference.fake_quantize_backward(dy, x, s, *self.args(), self.grad_scale, True)
            # Summation order differs between implementations: allow an error relative to the
            # sum of |dy * t(v)| per step, the scale of the rounding error of any order.
            v = x.float() / self.step_view()
            t = reference.grad_step_term(v, float(self.qmin), float(self.qmax))
            mag = (dy.float() * t).abs().double()
            mag = mag.sum() if s.numel() == 1 else mag.sum(dim=[d for d in range(x.dim()) if d != 1])
            tol = (self.grad_scale * mag).float().reshape(s.shape) * 1e-4 + 1e-6
            self._ref = (y, dx, ds, tol)
        return self._ref


class InputCache:
    """Keeps the inputs of the last case only (the biggest case holds ~0.5 GB with its references)."""

    def __init__(self):
        self._case, self._inputs = None, None

    def get(self, case):
        if case != self._case:
            self._case, self._inputs = None, None  # free before allocating the next
            self._inputs = Inputs(case)
            self._case = case
        return self._inputs

    def clear(self):
        self._case, self._inputs = None, None
