"""The base of every user-facing error of the toolkit (`dqa` prints these as one line, exit 2), and
the one way to quote another library's error message inside such a line."""
from __future__ import annotations

import re


class UserError(ValueError):
    """Bad input from the user (arguments, files, names), as opposed to a bug."""


class AttackError(UserError):
    """Bad attack name or budget."""


class TrainError(UserError):
    """Bad training settings or an unusable checkpoint."""


USER_ERRORS = (UserError, FileNotFoundError)

# Terminal colour and cursor codes: torch and tqdm put some in their messages.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
# Lines of torch.load's weights-only refusal that say nothing about this file.
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load",
                "Re-running `torch.load`", "In PyTorch 2.6")


def quote(error: BaseException | str, limit: int = 160) -> str:
    """Another library's message as part of one line: escape codes removed, its lines joined (torch's
    boilerplate left out), cut at a word boundary with an ellipsis when longer than ``limit``."""
    text = _ANSI.sub("", str(error))
    lines = [" ".join(line.split()) for line in text.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_BOILERPLATE)] or [line for line in lines if line]
    text = ""
    for line in kept:
        text += (" " if text.endswith((":", ".")) else "; " if text else "") + line.rstrip(" ;")
    if not text and isinstance(error, BaseException):
        return type(error).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    if " " in cut and not text[limit - 3].isspace():
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ;,:") + "..."
