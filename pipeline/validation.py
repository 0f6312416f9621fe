"""Settings checked in one place and one message format, before any work starts.

Each stage declares its rules once (``{"batch_size": at_least(1), "aug": one_of(...)}``) and calls
:func:`check`; a bad value is a :class:`PipelineError` that names the flag, what it must be and what it
got: ``--batch-size must be at least 1, got 0``. The command line and the Python API share the rules,
so both say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import PipelineError


@dataclass(frozen=True)
class Rule:
    """A test a value must pass and the words for it (``at least 1``); ``None`` passes every rule when
    ``optional``."""

    test: Callable[[Any], bool]
    words: str
    optional: bool = False

    def __or__(self, other: "Rule") -> "Rule":
        return Rule(lambda v: self.test(v) or other.test(v), f"{self.words} or {other.words}", self.optional or other.optional)


def at_least(low: float) -> Rule:
    return Rule(lambda v: _number(v) and v >= low, f"at least {low:g}" if low else "0 or more")


def positive() -> Rule:
    return Rule(lambda v: _number(v) and v > 0, "positive")


def between(low: float, high: float, high_open: bool = False, low_open: bool = False) -> Rule:
    """``low <= v <= high`` (either end open on request), written as an interval: ``in [0, 1)``."""
    def test(v) -> bool:
        return _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(test, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*options: str) -> Rule:
    return Rule(lambda v: v in options, f"one of {', '.join(options)}")


def optional(rule: Rule) -> Rule:
    """``rule``, or None (the setting is off)."""
    return Rule(rule.test, rule.words, optional=True)


def check(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise for the first value in ``values`` that breaks its rule: ``--name must be <words>, got <value>``."""
    for name, rule in rules.items():
        value = values[name]
        if value is None and rule.optional:
            continue
        if not rule.test(value):
            raise PipelineError(f"{flag(name)} must be {rule.words}, got {value!r}")


def flag(name: str) -> str:
    """The command-line spelling of a parameter: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
