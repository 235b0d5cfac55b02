"""convert(model): every ReLU activation site becomes its own DQAReLU.

Each module's own forward is traced with torch.fx, one level at a time (its submodules are leaves),
so a module ReLU called twice (torchvision's `self.relu`) and the functional calls (F.relu,
torch.relu, Tensor.relu, relu_, inplace) are all seen. Where every site is a module ReLU called
once, the ReLU is swapped in place and the model keeps its own classes; a module whose forward
needs a new call (a reused ReLU split, a functional call replaced) becomes a torch.fx.GraphModule
of the same name, with the same submodules and state_dict keys. A forward that does not trace
(data-dependent control flow) keeps its code: its module ReLUs are swapped and the report names the
functional calls it could not see.

A rewritten forward is the code fx recorded at convert time: Python values read in forward are frozen
into it (plain attributes and flags, `x is None` checks, `if self.flag:` branches). Each module is
traced in train and in eval mode, so one that reads self.training (F.dropout(..., training=
self.training), `if self.training:`) is never rewritten: its module ReLUs are swapped and its
functional ReLU calls are reported as left. Other attributes read in forward are not checked:
change them before convert, not after."""

import fnmatch
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._fx_tracing import (_functional_lines, _graph_module, _input_and_inplace, _later_users, _needs_trace,
                          _shared_targets, _slots, _trace_both_modes, _unique_attr)
from .nn import DQAReLU

_FUNCTIONS = {F.relu: "F.relu", F.relu_: "F.relu_", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
_METHODS = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}


@dataclass
class Site:
    """One activation site: `name` is the path of its DQAReLU (or of what was left)."""

    name: str
    kind: str    # "nn.ReLU", "F.relu", "Tensor.relu_", ...
    owner: str   # the module whose forward makes the call ("" for the root)
    status: str  # "converted", "skipped" or "left"
    how: str     # how it was converted, or why it was left


class ConvertReport:
    """What convert did, site by site; print it for a table."""

    def __init__(self):
        self.sites = []
        self.rewritten = []  # modules that became torch.fx.GraphModules

    def add(self, name, kind, owner, status, how):
        self.sites.append(Site(name, kind, owner, status, how))

    def of(self, status):
        return [s for s in self.sites if s.status == status]

    @property
    def converted(self):
        return self.of("converted")

    @property
    def skipped(self):
        return self.of("skipped")

    @property
    def left(self):
        return self.of("left")

    def __str__(self):
        head = (f"dqa_ext.convert: {len(self.converted)} activation site(s) converted, {len(self.skipped)} "
                f"skipped, {len(self.left)} left")
        if self.rewritten:
            head += f"; rewritten with torch.fx: {', '.join(n or '<root>' for n in self.rewritten)}"
        rows = [f"  {s.status:<9} {s.name or '<root>':<28} {s.kind:<14} {s.how}" for s in self.sites]
        return "\n".join([head] + rows)

    __repr__ = __str__


def _skip_rule(skip):
    if skip is None:
        return lambda site: False
    if callable(skip):
        return skip
    names = [skip] if isinstance(skip, str) else list(skip)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"dqa_ext.convert: skip must be None, a name pattern, a list of them or a predicate "
                        f"of the site, got {skip!r}")
    return lambda site: any(fnmatch.fnmatchcase(site.name, n) for n in names)


def _join(*parts):
    return ".".join(p for p in parts if p)


def convert(model, bits=2, mode="dynamic", *, skip=None, verbose=False, return_report=False, **kwargs):
    """Replaces every ReLU activation site of model by its own DQAReLU(bits, mode, **kwargs).

    Sites: nn.ReLU modules (inplace too; one called at several places gets one DQAReLU per call),
    F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu and Tensor.relu_ calls in forward.
    skip: site names not to convert (fnmatch patterns such as "layer4.*", or a list of them), or
        a predicate of the Site (site.name, site.kind, site.owner) returning True to skip.
    verbose: print the report; return_report: return (model, report) instead of model.
    Returns the model: the same object, with its classes, unless its own forward had to be
    rewritten (then a torch.fx.GraphModule of the same name). Anything left unconverted (a forward
    that does not trace, or that reads self.training) is reported and warned about. A rewritten
    forward freezes the plain Python attributes it reads (see the module docstring). The new steps are lazy: run one forward or
    dqa_ext.calibrate before creating the optimizer or wrapping the model in DDP."""
    DQAReLU(bits=bits, mode=mode, **kwargs)  # bad arguments fail here, before any change
    if not isinstance(model, nn.Module):
        raise TypeError(f"dqa_ext.convert: model must be an nn.Module, got {type(model).__name__}")
    job = _Job(model, _skip_rule(skip), lambda: DQAReLU(bits=bits, mode=mode, **kwargs))

    if isinstance(model, nn.ReLU):  # a lone ReLU: its replacement
        site = Site("", "nn.ReLU", "", "converted", "replaced")
        replaced = job.new()
        if job.skipped(site):
            site.status, site.how, replaced = "skipped", "by the skip option", model
        job.report.sites.append(site)
        return _finish(replaced, job.report, verbose, return_report)

    traced, untraced, by_mode = _trace_modules(job)
    sites, calls = _list_sites(job, traced)
    _name_sites(job, sites, calls)
    rewrites = _apply_sites(job, sites, calls)
    result = _rewrite_forwards(job, rewrites)
    _swap_in_untraced(job, untraced)
    _swap_in_mode_dependent(job, by_mode)
    _swap_uncalled(job, result, bool(untraced))
    return _finish(result, job.report, verbose, return_report)


