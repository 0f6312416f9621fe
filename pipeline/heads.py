"""Heads: scikit-learn estimators picked by name (and task kind) from a registry, each with the
preprocessing it needs.

Every head is a plain scikit-learn estimator (often a ``Pipeline``), so a user can put it in their own
``cross_val_score`` or ``GridSearchCV``. A name may have a version per task kind: ``ridge`` is a ridge
classifier, a multi-output ridge classifier for tags and ridge regression for targets. Fitted heads
are saved with skops; loading checks the file's types against the list this project trusts instead of
passing everything through.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import os
import sys
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, ClassifierMixin, clone, is_classifier, is_regressor
from sklearn.linear_model import RidgeClassifierCV, RidgeCV, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor, NearestCentroid
from sklearn.metrics import pairwise_distances
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from .batched import RowChunks, batchable, encode_classes, fit_many
from .errors import PipelineError
from .files import atomic_path
from .kinds import get_kind
from .similarity import ChunkedIndex, NeighbourIndex, normalized
from .splitters import StratifiedKFoldUpTo  # noqa: F401  (its old home: saved heads name it here)
from .validation import Rule, check, check_estimator_params, unknown


class _CappedNeighbours:
    """k nearest neighbours with k capped at the number of training rows, so few-shot fits work. On cosine
    distance with at least :data:`pipeline.similarity.EXACT_BELOW` training rows the neighbours come from
    the project's similarity index (approximate, built at fit) instead of a brute-force search of every row."""

    def fit(self, X, y):
        super().fit(X, y)
        self._index = None
        if self.metric == "cosine" and not issparse(self._fit_X) and NeighbourIndex.approximates(self.n_samples_fit_):
            self._fit_method = "similarity_index"  # not "brute": predict then asks kneighbors, never scikit-learn's own search
            self._neighbour_index()
        return self

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        check_is_fitted(self)
        if self.needs_rows:
            raise PipelineError(f"this knn head holds the ids of its {len(self.training_ids_)} training images, not "
                                "their features: load it with pipeline.load_head(path), which reads them from the "
                                "cache it was fit on, or fit it with portable=True (--portable)")
        n = min(n_neighbors or self.n_neighbors, self.n_samples_fit_ - (X is None))
        if self._fit_method != "similarity_index":
            return super().kneighbors(X, n, return_distance)
        index = self._neighbour_index()
        queries = index.base if X is None else normalized(validate_data(self, X, reset=False))
        sims, idx = index.search(queries, n, exclude=np.arange(len(queries)) if X is None else None)
        return (np.clip(1.0 - sims, 0.0, 2.0), idx) if return_distance else idx

    def _neighbour_index(self) -> NeighbourIndex:
        """The approximate index of the training rows, kept from fit; built again after loading (the same:
        it is seeded), as a faiss index is not saved."""
        if getattr(self, "_index", None) is None:
            self._index = NeighbourIndex(normalized(self._fit_X), exact_below=self.n_samples_fit_, n_jobs=self.n_jobs)
        return self._index

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_index", None)
        return state

    def without_rows(self, ids: np.ndarray) -> "_CappedNeighbours":
        """A copy to save that holds the ids of its training images (``training_ids_``, in fit order) and a
        digest of their features instead of the features (a knn head is otherwise as large as its
        training features): :meth:`with_rows` puts them back, read from the cache."""
        light = copy.copy(self)
        light.training_ids_ = np.asarray(ids, dtype=str)
        light.training_digest_ = _digest(self._fit_X)
        light._fit_X, light._index = self._fit_X[:0], None
        return light

    @property
    def needs_rows(self) -> bool:
        """Saved by :meth:`without_rows` and not given its rows back yet."""
        return len(getattr(self, "training_ids_", ())) > 0 and len(self._fit_X) == 0

    def with_rows(self, X: np.ndarray) -> "_CappedNeighbours":
        """Give back the training features (those of ``training_ids_``, in order), checked against the
        digest taken when the head was saved."""
        X = np.ascontiguousarray(X, dtype=self._fit_X.dtype)
        if X.shape != (len(self.training_ids_), self.n_features_in_) or _digest(X) != self.training_digest_:
            raise PipelineError(f"the cache's features of the head's {len(self.training_ids_)} training images are "
                                "not those it was fit on (the cache was made again, or is another one): fit it again")
        self._fit_X = X
        return self


