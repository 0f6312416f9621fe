"""The network's last layer when a backbone is fine-tuned: ``outputs(names)`` units trained with
``loss`` on ``targets``, read back as predictions (``from_logits``) and as what ``predict`` reports
(``logit_scores``), started from zeros, ``initial_bias`` or a fitted linear head (``linear_start``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import expit, softmax


class SoftmaxLayer:
    """A unit per class, cross-entropy over their softmax."""

    scores_meaning = "class probabilities, columns in `classes` order"

    def outputs(self, names: list[str]) -> int:
        return len(names)

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        import torch

        return torch.nn.functional.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)

    def targets(self, y: Sequence, names: list[str]):
        import torch

        index = {c: i for i, c in enumerate(names)}
        return torch.tensor([index[str(v)] for v in y], dtype=torch.long)

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        return np.array(names, dtype=object)[np.argmax(logits, axis=1)]

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        """What ``predict`` reports for a fine-tuned network: class probabilities."""
        return softmax(logits, axis=1)

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Softmax weights: a binary head's single row ``w`` becomes the rows ``-w/2, w/2`` (the same
        probabilities under softmax)."""
        w, b = fold_scaler(head)
        if w.shape[0] == 1:
            w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
        return w.astype(np.float32), b.astype(np.float32)

    def output_rows(self, W: np.ndarray, b: np.ndarray, classes: Sequence, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows in ``names`` order; a binary head's single row ``z`` becomes ``(-z/2, z/2)`` (the same
        probabilities under softmax)."""
        if len(W) == 1:
            W, b = np.concatenate([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
        order = [list(map(str, classes)).index(c) for c in names]
        return W[order], b[order]

    def torch_scores(self, logits):
        import torch

        return torch.softmax(logits, dim=1)


class SigmoidLayer:
    """A unit per tag, binary cross-entropy of its sigmoid against ``target``'s 0/1 matrix."""

    scores_meaning = "tag probabilities, columns in `classes` order (a tag is predicted at 0.5 or more)"

    def outputs(self, names: list[str]) -> int:
        return len(names)

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        import torch

        smoothed = target * (1 - label_smoothing) + 0.5 * label_smoothing
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), smoothed)

    def targets(self, y: Sequence, names: list[str]):
        import torch

        return torch.tensor(self.target(np.array(list(y), dtype=object), names), dtype=torch.float32)

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        return expit(logits)

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        return expit(logits)

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One sigmoid unit per tag: a one-vs-rest head's tag models stacked (a tag its training data had
        one value of keeps that value's log-odds), or a multi-output linear head's rows."""
        if not hasattr(head, "estimators_"):
            w, b = fold_scaler(head)
            return w.astype(np.float32), b.astype(np.float32)
        rows = []
        for est in head.estimators_:
            if hasattr(est, "y_"):  # scikit-learn's constant predictor for a tag with one value
                p = float(np.clip(np.mean(est.y_), 1e-4, 1 - 1e-4))
                rows.append((np.zeros((1, head.n_features_in_)), np.array([np.log(p / (1 - p))])))
            else:
                rows.append(fold_scaler(est))
        return (np.concatenate([w for w, _ in rows]).astype(np.float32),
                np.concatenate([b for _, b in rows]).astype(np.float32))

    def output_rows(self, W: np.ndarray, b: np.ndarray, classes: Sequence, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return W, b

    def torch_scores(self, logits):
        import torch

        return torch.sigmoid(logits)


class LinearLayer:
    """One linear output, the squared error over the training targets' variance (the scale of a
    standardised target), started at the training mean."""

    scores_meaning = "the predicted number, one per image"

    def outputs(self, names: list[str]) -> int:
        return 1

    def loss_scale(self, y: np.ndarray) -> float:
        """The training targets' variance, so the loss is on the scale of a standardised target."""
        return float(np.var(np.asarray(y, dtype=np.float64))) or 1.0

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        import torch

        return torch.nn.functional.mse_loss(logits.float()[:, 0], target) / scale

    def targets(self, y: Sequence, names: list[str]):
        import torch

        return torch.tensor([float(v) for v in y], dtype=torch.float32)

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64)[:, 0]

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64)[:, 0]

    def initial_bias(self, y: np.ndarray, names: list[str]) -> np.ndarray | None:
        return np.array([np.mean(np.asarray(y, dtype=np.float64))], dtype=np.float32)

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        w, b = fold_scaler(head)
        return w.reshape(1, -1).astype(np.float32), b.reshape(1).astype(np.float32)

    def output_rows(self, W: np.ndarray, b: np.ndarray, classes: Sequence, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return W, b

    def torch_scores(self, logits):
        return logits[:, 0]


def fold_scaler(head) -> tuple[np.ndarray, np.ndarray]:
    """A fitted ``scaler -> linear model`` pipeline (inside a search, if any) as weights on raw features:
    ``W' = W / scale``, ``b' = b - W' @ mean``."""
    pipe = getattr(head, "best_estimator_", head)
    scaler, model = pipe[0], pipe[-1]
    w = np.atleast_2d(model.coef_) / scaler.scale_
    b = np.atleast_1d(model.intercept_) - w @ scaler.mean_
    return w, b