class _Job:
    """What every phase of one convert call shares."""

    def __init__(self, model, skipped, new):
        self.model, self.skipped, self.new = model, skipped, new
        self.report = ConvertReport()
        self.slots = _slots(model)
        self.constants = {}  # id(module) -> the tensor constants of its traced forward
        self.called = set()  # id of every ReLU module a traced forward calls

    def skip_or_swap(self, name, kind, path):
        """True (and reported) when the skip option names this site."""
        if self.skipped(Site(name, kind, path, "", "")):
            self.report.add(name, kind, path, "skipped", "by the skip option")
            return True
        return False


def _trace_modules(job):
    """1. Each module's own forward, parents first: (traced, untraced, traced differently in
    train and eval mode)."""
    traced, untraced, by_mode = [], [], []
    for path, module in job.model.named_modules():
        if isinstance(module, (nn.ReLU, DQAReLU)) or not _needs_trace(module):
            continue
        try:
            (graph, constants), same, graphs = _trace_both_modes(module)
        except Exception as exc:  # noqa: BLE001  (any failure: fall back to module swaps here)
            untraced.append((path, module, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        if not same:  # a rewrite would freeze the mode it was traced in
            by_mode.append((path, module, graphs))
            continue
        traced.append((path, module, graph))
        job.constants[id(module)] = constants
    return traced, untraced, by_mode


def _list_sites(job, traced):
    """The sites of the traced forwards (dicts: the node, its owner, how it can be converted) and
    the calls of each module slot, in order."""
    sites, calls = [], {}
    for path, owner, graph in traced:
        taken = set()
        targets = _shared_targets(owner, graph)
        for node in graph.nodes:
            module = None
            if node.op == "call_module":
                module = owner.get_submodule(node.target)
                if not isinstance(module, nn.ReLU):
                    continue
                kind = "nn.ReLU"
                job.called.add(id(module))
                if node in targets:
                    node.target = targets[node]
            elif node.op == "call_function" and node.target in _FUNCTIONS:
                kind = _FUNCTIONS[node.target]
            elif node.op == "call_method" and node.target in _METHODS:
                kind = _METHODS[node.target]
            else:
                continue
            _, inplace = _input_and_inplace(node, module)
            site = dict(node=node, graph=graph, owner=owner, owner_path=path, kind=kind, module=module,
                        inplace=inplace, taken=taken)
            if module is not None:
                parent_path, _, attr = node.target.rpartition(".")
                slot = (id(owner.get_submodule(parent_path)), attr)
                site.update(slot=slot, parent=owner.get_submodule(parent_path), attr=attr)
                calls.setdefault(slot, []).append(site)
                site["name"] = _join(path, node.target) if len(calls[slot]) == 1 else None
            sites.append(site)
    return sites, calls


def _name_sites(job, sites, calls):
    """2. Names (the DQAReLU's path) and the skip decisions."""
    for site in sites:
        if site.get("name") is None:
            attr = _unique_attr(site["owner"], site["node"].name, site["taken"])
            site.update(name=_join(site["owner_path"], attr), new_attr=attr)
        site["skip"] = job.skipped(Site(site["name"], site["kind"], site["owner_path"], "", ""))
    for slot_sites in calls.values():
        # A slot is swapped in place when its first call is converted and no call of it is skipped.
        swap = not any(s["skip"] for s in slot_sites)
        for i, s in enumerate(slot_sites):
            s["swap"] = swap and i == 0
            if not s["swap"] and "new_attr" not in s and not s["skip"]:
                attr = _unique_attr(s["owner"], s["node"].name, s["taken"])
                s.update(name=_join(s["owner_path"], attr), new_attr=attr)


def _apply_sites(job, sites, calls):
    """3. In-place swaps and graph edits; returns the graph rewrites by owner."""
    rewrites = {}  # id(owner) -> {"path", "owner", "graph", "added": {attr: DQAReLU}, "changed"}
    for site in sites:
        if site["skip"]:
            job.report.add(site["name"], site["kind"], site["owner_path"], "skipped", "by the skip option")
            continue
        node, graph = site["node"], site["graph"]
        # Read now, not when the sites were listed: an earlier rewrite may have replaced this
        # call's input (a chained F.relu(x).relu_()).
        x = _input_and_inplace(node, site["module"])[0]
        later = _later_users(graph, node, x) if site["inplace"] else []
        entry = rewrites.setdefault(id(site["owner"]), dict(path=site["owner_path"], owner=site["owner"],
                                                            graph=graph, added={}, changed=False))
        if site.get("swap"):
            setattr(site["parent"], site["attr"], job.new())
            how, out = "swapped in place", node
            n_calls = len(calls[site["slot"]])
            if n_calls > 1:
                how += f" (call 1 of {n_calls})"
        else:
            attr = site["new_attr"]
            entry["added"][attr] = job.new()
            with graph.inserting_before(node):
                out = graph.call_module(attr, (x,))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            entry["changed"] = True
            how = (f"own module (call {calls[site['slot']].index(site) + 1} of {len(calls[site['slot']])} "
                   "of a reused ReLU)" if "slot" in site else "functional call replaced")
        for user in later:  # an inplace ReLU changed its input for these readers
            user.replace_input_with(x, out)
            entry["changed"] = True
        job.report.add(site["name"], site["kind"], site["owner_path"], "converted", how)
    return rewrites


def _rewrite_forwards(job, rewrites):
    """Edited graphs become GraphModules, deepest modules first; returns the model (or the
    GraphModule that replaced it)."""
    result = job.model
    for entry in sorted(rewrites.values(), key=lambda e: -(e["path"].count(".") + 1 if e["path"] else 0)):
        if not entry["changed"]:
            continue
        owner = entry["owner"]
        entry["graph"].lint()
        gm = _graph_module(owner, entry["graph"], entry["added"], job.constants[id(owner)])
        job.report.rewritten.append(entry["path"])
        if owner is job.model:
            result = gm
        for parent, attr in job.slots.get(id(owner), []):
            parent._modules[attr] = gm
    return result


def _swap_in_untraced(job, untraced):
    """4. Forwards that did not trace keep their code: their ReLU modules are swapped."""
    for path, owner, why in untraced:
        lines = _functional_lines(owner)
        for attr, child in list(owner._modules.items()):
            if isinstance(child, nn.ReLU):
                name = _join(path, attr)
                if job.skip_or_swap(name, "nn.ReLU", path):
                    continue
                owner._modules[attr] = job.new()
                job.report.add(name, "nn.ReLU", path, "converted",
                               "swapped in place (forward not traced: a reuse of it cannot be seen)")
        where = f"at lines {lines} of {type(owner).__qualname__}.forward" if lines else "none found in its source"
        if lines is None:
            where = "its source is not available"
        job.report.add(path, "forward", path, "left",
                       f"not traced ({why}); functional ReLU calls there are not converted ({where})")


def _swap_in_mode_dependent(job, by_mode):
    """5. Forwards that read self.training keep their code: the ReLU modules they call (in either
    mode) are swapped, their functional ReLU calls are left."""
    why = "forward reads self.training: its train and eval traces differ, so it is not rewritten"
    for path, owner, graphs in by_mode:
        relus, functional = {}, {}
        for graph in graphs:
            per_graph = {}
            for node in graph.nodes:
                if node.op == "call_module" and isinstance(owner.get_submodule(node.target), nn.ReLU):
                    per_graph[node.target] = per_graph.get(node.target, 0) + 1
                elif node.op == "call_function" and node.target in _FUNCTIONS:
                    functional.setdefault(node.name, _FUNCTIONS[node.target])
                elif node.op == "call_method" and node.target in _METHODS:
                    functional.setdefault(node.name, _METHODS[node.target])
            for target, n in per_graph.items():
                relus[target] = max(n, relus.get(target, 0))
        for target, n in relus.items():
            parent_path, _, attr = target.rpartition(".")
            parent = owner.get_submodule(parent_path)
            child, name = parent._modules[attr], _join(path, target)
            job.called.add(id(child))
            if job.skip_or_swap(name, "nn.ReLU", path):
                continue
            parent._modules[attr] = job.new()
            job.report.add(name, "nn.ReLU", path, "converted", f"swapped in place ({why}"
                           + (f"; its {n} calls share it)" if n > 1 else ")"))
        for node_name, kind in functional.items():
            job.report.add(_join(path, node_name), kind, path, "left", f"{why}; this call is not converted")


def _swap_uncalled(job, result, any_untraced):
    """6. ReLU modules no traced forward calls: swapped if an untraced forward may call them."""
    for path, module in list(result.named_modules()):
        for attr, child in list(module._modules.items()):
            if isinstance(child, nn.ReLU):
                name = _join(path, attr)
                if id(child) in job.called:  # called by a traced forward: handled above
                    continue
                if any_untraced and not job.skipped(Site(name, "nn.ReLU", path, "", "")):
                    module._modules[attr] = job.new()
                    job.report.add(name, "nn.ReLU", path, "converted",
                                   "swapped in place (not called by a traced forward; an untraced one may)")
                elif not any_untraced:
                    job.report.add(name, "nn.ReLU", path, "left", "never called by forward")


def _finish(model, report, verbose, return_report):
    if verbose:
        print(report)
    elif report.left:
        warnings.warn(f"dqa_ext.convert left {len(report.left)} site(s) unconverted: "
                      + "; ".join(f"{s.name or '<root>'}: {s.how}" for s in report.left[:3])
                      + " (convert(..., verbose=True) prints the full report)", stacklevel=3)
    return (model, report) if return_report else model
