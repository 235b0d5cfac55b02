"""convert(model): every nn.ReLU becomes a DQAReLU."""

from torch import nn

from .nn import DQAReLU


def convert(model, bits=2, mode="dynamic", **kwargs):
    """Replaces every nn.ReLU module of model (inplace ones too) by DQAReLU(bits, mode, **kwargs)
    and returns the model (a lone nn.ReLU is returned as a new DQAReLU).

    One ReLU instance registered in several places becomes one shared DQAReLU. A ReLU module
    called on tensors of different channel counts (one `self.relu` used after several layers)
    needs per_channel=False, or separate modules. The new steps are lazy: run one forward
    before creating the optimizer or wrapping the model in DDP."""
    new = {}

    def replacement(relu):
        if id(relu) not in new:
            new[id(relu)] = DQAReLU(bits=bits, mode=mode, **kwargs)
        return new[id(relu)]

    if isinstance(model, nn.ReLU):
        return replacement(model)
    seen = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if isinstance(child, nn.ReLU):
                module._modules[name] = replacement(child)
            elif child is not None:
                stack.append(child)
    return model
