"""Which version of a task serves: the quality gate's verdict, pins, canaries (`<task>/rollout.json`).

Versions are immutable, so everything that changes after publishing lives in
one small file per task, rewritten atomically (written aside, then renamed
over) under a lock, so every router replica reading the registry sees the same
state and two commands never lose each other's change. Without the file a task
serves its newest version that passed its gate.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ROLLOUT_FILE = "rollout.json"


class Gate(BaseModel):
    """The publish gate's verdict on one version, written into its record at publish."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    rule: str = Field(description="what was required, e.g. 'no_worse: 0.01 vs v2'")
    score: float = Field(description="this version's score on the eval split")
    baseline: float | None = Field(default=None, description="the serving version's score on the same eval data")
    baseline_version: int | None = None
    reason: str = Field(default="", description="why it failed; empty when it passed")


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    percent: float = Field(gt=0, lt=100, description="share of the task's requests, by a stable hash of their key")


class Rollout(BaseModel):
    """The mutable part of a task's registry state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pin: int | None = Field(default=None, description="serve this version, whatever is published later")
    canary: Canary | None = None
    allowed: tuple[int, ...] = Field(default=(), description="rejected versions a user forced through the gate")
    changed_by: str = ""


class Serving(BaseModel):
    """What a router should serve for one task: its primary version and perhaps a canary beside it."""

    model_config = ConfigDict(frozen=True)

    primary: int | None
    canary: Canary | None = None
    pinned: bool = False


def parse_percent(text: str) -> float:
    """'10%', '10' or '2.5 %' -> the share in percent; strictly between 0 and 100."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"canary share {text!r} is not a percentage like '10%'") from None
    if not 0 < value < 100:
        raise ValueError(f"canary share {text!r} must be above 0 % and below 100 % (promote to serve it alone)")
    return value
