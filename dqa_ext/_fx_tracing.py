"""torch.fx helpers of dqa_ext.convert: tracing one module's own forward (its submodules are
leaves), in train and in eval mode; reading a ReLU call's input; rebuilding a module from an
edited graph with the same submodules and state_dict keys."""

import inspect
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import fx, nn

# ReLU calls in source code that are not calls of a `self.<name>` module.
_FUNCTIONAL_SOURCE = re.compile(r"(?<!self)\.relu_?\(|\brelu_?\(")


class _OneLevelTracer(fx.Tracer):
    """Traces a module's own forward: every submodule call is a leaf (a call_module node)."""

    def is_leaf_module(self, m, qualname):
        return True


def _needs_trace(module):
    """Containers without forward are never called; torch.nn's own leaf layers hold no ReLU calls."""
    if type(module).forward is nn.Module.forward:
        return False
    return bool(module._modules) or not type(module).__module__.startswith("torch.nn.")


def _input_and_inplace(node, module=None):
    args, kwargs = node.args, node.kwargs
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if node.op == "call_module":
        return x, bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return x, node.target.endswith("_")
    inplace = node.target in (F.relu_, torch.relu_) or bool(
        kwargs.get("inplace", args[1] if node.target is F.relu and len(args) > 1 else False))
    return x, inplace


def _later_users(graph, node, x):
    """Nodes after `node` that read x: an inplace ReLU changed x for them."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    return [u for u in x.users if u is not node and order[u] > order[node]] if isinstance(x, fx.Node) else []


def _functional_lines(module):
    try:
        lines, start = inspect.getsourcelines(type(module).forward)
    except (OSError, TypeError):
        return None
    return [start + i for i, line in enumerate(lines)
            if _FUNCTIONAL_SOURCE.search(line.split("#")[0]) and "def " not in line]


def _slots(model):
    """id(module) -> [(parent, attribute)] for every place it is registered."""
    out = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, attr))
    return out


def _shared_targets(owner, graph):
    """fx names a module registered at several places (one ReLU twice in a Sequential) by its first
    path; when it is called as many times as it is registered, the k-th call is the k-th place."""
    paths = {}
    for p, m in owner.named_modules(remove_duplicate=False):
        if isinstance(m, nn.ReLU) and p:
            paths.setdefault(id(m), []).append(p)
    nodes = {}
    for node in graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(id(owner.get_submodule(node.target)), []).append(node)
    out = {}
    for key, places in paths.items():
        if len(places) > 1 and len(nodes.get(key, [])) == len(places):
            out.update(zip(nodes[key], places))
    return out


def _unique_attr(module, base, taken):
    name, i = base, 1
    while hasattr(module, name) or name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _graph_module(owner, graph, added, constants):
    """owner's traced graph as a GraphModule of owner's name, with all of owner's submodules,
    parameters and buffers (so state_dict keys stay) plus the new DQAReLUs. Tensors forward reads
    that owner holds as plain attributes, and fx's tensor constants, become non-persistent buffers
    (they move with the module and add no state_dict key)."""
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=type(owner).__name__)
    gm._modules = OrderedDict(list(owner._modules.items()) + list(added.items()))
    gm._parameters = OrderedDict(owner._parameters)
    gm._buffers = OrderedDict(owner._buffers)
    gm._non_persistent_buffers_set = set(owner._non_persistent_buffers_set)
    for node in graph.nodes:
        # A dotted target is read through owner's own submodules, which gm holds.
        name = node.target
        if node.op != "get_attr" or "." in name or name in gm._parameters or name in gm._buffers \
                or name in gm._modules:
            continue
        value = constants[name] if name in constants else getattr(owner, name)
        if isinstance(value, torch.Tensor):
            gm.register_buffer(name, value, persistent=False)
        else:
            setattr(gm, name, value)
    for hooks in ("_forward_hooks", "_forward_pre_hooks"):
        setattr(gm, hooks, getattr(owner, hooks))
    gm.training = owner.training
    gm._tracer_cls = graph._tracer_cls  # as GraphModule(root, graph) sets it (read by its pickling)
    gm.graph = graph  # compiles forward once every attribute it reads is in place
    return gm


def _trace(module):
    """module's forward traced as it is now: (graph, {name: tensor constant}). fx stores the tensor
    constants of forward as new attributes of module; they are taken off again here."""
    before = set(module.__dict__)
    try:
        graph = _OneLevelTracer().trace(module)
    finally:
        constants = {k: module.__dict__.pop(k) for k in list(module.__dict__) if k not in before}
    return graph, constants


def _same_constant(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a is b


def _trace_both_modes(module):
    """module traced in train and in eval mode (every mode is restored after):
    (graph, constants) of its current mode, and whether the two traces are the same."""
    modes = [(m, m.training) for m in module.modules()]
    traces = {}
    try:
        for training in (True, False):
            for m, _ in modes:  # the flag only: a train() override may do more than set it
                m.training = training
            traces[training] = _trace(module)
    finally:
        for m, training in modes:
            m.training = training
    (g1, c1), (g2, c2) = traces[True], traces[False]
    same = g1.python_code("self").src == g2.python_code("self").src and c1.keys() == c2.keys() and \
        all(_same_constant(c1[k], c2[k]) for k in c1)
    return traces[module.training], same, (traces[True][0], traces[False][0])
