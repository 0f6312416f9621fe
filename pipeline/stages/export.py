"""Export a model as one file for production: the backbone with its normalisation and the head, as ONNX
(the ``export`` extra: ``pip install -e '.[export]'`` in the repository) or TorchScript, with a JSON card beside it.

The file takes uint8 RGB images ``(N, 3, H, W)`` already decoded, resized and centre-cropped to the
spec's input size as its data config says (the card has it: ``input_size``, ``interpolation``,
``crop_pct``, ``crop_mode``); it normalises them (mean and std in the graph), runs the backbone's tap with
the spec's test-time augmentation, rounds the features to the spec's storage dtype as the cache does,
then applies the head and the task kind's last step (softmax, sigmoid, none) and returns ``predict``'s
scores. A head has a tensor form when it is affine layers with ReLU between them: the linear heads (a
scaler then logistic regression, a linear SVM or ridge: the scaler folded into the weights), the mlp,
and a fine-tuned network (its own classifier). Other heads (knn, centroid, sgd) are refused with the
reason.

A TorchScript file runs the backbone under the spec's autocast, as ``predict`` does; an ONNX graph
computes in float32 (onnxruntime's CPU kernels have no bf16 or fp16 convolutions), so for a spec with
autocast it differs from ``predict`` by that rounding, and the card says so. Every export is checked
before it is kept: the written file, run by onnxruntime or ``torch.jit.load``, against ``predict``'s path
(the spec's featurizer, the scikit-learn head) on a few generated images; the largest difference goes
into the card, and one above the tolerance where the two compute alike refuses the export.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import PipelineError
from ..featurizer import Featurizer
from ..files import atomic_path
from ..kinds import TaskKind
from .predict import LoadedModel
from ..validation import one_of, validate_params

FORMATS = ("onnx", "torchscript")
OPSET = 17
CHECK_IMAGES = 3  # a batch size other than the traced one's: the file must take any
TOLERANCE = 1e-4  # what the check allows a float32 spec, whose features predict computes in float32 too
# Why a head has no tensor form, by its estimator's class.
_REFUSED = {
    "CappedKNeighborsClassifier": "k nearest neighbours look up the training features",
    "CappedKNeighborsRegressor": "k nearest neighbours look up the training features",
    "NearestCentroid": "the nearest centroid's scores are distances, not what predict reports",
    "SGDClassifier": "its probabilities are one-vs-rest sigmoids renormalised, not a softmax",
}


@dataclass
class ExportResult:
    path: Path
    card: Path
    checked: int  # generated images the file was checked on
    max_difference: float  # largest |score difference| from predict's path on them
    notes: list[str] = field(default_factory=list)


@validate_params(dict(format=one_of(*FORMATS)))
def export_model(model: str | os.PathLike, out: str | os.PathLike, format: str = "onnx", task: str | None = None,
                 row: int | None = None, weights: Sequence[str | os.PathLike] = ()) -> ExportResult:
    """Write ``model`` (a fit run folder: its best row, of ``task``, or its row ``row``; a ``.skops`` head; a
    fine-tuned model folder) to ``out`` as one ``format`` file, and its card beside it (``out`` + ``.json``)."""
    out = Path(out)
    loaded = LoadedModel(model, task, row, weights, device="cpu", from_cache=False)
    m = loaded.model
    if len(m.parts) != 1:
        raise PipelineError(f"{model} is a head on {len(m.parts)} concatenated backbones; export writes one backbone")
    layers = head_layers(loaded.head, loaded.kind, m.classes)
    fz, tap = loaded.featurizer(0), m.parts[0].tap
    graph = ExportedModel(fz, tap, layers, loaded.kind.torch_scores, AUTOCAST[format](fz.spec.amp)).eval()
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():  # the exporters' deprecation notes and tracer warnings: the check below decides
            warnings.simplefilter("ignore")
            _WRITERS[format](graph, tmp)
        difference = _check(loaded, tap, format, tmp)
        if graph.amp == fz.spec.amp and difference > TOLERANCE:
            raise PipelineError(f"the exported model's scores differ from predict's by {difference:.2e} on generated "
                                f"images (allowed {TOLERANCE:g}); nothing written")
    notes = [] if graph.amp == fz.spec.amp else [
        f"the feature spec computes the backbone under {fz.spec.amp} autocast and the exported {format} model in "
        f"float32 (onnxruntime has no bf16 or fp16 convolutions on the CPU; --format torchscript keeps the autocast): "
        f"their scores differ by that rounding, {difference:.2e} at most on the check's generated images and often "
        f"more on photos (class probabilities: up to 0.08 measured for lite0 on hymenoptera's val); where scores "
        f"must match, export "
        f"--format torchscript"]
    card = out.with_name(f"{out.name}.json")
    with atomic_path(card) as tmp:
        tmp.write_text(json.dumps(_card(loaded, model, out, format, difference, notes), indent=1, default=str))
    return ExportResult(out, card, CHECK_IMAGES, difference, notes)


def head_layers(head, kind: TaskKind, names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The head as affine layers ``(W, b)`` (W: outputs x inputs) with ReLU between them, the last giving the
    kind's logits (columns in ``names`` order) on raw features, the scaler folded in; [] for a fine-tuned
    network, whose tap is its logits. A head with no such form is refused with the reason."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if head is None:
        return []
    pipe = getattr(head, "best_estimator_", head)
    # one-vs-rest (tags): a model per tag; a tag with one value in training has a constant predictor (``y_``)
    parts = [p for p in pipe.estimators_ if not hasattr(p, "y_")] if isinstance(pipe, OneVsRestClassifier) else [pipe]
    if all(isinstance(p, Pipeline) and len(p.steps) == 2 and isinstance(p[0], StandardScaler) for p in parts):
        if all(_is_linear(p[-1]) for p in parts):
            W, b = kind.linear_start(head, names)
            return [_as_float32(*kind.output_rows(W, b, getattr(parts[0][-1], "classes_", ()), names))]
        if len(parts) == 1 and _is_mlp(pipe[-1]):
            return _mlp_layers(pipe[0], pipe[-1], kind, names)
    name = type(parts[0][-1] if isinstance(parts[0], Pipeline) else parts[0]).__name__
    reason = _REFUSED.get(name, "export knows none for it")
    raise PipelineError(f"the head ({name}) has no tensor form: {reason}. Pick another row with --row N (the rows of "
                        "leaderboard.md, counted from 1). export takes the linear heads (logreg, "
                        "torch-logreg, linear-svm, ridge, torch-linear), the mlp, and fine-tuned "
                        "models")


def _is_linear(est) -> bool:
    from sklearn.linear_model import RidgeClassifierCV, RidgeCV

    from ..linear_probe import TorchLinearSVC, TorchLogisticRegression, TorchRidge
    from ..streaming import StreamingRidge, StreamingRidgeClassifier

    linear = (TorchLogisticRegression, TorchLinearSVC, TorchRidge, RidgeClassifierCV, RidgeCV, StreamingRidge,
              StreamingRidgeClassifier)
    return isinstance(est, linear)


def _is_mlp(est) -> bool:
    from sklearn.neural_network import MLPClassifier

    from ..mlp_probe import TorchMLPClassifier, TorchMLPRegressor

    return isinstance(est, (TorchMLPClassifier, TorchMLPRegressor)) or (isinstance(est, MLPClassifier)
                                                                       and est.activation == "relu")


def _mlp_layers(scaler, mlp, kind: TaskKind, names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """An MLP's layers (``coefs_`` are inputs x outputs), the scaler folded into the first and a
    regressor's target scaling into the last."""
    (W1, *Ws), (b1, *bs) = mlp.coefs_, mlp.intercepts_
    first = ((W1 / scaler.scale_[:, None]).T, b1 - (scaler.mean_ / scaler.scale_) @ W1)
    layers = [first] + [(W.T, b) for W, b in zip(Ws, bs)]
    if hasattr(mlp, "target_scale_"):
        W, b = layers[-1]
        layers[-1] = (W * mlp.target_scale_, b * mlp.target_scale_ + mlp.target_mean_)
    return layers[:-1] + [_as_float32(*kind.output_rows(*_as_float32(*layers[-1]), getattr(mlp, "classes_", ()), names))]


