"""Learned routing: which served task a request that names none is most like, from the tasks' profiles.

Pure and numpy only, so the decision is tested (and benchmarked) without HTTP. Built once
per route table from the served versions' `routing.json` profiles (`mtft.registry.routing`):
a hot-add or a version swap builds a new table and with it a new index, in milliseconds.

Two scores per task, from one pass over the request's hashed n-grams:
- which task: the cosine of the request to each task's centroid with every bucket weighted by
  its inverse frequency among the served tasks' profiles, so n-grams every task shares
  (" the", "ing ") count for little and the ones only one task has decide;
- whether at all (the gate, the score the router reports): the plain cosine to the chosen
  task's centroid divided by the median its own held-back training inputs reached. It depends
  on that task's profile alone, so adding other tasks never makes a task's inputs abstain;
  below the threshold the request takes the default route.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mtft.registry import RoutingProfile
from mtft.registry.routing import featurize

from .config import LEARNED_THRESHOLD as DEFAULT_THRESHOLD


@dataclass(frozen=True)
class Decision:
    task: str
    score: float
    """plain cosine / the task's own median: ~1 for a typical input, ~0.2 for gibberish."""


class LearnedIndex:
    """The served tasks' profiles as one bucket-sorted sparse matrix (rows: buckets, columns: tasks)."""

    def __init__(self, profiles: Mapping[str, RoutingProfile]):
        self.tasks = sorted(profiles)
        arrays = [profiles[t].arrays() for t in self.tasks]
        self.self_similarity = np.array([profiles[t].self_similarity for t in self.tasks], dtype=np.float32)
        if not arrays:
            self.buckets = np.zeros(0, dtype=np.int64)
            return
        buckets = np.concatenate([b for b, _ in arrays])
        columns = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, (b, _) in enumerate(arrays)])
        weights = np.concatenate([w for _, w in arrays])
        order = np.argsort(buckets, kind="stable")
        buckets, self.columns, self.weights = buckets[order], columns[order], weights[order]
        self.buckets, starts, df = np.unique(buckets, return_index=True, return_counts=True)
        self.starts, self.counts = starts, df
        idf = np.log((1 + len(self.tasks)) / (1 + df)).astype(np.float32) + 1
        self.idf, self.unseen_idf = idf, np.float32(np.log(1 + len(self.tasks)) + 1)
        squared = (self.weights * np.repeat(idf, df)) ** 2
        self.idf_norms = np.sqrt(np.bincount(self.columns, weights=squared, minlength=len(self.tasks)))

    def __len__(self) -> int:
        return len(self.tasks)

    def scores(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(IDF-weighted cosine, plain cosine) of `text` to every task's centroid, in `self.tasks` order."""
        n = len(self.tasks)
        if not len(self.buckets):
            return np.zeros(n), np.zeros(n)
        x_buckets, x_weights = featurize(text)
        at = np.searchsorted(self.buckets, x_buckets)
        at[at == len(self.buckets)] = 0
        hit = self.buckets[at] == x_buckets
        # a bucket no served task has weighs as much as the rarest: it makes the request less like all
        x_idf = np.where(hit, self.idf[at], self.unseen_idf)
        norm = float(np.sqrt(np.sum((x_weights * x_idf) ** 2))) or 1.0
        rows, x_weights, x_idf = at[hit], x_weights[hit], x_idf[hit]
        counts = self.counts[rows]
        # every (bucket, task) entry of the hit buckets, and the request's weight for each
        entries = np.repeat(self.starts[rows] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        products = np.repeat(x_weights, counts) * self.weights[entries]
        plain = np.bincount(self.columns[entries], weights=products, minlength=n)
        weighted = np.bincount(self.columns[entries], weights=products * np.repeat(x_idf * x_idf, counts),
                               minlength=n)
        return weighted / (self.idf_norms * norm), plain

    def classify(self, text: str, allowed: frozenset[str] | None = None) -> Decision | None:
        """The most similar task among `allowed` (None: all) with its gate score; None if none is allowed."""
        if not self.tasks or not text:
            return None
        weighted, plain = self.scores(text)
        if allowed is not None:
            weighted = np.where([t in allowed for t in self.tasks], weighted, -np.inf)
        best = int(np.argmax(weighted))
        if not np.isfinite(weighted[best]):
            return None
        return Decision(self.tasks[best], float(plain[best] / self.self_similarity[best]))