class CappedKNeighborsClassifier(_CappedNeighbours, KNeighborsClassifier):
    __doc__ = _CappedNeighbours.__doc__


class CappedKNeighborsRegressor(_CappedNeighbours, KNeighborsRegressor):
    __doc__ = _CappedNeighbours.__doc__


class NearestCentroidByDistance(NearestCentroid):
    """scikit-learn's ``NearestCentroid`` whose scores follow its rule: minus the squared distance to each
    centroid (for two classes, how much nearer the second one is), their softmax as probabilities, so the
    most probable class is the nearest centroid, the class it predicts. scikit-learn's own scores scale
    each feature by its spread within the classes, so their most probable class is often another one
    (the one ``predict`` served), and one image per class makes them NaN."""

    def _decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "centroids_")
        X = validate_data(self, X, reset=False, accept_sparse="csr", dtype=np.float64)
        return -pairwise_distances(X, self.centroids_, metric=self.metric) ** 2 + 2.0 * np.log(self.class_prior_)


class ChunkedKNeighborsClassifier(ClassifierMixin, BaseEstimator):
    """``knn`` for features that do not fit in memory: the ``n_neighbors`` nearest training rows on cosine
    distance vote, weighted by inverse distance, as ``KNeighborsClassifier(metric="cosine",
    weights="distance")`` does, the training rows held in a :class:`pipeline.similarity.ChunkedIndex` (a
    byte per feature, approximate search at the recall it was calibrated to) filled from row chunks by
    :meth:`fit_chunks`; ``fit(X, y)`` is one chunk. Learned: ``classes_``, ``codes_`` (each indexed row's
    class) and ``index_``, saved with the head."""

    _parameter_constraints: dict = {"n_neighbors": [Interval(Integral, 1, None, closed="left")],
                                    "random_state": ["random_state"]}

    def __init__(self, n_neighbors: int = 10, random_state: int | None = 0):
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        return self.fit_chunks(lambda epoch: [(X, y)])

    def fit_chunks(self, chunks: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]) -> "ChunkedKNeighborsClassifier":
        """Index the rows ``chunks(-1)`` yields as ``(X, y)`` (it is read twice)."""
        check_estimator_params(self)
        labels = []

        def rows():
            labels.clear()
            for X, y in chunks(-1):
                labels.append(np.asarray(y))
                yield normalized(X)

        self.index_ = ChunkedIndex(rows, seed=self.random_state or 0)
        self.classes_, self.codes_ = encode_classes(np.concatenate(labels))
        self.n_features_in_ = self.index_.dims
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        sims, idx = self.index_.search(normalized(X), min(self.n_neighbors, self.index_.ntotal))
        found = idx >= 0
        dist = np.where(found, np.clip(1.0 - np.nan_to_num(sims), 0.0, 2.0), np.inf)
        exact = dist == 0  # as scikit-learn: a row at distance 0 takes the whole vote (with any others at 0)
        weights = np.where(exact.any(axis=1, keepdims=True), exact, 1.0 / np.where(exact, 1.0, dist))
        proba = np.zeros((len(X), len(self.classes_)))
        np.add.at(proba, (np.nonzero(found)[0], self.codes_[idx[found]]), weights[found])
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def without_index(self, path: str | os.PathLike) -> "ChunkedKNeighborsClassifier":
        """A copy to save whose index goes to its own file ``path`` (faiss's, written from the index as it
        is) instead of inside the head: skops builds a head's file in memory, and held a 1.3 GB index of
        10^6 rows x 1,280 features four times over. :func:`read_head` reads it back from beside the head."""
        check_is_fitted(self)
        with atomic_path(path) as tmp:
            self.index_.write(tmp)
        head = copy.copy(self)
        head.index_, head.index_file_ = None, Path(path).name
        return head

    @property
    def needs_index(self) -> bool:
        """Saved by :meth:`without_index` and not given its index back yet."""
        return getattr(self, "index_", True) is None

    def with_index(self, folder: str | os.PathLike) -> "ChunkedKNeighborsClassifier":
        """Read the index saved beside the head back from ``folder``."""
        path = Path(folder) / self.index_file_
        if not path.is_file():
            raise PipelineError(f"this knn head's index {path} is missing: it is saved beside the head's file, so "
                                "copy or move the two together (or fit again)")
        self.index_ = ChunkedIndex.read(path)
        return self


