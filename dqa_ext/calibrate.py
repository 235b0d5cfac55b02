"""calibrate(model, batches): the explicit, documented way to initialise learned DQAReLU steps from
data, identical on every rank under torch.distributed; freeze_steps(model): stop learning them.

A plain first forward initialises a lazy step from its own batch and never communicates (a forward
that runs on one rank only must not hang). Under DDP, either initialise before wrapping the model
(DDP broadcasts rank 0's parameters) or call calibrate on every rank."""

import torch
from torch import nn

from .nn import DQAReLU


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _run(model, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"dqa_ext.calibrate: each batch must be a tensor, a tuple/list of arguments or a dict "
                    f"of keyword arguments, got {type(batch).__name__}")


def _restore(saved):
    """Flags and steps as they were before calibrate (a step that was lazy stays made, but its
    flag says uninitialised, as before: the next forward initialises it)."""
    with torch.no_grad():
        for m, initialized, pending, step in saved:
            m.initialized, m._pending = initialized, pending
            if step is not None:
                m.step.copy_(step)


def calibrate(model, batches, distributed=None):
    """Sets every data-initialised DQAReLU step of model (mode="dynamic", no init_step) to LSQ's
    2*mean(|x|)/sqrt(qmax) over the finite inputs it sees in `batches`, and returns model.

    batches: an iterable of inputs (a tensor, a tuple of positional arguments or a dict of keyword
        arguments per batch); the model runs on each in eval mode under no_grad (BatchNorm running
        statistics are untouched), each layer seeing the steps already set before it.
    distributed: None = when torch.distributed is initialised with more than one rank. Then the
        statistics are summed over ranks (one all_reduce per DQAReLU per batch): call calibrate on
        every rank, with the same number of batches, and every rank gets the same steps.
    Steps already learned are overwritten: calibrate before training. If calibrate raises (a bad
    batch, a step no eval-mode forward reached), every step and flag is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"dqa_ext.calibrate: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, dict)):
        raise TypeError("dqa_ext.calibrate: batches must be an iterable of batches (wrap one batch in a list)")
    dist = torch.distributed
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    model = _unwrap(model)
    acts = [m for m in model.modules() if isinstance(m, DQAReLU) and m.mode == "dynamic" and m.init_step is None]
    was_training = model.training
    # What calibrate changes, put back if it fails: a half-done calibration must not leave flags
    # that make the next plain forward re-initialise from its own batch.
    saved = [(m, m.initialized, m._pending, None if m.is_lazy else m.step.detach().clone()) for m in acts]
    seen, done = 0, False
    try:
        for m in acts:
            m.initialized = False
            m._calibration = {"distributed": bool(distributed), "stats": None}
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
                seen += 1
        if seen == 0:
            raise ValueError("dqa_ext.calibrate: batches must hold at least one batch, got none")
        missed = [name for name, m in model.named_modules() if m in acts and not m.initialized]
        if missed:
            raise RuntimeError(f"dqa_ext.calibrate: {len(missed)} DQAReLU step(s) saw no finite input in eval "
                               f"mode: {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''}; every "
                               "step was left as it was")
        done = True
    finally:
        model.train(was_training)
        for m in acts:
            m._calibration = None
        if not done:
            _restore(saved)
    return model


def freeze_steps(model, frozen=True):
    """Stops (frozen=True) or resumes learning every DQAReLU step of model; returns model."""
    for m in _unwrap(model).modules():
        if isinstance(m, DQAReLU):
            m.freeze(frozen)
    return model
