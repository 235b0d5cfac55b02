"""convert(model): every nn.ReLU becomes a DQAReLU."""

from torch import nn

from .nn import DQAReLU


def convert(model, bits=2, mode="dynamic", **kwargs):
    """Replaces every nn.ReLU module of model (inplace ones too) by DQAReLU(bits, mode, **kwargs)
    and returns the model (a lone nn.ReLU is returned as a new DQAReLU). The new steps are lazy:
    run one forward before creating the optimizer or wrapping the model in DDP."""
    if isinstance(model, nn.ReLU):
        return DQAReLU(bits=bits, mode=mode, **kwargs)
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, DQAReLU(bits=bits, mode=mode, **kwargs))
        else:
            convert(child, bits=bits, mode=mode, **kwargs)
    return model
