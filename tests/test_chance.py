"""Chance is what predictions that know nothing of the images score: the exact expectation of each
kind's metric over the row's own predictions shuffled within folds, and the test against it keeps its
false-positive rate on labels drawn independently of the features while finding real structure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from pipeline.evaluation.protocol import decide
from pipeline.heads import create_head
from pipeline.kinds import get_kind
from pipeline.kinds.parts.bootstrap import permutations
from pipeline.kinds.parts.scoring import (accuracy, expected_accuracy, expected_mean_ap, expected_r2, mean_ap,
                                          r2)

HEADS = {"multilabel": ("ridge", "knn"), "regression": ("ridge", "knn"), "classification": ("centroid", "knn")}
SEEDS = 20


def _bestgen(n: int, m: int) -> float:
    """Expected average precision of a random ranking of n items with m positives (Bestgen 2015)."""
    harmonic = np.sum(1 / np.arange(1, n + 1))
    return (m - 1) / (n - 1) + (n - m) * harmonic / (n * (n - 1))


def test_expected_average_precision_is_bestgens_and_the_shuffles_mean():
    rng = np.random.default_rng(0)
    for n, m in ((20, 1), (20, 3), (50, 25), (7, 7)):
        y = np.zeros((n, 1), int)
        y[rng.choice(n, m, replace=False)] = 1
        assert expected_mean_ap(y, rng.random((n, 1)), np.zeros(n)) == pytest.approx(_bestgen(n, m), abs=1e-12)
    assert _bestgen(20, 1) > 0.17 > 1 / 20  # one positive in 20: well above its prevalence
    n = 40
    Y = (rng.random((n, 3)) < [0.08, 0.2, 0.5]).astype(int)
    Y[0] = 1
    for S, folds in ((rng.random((n, 3)), np.zeros(n, int)),  # no ties, one fold: a random ranking
                     (np.round(rng.random((n, 3)) * 4) / 4, np.zeros(n, int)),  # ties, as knn's scores have
                     (rng.random((n, 3)) + np.arange(n)[:, None] % 3, np.arange(n) % 3)):  # fold models' scales differ
        shuffled = np.concatenate([mean_ap(Y, S, perms=p) for p in permutations(folds, seed=1, draws=40000)])
        assert expected_mean_ap(Y, S, folds) == pytest.approx(shuffled.mean(), abs=3 * shuffled.std() / 200)
    constant = expected_mean_ap(Y, np.zeros((n, 3)), np.zeros(n, int))
    assert constant == pytest.approx(Y.mean(0).mean())  # one big tie: the prevalence itself


def test_expected_r2_and_accuracy_are_the_shuffles_mean():
    rng = np.random.default_rng(1)
    n, folds = 45, np.arange(45) % 3
    y, pred = rng.normal(size=n), rng.normal(size=n) * 0.5 + folds
    shuffled = np.concatenate([r2(y, pred, perms=p) for p in permutations(folds, seed=2, draws=40000)])
    assert expected_r2(y, pred, folds) == pytest.approx(shuffled.mean(), abs=3 * shuffled.std() / 200)
    assert expected_r2(y, np.full(n, y.mean()), np.zeros(n)) == pytest.approx(0.0)  # the mean scores 0 R²
    truth = rng.choice(np.array(["a", "b", "c"], dtype=object), n, p=[0.5, 0.3, 0.2])
    guess = rng.choice(np.array(["a", "b", "c"], dtype=object), n)
    shuffled = np.concatenate([accuracy(truth, guess, p) for p in permutations(folds, seed=3, draws=40000)])
    assert expected_accuracy(truth, guess, folds) == pytest.approx(shuffled.mean(), abs=3 * shuffled.std() / 200)
    majority = np.full(n, "a", dtype=object)
    assert expected_accuracy(truth, majority, folds) == accuracy(truth, majority)[0]  # predicting one class is chance


def _labels(kind: str, rng: np.random.Generator, X: np.ndarray, signal: float) -> list:
    z = signal * X[:, 0]
    if kind == "multilabel":
        logit = np.log([0.06 / 0.94, 0.15 / 0.85, 0.3 / 0.7]) + z[:, None]
        has = rng.random((len(X), 3)) < 1 / (1 + np.exp(-logit))
        return [tuple(t for t, v in zip("abc", row) if v) for row in has]
    if kind == "regression":
        return list(rng.normal(size=len(X)) + z)
    return list(np.where(rng.random(len(X)) < 1 / (1 + np.exp(-z)), "x", "y"))


def _p_above_chance(kind_name: str, seed: int, signal: float, cv: bool, n: int = 60) -> list[float]:
    """The heads' ``p_above_chance`` on ``n`` generated feature vectors with labels that depend on the
    first feature by ``signal`` (0: not at all), scored by five-fold cross-validation or a held-out third."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8))
    kind = get_kind(kind_name)
    y = kind.values(_labels(kind_name, rng, X, signal))
    splits = ["all"] * n if cv else ["train"] * (n - n // 3) + ["val"] * (n // 3)
    protocol = decide("t", kind, [f"{i:03d}" for i in range(n)], y, splits, 5, seed)  # ids sort as X's rows
    ps = []
    for head in HEADS[kind_name]:
        pred = np.empty(n, dtype=object)
        for train, test in protocol.splits():
            model = create_head(head, 0, kind=kind_name).fit(X[train], kind.target(protocol.y[train], protocol.names))
            pred[test] = list(kind.predict(model, X[test], protocol.names))
        scored = pred[protocol.scored]
        scored = scored if kind_name == "classification" else np.array(list(scored), dtype=np.float64)
        ps.append(protocol.score(scored)["p_above_chance"])
    return ps


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # bootstrap draws of a rare tag without a positive
@pytest.mark.parametrize("kind_name", sorted(HEADS))
def test_labels_independent_of_the_features_keep_the_false_positive_rate(kind_name):
    ps = np.concatenate([_p_above_chance(kind_name, seed, 0.0, cv=seed % 2 == 0) for seed in range(SEEDS)])
    allowed = binom.ppf(0.999, len(ps), 0.05)  # what a 5 % rate allows but once in a thousand
    assert np.sum(ps < 0.05) <= allowed, sorted(ps)[:12]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind_name", sorted(HEADS))
@pytest.mark.parametrize("cv", [True, False])
def test_real_structure_is_above_chance(kind_name, cv):
    ps = _p_above_chance(kind_name, 0, 3.0, cv=cv, n=90)
    assert max(ps) < 0.05, ps
