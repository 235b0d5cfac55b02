"""Run a registration when another package is imported, not before: dqa_ext registers its Inductor
decompositions and its ONNX translations with packages that cost a second or more to import, or
that may not be installed, without importing them itself."""

import importlib.abc
import importlib.machinery
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs fn(module) right after the first import of the module named `name`."""

    def __init__(self, name, fn):
        self.name, self.fns = name, [fn]

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, fns = spec.loader, self.fns

        def exec_module(module):
            type(loader).exec_module(loader, module)
            for fn in fns:
                fn(module)

        loader.exec_module = exec_module  # this spec's loader object only
        return spec


def after_import(name, fn):
    """fn(module) now if `name` is imported, else right after its first import."""
    if name in sys.modules:
        fn(sys.modules[name])
        return
    for finder in sys.meta_path:
        if isinstance(finder, _AfterImport) and finder.name == name:
            finder.fns.append(fn)
            return
    sys.meta_path.insert(0, _AfterImport(name, fn))
