"""The adapter registry on disk: atomic, versioned publishing and reading.

Layout: `<root>/<task>/v<N>/{adapter_config.json, adapter_model.safetensors, mtft.json}`.
A version folder appears whole or not at all (written under `<root>/.staging`,
then renamed), and is never rewritten: a retrain becomes `v<N+1>`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from .record import ADAPTER_FILES, RECORD_FILE, AdapterRecord, checksum
from .servable import adapter_config_problems

log = logging.getLogger(__name__)
STAGING = ".staging"


class RegistryError(Exception):
    """A registry cannot be written, or an adapter cannot be published or read."""


class Registry:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def check_writable(self) -> None:
        """Fail before hours of training, not at publish time."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise RegistryError(
                f"registry {self.root} is not writable ({exc.strerror}); "
                "choose another --registry or fix its permissions"
            ) from exc

    def version_dir(self, task: str, version: int) -> Path:
        return self.root / task / f"v{version}"

    def versions(self, task: str) -> list[int]:
        task_dir = self.root / task
        if not task_dir.is_dir():
            return []
        found = [p.name[1:] for p in task_dir.iterdir() if p.name.startswith("v")]
        return sorted(int(v) for v in found if v.isdigit())

    def publish(self, adapter_dir: Path, record: AdapterRecord) -> AdapterRecord:
        """Copy a trained PEFT adapter in as the task's next version; return its final record."""
        adapter_dir = Path(adapter_dir)
        missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if missing:
            raise RegistryError(f"{adapter_dir} lacks {missing}; is it a PEFT LoRA adapter folder?")
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        problems = adapter_config_problems(config)
        if problems:
            raise RegistryError(f"refusing to publish {adapter_dir}: " + "; ".join(problems))
        self.check_writable()
        staging = self.root / STAGING / f"{record.task}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            for name in ADAPTER_FILES:
                shutil.copyfile(adapter_dir / name, staging / name)
            while True:
                version = max(self.versions(record.task), default=0) + 1
                final = record.model_copy(
                    update={
                        "version": version,
                        "checksum": checksum(staging),
                        "created": datetime.now(timezone.utc),
                    }
                )
                _write_synced(staging / RECORD_FILE, final.model_dump_json(indent=2))
                target = self.version_dir(record.task, version)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    # rename(2) of a directory is atomic; it fails if another
                    # publisher took this version first, and then we take the next.
                    os.rename(staging, target)
                except OSError:
                    if target.exists():
                        continue
                    raise
                log.info("published %s to %s", final.name, target)
                return final
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read(self, task: str, version: int) -> AdapterRecord:
        path = self.version_dir(task, version) / RECORD_FILE
        try:
            return AdapterRecord.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            raise RegistryError(f"cannot read adapter record {path}: {exc}") from exc

    def latest(self) -> dict[str, AdapterRecord]:
        """The newest readable version of every task."""
        found = {}
        for task_dir in sorted(self._task_dirs()):
            for version in reversed(self.versions(task_dir.name)):
                try:
                    found[task_dir.name] = self.read(task_dir.name, version)
                    break
                except RegistryError as exc:
                    log.warning("skipping %s", exc)
        return found

    def records(self) -> list[AdapterRecord]:
        """Every readable version of every task, oldest first."""
        out = []
        for task_dir in sorted(self._task_dirs()):
            for version in self.versions(task_dir.name):
                try:
                    out.append(self.read(task_dir.name, version))
                except RegistryError as exc:
                    log.warning("skipping %s", exc)
        return out

    def _task_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
