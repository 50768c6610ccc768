"""Routing profiles (`routing.json`): what the router needs to recognise a task's inputs, and no more.

Computed at publish from the task's training inputs as its template renders them,
without the prefix (what a client that names no task would send). A profile is two
hashed character n-gram centroids (the `KEEP` heaviest of 2**BITS buckets of the mean
unit-length n-gram vector): 1-5-grams to choose the task, 3-5-grams for the gate, with
how similar the task's own held-back inputs were to the latter (the router's
threshold is relative to that). Buckets are one-way hashes of 1-5 character n-grams
pooled over every input: no row, no word order beyond five characters, and no count of
any single input can be read back.

`featurize` is the one feature function: publishing and the router both call it,
so a served request is scored exactly as the profile's inputs were.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROUTING_FILE = "routing.json"
FEATURES = "char1-5-gate3-5-hash20-v2"
BITS = 20
CHOOSE = (1, 2, 3, 4, 5)
"""n-gram lengths that choose the task: short ones carry spelling and punctuation style."""
GATE = (3, 4, 5)
"""n-gram lengths of the gate: without 1-2-grams, which any text shares with any task (" e", "th")."""
KEEP = 4096
HELD_BACK = 0.2  # share of the inputs left out of the centroid to measure the task's own similarity
_SPACES = re.compile(r"\s+")
_DIGITS = str.maketrans("0123456789", "0000000000")
_MULT = np.uint64(0x100000001B3)
_MIX = np.uint64(0xFF51AFD7ED558CCD)

Sparse = tuple[np.ndarray, np.ndarray]  # (int64 buckets, float32 weights)


class ProfileError(Exception):
    """A routing profile cannot be read or does not belong to its adapter."""


class RoutingProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 2
    features: str = FEATURES
    adapter_checksum: str = Field(description="the adapter's checksum: a profile copied from another version is refused")
    examples: int = Field(gt=0, description="training inputs pooled into the centroids")
    buckets: list[int] = Field(description="1-5-gram centroid: hashed buckets, heaviest first")
    weights: list[float] = Field(description="its weight in each bucket (L2 norm 1)")
    gate_buckets: list[int] = Field(description="3-5-gram centroid: hashed buckets, heaviest first")
    gate_weights: list[float] = Field(description="its weight in each bucket (L2 norm 1)")
    self_similarity: float = Field(gt=0, le=1, description="median 3-5-gram cosine of held-back inputs to the "
                                   "centroid of the others")

    @model_validator(mode="after")
    def _check(self) -> RoutingProfile:
        if self.features != FEATURES:
            raise ValueError(f"features {self.features!r}: this router computes {FEATURES!r}")
        for buckets, weights in ((self.buckets, self.weights), (self.gate_buckets, self.gate_weights)):
            if len(buckets) != len(weights) or not buckets:
                raise ValueError(f"{len(buckets)} buckets but {len(weights)} weights")
            if min(buckets) < 0 or max(buckets) >= 1 << BITS:
                raise ValueError(f"buckets must lie in [0, 2**{BITS})")
        return self

    def choose(self) -> Sparse:
        return np.asarray(self.buckets, dtype=np.int64), np.asarray(self.weights, dtype=np.float32)

    def gate(self) -> Sparse:
        return np.asarray(self.gate_buckets, dtype=np.int64), np.asarray(self.gate_weights, dtype=np.float32)


def featurize(text: str) -> tuple[Sparse, Sparse]:
    """The input's (choose, gate) feature vectors: unique buckets and unit-norm sublinear counts of its
    1-5 and 3-5 character n-grams, from one pass of vectorised rolling hashes.

    Lowercased, whitespace collapsed, digits folded to 0 (a date's shape matters, its digits do not).
    """
    norm = " " + _SPACES.sub(" ", text.lower().translate(_DIGITS)).strip() + " "
    data = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    by_length = {}
    with np.errstate(over="ignore"):  # the hash wraps modulo 2**64 by design
        rolling = np.zeros(len(data), dtype=np.uint64)
        for n in range(1, max(CHOOSE) + 1):
            if n > len(data):
                break
            rolling = rolling[: len(data) - n + 1] * _MULT + data[n - 1:]
            mixed = (rolling + np.uint64(n)) * _MIX
            by_length[n] = (mixed ^ (mixed >> np.uint64(29))) * _MIX >> np.uint64(64 - BITS)
    return _vector(by_length, CHOOSE), _vector(by_length, GATE)


def _vector(by_length: dict[int, np.ndarray], lengths: tuple[int, ...]) -> Sparse:
    hashes = [by_length[n] for n in lengths if n in by_length]
    if not hashes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    buckets, counts = np.unique(np.concatenate(hashes), return_counts=True)
    weights = (1.0 + np.log(counts)).astype(np.float32)
    return buckets.astype(np.int64), weights / np.linalg.norm(weights)


def _totals(vectors: Iterable[tuple[Sparse, Sparse]]) -> np.ndarray:
    """The (choose, gate) sums of feature vectors, dense over the 2**BITS buckets."""
    totals = np.zeros((2, 1 << BITS), dtype=np.float32)
    for pair in vectors:
        for total, (buckets, weights) in zip(totals, pair):
            total[buckets] += weights
    return totals


def _heaviest(total: np.ndarray, keep: int = KEEP) -> Sparse:
    """The `keep` heaviest buckets of a dense sum, heaviest first (ties by bucket), renormalised.

    Ordered over the touched buckets only: a task's inputs touch a few thousand of the 2**20,
    and sorting all 2**20 would be nearly all of a profile's cost.
    """
    touched = np.flatnonzero(total)
    top = touched[np.lexsort((touched, -total[touched]))[:keep]]
    return top.astype(np.int64), total[top] / np.linalg.norm(total[top])


def cosine(x: Sparse, centroid: Sparse) -> float:
    """Cosine of a feature vector to a sparse centroid (both unit length)."""
    common, xi, ci = np.intersect1d(x[0], centroid[0], assume_unique=True, return_indices=True)
    return float(np.dot(x[1][xi], centroid[1][ci])) if len(common) else 0.0


def build_profile(texts: list[str], adapter_checksum: str, seed: int = 0) -> RoutingProfile:
    """A task's profile from its (un-prefixed, rendered) training inputs."""
    if not texts:
        raise ProfileError("no training inputs to build a routing profile from")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * HELD_BACK) if len(order) >= 10 else 0
    held = [featurize(texts[i]) for i in order[:cut]]
    rest = _totals(featurize(texts[i]) for i in order[cut:])
    gate = _heaviest(rest[1])
    similarity = float(np.median([cosine(features[1], gate) for features in held])) if held else 1.0
    every = rest + _totals(held)  # the router uses all of them
    choose, gate = _heaviest(every[0]), _heaviest(every[1])

    def listed(weights: np.ndarray) -> list[float]:
        return [round(float(w), 6) for w in weights]

    return RoutingProfile(adapter_checksum=adapter_checksum, examples=len(texts), buckets=choose[0].tolist(),
                          weights=listed(choose[1]), gate_buckets=gate[0].tolist(), gate_weights=listed(gate[1]),
                          self_similarity=min(max(similarity, 1e-6), 1.0))


def write_profile(folder: Path, profile: RoutingProfile) -> None:
    (Path(folder) / ROUTING_FILE).write_text(profile.model_dump_json())


def read_profile(folder: Path, adapter_checksum: str) -> RoutingProfile:
    """The profile in an adapter folder; ProfileError (with the path) if missing, corrupt or another version's."""
    path = Path(folder) / ROUTING_FILE
    try:
        profile = RoutingProfile.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ProfileError(f"{path} is missing: published without a routing profile") from exc
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}" for e in exc.errors())
        raise ProfileError(f"cannot read routing profile {path}: {fields}") from exc
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read routing profile {path}: {exc}") from exc
    if profile.adapter_checksum != adapter_checksum:
        raise ProfileError(f"{path} was made for another adapter ({profile.adapter_checksum[:19]})")
    return profile
