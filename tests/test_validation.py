"""Every declared setting is refused in the one format: the tables of the settings dataclasses and of the
checked functions (``--name must be ..., got ...``), the estimators' ``_parameter_constraints`` (``name
must be ..., got ...``, a ``ValueError`` as scikit-learn's), and registry lookups (``unknown X 'v';
choose from ...``). The tables are found by walking the package, so a new one is covered by itself."""

import importlib
import inspect
import pkgutil
import re
from dataclasses import replace

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.utils._param_validation import InvalidParameterError, generate_invalid_param_val, make_constraint

import pipeline
from pipeline.errors import PipelineError
from pipeline.validation import Settings, flag


class BadType:
    """A value of no type any setting takes."""

    def __repr__(self) -> str:
        return "BadType()"


PLAUSIBLE = (0, -1, 1.5, "nope", [], ("nope",))  # right type for many settings, wrong value for each


def _members():
    """Every class and function the package defines, and the methods of its classes."""
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if getattr(obj, "__module__", None) == module.__name__:
                yield obj
                if isinstance(obj, type):
                    yield from (m for m in map(lambda name: getattr(obj, name), vars(obj)) if callable(m))


MEMBERS = list(dict.fromkeys(_members()))
SETTINGS = [m for m in MEMBERS if isinstance(m, type) and issubclass(m, Settings) and m is not Settings]
FUNCTIONS = [m for m in MEMBERS if callable(m) and not isinstance(m, type) and hasattr(m, "RULES")]
ESTIMATORS = [m for m in MEMBERS  # public estimators whose constraints this package declares (or inherits from its own base)
              if isinstance(m, type) and issubclass(m, BaseEstimator) and not m.__name__.startswith("_")
              and next((c for c in m.__mro__ if "_parameter_constraints" in vars(c)), object).__module__.startswith("pipeline")]


def test_the_walk_finds_the_tables():
    names = {m.__qualname__ for m in SETTINGS + FUNCTIONS + ESTIMATORS}
    assert {"FitConfig", "AuditConfig", "FinetuneConfig", "extract", "predict", "neighbors", "finetune",
            "Featurizer.create", "planned_spec", "resolve_amp", "parallel_backend", "open_task",
            "TorchLogisticRegression", "TorchLinearSVC", "TorchRidge", "TorchMLPClassifier", "TorchMLPRegressor"} <= names, names


def _bad_values(rule) -> list:
    """A value of no allowed type, and the first plausible one ``rule`` refuses."""
    refused = [v for v in PLAUSIBLE if not rule.test(v)]
    assert refused, f"no plausible value is refused by {rule.describe()!r}"
    return [BadType(), refused[0]]


def _refused(call, name: str, value, spellings: tuple[str, ...]) -> None:
    with pytest.raises(PipelineError) as e:
        call()
    spelled = "|".join(re.escape(s) for s in spellings)
    assert re.fullmatch(rf"(?:{spelled}) must be .+, got .+", str(e.value)), str(e.value)
    assert str(e.value).endswith(f", got {value!r}")


@pytest.mark.parametrize("config", SETTINGS, ids=lambda c: c.__name__)
def test_each_setting_of_a_config_is_refused_in_the_one_format(config):
    assert config.RULES and set(config.RULES) <= set(vars(config()))
    for name, rule in config.RULES.items():
        for bad in _bad_values(rule):
            _refused(lambda: replace(config(), **{name: bad}).check(), name, bad, (flag(name),))


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__qualname__)
def test_each_argument_of_a_checked_function_is_refused_in_the_one_format(fn, tmp_path):
    """Checked before the body runs: the placeholder arguments are never used."""
    params = inspect.signature(fn).parameters
    assert set(fn.RULES) <= set(params)
    required = {n: tmp_path / "unused" for n, p in params.items()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for name, rule in fn.RULES.items():
        for bad in _bad_values(rule):
            _refused(lambda: fn(**{**required, name: bad}), name, bad, (flag(name), name))
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.__name__)
def test_each_parameter_of_an_estimator_is_refused_at_fit_in_the_one_format(estimator):
    """scikit-learn's convention: constructed with anything, refused at fit with a ValueError."""
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    assert set(estimator._parameter_constraints) == set(estimator().get_params()), "every parameter is declared"
    for name, constraints in estimator._parameter_constraints.items():
        bad_values = [BadType()]
        for c in map(make_constraint, constraints):
            try:
                bad_values.append(generate_invalid_param_val(c))
            except NotImplementedError:
                pass
        for bad in bad_values:
            model = clone(estimator()).set_params(**{name: bad})  # never refused in __init__ / set_params
            with pytest.raises(InvalidParameterError) as e:
                model.fit(X, y)
            assert isinstance(e.value, ValueError)
            assert re.fullmatch(rf"{name} must be .+, got .+", str(e.value)), str(e.value)


@pytest.mark.parametrize("bad, message", [
    (dict(Cs=[0.1, -1]), "Cs must be a float or a non-empty array-like of floats in the range (0, inf), got [0.1, -1]"),
    (dict(Cs=()), "Cs must be a float or a non-empty array-like of floats in the range (0, inf), got ()"),
    (dict(cv=1), "cv must be an int in the range [2, inf) or None, got 1"),
])
def test_a_grid_is_checked_value_by_value(bad, message):
    from pipeline.linear_probe import TorchLogisticRegression

    with pytest.raises(ValueError) as e:
        TorchLogisticRegression(**bad).fit(np.eye(4), [0, 1, 0, 1])
    assert str(e.value) == message


def test_a_heads_parameters_are_checked_when_it_is_made():
    """A head's --head-param is refused before any work, a pipeline's steps included, in the same words."""
    from pipeline.heads import create_head

    with pytest.raises(PipelineError) as e:
        create_head("logreg", params={"torchlogisticregression__Cs": [-1]})
    assert str(e.value) == ("--head-param for logreg: Cs must be a float or a non-empty array-like of floats in the "
                            "range (0, inf), got [-1]")
    with pytest.raises(PipelineError) as e:
        create_head("sklearn.svm:SVC", params={"C": "abc"})
    assert str(e.value) == "--head-param for sklearn.svm:SVC: C must be a float in the range (0.0, inf], got 'abc'"


def test_a_registry_names_what_it_holds_in_one_shape():
    from pipeline.backbones import check_taps
    from pipeline.devices import resolve_device
    from pipeline.heads import head_spec
    from pipeline.kinds import get_kind
    from pipeline.model_sources import model_source_named
    from pipeline.preprocess import decode_path
    from pipeline.strategies import get_strategy

    lookups = {"task kind": get_kind, "decode path": lambda v: decode_path(v, {}), "strategy": get_strategy,
               "model source": model_source_named, "device": resolve_device, "head": head_spec,
               "tap": lambda v: check_taps([v])}
    for what, lookup in lookups.items():
        with pytest.raises(PipelineError) as e:
            lookup("nope")
        assert re.fullmatch(rf"unknown {what} 'nope'; choose from \w.+", str(e.value)), str(e.value)
    with pytest.raises(PipelineError) as e:
        get_strategy("nope")
    assert str(e.value) == "unknown strategy 'nope'; choose from lp-ft, freeze-unfreeze, discriminative"