def _as_float32(W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.atleast_2d(W).astype(np.float32), np.atleast_1d(b).astype(np.float32)


class ExportedModel(torch.nn.Module):
    """uint8 images ``(N, 3, H, W)`` -> the spec's normalisation -> the backbone's tap (with the spec's
    test-time augmentation, rounded to its storage dtype) -> the head's layers -> the kind's last step."""

    def __init__(self, fz: Featurizer, tap: str, layers: list[tuple[np.ndarray, np.ndarray]],
                 activation: Callable[[torch.Tensor], torch.Tensor], amp: str = "off"):
        super().__init__()
        self.network = fz.backbone.model  # registered, so its weights are the module's
        self.featurizer, self.tap, self.activation, self.amp = fz, tap, activation, amp
        self.dtype = getattr(torch, fz.spec.dtype)
        steps: list[torch.nn.Module] = []
        for W, b in layers:
            linear = torch.nn.Linear(W.shape[1], W.shape[0])
            linear.weight.data = torch.tensor(W, dtype=torch.float32)
            linear.bias.data = torch.tensor(b, dtype=torch.float32)
            steps += [linear, torch.nn.ReLU()]
        self.head = torch.nn.Sequential(*steps[:-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fz = self.featurizer
        x = fz.normalize(images.float())
        features = fz.backbone.forward(x, (self.tap,), fz.spec.tta or None, self.amp)[self.tap]
        return self.activation(self.head(features.to(self.dtype).float()))


def _images(fz: Featurizer, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random images of the spec's input size, as the exported model takes them."""
    size = fz.spec.data_config["input_size"]
    return torch.randint(0, 256, (n, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _write_onnx(graph: ExportedModel, path: Path) -> None:
    # the TorchScript-based exporter (torch's default before 2.9): the newer one needs onnxscript
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(graph, (_images(graph.featurizer, 2),), str(path), opset_version=OPSET, input_names=["images"],
                      output_names=["scores"], dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}}, **legacy)


def _write_torchscript(graph: ExportedModel, path: Path) -> None:
    torch.jit.trace(graph, _images(graph.featurizer, 2)).save(str(path))


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript}
# The autocast each format's graph runs the backbone under, given the spec's: a TorchScript trace records
# autocast's casts and runs them as predict does; onnxruntime's CPU kernels have no bf16 or fp16 convolutions.
AUTOCAST = {"onnx": lambda amp: "off", "torchscript": lambda amp: amp}


def run_exported(path: str | os.PathLike, format: str, images: np.ndarray) -> np.ndarray:
    """The scores an exported file gives ``images`` (uint8, ``(N, 3, H, W)``), run as its users run it."""
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise PipelineError("checking an ONNX export needs onnxruntime: pip install -e '.[export]' (in the repository)") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation note
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(torch.from_numpy(images)).numpy()


def _check(loaded: LoadedModel, tap: str, format: str, path: Path) -> float:
    """Largest |difference| between the file's scores and predict's path on ``CHECK_IMAGES`` generated images."""
    fz = loaded.featurizer(0)
    x = _images(fz, CHECK_IMAGES, seed=1)
    expected = loaded.scores(fz.features(x, (tap,))[tap])
    got = run_exported(path, format, x.numpy())
    return float(np.max(np.abs(got - expected)))


def _pixels(spec) -> str:
    """How the card's input pixels are made: as the spec's decode path makes them for ``predict``."""
    from ..preprocess import list_decoders

    return (f"RGB, channels first, 0-255, not normalised: the image decoded upright and brought to the input size "
            f"by the spec's decode path {spec.decode!r} ({list_decoders()[spec.decode]}), from the data_config's "
            f"size, interpolation and crop. In Python: pipeline.preprocess.decode_path(card['input']['decode'], "
            f"card['data_config'], card['input']['jpeg_draft']).load(path) gives them, (H, W, 3)"
            + (" (JPEGs are decoded at reduced DCT scale first, down to the size the resize needs: without it, "
               "expect differences in the third decimal)" if spec.jpeg_draft else ""))


def _card(loaded: LoadedModel, model, out: Path, format: str, difference: float, notes: list[str]) -> dict:
    spec = loaded.featurizer(0).spec
    dc = spec.data_config
    return dict(
        file=out.name, format=format, model=str(model),
        input=dict(name="images", dtype="uint8", shape=["batch", *dc["input_size"]], decode=spec.decode,
                   jpeg_draft=spec.jpeg_draft, pixels=_pixels(spec)),
        output=dict(name="scores", meaning=loaded.kind.scores_meaning),
        feature_spec_key=spec.key, data_config=dc, normalisation="in the graph: (pixels / 255 - mean) / std", computes="float32",
        spec_amp=spec.amp,
        check=dict(images=CHECK_IMAGES, max_abs_difference=difference,
                   against="predict's path: the spec's featurizer and the scikit-learn head"),
        notes=notes, **loaded.describe())
