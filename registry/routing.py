"""Routing profiles (`routing.json`): what the router needs to recognise a task's inputs, and no more.

Computed at publish from the task's training inputs as its template renders them,
without the prefix (what a client that names no task would send). A profile is a
hashed character n-gram centroid: the `keep` heaviest of 2**BITS buckets of the
mean normalised n-gram vector, plus how similar the task's own held-back inputs
were to it (the router's threshold is relative to that). Buckets are one-way
hashes of 1-5 character n-grams pooled over every input: no row, no word order
beyond five characters, and no count of any single input can be read back.

`featurize` is the one feature function: publishing and the router both call it,
so a served request is scored exactly as the profile's inputs were.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROUTING_FILE = "routing.json"
FEATURES = "char1-5-hash20-v1"
BITS = 20
NGRAMS = (1, 2, 3, 4, 5)
KEEP = 4096
HELD_BACK = 0.2  # share of the inputs left out of the centroid to measure the task's own similarity
_SPACES = re.compile(r"\s+")
_DIGITS = str.maketrans("0123456789", "0000000000")
_MULT = np.uint64(0x100000001B3)
_MIX = np.uint64(0xFF51AFD7ED558CCD)


class ProfileError(Exception):
    """A routing profile cannot be read or does not belong to its adapter."""


class RoutingProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    features: str = FEATURES
    adapter_checksum: str = Field(description="the adapter's checksum: a profile copied from another version is refused")
    examples: int = Field(gt=0, description="training inputs pooled into the centroid")
    buckets: list[int] = Field(description="hashed n-gram buckets, heaviest first")
    weights: list[float] = Field(description="the centroid's weight in each bucket (L2 norm of all kept = 1)")
    self_similarity: float = Field(gt=0, le=1, description="median cosine of the held-back inputs to the centroid")

    @model_validator(mode="after")
    def _check(self) -> RoutingProfile:
        if self.features != FEATURES:
            raise ValueError(f"features {self.features!r}: this router computes {FEATURES!r}")
        if len(self.buckets) != len(self.weights) or not self.buckets:
            raise ValueError(f"{len(self.buckets)} buckets but {len(self.weights)} weights")
        if min(self.buckets) < 0 or max(self.buckets) >= 1 << BITS:
            raise ValueError(f"buckets must lie in [0, 2**{BITS})")
        return self

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.buckets, dtype=np.int64), np.asarray(self.weights, dtype=np.float32)


def featurize(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(unique buckets, weights with unit L2 norm) of one input: sublinear counts of 1-5 character n-grams.

    Lowercased, whitespace collapsed, digits folded to 0 (a date's shape matters, its digits do not).
    Vectorised rolling hashes: about 20 us for a sentence, so the router can afford it per request.
    """
    norm = " " + _SPACES.sub(" ", text.lower().translate(_DIGITS)).strip() + " "
    data = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    hashes = []
    with np.errstate(over="ignore"):  # the hash wraps modulo 2**64 by design
        rolling = np.zeros(len(data), dtype=np.uint64)
        for n in range(1, max(NGRAMS) + 1):
            if n > len(data):
                break
            rolling = rolling[: len(data) - n + 1] * _MULT + data[n - 1:]
            if n in NGRAMS:
                mixed = (rolling + np.uint64(n)) * _MIX
                hashes.append((mixed ^ (mixed >> np.uint64(29))) * _MIX >> np.uint64(64 - BITS))
    buckets, counts = np.unique(np.concatenate(hashes), return_counts=True)
    weights = (1.0 + np.log(counts)).astype(np.float32)
    return buckets.astype(np.int64), weights / np.linalg.norm(weights)


def centroid(texts: list[str], keep: int = KEEP) -> tuple[np.ndarray, np.ndarray]:
    """The heaviest `keep` buckets of the mean feature vector, renormalised to unit length."""
    total = np.zeros(1 << BITS, dtype=np.float32)
    for text in texts:
        buckets, weights = featurize(text)
        total[buckets] += weights
    top = np.argsort(total)[::-1][:keep]
    top = top[total[top] > 0]
    weights = total[top]
    return top.astype(np.int64), weights / np.linalg.norm(weights)


def cosine(text: str, buckets: np.ndarray, weights: np.ndarray) -> float:
    """Cosine of one input to a sparse centroid (sorted or not)."""
    x_buckets, x_weights = featurize(text)
    common, xi, ci = np.intersect1d(x_buckets, buckets, assume_unique=True, return_indices=True)
    return float(np.dot(x_weights[xi], weights[ci])) if len(common) else 0.0


def build_profile(texts: list[str], adapter_checksum: str, seed: int = 0) -> RoutingProfile:
    """A task's profile from its (un-prefixed, rendered) training inputs."""
    if not texts:
        raise ProfileError("no training inputs to build a routing profile from")
    shuffled = texts[:]
    random.Random(seed).shuffle(shuffled)
    cut = int(len(shuffled) * HELD_BACK) if len(shuffled) >= 10 else 0
    held, rest = shuffled[:cut], shuffled[cut:]
    buckets, weights = centroid(rest)
    similarity = float(np.median([cosine(t, buckets, weights) for t in held])) if held else 1.0
    buckets, weights = centroid(texts)  # the router uses all of them
    return RoutingProfile(adapter_checksum=adapter_checksum, examples=len(texts), buckets=buckets.tolist(),
                          weights=[round(float(w), 6) for w in weights], self_similarity=min(max(similarity, 1e-6), 1.0))


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
