"""How well `pipeline audit` ranks planted label errors, against a plain script.

    python benchmarks/label_issues.py --data ../shared/data/hymenoptera --data ../shared/data/lego

Extracts each dataset once (lite0, ``PIPELINE_WEIGHTS_DIR``), then per seed flips --flip of its labels
(every split) to another class, only in the labels, and prints precision@k (k = the number of flips) of:

- ``audit``: the head of audit's ranking (``label_issues_<task>.csv``): its label head (``--head``,
  default ``auto``: logreg without a run), its out-of-fold plan (the data's val split, else 5 folds),
  ranked by self-confidence; the functions ``audit`` calls, without its other findings;
- ``audit flagged only``: the rows cleanlab's confident learning flags, in the same order;
- ``--head logreg``: the ranking with the pipeline's ``logreg`` head, and its flagged rows alone (what
  audit listed before: logreg was its default, and it ranked only the flagged rows);
- ``rank_by=...``: cleanlab's other label quality scores of the same out-of-fold probabilities;
- ``plain``: scikit-learn's ``LogisticRegression()`` on the cache's raw features, 5 shuffled stratified
  folds over every image, ranked by self-confidence.

Medians (min / max) over the seeds.

With ``--kinds tags,numbers``, the same for a tags task and a numbers task made from each image's class
(the data has no others): tags are the class and the parity of its index in sorted order
(``parity_0``, ``parity_1``), corrupted by swapping both tags to another class's for --flip of the
images; numbers are the class's index plus Gaussian noise (sd 0.1), corrupted by adding 2 or more.
``audit`` ranks them with cleanlab's multi-label and regression label quality (its default heads); the
plain script ranks out-of-fold scikit-learn probabilities (one-vs-rest ``LogisticRegression``, lowest
given-tag probability) or absolute residuals (``RidgeCV``), 5 shuffled folds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import FeatureCache, extract  # noqa: E402
from pipeline.evaluation import Labelled  # noqa: E402
from pipeline.kinds import get_kind  # noqa: E402
from pipeline.stages.audit import joined_features, label_head, out_of_fold, rank_label_issues  # noqa: E402

RANK_BY = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def flip(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` with ``fraction`` of them (seeded) changed to another class, and the indices changed."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    flipped = rng.choice(len(labels), round(fraction * len(labels)), replace=False)
    y = labels.copy()
    for i in flipped:
        y[i] = rng.choice([c for c in classes if c != labels[i]])
    return y, flipped


def plain(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """The plain script: out-of-fold LogisticRegression probabilities, lowest given-label probability first."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probs = cross_val_predict(LogisticRegression(max_iter=2000), X, y, cv=folds, method="predict_proba")
    return np.argsort(probs[np.arange(len(y)), np.searchsorted(np.unique(y), y)], kind="stable")


def audit_rankings(X: np.ndarray, ids: np.ndarray, y: np.ndarray, splits: np.ndarray, head: str) -> tuple[dict, str]:
    """What ``audit`` ranks for a label file of ``y`` (no run: the protocol decided as ``fit`` decides
    it), its flagged rows alone, and cleanlab's other ``rank_by`` scores of the same probabilities."""
    from cleanlab.rank import get_label_quality_scores

    protocol = Labelled("flipped", "classification", ids, y.astype(object), splits).decide(5, 0)
    row = {s: i for i, s in enumerate(ids)}
    probs = out_of_fold(X[[row[i] for i in protocol.ids]], protocol, label_head("classification", "flipped", None, head), 5, 0)
    order, _, flagged, _ = rank_label_issues(protocol, probs)
    given = np.searchsorted(protocol.names, protocol.y.astype(str))
    ranked = {"audit": list(protocol.ids[order]), "audit flagged only": list(protocol.ids[order[flagged[order]]])}
    for m in RANK_BY[1:]:
        ranked[f"rank_by={m}"] = list(protocol.ids[np.argsort(get_label_quality_scores(given, probs, method=m), kind="stable")])
    return ranked, protocol.eval


