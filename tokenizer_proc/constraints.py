"""A request's output constraint (sampling_params json_schema, regex or ebnf), checked in the caller's thread
so that a bad one is a ValueError naming the field before anything is sent. xgrammar parses each kind
without the tokenizer; the scheduler compiles it against the tokenizer later (scheduler_proc/grammar.py)."""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from engine.shared.errors import native_message
from engine.shared.sampling import CONSTRAINT_FIELDS, SamplingParams

_CHECKED_TEXTS = 512  # distinct constraints remembered as good or bad: requests usually repeat a few


def check_constraint(params: SamplingParams) -> None:
    """Raise ValueError naming the field when the request's constraint cannot be compiled."""
    constraint = params.constraint
    if constraint is None:
        return
    problem = _checked.get(constraint, _UNCHECKED)
    if problem is _UNCHECKED:
        problem = _problem(*constraint)
        if len(_checked) >= _CHECKED_TEXTS:
            _checked.clear()
        _checked[constraint] = problem
    if problem is not None:
        raise ValueError(f"sampling_params.{constraint[0]} {problem}")


def needs_checking(sampling_params: Any) -> bool:
    """Whether a generate() call's raw sampling_params (a dict, a SamplingParams, or a list) hold a constraint
    not checked yet in this process: checking one imports xgrammar the first time (seconds) and parses it, which
    an event loop should not wait on. One checked before is answered from the cache at once (a caller's thread
    hop per request cost more: 256 streamed JSON requests took 55 ms to submit on the device, free ones 1)."""
    entries = sampling_params if isinstance(sampling_params, list) else [sampling_params]
    for entry in entries:
        values = entry if isinstance(entry, dict) else {name: getattr(entry, name, None) for name in CONSTRAINT_FIELDS}
        for name in CONSTRAINT_FIELDS:
            value = values.get(name)
            if name == "json_schema" and isinstance(value, dict):
                try:
                    value = json.dumps(value)  # the text SamplingParams makes of it
                except (TypeError, ValueError):  # not JSON: the check in the thread says so, naming the field
                    return True
            if value is not None and (not isinstance(value, str) or (name, value) not in _checked):
                return True
    return False


# The constraints check_constraint has answered, with the answer: what is wrong, or None.
_checked: dict[tuple[str, str], Optional[str]] = {}
_UNCHECKED = object()


def _problem(kind: str, text: str) -> Optional[str]:
    """What is wrong with a constraint, in words that follow its field name; None when xgrammar takes it."""
    import xgrammar  # imports torch: only callers who ask for a constraint pay for it

    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as error:
            return f"is not valid JSON: {error}"
        if not isinstance(schema, dict):
            return f"must be a JSON object (a JSON Schema), got {type(schema).__name__}"
        build = xgrammar.Grammar.from_json_schema
    elif kind == "regex":
        try:
            re.compile(text)
        except re.error as error:
            return f"is not a valid regex: {error}"
        build = xgrammar.Grammar.from_regex
    else:
        build = xgrammar.Grammar.from_ebnf
    try:
        build(text)
    except Exception as error:  # xgrammar raises RuntimeError (and others) carrying its parser's message
        return f"cannot be compiled: {native_message(error)}"
    return None
