"""The one exception type the engine raises for its own failures (user mistakes raise ValueError/TypeError),
and how those messages show the caller's value."""

import re
from typing import Any


class EngineError(RuntimeError):
    """A child process failed or the engine was shut down; the message carries the child's traceback."""


def short_repr(value: Any) -> str:
    """repr(value), cut to 80 characters: an error message names the value without quoting a whole batch."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def native_message(error: Exception) -> str:
    """The first line of a native library's error without its C++ source prefix ("[12:00:00] /src/x.cc:82: "),
    as xgrammar raises them: the part a caller can act on."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", lines[0]) if lines else type(error).__name__
