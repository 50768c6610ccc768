"""`state.json` in the run folder: per task, what a `--resume` can skip and the config it was trained with."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from mtft.registry.rollout import Gate

from .spec import SpecError


class TaskState(BaseModel):
    base_score: float | None = None
    adapter_score: float | None = None
    version: int | None = None
    base_interval: tuple[float, float] | None = None  # bootstrap 95 %
    adapter_interval: tuple[float, float] | None = None
    config_hash: str | None = None  # of the training that made (or makes) this task's adapter
    gate: Gate | None = None  # the publish gate's verdict on the published version


class RunState(BaseModel):
    """`state.json` in the run folder: what a resumed run can skip."""

    tasks: dict[str, TaskState] = {}

    @classmethod
    def load(cls, path: Path) -> RunState:
        return cls.model_validate_json(path.read_text()) if path.exists() else cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)

    def task(self, name: str) -> TaskState:
        return self.tasks.setdefault(name, TaskState())

    def claim(self, names: list[str], config_hash: str, resume: bool, path: Path) -> bool:
        """Record what trains `names`; True where a resume may continue from their checkpoint.

        The one place that refuses to resume a run made with another spec, task selection or base.
        """
        states = [self.task(n) for n in names]
        if resume and any(s.config_hash not in (None, config_hash) for s in states):
            raise SpecError(str(path), [
                "this run was made with a different spec, task selection or base model; "
                "rerun without --resume to start over, or restore the spec it was made with"])
        resumable = resume and all(s.config_hash == config_hash for s in states)
        for s in states:
            s.config_hash = config_hash
        return resumable
