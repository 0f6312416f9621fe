"""What an audit found: per task its protocol, label issues and leaked images; copies,
outliers and the map; and the names of the files they are written to. Read by ``audit`` (which makes
them) and by its page (:mod:`pipeline.audit_page`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .evaluation import Protocol, slug
from .copies import leak_message


DUPLICATES, OUTLIERS, MAP_CSV, MAP, PAGE = "duplicates.csv", "outliers.csv", "map.csv", "map.png", "audit.html"
LABEL_ISSUES = "label_issues_{}.csv"
STAGING = ".audit-writing"  # inside the audit's folder: its files until every one is written


def label_issues_file(task: str) -> str:
    return LABEL_ISSUES.format(slug(task))


def audit_files(folder: Path) -> list[Path]:
    """The files an audit writes that ``folder`` holds: an earlier audit's (finished where :data:`PAGE`,
    written last, is among them), replaced as a whole so that no task's file outlives its audit."""
    named = [folder / name for name in (DUPLICATES, OUTLIERS, MAP_CSV, MAP, PAGE)]
    return [p for p in named if p.is_file()] + sorted(folder.glob(LABEL_ISSUES.format("*")))


@dataclass(frozen=True, eq=False)
class Rows:
    """Rows of a findings CSV made a block at a time: each column is a function giving its cells for an
    array of positions, and ``index`` the positions in row order, so the ranking of ten million images
    holds its arrays, not ten million dicts. Reads as a list of dicts (``len``, iteration, an index or a
    slice); :meth:`where` keeps the rows whose cell in a column is true."""

    columns: dict[str, Callable[[np.ndarray], Sequence]]
    index: np.ndarray

    BLOCK = 8192

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.index), self.BLOCK):
            block = self.index[start:start + self.BLOCK]
            for values in zip(*(column(block) for column in self.columns.values())):
                yield dict(zip(self.columns, values))

    def __getitem__(self, key: int | slice) -> dict | Rows:
        if isinstance(key, slice):
            return Rows(self.columns, self.index[key])
        return next(iter(Rows(self.columns, self.index[[key]])))

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self[:3]))
        return f"<{len(self)} rows{': ' if shown else ''}{shown}{', ...' if len(self) > 3 else ''}>"

    def where(self, column: str) -> Rows:
        if not len(self.index):
            return self
        return Rows(self.columns, self.index[np.asarray(self.columns[column](self.index), dtype=bool)])


def cells(values: np.ndarray, digits: int | None = None) -> Callable[[np.ndarray], list]:
    """A column of :class:`Rows`: ``values`` at the positions asked (numbers rounded to ``digits``)."""
    if digits is None:
        return lambda at: values[at].tolist()
    return lambda at: [round(v, digits) for v in values[at].tolist()]


@dataclass
class TaskAudit:
    """One task's findings: its protocol, the ranking of its labels (rows of the CSV, most suspicious
    first, ``flagged`` marking cleanlab's label issues), and the scored images with a near-copy among
    their training images."""

    task: str
    protocol: Protocol
    ranking: Rows
    leaked: list[str]
    note: str = ""

    @cached_property
    def issues(self) -> Rows:
        """The flagged rows of the ranking, most suspicious first (found once: the ranking may hold ten
        million rows)."""
        return self.ranking.where("flagged")

    def lines(self, out: Path) -> list[str]:
        p = self.protocol
        lines = [f"label issues in {self.task} ({p.eval}, {len(p.ids)} images): {len(self.issues)} flagged"
                 + (f"; {out / label_issues_file(self.task)}" if self.ranking else "")]
        if self.note:
            lines.append(f"  note: {self.note}")
        lines.append(f"  possible leakage: {leak_message(len(self.leaked), p)}")
        return lines


@dataclass
class AuditResult:
    """What ``audit`` found and where it wrote it."""

    out: Path
    tasks: list[TaskAudit]
    duplicates: list[dict]  # rows of duplicates.csv: confirmed copies first, cross-split pairs first within
    outliers: Rows  # rows of outliers.csv: every image, most outlying first
    map_method: str
    files: dict[str, Path] = field(default_factory=dict)
    copy_rule: str = ""  # how the copies were confirmed (pipeline.copies.Copies.rule)
    search: str = ""  # how every image's nearest others were found (pipeline.similarity.describe_search)
    set_aside: list[str] = field(default_factory=list)  # with a run: the label issues it set aside, and the ranking then

    @property
    def search_said(self) -> bool:
        """Whether the summary and the page say how the nearest others were found: only where not exactly."""
        return self.search not in ("", "exact")

    @property
    def copies(self) -> list[dict]:
        return [d for d in self.duplicates if d["confirmed"]]

    @property
    def cross_split(self) -> list[dict]:
        return [d for d in self.copies if d["cross"]]

    def lines(self, folder: Path | None = None) -> list[str]:
        """A summary for people, one finding a line; the files named in ``folder`` (None: the audit's
        folder as given; the page, beside them, names them alone with ``Path()``)."""
        folder = self.out if folder is None else folder
        named = {name: folder / path.name for name, path in self.files.items()}
        lines = [line for t in self.tasks for line in t.lines(folder)]
        if not self.tasks:
            lines.append("label issues: no labels in the cache and no --labels file, so none looked for")
        evaluated = {d["id_a"] for d in self.cross_split}
        pairs = f"{len(self.copies)} pair" + ("" if len(self.copies) == 1 else "s")
        lines.append(f"copies ({self.copy_rule}): {pairs}, {len(self.cross_split)} across train "
                     f"and val/test ({len(evaluated)} evaluation images); {named['duplicates']}")
        flagged = len(self.outliers.where("outlier"))
        lines.append(f"outliers: {flagged} of {len(self.outliers)} images beyond the fence; {named['outliers']}")
        if self.search_said:
            lines.append(f"nearest others (the copies' candidates, the outliers' scores): {self.search}")
        lines += self.set_aside
        if "map" in named:
            lines.append(f"map ({self.map_method}): {named['map']}")
        if "page" in named:
            lines.append(f"page: {named['page']}")
        return lines