# What skops may rebuild when loading a head: scikit-learn internals its own check flags, plus ours.
TRUSTED_TYPES = (
    "sklearn.metrics._classification.log_loss",
    "sklearn.metrics._scorer._PassthroughScorer",
    "sklearn.metrics._scorer._Scorer",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.multiclass._ConstantPredictor",
    "pipeline.splitters.StratifiedKFoldUpTo",
    f"{__name__}.StratifiedKFoldUpTo",  # its name in heads saved before it moved to pipeline.splitters
    f"{__name__}.CappedKNeighborsClassifier",
    f"{__name__}.CappedKNeighborsRegressor",
    f"{__name__}.ChunkedKNeighborsClassifier",
    f"{__name__}.NearestCentroidByDistance",
    "pipeline.similarity.ChunkedIndex",
    "pipeline.linear_probe.TorchLinearSVC",
    "pipeline.linear_probe.TorchLogisticRegression",
    "pipeline.linear_probe.TorchRidge",
    "pipeline.mlp_probe.TorchMLPClassifier",
    "pipeline.mlp_probe.TorchMLPRegressor",
    "pipeline.streaming.StreamingRidge",
    "pipeline.streaming.StreamingRidgeClassifier",
)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: str  # the task kind it predicts (pipeline.kinds)
    build: Callable[[int], BaseEstimator]
    doc: str
    linear: bool = False  # a scaler then a linear model: ``finetune --init`` can start a network's last layer from it
    chunked: bool = False  # trains by row chunks (``fit_by_chunks``), so the features need not fit in memory
    streams: Callable[[int], BaseEstimator] | None = None  # the same model by row chunks, where the features do not fit


_REGISTRY: dict[tuple[str, str], HeadSpec] = {}


def register_head(name: str, doc: str, kind: str = "classification", linear: bool = False, chunked: bool = False,
                  streams: Callable[[int], BaseEstimator] | bool = False):
    """Register ``build(random_state) -> estimator`` under ``name`` for task kind ``kind`` (decorator). A
    name may have a version per kind (``ridge`` classifies, tags and regresses). A ``chunked`` head is a
    ``Pipeline`` of a scaler and a classifier that both have ``partial_fit``, or of a scaler and a model
    fitted from sums over the rows (:mod:`pipeline.streaming`); ``streams`` builds such a version of a head
    that otherwise holds its features, for features that do not fit in memory (``True``: the head itself
    also fits on :class:`~pipeline.batched.RowChunks`, as the batched linear heads do)."""

    def wrap(build: Callable[[int], BaseEstimator]) -> Callable[[int], BaseEstimator]:
        _REGISTRY[(kind, name)] = HeadSpec(name, kind, build, doc, linear, chunked,
                                           build if streams is True else streams or None)
        return build

    return wrap


def list_heads(kind: str = "classification") -> dict[str, str]:
    """The head names registered for ``kind`` and their one-line descriptions."""
    return {name: spec.doc for (k, name), spec in _REGISTRY.items() if k == kind}


