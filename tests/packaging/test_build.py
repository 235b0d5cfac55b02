"""The install and build decisions: CUDA toolkit and archs (build_tools/cuda_config.py), the
built-with-torch check at load (dqa_ext/_backend.py), the kernel package importing without the
robustness extras, and the one line that names them (dqa_ext/_extras.py)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dqa_ext
from dqa_ext import _backend, _extras

ROOT = Path(__file__).resolve().parents[2]


def _load_cuda_config():
    # By path: putting the repository root on sys.path would shadow the installed dqa_ext.
    spec = importlib.util.spec_from_file_location("dqa_cuda_config", ROOT / "build_tools" / "cuda_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cc = _load_cuda_config()


def _toolkit(path, headers=True, version="13.0"):
    """A fake CUDA toolkit folder: bin/nvcc, and include/cuda_runtime.h and include/cuda.h (with
    CUDA_VERSION for `version`, as the real one writes 13.0: 13000) when headers."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (path / "bin" / "nvcc").chmod(0o755)
    if headers:
        (path / "include").mkdir()
        (path / "include" / "cuda_runtime.h").write_text("")
        if version:
            major, minor = map(int, version.split("."))
            (path / "include" / "cuda.h").write_text(
                f"#ifndef __cuda_cuda_h__\n#define CUDA_VERSION {major * 1000 + minor * 10}\n#endif\n")
    return str(path)


# ------------------------------------------------------------------ CUDA toolkit and archs


def test_cuda_torch_with_nvcc_and_no_gpu_gets_default_archs_and_the_real_toolkit(tmp_path):
    # This machine's kind: /usr/local/bin/nvcc (torch guesses CUDA_HOME=/usr/local, which has no
    # headers) and the toolkit in /usr/local/cuda; no GPU, TORCH_CUDA_ARCH_LIST unset.
    guessed = _toolkit(tmp_path / "usr-local", headers=False)
    real = _toolkit(tmp_path / "cuda-13.0")
    plan = cc.plan_cuda({}, "13.0", gpu_visible=False, candidates=[guessed, real])
    assert plan.enabled and plan.error is None
    assert plan.cuda_home == real
    assert plan.arch_list == cc.DEFAULT_ARCH_LIST
    environ = {}
    cc.apply(plan, environ)
    assert environ == {"CUDA_HOME": real, "TORCH_CUDA_ARCH_LIST": cc.DEFAULT_ARCH_LIST}


