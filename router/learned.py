"""Learned routing: which served task a request that names none is most like, from the tasks' profiles.

Pure and numpy only, so the decision is tested (and benchmarked) without HTTP. Built once
per route table from the served versions' `routing.json` profiles (`mtft.registry.routing_profile`):
a hot-add or a version swap builds a new table and with it a new index, in milliseconds.

Two scores per task, from one featurisation of the request:
- which task: the cosine of its 1-5-gram vector to each task's centroid with every bucket weighted
  by its inverse frequency among the served tasks' profiles, so n-grams every task shares
  (" the", "ing ") count for little and the ones only one task has decide;
- whether at all (the gate, the score the router reports): the 3-5-gram cosine to the chosen
  task's gate centroid divided by the median its own held-back training inputs reached. It
  depends on that task's profile alone, so adding other tasks never makes a task's inputs
  abstain; below the threshold the request takes the default route.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mtft.registry import RoutingProfile
from mtft.registry.routing_profile import Sparse, featurize

from .config import LEARNED_THRESHOLD as DEFAULT_THRESHOLD


@dataclass(frozen=True)
class Decision:
    task: str
    score: float
    """gate cosine / the task's own median: ~1 for a typical input, near 0 for text unlike it."""


class _Columns:
    """Sparse centroids as one bucket-sorted matrix (rows: buckets, columns: tasks). Rows that many
    tasks share (most of a request's n-grams hit those) are also kept dense: one matrix-vector
    product for them instead of expanding thousands of (bucket, task) entries per request."""

    DENSE_FROM = 8  # tasks sharing a row

    def __init__(self, centroids: list[Sparse]):
        n = len(centroids)
        buckets = np.concatenate([b for b, _ in centroids])
        columns = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, (b, _) in enumerate(centroids)])
        order = np.argsort(buckets, kind="stable")
        self.columns = columns[order]
        self.weights = np.concatenate([w for _, w in centroids])[order]
        self.buckets, self.starts, self.counts = np.unique(buckets[order], return_index=True, return_counts=True)
        shared = np.flatnonzero(self.counts >= self.DENSE_FROM)
        self.dense_of = np.full(len(self.buckets), -1, dtype=np.int64)
        self.dense_of[shared] = np.arange(len(shared))
        self.dense = np.zeros((len(shared), n), dtype=np.float32)
        entries = self._entries(shared)
        self.dense[np.repeat(np.arange(len(shared)), self.counts[shared]), self.columns[entries]] = self.weights[entries]

    def _entries(self, rows: np.ndarray) -> np.ndarray:
        """Every (bucket, task) entry of these rows, row after row."""
        counts = self.counts[rows]
        return np.repeat(self.starts[rows] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())

    def rows(self, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of `buckets` some centroid has, their row numbers)."""
        at = np.searchsorted(self.buckets, buckets)
        at[at == len(self.buckets)] = 0
        hit = self.buckets[at] == buckets
        return hit, at[hit]

    def dot(self, rows: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
        """Each column's dot product with the vector `weights` on `rows`."""
        dense = self.dense_of[rows]
        shared = dense >= 0
        out = weights[shared] @ self.dense[dense[shared]]
        rows, weights = rows[~shared], weights[~shared]
        entries = self._entries(rows)
        products = np.repeat(weights, self.counts[rows]) * self.weights[entries]
        return out + np.bincount(self.columns[entries], weights=products, minlength=n)

    def rescale(self, factors: np.ndarray, norms: np.ndarray) -> None:
        """Multiply row i by factors[i] and divide column j by norms[j] (the IDF weighting)."""
        self.weights = self.weights * np.repeat(factors, self.counts) / norms[self.columns]
        self.dense *= factors[self.dense_of >= 0][:, None] / norms[None, :]


class LearnedIndex:
    """The served tasks' profiles, ready to score a request against all of them at once."""

    def __init__(self, profiles: Mapping[str, RoutingProfile]):
        self.tasks = sorted(profiles)
        self.self_similarity = np.array([profiles[t].self_similarity for t in self.tasks], dtype=np.float32)
        if not self.tasks:
            return
        self.choose = _Columns([profiles[t].choose() for t in self.tasks])
        self.gates = [_sorted(profiles[t].gate()) for t in self.tasks]
        n = len(self.tasks)
        self.idf = np.log((1 + n) / (1 + self.choose.counts)).astype(np.float32) + 1
        self.unseen_idf = np.float32(np.log(1 + n) + 1)
        weighted = self.choose.weights * np.repeat(self.idf, self.choose.counts)
        self.choose.rescale(self.idf, np.sqrt(np.bincount(self.choose.columns, weights=weighted ** 2, minlength=n)))

    def __len__(self) -> int:
        return len(self.tasks)

    def choose_scores(self, choose: Sparse) -> np.ndarray:
        """The IDF-weighted cosine of a request's 1-5-gram vector to every task, in `self.tasks` order."""
        buckets, weights = choose
        hit, rows = self.choose.rows(buckets)
        # a bucket no served task has weighs as much as the rarest: it makes the request less like all
        idf = np.full(len(buckets), self.unseen_idf, dtype=np.float32)
        idf[hit] = self.idf[rows]
        weighted = weights * idf
        return self.choose.dot(rows, weighted[hit] / (np.linalg.norm(weighted) or 1.0), len(self.tasks))

    def gate_score(self, i: int, gate: Sparse) -> float:
        """Task i's gate: the 3-5-gram cosine relative to its own held-back inputs' median."""
        buckets, weights = self.gates[i]
        at = np.searchsorted(buckets, gate[0])
        at[at == len(buckets)] = 0
        hit = buckets[at] == gate[0]
        return float(np.dot(gate[1][hit], weights[at[hit]]) / self.self_similarity[i])

    def classify(self, text: str, allowed: frozenset[str] | None = None) -> Decision | None:
        """The most similar task among `allowed` (None: all) with its gate score; None if none is allowed."""
        if not self.tasks or not text:
            return None
        choose, gate = featurize(text)
        scores = self.choose_scores(choose)
        if allowed is not None:
            scores = np.where([t in allowed for t in self.tasks], scores, -np.inf)
        best = int(np.argmax(scores))
        if not np.isfinite(scores[best]):
            return None
        return Decision(self.tasks[best], self.gate_score(best, gate))


def _sorted(centroid: Sparse) -> Sparse:
    order = np.argsort(centroid[0])
    return centroid[0][order], centroid[1][order]
