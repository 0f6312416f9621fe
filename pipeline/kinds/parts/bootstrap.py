"""Paired bootstrap statistics shared by the scoring parts whose metric has no closed-form interval or
test (mean average precision, R²): the same seeded resamples for every row of a task, so two rows (or a
row and chance) are compared on the same draws."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_DRAWS = 1000


def bootstrap(n: int, seed: int = 0, draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """``draws`` resamples of ``n`` rows as weights (how often each row is drawn), seeded: the same
    resamples for every row of a task, so paired comparisons see the same draws."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap values (NaN draws left out)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def p_greater(diffs: np.ndarray) -> float:
    """One-sided bootstrap p-value that a difference is above 0 (with the +1 that keeps it above 0)."""
    diffs = diffs[np.isfinite(diffs)]
    return float((np.sum(diffs <= 0) + 1) / (len(diffs) + 1))


def p_two_sided(diffs: np.ndarray) -> float:
    return min(1.0, 2 * min(p_greater(diffs), p_greater(-diffs)))