def has_head(name: str, kind: str) -> bool:
    """Whether ``name`` can be fit on a task of ``kind`` (``module:Class`` always can be tried)."""
    return ":" in name or (kind, name) in _REGISTRY


def head_spec(name: str, kind: str = "classification") -> HeadSpec:
    """The registry entry of ``name`` for ``kind``; ``module:Class`` gets one built by importing that class."""
    if ":" in name:
        cls = _import_estimator(name, kind)
        return HeadSpec(name, kind, lambda random_state: cls(), f"{cls.__module__}.{cls.__name__}")
    if (kind, name) not in _REGISTRY:
        known = sorted({n for _, n in _REGISTRY})
        if name not in known:
            raise unknown("head", name, list_heads(), f"or give module:Class (every head: {', '.join(known)})")
        raise PipelineError(f"head {name!r} has no {kind} version; {kind} heads: {', '.join(list_heads(kind))}")
    return _REGISTRY[(kind, name)]


def check_head_name(name: str) -> None:
    """Fail on a name no kind registers (before any work)."""
    if ":" not in name and all(n != name for _, n in _REGISTRY):
        head_spec(name)


def is_chunked(name: str) -> bool:
    """Whether ``name`` trains by row chunks in every kind that has it (then no features are loaded whole)."""
    specs = [spec for (_, n), spec in _REGISTRY.items() if n == name]
    return bool(specs) and all(spec.chunked for spec in specs)


def is_linear(name: str, kind: str = "classification") -> bool:
    """Whether ``name`` is a registered linear head of ``kind`` (one ``finetune --init`` can start from)."""
    return (kind, name) in _REGISTRY and _REGISTRY[(kind, name)].linear


def create_head(name: str, random_state: int = 0, params: dict | None = None, kind: str = "classification",
                by_chunks: bool = False) -> BaseEstimator:
    """A new, unfitted head of ``kind``: a registry name, or ``module:Class`` naming any scikit-learn
    classifier (a regressor for regression), built with ``params`` (``--head-param key=value``; for a
    registry head, ``set_params`` names); ``by_chunks``: its version that trains by row chunks, where it
    has one (:attr:`HeadSpec.streams`)."""
    spec = head_spec(name, kind)
    est = (spec.streams if by_chunks and spec.streams is not None else spec.build)(random_state)
    if params:
        try:
            est.set_params(**params)
            for part in (est, *getattr(est, "named_steps", {}).values()):  # a pipeline's steps, as fit would check
                if hasattr(part, "_parameter_constraints"):
                    check_estimator_params(part)
        except ValueError as e:
            raise PipelineError(f"--head-param for {name}: {str(e).splitlines()[0]}") from None
    return est


def _import_estimator(name: str, kind: str) -> type:
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"head {name!r}: cannot import {attr!r} from {module!r} ({e})") from None
    wanted = get_kind(kind).estimator_type
    test = {"regressor": is_regressor, "classifier": is_classifier}[wanted]
    if not (isinstance(cls, type) and hasattr(cls, "get_params") and test(cls())):
        raise PipelineError(f"head {name!r} is not a scikit-learn {wanted}")
    return cls


_KEY_VALUE = Rule(lambda item: "=" in item and bool(item.partition("=")[0].strip()), "key=value")


def parse_head_params(items: Iterable[str]) -> dict:
    """``["C=10", "kernel=rbf"]`` -> ``{"C": 10, "kernel": "rbf"}`` (values read as Python literals
    where they are one, else kept as strings)."""
    params = {}
    for item in items:
        check(dict(head_param=item), dict(head_param=_KEY_VALUE))
        key, _, value = item.partition("=")
        if key.strip() in params:
            raise PipelineError(f"--head-param {key.strip()} is given twice")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip()] = value.strip()
    return params


