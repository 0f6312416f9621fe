"""The torch side of the linear probes of :mod:`pipeline.linear_probe`: the batched L-BFGS solver of the
linear classifiers (:class:`Batch`) and ridge's SVD path. Kept apart from the estimators, which predict
with numpy alone, so a process that only holds or applies fitted probes (fit's main process, which
receives and saves them; ``predict`` and ``serve`` on a cache) never imports torch, about 0.45 GB
resident and two seconds."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import numpy as np
import torch

from .batched import Group, RowChunks, group_scaling, n_outputs, one_softmax

SMALL_PRODUCT = 2e8  # multiply-adds of one logits product below which a CPU solve runs on one thread


@contextlib.contextmanager
def threads_for(batch: "Batch"):
    """One torch thread on a CPU for a batch whose products are small: each L-BFGS step is dozens of
    small operations, too little work to share, and with a busy core (another job, a worker of the
    sweep) every operation would wait for the slowest thread: 10x slower on a loaded 2-core machine."""
    small = batch.device.type == "cpu" and batch.n * batch.d * batch.train.shape[1] * batch.outputs < SMALL_PRODUCT
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# rows x problems x outputs of one logits product, by device type: bounds what autograd keeps per step.
# On a CPU a product that stays in its caches is faster (torch-logreg, 50,000 x 512, 100 classes, 5 folds:
# 43.6 s and 1.2 GB peak at 2^20 against 58.8 s and 1.5 GB at 2^24); a GPU wants large products.
CHUNK_CELLS = {"cpu": 2 ** 20, "cuda": 2 ** 24}


class Batch:
    """Linear problems on rows of ``X``, solved side by side. Per group: one problem per held-out split
    (on its training rows) and one on all the group's rows, each on the group's standardisation (a split
    problem on its own rows' with ``scale_folds``). ``loss``
    is ``log`` (binary on one logit for two classes, else multinomial) or ``squared_hinge`` (one-vs-rest,
    one margin for two classes); for tags (``codes`` a 0/1 matrix) either is a binary problem per tag,
    each tag with its own ``C``: the tags, splits and ``C`` solved as one problem. Every pass over the rows goes a chunk at a time (:meth:`_chunks`), so
    memory holds one chunk's logits, and ``X`` may be :class:`~pipeline.batched.RowChunks` read from disk."""

    def __init__(self, X: torch.Tensor | RowChunks, codes: np.ndarray, n_classes: int, loss: str,
                 groups: list[Group], scale_folds: bool = False, device: torch.device | None = None):
        (n, d), dev = X.shape, X.device if isinstance(X, torch.Tensor) else device
        self.X, self.n, self.d, self.device, self.loss = X, n, d, dev, loss
        self.codes, self.n_classes = torch.as_tensor(codes, dtype=torch.long, device=dev), n_classes
        self.tags = codes.ndim == 2  # a 0/1 column per tag, else a class per row
        self.outputs = n_outputs(codes)
        self.softmax = loss == "log" and one_softmax(codes, n_classes)
        self.chosen = self.outputs if self.tags else 1  # outputs whose C is chosen apart: each tag
        # a tag with one value in a group's rows: every C fits it alike, so it keeps the first
        self.constant = np.array([np.ptp(codes[g.rows], axis=0) == 0 if self.tags else [False] for g in groups])
        train, held, held_problem, owner, self.refits, self.held_of = [], [], [], [], [], []
        for g, group in enumerate(groups):
            held_cols = []
            for tr, te in group.splits:
                held_cols.append(len(held))
                held_problem.append(len(train))
                train.append(_mask(n, group.rows[tr]))
                held.append(_mask(n, group.rows[te]))
                owner.append(g)
            self.held_of.append(held_cols)
            self.refits.append(len(train))
            train.append(_mask(n, group.rows))
            owner.append(g)
        self.train = torch.tensor(np.stack(train, 1), dtype=torch.float32, device=dev)
        self.held = torch.tensor(np.stack(held, 1) if held else np.zeros((n, 0)), dtype=torch.float32, device=dev)
        self.held_problem = torch.as_tensor(held_problem, dtype=torch.long, device=dev)
        self.n_train = self.train.sum(0)
        means, scales = (a[:, owner] for a in group_scaling(groups, d))
        if scale_folds and held_problem:  # each split problem standardised on its own training rows
            split_means, split_scales = _column_stats(self._chunks(), self.train[:, held_problem])
            means[:, held_problem], scales[:, held_problem] = split_means, split_scales
        self.scaled = scale_folds or any(g.scaler is not None for g in groups)
        if self.scaled:  # problem p sees (x - mean_p) / scale_p = x * inv_scale[:, p] - shift[:, p]
            self.inv_scale = torch.tensor(1 / scales, dtype=torch.float32, device=dev)
            self.shift = torch.tensor(means / scales, dtype=torch.float32, device=dev)

    def path(self, Cs: np.ndarray, max_iter: int, tol: float, stop_after_rises: int) -> list[tuple]:
        """Solve along ``Cs``; per group the chosen ``C`` (for tags, an array: each tag's own), its path of
        (C, held-out score, a list of one per tag for tags) and its all-rows solution at that ``C``:
        ``(C, path, W, b, iterations)`` (the last ``C`` when nothing is held out)."""
        G, refits = len(self.refits), torch.as_tensor(self.refits, device=self.device)
        shape = (G, self.chosen)
        best_C, best_score, rises = np.zeros(shape), np.full(shape, np.inf), np.zeros(shape, int)
        paths, params, W_best, b_best = [[] for _ in range(G)], None, None, None
        for C in Cs:
            params = self.solve(float(C), max_iter, tol, params or self._sample_start(float(C), max_iter, tol))
            W, b = params[0][:, refits], params[1][refits]
            better = np.ones(shape, bool)
            if self.held.shape[1]:
                scores = self.held_out_scores(params)
                live = rises < stop_after_rises if stop_after_rises else better
                better = live & (((scores < best_score) & ~self.constant) | (W_best is None))
                for g in np.flatnonzero(live.any(1)):
                    paths[g].append((float(C), scores[g].tolist() if self.tags else float(scores[g, 0])))
                best_score[better], rises = scores[better], np.where(better, 0, rises + live)
            best_C[better] = C
            keep = torch.as_tensor(np.repeat(better, self.outputs // self.chosen, axis=1), device=self.device)
            W_best = W if W_best is None else torch.where(keep, W, W_best)
            b_best = b if b_best is None else torch.where(keep, b, b_best)
            if stop_after_rises and (rises >= stop_after_rises).all():
                break
        return [(best_C[g] if self.tags else float(best_C[g, 0]), paths[g], W_best[:, g], b_best[g], params[2])
                for g in range(G)]

    def solve(self, C: float, max_iter: int, tol: float, init=None):
        """Minimise every problem's ``mean loss + ||W||^2 / (2 C n)`` from ``init`` (else zeros): weights
        ``(d, problems, outputs)``, biases ``(problems, outputs)``, L-BFGS iterations. Each evaluation
        adds up the loss and its gradient chunk by chunk."""
        P = self.train.shape[1]
        W = torch.zeros((self.d, P, self.outputs), device=self.device) if init is None else init[0].clone()
        b = torch.zeros((P, self.outputs), device=self.device) if init is None else init[1].clone()
        W.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-9,
                                history_size=20, line_search_fn="strong_wolfe")
        scale = 1.0 / (2.0 * C * self.n_train)

        def closure():
            opt.zero_grad()
            norms = W.pow(2).sum((0, 2)) + (b.pow(2).sum(1) if self.loss == "squared_hinge" else 0)
            objective = (scale * norms).sum()
            objective.backward()
            total = objective.detach()
            for rows, x in self._chunks():
                part = ((self._losses(x, rows, W, b).sum(-1) * self.train[rows]).sum(0) / self.n_train).sum()
                part.backward()
                total = total + part.detach()
            return total

        opt.step(closure)
        return W.detach(), b.detach(), int(opt.state[W].get("n_iter", 0))

    def _sample_start(self, C: float, max_iter: int, tol: float):
        """Where the first solve on rows read from disk starts: every problem solved at ``C`` on a random
        chunk's worth of its rows held in memory (more regularised there, the penalty being per row), so
        fewer passes over every row follow (the audit's label head at 10^6 x 1,280, 100 classes, 6
        problems: about 260 s against 1,250 s). It holds one chunk more while it runs. None (start from
        zeros) in memory or when the rows are fewer than four chunks."""
        if not isinstance(self.X, RowChunks) or self.n < 4 * self.X.step:
            return None
        keep = np.zeros(self.n, bool)
        keep[np.random.default_rng(0).choice(self.n, self.X.step, replace=False)] = True
        rows = torch.as_tensor(np.flatnonzero(keep), device=self.device)
        sample = copy.copy(self)
        sample.X = torch.as_tensor(np.concatenate([x[keep[where]] for where, x in self.X]), device=self.device)
        sample.n, sample.codes, sample.train = len(rows), self.codes[rows], self.train[rows]
        sample.n_train = sample.train.sum(0).clamp(min=1)  # a problem without a sampled row stays at zero
        return sample.solve(C, max_iter, tol)

    def held_out_scores(self, params) -> np.ndarray:
        """Per group (and for tags, per tag: ``(groups, tags)``, else ``(groups, 1)``), the mean over its
        splits of the held-out log loss (``log``) or error rate (``squared_hinge``)."""
        W, b, _ = params
        summed = torch.zeros((self.held.shape[1], self.chosen), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for rows, x in self._chunks():
                summed += (self._held_losses(x, rows, W, b) * self.held[rows, :, None]).sum(0).double()
        per_split = (summed / self.held.sum(0).double()[:, None]).cpu().numpy()
        return np.stack([per_split[cols].mean(0) for cols in self.held_of])

    def _held_losses(self, x: torch.Tensor, rows: slice, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """What ``held_out_scores`` averages, per row of the chunk ``x``, held-out problem and chosen output."""
        if self.loss == "log":
            losses = self._losses(x, rows, W, b)[:, self.held_problem]
            return losses if self.tags else losses.sum(-1, keepdim=True)
        z = self._logits(x, W, b)[:, self.held_problem]
        if self.tags:
            return ((z > 0).float() != self._targets(rows)[:, None, :]).float()
        guess = (z[..., 0] > 0).long() if self.outputs == 1 else z.argmax(-1)
        return (guess != self.codes[rows, None]).float()[..., None]

    def _chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, features)`` in chunks of at most :data:`CHUNK_CELLS` logits: slices of the tensor ``X``,
        or of each chunk read from :class:`~pipeline.batched.RowChunks`."""
        cells = CHUNK_CELLS.get(getattr(self.device, "type", "cpu"), CHUNK_CELLS["cpu"])
        step = max(1, cells // (self.train.shape[1] * self.outputs))
        parts = ((slice(0, self.n), self.X),) if isinstance(self.X, torch.Tensor) else self.X
        for where, x in parts:
            x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
            for start in range(0, len(x), step):
                stop = min(start + step, len(x))
                yield slice(where.start + start, where.start + stop), x[start:stop]

    def _logits(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d, P, o = W.shape
        if not self.scaled:
            return (x @ W.reshape(d, P * o)).reshape(-1, P, o) + b
        z = x @ (W * self.inv_scale[:, :, None]).reshape(d, P * o)
        return z.reshape(-1, P, o) + (b - torch.einsum("dp,dpo->po", self.shift, W))

    def _targets(self, rows: slice) -> torch.Tensor:
        """The 0/1 targets of the outputs for ``rows`` (a class's one-hot row made per chunk: a matrix of
        every row's would cost rows x classes)."""
        if self.tags:
            return self.codes[rows].float()
        Y = torch.nn.functional.one_hot(self.codes[rows], self.n_classes).float()
        return Y[:, 1:] if self.outputs == 1 else Y

    def _losses(self, x: torch.Tensor, rows: slice, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The loss of each row of the chunk ``x`` (rows ``rows``) in each problem, per output (one
        column for a softmax over classes), ``(len(x), problems, outputs or 1)``."""
        z, Y = self._logits(x, W, b), self._targets(rows)[:, None, :]
        if self.loss == "squared_hinge":
            return torch.clamp(1 - (2 * Y - 1) * z, min=0).pow(2)
        if not self.softmax:
            return torch.nn.functional.softplus(z) - Y * z
        return (torch.logsumexp(z, -1) - (z * Y).sum(-1))[..., None]


def _column_stats(chunks: Iterator[tuple[slice, torch.Tensor]], masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per mask column, the mean and standard deviation of the rows it selects, summed over the chunks
    ``(rows, features)``, ``(d, columns)`` each; a constant feature's deviation is 1, as ``StandardScaler`` has it."""
    M = masks.double()
    sums = squares = 0
    for rows, x in chunks:
        x64 = x.double()
        sums = sums + x64.T @ M[rows]
        squares = squares + x64.pow(2).T @ M[rows]
    n = M.sum(0)
    mean = sums / n
    var = torch.clamp(squares / n - mean.pow(2), min=0)
    std = var.sqrt()
    std[std < 10 * torch.finfo(torch.float64).eps * mean.abs().clamp(min=1)] = 1.0
    return mean.cpu().numpy(), std.cpu().numpy()


def _mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, np.float32)
    mask[rows] = 1
    return mask


def ridge_path(X: torch.Tensor, Y: torch.Tensor):
    """``alpha -> (W, b)`` of ridge on ``X``, ``Y`` from one thin SVD of the centred ``X``:
    ``W = V diag(s / (s^2 + alpha)) U^T Y_c``, ``b = mean(Y) - mean(X) W``."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    U, s, Vh = torch.linalg.svd(X - x_mean, full_matrices=False)
    UtY = U.T @ (Y - y_mean)

    def solve(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        W = Vh.T @ ((s / (s ** 2 + alpha))[:, None] * UtY)
        return W, y_mean - x_mean @ W

    return solve
