"""The `dqa` command: one line and exit 2 for every bad argument, before any work; its entry points
(`dqa`, `python -m dqa_ext.robust`, and `python -m dqa_ext info` in the core); help with defaults;
every flag through torchrun's own parser; a closed pipe and Ctrl-C end in one line or none."""
import json
import subprocess
import sys

import pytest
import torch

import dqa_ext
from dqa_ext.robust.cli import build_parser
from support.robust import dqa, forbid_work, one_line_error

QUIET = dict(capture_output=True, text=True)


@pytest.fixture
def no_work(monkeypatch):
    forbid_work(monkeypatch)


@pytest.mark.parametrize("argv,match", [
    ([], "required"),
    (["fly"], "invalid choice"),
    (["train", "--act", "dqa9"], "bad activation 'dqa9'"),
    (["train", "--data", "mnist"], "--data-dir"),
    (["train", "--data", "mnist", "--data-dir", "/nonexistent"], "train-images-idx3-ubyte"),
    (["train", "--epochs", "x"], "invalid int value"),
    (["train", "--epoch", "3"], "unrecognized arguments: --epoch"),  # no abbreviations (torchrun has none either)
    (["attack", "/nonexistent.pt"], "does not exist"),
    (["attack", "x.pt", "--attacks", "pgd,deepfool"], "unknown attack 'deepfool'"),
    (["attack", "x.pt", "--budget", "pgd_steps"], "KEY=VALUE"),
    (["attack", "x.pt", "--budget", "speed=3"], "KEY=VALUE"),
    (["attack", "x.pt", "--budget", "pgd_steps=2.5"], "not an integer"),
    (["report", "/nonexistent"], "no results file"),
    (["reproduce", "--preset", "paper"], "--data-dir"),
    (["reproduce", "--preset", "huge"], "invalid choice"),
    (["reproduce", "--resume", "--force"], "give one of them"),
])
def test_errors_are_one_line(capsys, argv, match):
    assert match in one_line_error(capsys, argv)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dqa_ext {dqa_ext.backend_info()['dqa_ext']}"


BAD_TRAIN = [
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--device", "tpu"], "--device 'tpu'"), (["--device", "cuda:99"], "--device 'cuda:99'"),
    (["--channels", "8"], "--channels"), (["--channels", "8,16,32"], "--channels"), (["--channels", "0,4"], "--channels"),
    (["--hidden", "0"], "--hidden"), (["--kernel", "0"], "--kernel"), (["--kernel", "4"], "--kernel must be odd"),
    (["--batch-size", "0"], "--batch-size"), (["--epochs", "0"], "--epochs"), (["--eps", "-1"], "--eps"),
    (["--eps", "nan"], "--eps"), (["--pgd-steps", "0"], "--pgd-steps"), (["--pgd-step-size", "0"], "--pgd-step-size"),
    (["--eps-warmup", "-1"], "--eps-warmup"), (["--n-train", "0"], "--n-train"),
    (["--eps", "2"], "--eps must be at most 1"), (["--resume", "--force"], "give one of them"),
    (["--width", "8"], "--width does not apply to mnist_cnn"),
    (["--arch", "resnet20", "--channels", "8,16"], "--channels does not apply to resnet20"),
    (["--data", "cifar10", "--data-dir", "x", "--channels", "8,16"], "--channels does not apply to resnet20"),
    (["--init-from", "/nonexistent.pt"], "does not exist"),
]
if not torch.cuda.is_available():
    BAD_TRAIN.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("args,match", BAD_TRAIN)
def test_bad_train_arguments(capsys, no_work, tmp_path, args, match):
    assert match in one_line_error(capsys, ["train", "--out", tmp_path / "m.pt"] + args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,match", [
    (["--eps", "-1"], "--eps"), (["--eps", "0"], "--eps"), (["--eps", "nan"], "--eps"), (["--eps", "inf"], "--eps"),
    (["--eps", "1.5"], "--eps must be at most 1"),
    (["--n-images", "0"], "--n-images must be"), (["--sweep-eps", "0,-0.1"], "--sweep-eps"),
    (["--device", "tpu"], "--device"), (["--budget", "zoo_n=0"], "zoo_n must be >= 1"),
])
def test_bad_attack_arguments(capsys, no_work, tmp_path, args, match):
    assert match in one_line_error(capsys, ["attack", "x.pt", "--out", tmp_path / "rep"] + args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module,argv", [
    ("tqdm", ["train"]), ("art", ["attack", "x.pt"]), ("matplotlib", ["attack", "x.pt"]), ("tqdm", ["attack", "x.pt"]),
    ("art", ["reproduce", "--preset", "smoke"]), ("matplotlib", ["report", "."]),
])
def test_missing_robust_extra_is_one_line(capsys, monkeypatch, no_work, tmp_path, module, argv):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    if argv[0] == "report":
        argv = ["report", tmp_path]
    else:
        argv = argv + ["--out", tmp_path / ("m.pt" if argv[0] == "train" else "rep")]
    err = one_line_error(capsys, argv)
    assert "robustness extras" in err and 'pip install "dqa_ext[robust]"' in err


def test_info_prints_the_backend_as_json(capsys):
    assert dqa(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads(json.dumps(dqa_ext.backend_info(), default=str))


def test_the_toolkit_runs_as_a_module_and_the_core_only_says_info(tmp_path):
    # From a neutral folder: `python -m` puts the working directory first on sys.path.
    r = subprocess.run([sys.executable, "-m", "dqa_ext.robust", "train", "--act", "bogus"], cwd=tmp_path, **QUIET)
    assert r.returncode == 2 and r.stderr.startswith("dqa: error: bad activation") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "dqa_ext", "info"], cwd=tmp_path, **QUIET)
    assert r.returncode == 0 and json.loads(r.stdout)["extension_loaded"] == dqa_ext.backend_info()["extension_loaded"]
    r = subprocess.run([sys.executable, "-m", "dqa_ext", "attack", "m.pt"], cwd=tmp_path, **QUIET)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "python -m dqa_ext.robust" in r.stderr


@pytest.mark.parametrize("module", ["dqa_ext.robust", "dqa_ext"])
def test_info_into_a_closed_pipe_ends_quietly(tmp_path, module):
    """`dqa info | head`: the reader has left before the JSON is written (it closes the pipe at once,
    while the command still imports torch); no BrokenPipeError, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", module, "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path, text=True)
    p.stdout.close()
    err = p.stderr.read()
    p.wait()
    assert err == "" and p.returncode in (0, 141), err


def _options(parser):
    """(command, option) for every option of every command, and the commands' parsers."""
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for command, p in sub.choices.items():
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    yield command, opt, action


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        dqa(["attack", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: dqa-attack)" in text and "(default: bpda)" in text and "(default: mnist5k)" in text


def test_every_flag_survives_torchruns_parser():
    """torchrun reads every option of its command line, the script's too: a `dqa` flag that is a
    prefix of one of torchrun's (`--n` of `--nnodes`) is refused or taken by torchrun."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    checked = 0
    for command, opt, action in _options(build_parser()):
        value = [] if action.nargs == 0 else ["1"]
        script_args = [command, "m.pt", opt, *value]
        for form in (script_args, [command, "m.pt", f"{opt}=1"] if value else None):
            if form is None:
                continue
            ns = torchrun.parse_args(["--nproc_per_node", "2", "-m", "dqa_ext.robust", *form])
            assert (ns.training_script, ns.training_script_args) == ("dqa_ext.robust", form), (command, opt)
            checked += 1
    assert checked > 40
