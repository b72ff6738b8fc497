"""Regular expressions over module names that cannot hang: the checks on ``targets`` and LoRA's
``target_modules`` wherever they come from (a call, an adapter folder, a server request)."""

from __future__ import annotations

import re

try:
    from re import _parser as _regex_parser  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _regex_parser

# Method options that are regular expressions over module names (AdapterConfig.targets, LoRA's
# target_modules), and what keeps their matching time bounded (see `pattern_problem`).
PATTERN_OPTIONS = ("targets", "target_modules")
MAX_PATTERN_LENGTH = 200
MAX_PATTERN_REPEATS = 3


def pattern_problem(text: str) -> str | None:
    """Why matching the regular expression ``text`` against module names could take unbounded
    time, or None. Python's ``re`` backtracks and cannot be interrupted: ``(.*.*.*.*.*)*X``
    never finishes on a 30-character name. Refused: a repetition inside a repetition, an
    alternation inside a repetition, back-references, more than `MAX_PATTERN_REPEATS`
    repetitions, patterns longer than `MAX_PATTERN_LENGTH`. Names of blocks and layers need
    none of these (``blocks\\.(1|2)$``, ``stages\\.\\d+\\.blocks``, ``attn\\.qkv``)."""
    if len(text) > MAX_PATTERN_LENGTH:
        return f"longer than {MAX_PATTERN_LENGTH} characters"
    try:
        parsed = _regex_parser.parse(text)
    except re.error as error:
        return f"not a regular expression ({error})"
    repeats = 0
    # (parsed items, inside a repetition)
    pending = [(parsed, False)]
    while pending:
        items, in_repeat = pending.pop()
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                if arg[1] > 1:
                    if in_repeat:
                        return "a repetition inside a repetition (its matching time can grow exponentially)"
                    repeats += 1
                pending.append((arg[2], in_repeat or arg[1] > 1))
            elif name == "BRANCH":
                if in_repeat:
                    return "an alternation inside a repetition (its matching time can grow exponentially)"
                pending.extend((branch, in_repeat) for branch in arg[1])
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "a back-reference"
            elif name == "SUBPATTERN":
                pending.append((arg[3], in_repeat))
            elif name in ("ASSERT", "ASSERT_NOT"):
                pending.append((arg[1], in_repeat))
            elif name == "ATOMIC_GROUP":
                pending.append((arg, in_repeat))
    if repeats > MAX_PATTERN_REPEATS:
        return f"{repeats} repetitions (at most {MAX_PATTERN_REPEATS})"
    return None


def option_pattern_problems(options: dict) -> list[str]:
    """One phrase per method option in ``options`` that is a regular expression `pattern_problem` refuses."""
    problems = []
    for key in PATTERN_OPTIONS:
        value = options.get(key) if isinstance(options, dict) else None
        problem = pattern_problem(value) if isinstance(value, str) else None
        if problem:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
            problems.append(f"option {key!r} {shown}: the pattern is {problem}")
    return problems


def check_pattern(name: str, text: str) -> str:
    """``text`` if `pattern_problem` finds nothing wrong with it, else a ValueError naming the option."""
    problem = pattern_problem(text)
    if problem:
        raise ValueError(f"option {name!r} {text[:60]!r}: the pattern is {problem}")
    return text
