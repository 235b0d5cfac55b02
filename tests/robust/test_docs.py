"""docs/robust.md is checked against the CLI: its reference block is the parser's own (generated),
every option it names exists, and it names every command and every attack of the catalog."""
import re
from pathlib import Path

from torch.distributed.run import get_args_parser

from dqa_ext.robust.attacks import catalog
from dqa_ext.robust.cli import build_parser
from dqa_ext.robust.cli_reference import block_of, render

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "robust.md"


def _options(parser):
    found = set()
    for action in parser._actions:
        found |= {o for o in action.option_strings}
        for sub in (action.choices or {}).values() if isinstance(action.choices, dict) else ():
            found |= _options(sub)
    return found


def test_the_cli_reference_is_the_parsers():
    block = block_of(DOC.read_text())
    assert block is not None and block == render(), \
        "docs/robust.md is out of step with the CLI: run python -m dqa_ext.robust.cli_reference docs/robust.md"


def test_every_option_the_docs_name_exists():
    script = (ROOT / "scripts" / "anneal_rates.py").read_text()  # the docs run it too
    known = _options(build_parser()) | _options(get_args_parser()) | {"--no-build-isolation"} \
        | set(re.findall(r'add_argument\("(--[\w-]+)"', script))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", DOC.read_text()))
    assert named - known == set()


def test_the_docs_name_every_command_and_attack():
    text = DOC.read_text()
    commands = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices
    assert all(f"dqa {c}" in text for c in commands)
    assert [a for a in catalog.attack_names() if f"`{a}`" not in text] == []