def test_default_arch_list_gives_torch_the_arch_flags_without_a_gpu(monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", cc.DEFAULT_ARCH_LIST)
    flags = _get_cuda_arch_flags()
    for sm in ("75", "80", "90"):  # CUDA 13 supports sm_75 and newer
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for GPUs newer than 9.0


def test_user_arch_list_wins_and_a_visible_gpu_leaves_torch_to_choose(tmp_path):
    real = _toolkit(tmp_path / "cuda")
    plan = cc.plan_cuda({"TORCH_CUDA_ARCH_LIST": "8.6"}, "13.0", gpu_visible=False, candidates=[real])
    assert plan.enabled and plan.arch_list == "8.6"
    plan = cc.plan_cuda({}, "13.0", gpu_visible=True, candidates=[real])
    assert plan.enabled and plan.arch_list is None
    environ = {}
    cc.apply(plan, environ)
    assert environ == {"CUDA_HOME": real}


def test_cuda_torch_without_a_toolkit_builds_cpu_only_and_says_how_to_get_cuda(tmp_path):
    guessed = _toolkit(tmp_path / "usr-local", headers=False)
    plan = cc.plan_cuda({}, "13.0", gpu_visible=False, candidates=[guessed, str(tmp_path / "missing")])
    assert not plan.enabled and plan.error is None
    line = plan.notes[-1]
    assert "\n" not in line and "CPU kernels only" in line and guessed in line
    assert "CUDA_HOME" in line and "pip install --no-build-isolation ." in line


def test_force_cuda_without_a_toolkit_is_an_error_naming_cuda_home(tmp_path):
    plan = cc.plan_cuda({"FORCE_CUDA": "1"}, "13.0", gpu_visible=False, candidates=[str(tmp_path)])
    assert plan.error and "FORCE_CUDA=1" in plan.error and "CUDA_HOME" in plan.error


def test_force_cuda_and_no_cuda(tmp_path):
    real = _toolkit(tmp_path / "cuda")
    assert cc.plan_cuda({"FORCE_CUDA": "1"}, "13.0", False, [real]).enabled
    assert not cc.plan_cuda({}, None, False, [real]).enabled  # a CPU torch
    skipped = cc.plan_cuda({"DQA_EXT_NO_CUDA": "1", "FORCE_CUDA": "1"}, "13.0", True, [real])
    assert not skipped.enabled and "DQA_EXT_NO_CUDA" in skipped.notes[-1]


def test_force_cuda_with_a_cpu_torch_stops_in_one_line_before_any_build(tmp_path):
    # A CPU torch has no libc10_cuda/libtorch_cuda: the link would fail minutes into the build.
    real = _toolkit(tmp_path / "cuda")
    plan = cc.plan_cuda({"FORCE_CUDA": "1"}, None, False, [real])
    assert not plan.enabled and plan.error and "\n" not in plan.error
    assert "FORCE_CUDA=1" in plan.error and "no CUDA" in plan.error


@pytest.mark.parametrize("header", ["cuda.h", "version.json"])
def test_toolkit_version_is_read_from_cuda_h_or_version_json(tmp_path, header):
    path = Path(_toolkit(tmp_path / "cuda", version=None if header == "version.json" else "12.8"))
    if header == "version.json":
        (path / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.8.1"}}')
    assert cc.toolkit_version(str(path)) == "12.8"
    assert cc.toolkit_version(str(tmp_path / "missing")) is None


def test_toolkit_of_another_cuda_major_is_skipped_for_the_next_candidate(tmp_path):
    # A cu12x torch with CUDA_HOME on a CUDA 13 toolkit: torch's build would raise on it.
    cuda13 = _toolkit(tmp_path / "cuda-13.0", version="13.0")
    cuda12 = _toolkit(tmp_path / "cuda-12.6", version="12.6")  # a minor mismatch only warns in torch
    plan = cc.plan_cuda({"CUDA_HOME": cuda13}, "12.8", False, [cuda13, cuda12])
    assert plan.enabled and plan.error is None and plan.cuda_home == cuda12
    skipped = [note for note in plan.notes if cuda13 in note]
    assert len(skipped) == 1 and "CUDA 13.0" in skipped[0] and "12.8" in skipped[0]


def test_only_toolkits_of_another_cuda_major_fall_back_to_cpu_naming_why(tmp_path):
    cuda13 = _toolkit(tmp_path / "cuda-13.0", version="13.0")
    plan = cc.plan_cuda({}, "12.8", False, [cuda13])
    assert not plan.enabled and plan.error is None
    line = plan.notes[-1]
    assert "\n" not in line and "CPU kernels only" in line
    assert f"{cuda13} has CUDA 13.0" in line and "12.8" in line and "CUDA_HOME" in line
    forced = cc.plan_cuda({"FORCE_CUDA": "1"}, "12.8", False, [cuda13])
    assert forced.error and "\n" not in forced.error
    assert "FORCE_CUDA=1" in forced.error and f"{cuda13} has CUDA 13.0" in forced.error


def test_cuda_home_that_is_not_a_toolkit_is_named_and_skipped(tmp_path):
    bad = _toolkit(tmp_path / "bad", headers=False)
    real = _toolkit(tmp_path / "cuda")
    plan = cc.plan_cuda({"CUDA_HOME": bad}, "13.0", False, [bad, real])
    assert plan.cuda_home == real
    assert any(f"CUDA_HOME={bad}" in note for note in plan.notes)


def test_candidates_follow_a_symlinked_nvcc_to_its_toolkit(tmp_path):
    real = _toolkit(tmp_path / "cuda-13.0")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvcc").symlink_to(Path(real) / "bin" / "nvcc")
    env = {"CUDA_PATH": str(tmp_path / "from-env"), "PATH": str(bindir)}
    found = cc.toolkit_candidates(env)
    assert found == [str(tmp_path / "from-env"), real, "/usr/local/cuda"]


@pytest.mark.skipif(not cc.is_toolkit("/usr/local/cuda"), reason="no CUDA toolkit in /usr/local/cuda")
def test_this_machines_toolkit_is_found_from_a_bare_environment():
    env = {"PATH": os.environ.get("PATH", "")}
    plan = cc.plan_cuda(env, "13.0", gpu_visible=False, candidates=cc.toolkit_candidates(env))
    assert plan.enabled and cc.is_toolkit(plan.cuda_home) and plan.arch_list == cc.DEFAULT_ARCH_LIST


@pytest.mark.skipif(not cc.is_toolkit("/usr/local/cuda"), reason="no CUDA toolkit in /usr/local/cuda")
def test_setup_py_configures_a_cuda_build_without_a_gpu(tmp_path):
    # setup.py as a CUDA torch without a GPU runs it (this CPU torch, reporting CUDA 13.0):
    # `--name` configures the extension (CUDA_HOME, arch flags, build record) without compiling.
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path)
    for name in ("build_tools", "csrc"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "dqa_ext").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env["PATH"] = "/usr/local/bin:" + env.get("PATH", "")  # where this machine kind has its nvcc
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import runpy, sys
        import torch
        torch.version.cuda = "13.0"
        torch.cuda._is_compiled = lambda: True  # cpp_extension reads CUDA_HOME only for a CUDA torch
        torch.cuda.is_available = lambda: False  # what a CUDA torch says without a GPU
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
        from torch.utils import cpp_extension
        print("CUDA_HOME", cpp_extension.CUDA_HOME)
        """)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cuda_home = proc.stdout.split("CUDA_HOME ")[-1].strip()
    assert cc.is_toolkit(cuda_home), cuda_home  # not /usr/local, torch's guess from /usr/local/bin/nvcc
    record = {}
    exec((tmp_path / "dqa_ext" / "_build_config.py").read_text(), record)
    assert record["WITH_CUDA"] is True and record["NO_CUDA_REASON"] is None
    flags = record["CUDA_ARCHS"].split()
    assert "-gencode=arch=compute_75,code=sm_75" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    assert "no GPU visible" in proc.stderr and cc.DEFAULT_ARCH_LIST in proc.stderr


# ------------------------------------------------------------------ built with which torch


def test_build_problem_names_both_torches_and_the_command():
    assert _backend.build_problem("2.13.0+cpu", "2.13.0+cpu", True) is None
    line = _backend.build_problem("2.14.1+cu130", "2.13.0+cpu", True)
    assert "2.14.1+cu130" in line and "2.13.0+cpu" in line and "pip install --no-build-isolation ." in line
    assert "\n" not in line


def test_build_problem_without_kernels_and_in_the_source_tree():
    line = _backend.build_problem(None, "2.13.0+cpu", False)
    assert "without its compiled kernels" in line and "pip install --no-build-isolation ." in line
    line = _backend.build_problem(None, "2.13.0+cpu", False, source_tree="/src/dqa_ext")
    assert "source tree /src/dqa_ext" in line and "pip install --no-build-isolation -e ." in line
    assert "circular" not in line


def _python(code, cwd, env=None):
    run_env = dict(os.environ, DQA_EXT_BACKEND="", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(cwd)], cwd=cwd, env=run_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _backend.LOADED, reason="needs the compiled extension")
def test_kernels_built_for_another_torch_are_not_loaded_and_the_fallback_warns_once(tmp_path):
    # The recorded version is replaced before dqa_ext reads it: as if built against another torch.
    proc = _python("""
        import sys, types, warnings
        import torch
        cfg = types.ModuleType("dqa_ext._build_config")
        cfg.CPU_CAPABILITY, cfg.WITH_CUDA, cfg.CUDA_ARCHS = "default", False, ""
        cfg.BUILT_WITH_TORCH = "0.0.1+other"
        sys.modules["dqa_ext._build_config"] = cfg
        import dqa_ext
        info = dqa_ext.backend_info()
        assert "dqa_ext._C" not in sys.modules
        assert not info["extension_loaded"] and not info["cpu_kernels"], info
        assert info["built_with_torch"] == "0.0.1+other" and info["torch_matches_build"] is False, info
        x, step = torch.randn(4, 3), torch.full((3,), 0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = dqa_ext.functional.quantized_relu(x, step, 2)
            dqa_ext.functional.quantized_relu(x, step, 2)
        dqa_ext.set_backend("reference")
        assert torch.equal(y, dqa_ext.functional.quantized_relu(x, step, 2))
        print(len(caught), caught[0].message)
        """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    count, message = proc.stdout.strip().split(" ", 1)
    assert count == "1"
    assert "0.0.1+other" in message and torch.__version__ in message
    assert "pip install --no-build-isolation ." in message


def test_matching_build_reports_the_torch_it_was_built_with():
    info = dqa_ext.backend_info()
    if _backend.LOADED:
        assert info["built_with_torch"] == torch.__version__ and info["torch_matches_build"] is True
    assert "torch_matches_build" in info and info["torch"] == torch.__version__


def _copy_package(dest):
    """The Python files of dqa_ext without the compiled library and build record."""
    src = Path(dqa_ext.__file__).parent
    shutil.copytree(src, dest / "dqa_ext",
                    ignore=shutil.ignore_patterns("_C*", "_build_config.py", "__pycache__"))


@pytest.mark.parametrize("source_tree", [True, False], ids=["source-tree", "pure-python-wheel"])
def test_package_without_kernels_says_why_in_one_line(tmp_path, source_tree):
    _copy_package(tmp_path)
    if source_tree:  # what `python -c` in the repository root imports
        (tmp_path / "setup.py").write_text("")
        (tmp_path / "csrc").mkdir()
    proc = _python("""
        import sys
        # An editable install's finder would serve the missing files from its own checkout.
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        import dqa_ext
        assert dqa_ext.__file__.startswith(sys.argv[1]), dqa_ext.__file__
        print(dqa_ext.backend_info()["load_error"])
        """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "circular" not in line
    if source_tree:
        assert f"source tree {tmp_path}" in line and "pip install --no-build-isolation -e ." in line
    else:
        assert "without its compiled kernels" in line and "pip install --no-build-isolation ." in line


def test_build_problem_names_a_library_without_build_record_and_one_for_another_python():
    line = _backend.build_problem(None, "2.13.0+cpu", True)
    assert "\n" not in line and "no record of the torch" in line and "_build_config.py" in line
    assert "torch was not importable" not in line and "pip install --no-build-isolation ." in line
    line = _backend.build_problem(None, "2.13.0+cpu", False, other_python_library="_C.cpython-39-x.so")
    assert "\n" not in line and "_C.cpython-39-x.so" in line and "another Python" in line
    assert "torch was not importable" not in line and _backend._C_NAMES[0] in line


def _other_python_tag():
    return f"cpython-{sys.version_info.major}{sys.version_info.minor + 1}-other"


@pytest.mark.parametrize("layout", ["no-build-record", "other-python"])
def test_package_with_a_library_it_cannot_use_says_why_in_one_line(tmp_path, layout):
    # Empty library files: the problem is found before anything would load them.
    _copy_package(tmp_path)
    pkg = tmp_path / "dqa_ext"
    if layout == "no-build-record":  # a CMake build that copied only _C.so
        (pkg / _backend._C_NAMES[0]).write_bytes(b"")
    else:  # built by another Python, with its build record
        other = f"_C.{_other_python_tag()}.so"
        (pkg / other).write_bytes(b"")
        (pkg / "_build_config.py").write_text(
            f'CPU_CAPABILITY = "default"\nWITH_CUDA = False\nCUDA_ARCHS = ""\n'
            f'BUILT_WITH_TORCH = {torch.__version__!r}\n')
    proc = _python("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        import dqa_ext
        assert dqa_ext.__file__.startswith(sys.argv[1]), dqa_ext.__file__
        info = dqa_ext.backend_info()
        assert not info["extension_loaded"] and "dqa_ext._C" not in sys.modules
        print(info["load_error"])
        """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "torch was not importable" not in line
    assert "pip install --no-build-isolation ." in line
    if layout == "no-build-record":
        assert "no record of the torch" in line
    else:
        assert f"_C.{_other_python_tag()}.so" in line and "another Python" in line


# ------------------------------------------------------------------ kernel package vs toolkit

ROBUST = ("art", "mlxtend", "matplotlib", "tqdm")
BLOCK_ROBUST = f"""
    import sys
    class _Blocker:  # as if the robust extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {ROBUST!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, _Blocker())
"""


def test_import_dqa_ext_needs_none_of_the_robust_extras(tmp_path):
    proc = _python(BLOCK_ROBUST + f"""
    import torch
    import dqa_ext, dqa_ext.robust.cli, dqa_ext.robust
    y = dqa_ext.functional.quantized_relu(torch.randn(2, 3), torch.full((3,), 0.5), 2)
    print([m for m in sys.modules if m.partition(".")[0] in {ROBUST!r}])
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_robust_extra_becomes_one_line_through_the_toolkit(tmp_path):
    proc = _python(BLOCK_ROBUST + """
    from dqa_ext._extras import missing_robust_extra
    from dqa_ext.robust.data import load_dataset
    try:
        load_dataset("mnist5k")
    except Exception as e:
        print(missing_robust_extra(e))
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("this command needs the robustness extras (mlxtend is not installed): "
                                   'pip install "dqa_ext[robust]"')


def test_missing_robust_extra_ignores_other_errors():
    assert "adversarial-robustness-toolbox" in _extras.missing_robust_extra(
        ModuleNotFoundError("No module named 'art.attacks'", name="art.attacks"))
    assert _extras.missing_robust_extra(ModuleNotFoundError("x", name="artful")) is None
    assert _extras.missing_robust_extra(ModuleNotFoundError("x")) is None
    assert _extras.missing_robust_extra(ValueError("art")) is None


def _names(requirements):
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements}


def test_pyproject_splits_kernels_toolkit_and_tests():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _names(meta["project"]["dependencies"]) == {"torch", "numpy"}
    extras = meta["project"]["optional-dependencies"]
    assert _names(extras["robust"]) == set(_extras.ROBUST_MODULES.values())
    # onnx, onnxscript and onnxruntime: the ONNX export tests; cuobjdump and nvdisasm: the SASS
    # budgets of the CUDA kernels, checked without a GPU.
    assert _names(extras["test"]) == {"pytest", "hypothesis", "pytest-benchmark", "onnx", "onnxscript",
                                      "onnxruntime", "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"}
    # torch as a build requirement makes pip's isolated build fetch another torch.
    assert "torch" not in _names(meta["build-system"]["requires"])