@register_head("logreg", "standardise + L2 logistic regression, C chosen by 5-fold CV (log loss) on the training data; "
               "the folds and the refit on all rows solved as one batched problem in torch; by chunks where the "
               "features do not fit in memory", linear=True, streams=True)
def _logreg(random_state: int) -> BaseEstimator:
    from .linear_probe import TorchLogisticRegression

    return make_pipeline(StandardScaler(), TorchLogisticRegression(cv=5, scale_folds=True, tol=1e-4,
                                                                        random_state=random_state))


MLP = dict(units=512, alpha=1e-3, max_iter=500)  # the mlp heads' settings (numbers: alpha 1.0)


@register_head("mlp", "standardise + one hidden layer of 512 ReLU units (Adam, L2 1e-3): scikit-learn's MLPClassifier "
               "trained in torch, bf16 products where native; the folds and the refit trained side by side")
def _mlp(random_state: int) -> BaseEstimator:
    from .mlp_probe import TorchMLPClassifier

    return make_pipeline(StandardScaler(), TorchMLPClassifier(hidden_layer_size=MLP["units"], alpha=MLP["alpha"],
                                                              max_iter=MLP["max_iter"], random_state=random_state))


def _knn_by_chunks(random_state: int) -> BaseEstimator:
    return ChunkedKNeighborsClassifier(n_neighbors=10, random_state=random_state)


@register_head("knn", "k=10 nearest neighbours (fewer when there are fewer training rows) on cosine distance, "
               "distance-weighted votes; where the features do not fit in memory, from an index of a byte per "
               "feature filled by chunks", streams=_knn_by_chunks)
def _knn(random_state: int) -> BaseEstimator:
    return CappedKNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance")


@register_head("torch-logreg", "standardise + logistic regression by full-batch L-BFGS in torch (GPU when present), "
               "C from a warm-started path scored on a 20 % hold-out; much faster than logreg at scale; by chunks "
               "where the features do not fit in memory", linear=True, streams=True)
def _torch_logreg(random_state: int) -> BaseEstimator:
    from .linear_probe import TorchLogisticRegression

    return make_pipeline(StandardScaler(), TorchLogisticRegression(random_state=random_state))


@register_head("linear-svm", "standardise + linear SVM (squared hinge), C chosen by 5-fold CV (accuracy); "
               "the folds and the refit on all rows solved as one batched problem in torch; by chunks where the "
               "features do not fit in memory", linear=True, streams=True)
def _linear_svm(random_state: int) -> BaseEstimator:
    from .linear_probe import TorchLinearSVC

    return make_pipeline(StandardScaler(), TorchLinearSVC(cv=5, scale_folds=True, random_state=random_state))


def _ridge_by_chunks(random_state: int) -> BaseEstimator:
    from .streaming import StreamingRidgeClassifier

    return make_pipeline(StandardScaler(), StreamingRidgeClassifier())


@register_head("ridge", "standardise + ridge classifier (one-vs-rest least squares), alpha by efficient leave-one-out "
               "CV; where the features do not fit in memory, from sums over the rows read by chunks in one pass, "
               "alpha by 5-fold CV", linear=True, streams=_ridge_by_chunks)
def _ridge(random_state: int) -> BaseEstimator:
    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 5, 13)))


@register_head("centroid", "L2-normalise + nearest class mean (cosine nearest centroid), probabilities from the "
               "distances; no training to speak of")
def _centroid(random_state: int) -> BaseEstimator:
    return make_pipeline(Normalizer(), NearestCentroidByDistance())


SGD_EPOCHS = 10


@register_head("sgd", f"standardise + logistic regression by SGD (log loss, L2 1e-4, {SGD_EPOCHS} epochs); "
               "trains by row chunks, so the cache need not fit in memory", linear=True, chunked=True)
def _sgd(random_state: int) -> BaseEstimator:
    return make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", alpha=1e-4, random_state=random_state))


