"""A run's final per-task scores: the rows the CLI prints and `results.json` holds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel

from mtft.registry.rollout import Gate


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str
    base: float
    adapter: float  # the published adapter (shared runs: this task's export)
    version: int
    separate: float | None = None  # shared runs: the newest per-task adapter's score, for comparison
    base_interval: tuple[float, float] | None = None  # bootstrap 95 %
    adapter_interval: tuple[float, float] | None = None
    seen: int | None = None  # shared runs: examples trained on
    share: float | None = None  # shared runs: `seen` / what the task's own run would train on
    gate: Gate | None = None  # None: the task has no publish gate

    @property
    def rejected(self) -> bool:
        return self.gate is not None and not self.gate.passed

    @property
    def negative_transfer(self) -> bool:
        """Shared runs: the export scores below the per-task adapter beyond its 95 % interval."""
        interval, separate = self.adapter_interval, self.separate
        return separate is not None and interval is not None and interval[1] < separate


def write_results(path: Path, mode: str, results: list[TaskResult]) -> None:
    """`results.json`: the run's mode and each task's row, without the fields it leaves empty."""
    rows = {r.task: {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in asdict(r).items()
                     if k != "task" and v is not None} for r in results}
    path.write_text(json.dumps({"mode": mode, "tasks": rows}, indent=2))
