"""Settings checked in one place and one message format, before any work starts.

Each setting is declared once, where it is defined, as scikit-learn declares ``_parameter_constraints``:
a settings dataclass carries its table ``RULES`` (``{"batch_size": at_least(1), "aug": one_of(...)}``)
and checks it with :meth:`Settings.check`; a function declares its table with :func:`validate_params`,
which checks every call before the body runs. A bad value is a :class:`PipelineError` that names the
flag, what it must be and what it got: ``--batch-size must be at least 1, got 0``. The command line and
the Python API share the tables, so both say the same thing.

The project's estimators declare scikit-learn's own ``_parameter_constraints`` and check them at
``fit`` with :func:`check_estimator_params`: scikit-learn's constraints, the same message format, and
scikit-learn's ``InvalidParameterError`` (a ``ValueError``). A name looked up in a registry that does not
hold it is :func:`unknown`: ``unknown head 'svm'; choose from logreg, mlp, knn``.
"""

from __future__ import annotations

import re

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

from .errors import PipelineError


@dataclass(frozen=True)
class Rule:
    """A test a value must pass and the words for it (``at least 1``; a callable for words known only
    when a value is checked, as a registry's names); ``None`` passes every rule when ``optional``."""

    test: Callable[[Any], bool]
    words: str | Callable[[], str]
    optional: bool = False

    def describe(self) -> str:
        return self.words() if callable(self.words) else self.words


def at_least(low: float) -> Rule:
    return Rule(lambda v: _number(v) and v >= low, f"at least {low:g}" if low else "0 or more")


def jobs() -> Rule:
    """joblib's ``n_jobs``: a count of processes, or -1 for every core (-2 all but one, ...)."""
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v != 0, "a number of jobs other than 0 (-1: every core)")


_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes of a size: a number of bytes (``8000000``, or that int), or ``8GB``, ``512MB``, ``1.5G``,
    where K, M, G, T are powers of 1024 (``MiB`` reads as ``MB``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = _SIZE.fullmatch(str(size).strip())
    if match is None:
        raise PipelineError(f"--max-memory must be a size above zero, such as 8GB or 512MB, got {size!r}")
    return int(float(match[1]) * 1024 ** " kmgt".index(match[2].lower() or " "))


def megabytes(size: int) -> int:
    """Bytes as whole MiB, rounded up (a bound that holds them)."""
    return -(-size // 2 ** 20)


def size() -> Rule:
    """A memory bound: a positive size :func:`parse_size` reads."""
    return Rule(lambda v: (isinstance(v, int) and not isinstance(v, bool)
                           or isinstance(v, str) and _SIZE.fullmatch(v.strip()) is not None) and parse_size(v) > 0,
                "a size above zero, such as 8GB or 512MB")


def positive() -> Rule:
    return Rule(lambda v: _number(v) and v > 0, "positive")


def between(low: float, high: float, high_open: bool = False, low_open: bool = False) -> Rule:
    """``low <= v <= high`` (either end open on request), written as an interval: ``in [0, 1)``."""
    def test(v) -> bool:
        return _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(test, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*options: Any) -> Rule:
    return registered(lambda: options)


def registered(names: Callable[[], Iterable]) -> Rule:
    """One of the names ``names()`` gives when the value is checked (a registry's, later entries included)."""
    return Rule(lambda v: v in tuple(names()), lambda: f"one of {', '.join(map(str, names()))}")


def instance_of(*types: type, words: str) -> Rule:
    """A type check (``words``: ``head names``)."""
    return Rule(lambda v: isinstance(v, types), words)


def list_of(item: Rule, nonempty: bool = False) -> Rule:
    """A list or tuple (a string is not one) whose every item passes ``item``: ``a list of <words>``."""
    return Rule(lambda v: isinstance(v, (list, tuple)) and (bool(v) or not nonempty) and all(map(item.test, v)),
                lambda: f"a {'non-empty ' if nonempty else ''}list of {item.describe()}")


def name_part() -> Rule:
    """A name that can stand in a file name as it is (a source's, which names its caches)."""
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._=-]+", v) is not None,
                "letters, digits, '.', '_', '=' or '-'")


def optional(rule: Rule) -> Rule:
    """``rule``, or None (the setting is off)."""
    return Rule(rule.test, rule.words, optional=True)


def flag(name: str) -> str:
    """The command-line spelling of a parameter: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check(values: Mapping[str, Any], rules: Mapping[str, Rule], *, spell: Callable[[str], str] = flag,
          error: type[Exception] = PipelineError) -> None:
    """Raise ``error`` for the first value in ``values`` that breaks its rule: ``--name must be <words>,
    got <value>`` (``spell`` writes the name; default: the command-line flag)."""
    for name, rule in rules.items():
        value = values[name]
        if not (value is None and rule.optional) and not rule.test(value):
            raise error(f"{spell(name)} must be {rule.describe()}, got {value!r}")


class Settings:
    """A dataclass of settings that declares their rules in ``RULES`` (field name -> :class:`Rule`)."""

    RULES: ClassVar[Mapping[str, Rule]] = {}

    def check(self) -> None:
        """Raise for the first field that breaks its rule."""
        check(vars(self), self.RULES)


def validate_params(rules: Mapping[str, Rule], spell: Callable[[str], str] = flag) -> Callable:
    """Decorator: check the arguments named in ``rules`` (defaults included) on every call, before the
    body runs, as scikit-learn's ``validate_params``; the table stays on the function as ``RULES``."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(bound.arguments, rules, spell=spell)
            return fn(*args, **kwargs)

        checked.RULES = rules
        return checked

    return wrap


def check_estimator_params(estimator) -> None:
    """Check an estimator's parameters against scikit-learn's ``_parameter_constraints`` of its class, at
    ``fit`` (scikit-learn checks there, never in ``__init__``), worded as every other setting: ``alpha must be
    a float in the range [0.0, inf), got -1``; scikit-learn's ``InvalidParameterError``, a ``ValueError``."""
    from sklearn.utils._param_validation import InvalidParameterError, make_constraint

    def rule(constraints: list) -> Rule:
        made = [make_constraint(c) for c in constraints]
        words = " or ".join(str(c) for c in made if not c.hidden)
        return Rule(lambda v: any(c.is_satisfied_by(v) for c in made), words)

    params = estimator.get_params(deep=False)
    rules = {name: rule(c) for name, c in type(estimator)._parameter_constraints.items()
             if name in params and c != "no_validation"}
    check(params, rules, spell=str, error=InvalidParameterError)


def unknown(what: str, value: Any, choices: Iterable, more: str = "") -> PipelineError:
    """The error of a name a registry does not hold: ``unknown head 'svm'; choose from logreg, mlp``
    (``more``: what else is accepted, ``or give module:Class``)."""
    listed = ", ".join(map(str, choices)) + (f" {more}" if more else "")
    return PipelineError(f"unknown {what} {value!r}; choose from {listed}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