@register_head("logreg", "standardise + L2 logistic regression, a sigmoid per tag, each tag's C by 5-fold CV (log "
               "loss); the tags, folds and C solved as one batched problem in torch; by chunks where the features "
               "do not fit in memory", kind="multilabel", linear=True, streams=True)
def _logreg_tags(random_state: int) -> BaseEstimator:
    return _logreg(random_state)


@register_head("ridge", "standardise + multi-output ridge classifier, alpha by efficient leave-one-out CV; by "
               "chunks where the features do not fit in memory", kind="multilabel", linear=True, streams=_ridge_by_chunks)
def _ridge_tags(random_state: int) -> BaseEstimator:
    return _ridge(random_state)


@register_head("knn", "k=10 nearest neighbours on cosine distance, distance-weighted, per tag", kind="multilabel")
def _knn_tags(random_state: int) -> BaseEstimator:
    return _knn(random_state)


@register_head("mlp", "standardise + one hidden layer of 512 ReLU units, a sigmoid per tag: scikit-learn's "
               "MLPClassifier trained in torch as the classes' mlp is", kind="multilabel")
def _mlp_tags(random_state: int) -> BaseEstimator:
    return _mlp(random_state)


def _ridge_target_by_chunks(random_state: int) -> BaseEstimator:
    from .streaming import StreamingRidge

    return make_pipeline(StandardScaler(), StreamingRidge())


@register_head("ridge", "standardise + ridge regression, alpha by efficient leave-one-out CV; by chunks where the "
               "features do not fit in memory", kind="regression", linear=True, streams=_ridge_target_by_chunks)
def _ridge_target(random_state: int) -> BaseEstimator:
    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 13)))


@register_head("knn", "k=10 nearest neighbours on cosine distance, distance-weighted mean", kind="regression")
def _knn_target(random_state: int) -> BaseEstimator:
    return CappedKNeighborsRegressor(n_neighbors=10, metric="cosine", weights="distance")


@register_head("mlp", "standardise features and target + one hidden layer of 512 ReLU units (Adam, L2 alpha 1.0: a "
               "squared loss on a few hundred images overfits with less): scikit-learn's MLPRegressor trained in "
               "torch, bf16 products where native; the folds and the refit trained side by side", kind="regression")
def _mlp_target(random_state: int) -> BaseEstimator:
    from .mlp_probe import TorchMLPRegressor

    return make_pipeline(StandardScaler(), TorchMLPRegressor(hidden_layer_size=MLP["units"], alpha=1.0, scale_target=True,
                                                             max_iter=MLP["max_iter"], random_state=random_state))


@register_head("torch-linear", "standardise + ridge regression solved in torch (GPU when present), alpha from a "
               "path scored on a 20 % hold-out: the linear probe with a squared loss", kind="regression", linear=True)
def _torch_linear(random_state: int) -> BaseEstimator:
    from .linear_probe import TorchRidge

    return make_pipeline(StandardScaler(), TorchRidge(random_state=random_state))


def fit_subsets(estimator: BaseEstimator, X: np.ndarray | RowChunks, y: np.ndarray,
                subsets: list[np.ndarray]) -> Iterable[BaseEstimator]:
    """Clones of ``estimator`` fitted on each row subset of ``X``, ``y`` (the folds of a cross-validation
    and the refit on all rows): as one batched problem where :func:`pipeline.batched.batchable` says the
    head allows it (``logreg``, ``linear-svm``, ``torch-logreg``, ``mlp``; the linear ones also on
    :class:`~pipeline.batched.RowChunks`), a list; a head fitted from sums over the rows (the streaming
    ridges) on ``RowChunks`` in one pass over the rows of them all, a list; else one by one as they are
    iterated, so a caller that is done with a model before asking for the next never holds two (a knn
    holds its training rows)."""
    from .streaming import accumulates, fit_subsets_in_one_pass

    if isinstance(X, RowChunks) and accumulates(estimator):
        used = np.unique(np.concatenate(subsets))
        chunks = ((used[where], x, y[used[where]]) for where, x in X.take(used))
        return fit_subsets_in_one_pass(estimator, chunks, subsets, np.unique(y) if y.ndim == 1 else None)
    if batchable(estimator, chunks=isinstance(X, RowChunks)):
        return fit_many(estimator, X, y, subsets)
    return (clone(estimator).fit(X[s], y[s]) for s in subsets)


