"""Inception Score as ADM's evaluator computes it, streamed over consecutive splits.

IS = mean over splits of exp(mean_i KL(p(y|x_i) || p(y))), p(y) the split's mean prediction, splits of 5000
consecutive unshuffled samples (10 splits at 50K), softmax over all 1008 unbiased logits, no epsilon.
Per split only sum_i p_i and sum_i sum_y p_iy log p_iy are kept, because
mean_i KL_i = mean_i sum_y p_iy log p_iy - sum_y p_y log p_y.
"""

from __future__ import annotations

import numpy as np

from ..errors import UvitError

SPLIT_SIZE = 5000


class InceptionScoreAccumulator:
    """Feed logits batch by batch (any batch size); :meth:`result` returns (mean, std) over the splits."""

    def __init__(self, split_size: int = SPLIT_SIZE):
        if split_size < 1:
            raise ValueError("split_size must be >= 1")
        self.split_size = split_size
        self.splits: list[tuple[int, np.ndarray, float]] = []  # (count, sum of p, sum of p log p)
        self._count = 0
        self._sum_p = None
        self._neg_entropy = 0.0

    def update(self, logits) -> None:
        if hasattr(logits, "detach"):
            logits = logits.detach().to("cpu").double().numpy()
        x = np.asarray(logits, dtype=np.float64)
        if not np.isfinite(x).all():
            raise UvitError("the Inception logits contain NaN or inf; check the images for NaN/inf values")
        while len(x):
            take = min(len(x), self.split_size - self._count)
            part, x = x[:take], x[take:]
            logp = part - part.max(axis=1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
            p = np.exp(logp)
            if self._sum_p is None:
                self._sum_p = np.zeros(part.shape[1])
            self._sum_p += p.sum(axis=0)
            self._neg_entropy += float((p * logp).sum())
            self._count += take
            if self._count == self.split_size:
                self._close()

    def _close(self) -> None:
        if self._count:
            self.splits.append((self._count, self._sum_p, self._neg_entropy))
        self._count, self._sum_p, self._neg_entropy = 0, None, 0.0

    @property
    def n(self) -> int:
        return sum(c for c, _, _ in self.splits) + self._count

    def result(self) -> tuple[float, float]:
        splits = self.splits + ([(self._count, self._sum_p, self._neg_entropy)] if self._count else [])
        if not splits:
            raise UvitError("the Inception Score needs at least one image")
        scores = []
        for count, sum_p, neg_entropy in splits:
            py = sum_p / count
            nz = py > 0
            mean_kl = neg_entropy / count - float((py[nz] * np.log(py[nz])).sum())
            scores.append(np.exp(mean_kl))
        return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits, split_size: int = SPLIT_SIZE) -> float:
    """IS of a (N, classes) logit array with ADM's consecutive splits."""
    acc = InceptionScoreAccumulator(split_size)
    acc.update(logits)
    return acc.result()[0]
