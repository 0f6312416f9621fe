"""What a label cell holds: how cells are read and written, the classes or tags a model predicts over,
whether a task's labels can be evaluated, and what a scikit-learn head fits on."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ...errors import PipelineError

SEPARATOR = "|"  # between the tags of a cell


class ClassLabels:
    """One class name per image (an empty cell is an error)."""

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.array([c.strip() for c in cells], dtype=object)
        empty = np.flatnonzero(out == "")
        if len(empty):
            raise PipelineError(f"{where[empty[0]]}: empty label")
        return out

    def format(self, y: np.ndarray) -> list[str]:
        return [str(v) for v in y]

    def names(self, y: np.ndarray) -> list[str]:
        return sorted(set(map(str, y)))

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise PipelineError(f"task {task!r}: needs at least 2 classes, found {len(classes)} "
                                f"({', '.join(map(str, classes))})")
        rare = counts < (n_folds or 0)
        if rare.any():
            raise PipelineError(
                f"task {task!r}: class {classes[rare][0]!r} has {counts[rare][0]} sample(s), fewer than --cv "
                f"{n_folds}; lower --cv, add samples, or give the task a train/val split")

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        return y


class TagLabels:
    """A set of tags per image: tags separated by ``|``, an empty cell for none; held as sorted tuples."""

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.empty(len(cells), dtype=object)
        for i, cell in enumerate(cells):
            tags = [t.strip() for t in cell.split(SEPARATOR)] if cell.strip() else []
            if "" in tags:
                raise PipelineError(f"{where[i]}: empty tag in {cell!r}; tags are separated by {SEPARATOR!r}")
            out[i] = tuple(sorted(set(tags)))
        return out

    def format(self, y: np.ndarray) -> list[str]:
        return [SEPARATOR.join(tags) for tags in y]

    def names(self, y: np.ndarray) -> list[str]:
        return sorted({t for tags in y for t in tags})

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        Y = indicators(y, self.names(y))
        varied = (Y.sum(0) > 0) & (Y.sum(0) < len(y))
        if not varied.any():
            raise PipelineError(f"task {task!r}: needs a tag that some images have and others do not")
        if n_folds and len(y) < n_folds:
            raise PipelineError(f"task {task!r}: {len(y)} images, fewer than --cv {n_folds}")

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        return indicators(y, names)


class NumberLabels:
    """A finite number per image; no names."""

    def values(self, values: Sequence) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.empty(len(cells), dtype=np.float64)
        for i, cell in enumerate(cells):
            try:
                out[i] = float(cell)
            except ValueError:
                raise PipelineError(f"{where[i]}: target {cell.strip()!r} is not a number") from None
            if not math.isfinite(out[i]):
                raise PipelineError(f"{where[i]}: target {cell.strip()!r} is not a finite number")
        return out

    def format(self, y: np.ndarray) -> list[str]:
        return [repr(float(v)) for v in y]

    def names(self, y: np.ndarray) -> list[str]:
        return []

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        if len(y) < max(n_folds or 0, 3):
            raise PipelineError(f"task {task!r}: {len(y)} images, too few to score a regression"
                                + (f" with --cv {n_folds}" if n_folds else ""))
        if np.ptp(np.asarray(y, dtype=np.float64)) == 0:
            raise PipelineError(f"task {task!r}: every target is {y[0]}; there is nothing to predict")

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(y, dtype=np.float64)


def indicators(y: np.ndarray, names: list[str]) -> np.ndarray:
    """Tag sets as a 0/1 matrix, a column per tag of ``names``."""
    index = {t: j for j, t in enumerate(names)}
    Y = np.zeros((len(y), len(names)), np.int64)
    for i, tags in enumerate(y):
        Y[i, [index[t] for t in tags if t in index]] = 1
    return Y