def fits_on_chunks(estimator: BaseEstimator) -> bool:
    """Whether :func:`fit_subsets` fits ``estimator`` on :class:`~pipeline.batched.RowChunks` in passes
    over them all (batched, or from sums over the rows), never holding a subset's rows whole."""
    from .streaming import accumulates

    return accumulates(estimator) or batchable(estimator, chunks=True)


def fit_by_chunks(estimator: BaseEstimator, chunks: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
                  classes: np.ndarray, epochs: int = SGD_EPOCHS) -> BaseEstimator:
    """Fit a chunked head from ``chunks(epoch)``, which yields (X, y) row chunks covering the training
    rows (in a new order each epoch): one pass for the scaler's statistics, then ``epochs`` passes of the
    classifier's ``partial_fit``; a head fitted from sums over the rows takes one pass, ``chunks(-1)``.
    Memory holds one chunk at a time."""
    from .streaming import accumulates, fit_subsets_in_one_pass

    if hasattr(estimator, "fit_chunks"):
        return estimator.fit_chunks(chunks)
    if accumulates(estimator):
        return fit_subsets_in_one_pass(estimator, _numbered(chunks(-1)), classes=classes)[0]
    scaler, clf = estimator[0], estimator[-1]
    for X, _ in chunks(-1):
        scaler.partial_fit(X)
    for epoch in range(epochs):
        for X, y in chunks(epoch):
            clf.partial_fit(scaler.transform(X), y, classes=classes)
    return estimator


def _numbered(chunks: Iterable[tuple[np.ndarray, np.ndarray]]):
    """``(rows, X, y)``: each chunk with the positions of its rows in the stream."""
    start = 0
    for X, y in chunks:
        yield np.arange(start, start + len(X)), X, y
        start += len(X)


def _digest(X: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(X)).cast("B")).hexdigest()


def _skops_io():
    """``skops.io``, imported without importing torch. Its list of trusted types walks every module of
    scikit-learn, and walking imports each package, scikit-learn's vendored array-API shim for torch too,
    which imports torch: about 0.5 GB resident in a process that saves heads and never runs torch (fit's
    main process). The walk skips a package whose import fails, so the shim fails while skops loads."""
    if "skops.io" not in sys.modules and "torch" not in sys.modules:
        shim = "sklearn.externals.array_api_compat.torch"
        sys.modules[shim] = None  # importing it raises ImportError, which the walk ignores
        try:
            import skops.io
        finally:
            del sys.modules[shim]
    import skops.io

    return skops.io


def save_head(estimator: BaseEstimator, path: str | os.PathLike) -> Path:
    """Write a fitted head with skops (no code runs when it is loaded)."""
    path = Path(path)
    _skops_io().dump(estimator, path)
    return path


def read_head(path: str | os.PathLike) -> BaseEstimator:
    """Read a skops head, refusing any type outside :data:`TRUSTED_TYPES`; a knn head saved with its index
    beside it gets the index back (one saved without its training features comes back without them:
    :func:`pipeline.load_head` gives them back)."""
    sio = _skops_io()
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"head file not found: {path}")
    untrusted = sio.get_untrusted_types(file=path)
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise PipelineError(f"{path} holds types this project does not trust: {', '.join(refused)}")
    head = sio.load(path, trusted=untrusted)
    return head.with_index(path.parent) if getattr(head, "needs_index", False) else head
