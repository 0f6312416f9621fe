"""A whole study from one TOML file: the data, backbones, taps, label files, heads, few-shot curves and
fine-tunes, and where the caches and the run folder go. ``run`` does every stage the caches and the run
folder do not already hold, so editing the file and running again costs only what changed; ``dry_run``
says what it would do. Paths in the file are relative to the file's folder.

    data = "images"                      # a folder or CSV manifest
    backbones = ["tf_efficientnet_lite0.in1k"]
    out = "runs/study"                   # the run folder
    cache = "cache"                      # default "cache"
    labels = ["tags.csv"]                # label files or folders (optional)
    heads = ["logreg", "knn"]            # default: each task kind's own
    [extract]                            # extract()'s settings: taps, dtype, amp, tta, jpeg_draft, decode, compile, batch_size, workers, device
    [fit]                                # fit()'s settings: cv, seed, shots, draws, concat, n_jobs, backend, ...
    [[finetune]]                         # one table per fine-tune: out, backbone (default: the first), and
    out = "ft"                           # finetune()'s settings; it starts from the run (init) unless init = false
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..cache import FeatureCache, cache_path, spec_to_write
from ..data import HASH_BYTES
from ..sources import load_source
from ..errors import PipelineError
from .extract import extract
from ..backbones import LAYER, check_taps
from ..featurizer import Featurizer, planned_spec
from ..spec import SPEC_INPUTS, FeatureSpec
from .finetune import METRICS_FILE, STATE_FILE, FinetuneConfig, finetune
from .fit import FitConfig, fit
from ..evaluation import RunFolder
from ..tasks import label_files

_EXTRACT = ("taps", "dtype", "amp", "tta", "jpeg_draft", "decode", "compile", "batch_size", "workers", "device",
            "channels_last")
_FINETUNE_OWN = ("out", "backbone", "init", "labels", "weights", "budget_minutes", "workers", "device")


@dataclass
class Study:
    """A study file, read and checked; paths resolved against the file's folder."""

    path: Path
    data: Path
    backbones: list[str]
    out: Path
    cache: Path
    labels: list[Path] = field(default_factory=list)
    heads: list[str] | None = None
    extract: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    finetune: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Study":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PipelineError(f"study file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise PipelineError(f"{path}: not valid TOML ({e})") from None
        known = {f.name for f in fields(cls)} - {"path"}
        unknown = sorted(set(raw) - known)
        missing = [k for k in ("data", "backbones", "out") if k not in raw]
        if unknown or missing:
            raise PipelineError(f"{path}: " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"] if unknown else [])
                + ([f"missing {', '.join(missing)}"] if missing else [])))
        here = path.resolve().parent
        study = cls(path=path, data=(here / raw["data"]).resolve(), backbones=list(raw["backbones"]),
                    out=(here / raw["out"]).resolve(), cache=(here / raw.get("cache", "cache")).resolve(),
                    labels=[(here / p).resolve() for p in raw.get("labels", [])],
                    heads=raw.get("heads"), extract=dict(raw.get("extract", {})), fit=dict(raw.get("fit", {})),
                    finetune=[dict(t) for t in raw.get("finetune", [])])
        study._check(here)
        return study

    def _check(self, here: Path) -> None:
        fit_keys = {f.name for f in fields(FitConfig)} - {"heads"}
        tune = {f.name for f in fields(FinetuneConfig)} | set(_FINETUNE_OWN)
        bad = _unknown("[extract]", self.extract, _EXTRACT) + _unknown("[fit]", self.fit, fit_keys)
        for i, t in enumerate(self.finetune):
            bad += _unknown(f"[[finetune]] #{i + 1}", t, tune)
            if "out" not in t:
                bad.append(f"[[finetune]] #{i + 1} has no out")
            t["out"] = (here / t.get("out", "")).resolve()
            for key in ("labels", "weights"):
                if key in t:
                    t[key] = (here / t[key]).resolve()
        if not self.backbones:
            bad.append("backbones is empty")
        if bad:
            raise PipelineError(f"{self.path}: " + "; ".join(bad))


@dataclass
class Step:
    """One thing the study does, or found already done."""

    stage: str
    what: str
    needed: bool
    reason: str
    action: Callable[[], object] | None = None

    def line(self) -> str:
        return f"{self.stage:9s} {'run ' if self.needed else 'skip'}  {self.what}: {self.reason}"


def run(study: str | os.PathLike, dry_run: bool = False, progress: bool = True,
        log: Callable[[str], None] | None = None) -> list[Step]:
    """Plan the study and, unless ``dry_run``, do every step that is needed, in order; the steps.
    ``log`` receives each step's line as it starts."""
    log = log or (lambda line: None)
    s = Study.read(study)
    extracts, caches = _extract_steps(s, progress, load=not dry_run)
    steps = extracts + [_fit_step(s, caches, any(e.needed for e in extracts), progress)]
    steps += [_finetune_step(s, t, progress) for t in s.finetune]
    for step in steps:
        log(step.line())
        if step.needed and not dry_run:
            step.action()
    return steps