def planted(labels: np.ndarray, kind: str, fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Label cells of a ``kind`` task made from the class ``labels``, ``fraction`` of them (seeded)
    corrupted, and the indices corrupted (see the module docstring)."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    index = np.searchsorted(classes, labels)
    bad = rng.choice(len(labels), round(fraction * len(labels)), replace=False)
    shown = index.copy()
    shown[bad] = [(k + rng.integers(1, len(classes))) % len(classes) for k in index[bad]]
    if kind == "multilabel":
        return [f"{classes[k]}|parity_{k % 2}" for k in shown], bad
    value = index + rng.normal(0, 0.1, len(labels))
    value[bad] += 2 + rng.random(len(bad))
    return [f"{v:.4f}" for v in value], bad


def audit_kind_ranking(X: np.ndarray, ids: np.ndarray, cells: list[str], splits: np.ndarray, kind: str) -> list[str]:
    """``audit``'s ranking of a ``kind`` task of label cells ``cells``, most suspicious first."""
    y = get_kind(kind).parse(cells, list(ids))
    protocol = Labelled("planted", kind, ids, y, splits).decide(5, 0)
    row = {s: i for i, s in enumerate(ids)}
    scores = out_of_fold(X[[row[i] for i in protocol.ids]], protocol, label_head(kind, "planted", None, "auto"), 5, 0)
    return list(protocol.ids[rank_label_issues(protocol, scores)[0]])


def plain_kind_ranking(X: np.ndarray, cells: list[str], kind: str, seed: int) -> np.ndarray:
    """The plain script for tags (lowest out-of-fold probability of a given tag) or numbers (largest
    out-of-fold absolute residual): indices, most suspicious first."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    folds = KFold(5, shuffle=True, random_state=seed)
    if kind == "multilabel":
        Y = MultiLabelBinarizer().fit_transform([c.split("|") for c in cells])
        probs = cross_val_predict(OneVsRestClassifier(LogisticRegression(max_iter=2000)), X, Y, cv=folds,
                                  method="predict_proba")
        return np.argsort(np.where(Y == 1, probs, np.inf).min(axis=1), kind="stable")
    y = np.array(cells, dtype=float)
    return np.argsort(-np.abs(cross_val_predict(RidgeCV(), X, y, cv=folds) - y), kind="stable")


def precision_at(ranked: list[str], truth: set[str]) -> float:
    return len(set(ranked[:len(truth)]) & truth) / len(truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", help="image folder; repeat for several")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    ap.add_argument("--work", default="label-issues")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--head", default="auto", help="audit's --head")
    ap.add_argument("--kinds", default="classes", help="comma-separated: classes, tags, numbers")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for data in map(Path, args.data or ["../shared/data/hymenoptera", "../shared/data/lego"]):
        [res] = extract(data, args.backbone, work / "cache", progress=False)
        with FeatureCache(res.cache) as c:
            ids, X = joined_features([c], "pooled")  # audit's features: L2-normalised
            rows = np.array([list(c.ids).index(i) for i in ids])
            labels, splits, raw = c.labels[rows].astype(str), c.splits[rows], c.features("pooled", rows)
        kinds = args.kinds.split(",")
        for kind in [k for k in kinds if k != "classes"]:
            kind_name = {"tags": "multilabel", "numbers": "regression"}[kind]
            found = {"audit": [], "plain": []}
            for seed in range(args.seeds):
                cells, bad = planted(labels, kind_name, args.flip, seed)
                found["audit"].append(precision_at(audit_kind_ranking(X, ids, cells, splits, kind_name), set(ids[bad])))
                found["plain"].append(precision_at(list(ids[plain_kind_ranking(raw, cells, kind_name, seed)]), set(ids[bad])))
            print(f"\n{data.name} {kind}: {len(bad)} of {len(ids)} labels corrupted, {args.seeds} seeds")
            for name, values in found.items():
                print(f"  {name:36s} {np.median(values):.3f} ({min(values):.3f} / {max(values):.3f})")
        if "classes" not in kinds:
            continue
        got: dict[str, list[float]] = {}
        seconds = []
        for seed in range(args.seeds):
            y, flipped = flip(labels, args.flip, seed)
            started = time.perf_counter()
            ranked, protocol = audit_rankings(X, ids, y, splits, args.head)
            seconds.append(time.perf_counter() - started)
            before, _ = audit_rankings(X, ids, y, splits, "logreg")
            ranked["--head logreg"] = before["audit"]
            ranked["--head logreg, flagged only (before)"] = before["audit flagged only"]
            ranked["plain"] = list(ids[plain(raw, y, seed)])
            for name, order in ranked.items():
                got.setdefault(name, []).append(precision_at(order, set(ids[flipped])))
            got.setdefault("flagged count", []).append(len(ranked["audit flagged only"]))
        print(f"\n{data.name}: {len(ids)} images, {len(flipped)} labels flipped, {protocol}, {args.seeds} seeds; "
              f"audit's ranking {np.median(seconds):.1f} s (median)")
        print(f"  {'':36s} precision@{len(flipped)} median (min / max)")
        for name, values in got.items():
            print(f"  {name:36s} {np.median(values):.3f} ({min(values):.3f} / {max(values):.3f})"
                  + ("  [a count, not a precision]" if name == "flagged count" else ""))

if __name__ == "__main__":
    main()
