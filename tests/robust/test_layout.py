"""How the toolkit sits on the core: the core never imports it; quantizers are found by type, so a
user's subclass of DQAReLU gets the quantization-aware attacks; no module grows past ~450 lines; no
tracked file names a build machine's paths; the frozen audit scripts still find what they import."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import dqa_ext
from dqa_ext.robust.attacks.adaptive import Variant, has_quantizers
from dqa_ext.robust.models import build_model, dqa_modules, learned_steps, materialize

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dqa_ext"


def _core_modules():
    return [p for p in PACKAGE.rglob("*.py") if "robust" not in p.relative_to(PACKAGE).parts]


def _names_robust(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        module = ("." * node.level) + (node.module or "")
        return "robust" in module.split(".") or any(a.name == "robust" for a in node.names)
    if isinstance(node, ast.Import):
        return any("robust" in a.name.split(".") for a in node.names)
    # a module named by string (importlib.import_module, __import__)
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and \
        re.fullmatch(r"(dqa_ext)?\.?robust(\.\w+)*", node.value) is not None


def test_the_core_never_imports_the_toolkit():
    offenders = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in _core_modules()
                 for n in ast.walk(ast.parse(p.read_text())) if _names_robust(n)]
    assert offenders == []
    code = ("import sys, torch, dqa_ext; m = dqa_ext.convert(torch.nn.Sequential(torch.nn.ReLU()), bits=2); "
            "m(torch.randn(2, 3)); print(sorted(k for k in sys.modules if k.startswith('dqa_ext.robust')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


class StepQuantizer(dqa_ext.DQAReLU):
    """A user's own quantizer: a subclass with another name (found by isinstance, not by name)."""


def test_a_subclass_of_dqarelu_is_a_quantizer_to_the_attacks():
    model = build_model("mnist_cnn", "relu", (1, 28, 28), 10, channels=[4, 8], hidden=16, kernel=3)
    model[2] = StepQuantizer(bits=2)
    materialize(model, torch.rand(4, 1, 28, 28))
    assert [type(m) for _, m in dqa_modules(model)] == [StepQuantizer] and has_quantizers(model)
    assert list(learned_steps(model)) == ["2"]
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        twin = Variant(model, "twin", "clip")(x)
        exact = model(x)
    assert not torch.equal(twin, exact)  # the twin replaced the subclass's quantizing forward


def _tracked(*folders):
    out = subprocess.run(["git", "ls-files", *folders], capture_output=True, text=True, cwd=ROOT).stdout.split()
    return [ROOT / f for f in out]


def test_no_module_of_the_toolkit_or_its_tests_is_over_450_lines():
    files = [p for p in _tracked("dqa_ext/robust", "tests/robust", "tests/support") if p.suffix == ".py"]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 450}
    assert files and long == {}


BUILD_MACHINE = re.compile("/" + r"(work|scratch|home|root|Users)/")


def test_no_tracked_file_names_a_build_machines_paths():
    files = [p for p in _tracked("docs", "dqa_ext", "tests", "scripts") if p.is_file()]
    hits = [str(p.relative_to(ROOT)) for p in files if p.suffix not in (".png", ".gz")
            and BUILD_MACHINE.search(p.read_text(errors="replace"))]
    assert hits == []


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_committed_results_record_no_absolute_path_and_no_machine_name():
    files = [p for p in _tracked("docs") if p.name == "results.json"]
    assert files
    for p in files:
        results = json.loads(p.read_text())
        assert not [s for s in _strings(results) if re.search(r"(^|\s)/\w", s)], p
        assert "platform" not in results["provenance"], p


def test_the_frozen_audit_scripts_find_what_they_import():
    for path in [p for d in ("independent", "independent2", "independent3") for p in (ROOT / "scripts" / d).glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dqa_ext"):
                module = __import__(node.module, fromlist=["_"])
                assert all(hasattr(module, a.name) for a in node.names), (path.name, node.module)