def _extract_steps(s: Study, progress: bool, load: bool) -> tuple[list[Step], list[Path]]:
    """A step per backbone, skipped when its cache (found by the feature spec's key) already holds every
    image of the data with the same bytes; and the caches (those known: see :func:`_planned`)."""
    src = load_source(s.data)
    digests, _, _ = src.content_hashes()
    hashes = {sid: bytes(h).ljust(HASH_BYTES, b"\0") for sid, h in zip(src.ids, digests)}
    settings = {k: v for k, v in s.extract.items() if k != "taps"}
    taps = check_taps(s.extract.get("taps", ("pooled",)))
    steps, paths = [], []
    for name in s.backbones:
        action = lambda name=name: extract(s.data, name, s.cache, taps=taps, progress=progress, **settings)  # noqa: E731
        path, stored = _planned(s.cache, src.name, name, settings, taps, load)
        if path is not None:
            paths.append(path)
        if stored is None:  # a dry run, and only the model could tell
            unknown = "which layers its taps are" if path else "the cache's name"
            steps.append(Step("extract", f"{name} -> {path.name if path else 'cache name unknown until extraction'}",
                              True, f"{unknown} is known once the model is loaded, and a dry run loads none", action))
            continue
        todo = _pending(path, hashes, stored)
        steps.append(Step("extract", f"{name} -> {path.name}", todo > 0,
                          f"{todo} of {len(hashes)} images to compute" if todo else f"the cache holds all {len(hashes)} images",
                          action))
    return steps, paths


def _unknown(table: str, given: dict, known) -> list[str]:
    """``[table] key`` for each key of ``given`` that is no setting, with the settings there are."""
    return [f"{table} {k} is no setting (known: {', '.join(sorted(known))})" for k in given if k not in known]


def _planned(cache_dir: Path, source: str, name: str, settings: dict, taps: tuple[str, ...],
             load: bool) -> tuple[Path | None, tuple[str, ...] | None]:
    """The cache a backbone's extraction writes and the taps it stores, from the feature spec planned
    without building the model. Where the model source cannot plan (weights from the hub, a user's
    module) or a tap counts layers from the last (``layer-1``), the model is loaded, unless ``load`` is
    false: then None for what stays unknown."""
    inputs = {k: settings[k] for k in ("device", *SPEC_INPUTS) if k in settings}

    def path(spec: FeatureSpec) -> Path:
        return cache_path(cache_dir, source, spec_to_write(cache_dir, source, spec, inputs.get("decode")))

    spec = planned_spec(name, **inputs)
    from_last = any((m := LAYER.match(t)) and int(m.group(1)) < 0 for t in taps)
    if spec is not None and not from_last:
        return path(spec), taps
    if not load:
        return (None if spec is None else path(spec)), None
    fz = Featurizer.create(name, **inputs)
    return path(fz.spec), fz.backbone.resolve_taps(taps)


def _pending(path: Path, hashes: dict[str, bytes], taps: tuple[str, ...]) -> int:
    """How many images a cache still lacks (absent, changed, or not yet computed, failures aside)."""
    if not path.is_file():
        return len(hashes)
    with FeatureCache(path) as c:
        if not set(taps) <= set(c.taps):
            return len(hashes)
        failed = {f[0] for f in c.failures}
        done = {i: h for i, h, v in zip(c.ids, c.content_hash, c.valid) if v or i in failed}
    return sum(done.get(i) != h for i, h in hashes.items())


def _fit_step(s: Study, caches: list[Path], extracting: bool, progress: bool) -> Step:
    """Skipped when the run folder's last fit had these caches, label files and settings, and no cache
    or label file changed since."""
    action = lambda: fit(caches, s.out, labels=s.labels, heads=s.heads, progress=progress, **s.fit)  # noqa: E731
    run_folder = RunFolder(s.out)
    if not run_folder.exists:
        return Step("fit", str(s.out), True, "no run folder yet", action)
    if extracting:
        return Step("fit", str(s.out), True, "its caches are being extracted", action)
    last = next((h["parameters"] for h in reversed(run_folder.history()) if h["stage"] == "fit"), {})
    want = dict(vars(FitConfig(heads=s.heads, **s.fit)), caches=[str(c) for c in caches],
                labels=[str(x) for x in s.labels])
    changed = [k for k, v in want.items() if k not in ("n_jobs", "backend", "cluster", "overwrite")
               and json.loads(json.dumps(v, default=str)) != last.get(k)]
    if changed:
        return Step("fit", str(s.out), True, f"{', '.join(changed)} differ from the run's last fit", action)
    built = run_folder.artifact("leaderboard").stat().st_mtime
    if any(c.stat().st_mtime > built for c in caches):
        return Step("fit", str(s.out), True, "a cache changed since the last fit", action)
    if any(f.stat().st_mtime > built for f in label_files(s.labels) if f.exists()):
        return Step("fit", str(s.out), True, "a label file changed since the last fit", action)
    return Step("fit", str(s.out), False, f"the run holds {len(run_folder.rows())} rows of these caches and settings", action)


def _finetune_step(s: Study, t: dict, progress: bool) -> Step:
    """Skipped when its folder holds a finished fine-tune; resumed when it holds an interrupted one."""
    out = t["out"]
    settings = {k: v for k, v in t.items() if k not in _FINETUNE_OWN}
    backbone = t.get("backbone", s.backbones[0])
    init = s.out if t.get("init", True) else None
    own = {k: t[k] for k in ("labels", "weights", "budget_minutes", "workers", "device") if k in t}
    metrics = out / METRICS_FILE
    state = json.loads(metrics.read_text()).get("stopped") if metrics.is_file() else None
    finished = state in ("finished", "early-stopping")
    resume = not finished and any(out.glob(f"**/{STATE_FILE}"))  # a cross-validated one keeps it per fold
    action = lambda: finetune(s.data, backbone, out, init, run=s.out, resume=resume, progress=progress,  # noqa: E731
                              **own, **settings)
    reason = "finished" if finished else "interrupted: it resumes" if resume else "not trained yet"
    return Step("finetune", f"{backbone} -> {out}", not finished, reason, action)
