"""The adapter record (`mtft.json`): everything serving needs to know about an adapter."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .rollout import Gate
from .template import PromptTemplate

RECORD_FILE = "mtft.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class BaseModelRef(BaseModel):
    """The frozen base an adapter was trained on; the fingerprint pins its exact weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="what the task spec named: 'smollm2-135m', a folder or a hub id")
    path: str = Field(description="the local folder the weights were loaded from")
    fingerprint: str


class AdapterRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    task: str
    version: int = 0
    prefix: str
    template: PromptTemplate
    base_model: BaseModelRef
    rank: int
    alpha: float
    target_modules: list[str]
    metric: str
    labels: list[str] | None = Field(default=None, description="accuracy: the valid labels answers snap to")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="'base' (zero-shot) and 'adapter' scores on the eval split"
    )
    eval_examples: int = 0
    eval_hash: str = Field(default="", description="sha256 over the eval split's prompts and targets")
    gate: Gate | None = Field(default=None, description="the publish gate's verdict; None: no gate was set")
    max_new_tokens: int
    stop: list[str] = Field(default_factory=list, description="stop strings used in evaluation")
    checksum: str = ""
    created: datetime | None = None
    trained_by: str = "mtft-train adapters"

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if not TASK_NAME.match(value):
            raise ValueError(
                f"task name {value!r} must be lowercase letters, digits, '-' or '_' (at most 64)"
            )
        return value

    @property
    def rejected(self) -> bool:
        """Failed its publish gate: never served unless a user forces it (`registry pin --force`)."""
        return self.gate is not None and not self.gate.passed

    @property
    def name(self) -> str:
        """The adapter's name in vLLM: unique per version, never reused for new weights."""
        return f"{self.task}-v{self.version}"


def checksum(adapter_dir: Path) -> str:
    """sha256 over the adapter files, so serving can tell a damaged or edited adapter."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode())
        digest.update((adapter_dir / name).read_bytes())
    return "sha256:" + digest.hexdigest()


def fingerprint(model_dir: Path) -> str:
    """sha256 of a base model's config and weights: adapters only serve on the same base."""
    digest = hashlib.sha256()
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
