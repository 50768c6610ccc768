"""The adapter registry on disk: atomic, versioned publishing and reading.

Layout: `<root>/<task>/v<N>/{adapter_config.json, adapter_model.safetensors, mtft.json}`
and `<root>/<task>/rollout.json` (pins, canary, forced versions: see `rollout.py`).
A version folder appears whole or not at all (written under `<root>/.staging`,
then renamed), and is never rewritten: a retrain becomes `v<N+1>`. Only this
class knows the layout: serving and routing ask it for tasks, versions, the
(task, version) a path names, and whether anything changed (`signature`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from .record import ADAPTER_FILES, RECORD_FILE, TASK_NAME, AdapterRecord, checksum
from .rollout import ROLLOUT_FILE, Rollout, Serving
from .routing_profile import build_profile, write_profile
from .servable import adapter_config_problems, weight_problems

log = logging.getLogger(__name__)
STAGING = ".staging"
VERSION_DIR = re.compile(r"v([0-9]+)")


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

    def tasks(self) -> list[str]:
        """Every task folder, sorted; `.staging`, stray files and names no task may have are not tasks.

        A symlinked task folder counts: serving refuses it later, with the reason, if it leads out.
        """
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if TASK_NAME.match(p.name) and p.is_dir())

    def versions(self, task: str) -> list[int]:
        task_dir = self.root / task
        if not task_dir.is_dir():
            return []
        found = (_version_number(p.name) for p in task_dir.iterdir())
        return sorted(v for v in found if v is not None)

    def newest_version(self, task: str) -> int | None:
        return max(self.versions(task), default=None)

    def locate(self, path: str | Path) -> tuple[str, int]:
        """The (task, version) that `<task>/v<N>`, relative to the root, names; it must resolve inside it.

        Only the layout is checked here (`..`, absolute paths and symlinks out are refused);
        whether the task and version exist, and may be served, is for the caller to ask.
        """
        root = self.root.resolve()
        folder = (self.root / path).resolve()
        version = _version_number(folder.name)
        if not folder.is_relative_to(root) or folder.parent.parent != root or version is None:
            raise RegistryError(f"path {str(path)!r} resolves to {folder}, not <registry>/<task>/v<N> inside {root}")
        return folder.parent.name, version

    def signature(self) -> tuple:
        """Changes when a version is published or a task folder comes or goes: a few stat calls, no reads.

        The mtime of the root and of every entry in it: publishing renames a version folder
        into its task folder (or creates the task folder), which touches one of them.
        """
        try:
            entries = [(e.name, e.stat().st_mtime_ns) for e in os.scandir(self.root)]
            return (self.root.stat().st_mtime_ns, tuple(sorted(entries)))
        except OSError:
            return ()

    def publish(self, adapter_dir: Path, record: AdapterRecord,
                routing_inputs: Sequence[str] | None = None) -> AdapterRecord:
        """Copy a trained PEFT adapter in as the task's next version; return its final record.

        `routing_inputs` (the training inputs, rendered, without the prefix) add a routing profile
        (`routing.json`, see `routing_profile.py`), so the router can route requests that name no task here.
        """
        adapter_dir = Path(adapter_dir)
        missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if missing:
            raise RegistryError(f"{adapter_dir} lacks {missing}; is it a PEFT LoRA adapter folder?")
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        problems = adapter_config_problems(config) + weight_problems(config, adapter_dir / "adapter_model.safetensors")
        if problems:
            raise RegistryError(f"refusing to publish {adapter_dir}: " + "; ".join(problems))
        self.check_writable()
        staging = self.root / STAGING / f"{record.task}-{uuid.uuid4().hex}"
        try:
            return self._publish_staged(adapter_dir, record, staging, routing_inputs)
        except OSError as exc:  # a full disk, a registry remounted read-only: nothing got in
            where = exc.filename2 or exc.filename
            raise RegistryError(f"cannot publish {record.task} into registry {self.root}: "
                                f"{exc.strerror or exc}{f' ({where})' if where else ''}; nothing was published, "
                                "the versions served before are unchanged") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish_staged(self, adapter_dir: Path, record: AdapterRecord, staging: Path,
                        routing_inputs: Sequence[str] | None) -> AdapterRecord:
        """Write the version under `staging`, then rename it into place as the next free version."""
        staging.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copyfile(adapter_dir / name, staging / name)
        if routing_inputs:
            write_profile(staging, build_profile(list(routing_inputs), checksum(staging)))
        while True:
            version = (self.newest_version(record.task) or 0) + 1
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

    def read(self, task: str, version: int) -> AdapterRecord:
        path = self.version_dir(task, version) / RECORD_FILE
        try:
            return AdapterRecord.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            raise RegistryError(f"cannot read adapter record {path}: {exc}") from exc

    def latest(self) -> dict[str, AdapterRecord]:
        """The newest readable version of every task."""
        found = {}
        for task in self.tasks():
            for version in reversed(self.versions(task)):
                try:
                    found[task] = self.read(task, version)
                    break
                except RegistryError as exc:
                    log.warning("skipping %s", exc)
        return found

    def records(self) -> list[AdapterRecord]:
        """Every readable version of every task, oldest first."""
        out = []
        for task in self.tasks():
            for version in self.versions(task):
                try:
                    out.append(self.read(task, version))
                except RegistryError as exc:
                    log.warning("skipping %s", exc)
        return out


    # -- rollouts ---------------------------------------------------------------------------
    def rollout(self, task: str) -> Rollout:
        path = self.root / task / ROLLOUT_FILE
        try:
            return Rollout.model_validate_json(path.read_text())
        except FileNotFoundError:
            return Rollout()
        except (OSError, ValidationError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
            raise RegistryError(f"cannot read {path} ({why}); fix or delete it (then the newest good version serves)") from exc

    def update_rollout(self, task: str, change: Callable[[Rollout], Rollout]) -> Rollout:
        """Read, change and atomically rewrite a task's rollout state; one writer at a time per task."""
        if not self.versions(task):
            raise RegistryError(f"registry {self.root} has no task {task!r}; tasks: {self.tasks()}")
        task_dir = self.root / task
        with _locked(task_dir):
            new = change(self.rollout(task))
            staged = task_dir / f".{ROLLOUT_FILE}.{uuid.uuid4().hex}"
            try:
                _write_synced(staged, new.model_dump_json(indent=2))
                os.replace(staged, task_dir / ROLLOUT_FILE)
            except OSError as exc:
                staged.unlink(missing_ok=True)
                raise RegistryError(f"cannot write {task_dir / ROLLOUT_FILE} ({exc.strerror}); nothing changed") from exc
        return new

    def good(self, record: AdapterRecord, rollout: Rollout | None = None) -> bool:
        """Passed its gate (or had none), or a user forced it through."""
        rollout = rollout if rollout is not None else self.rollout(record.task)
        return not record.rejected or record.version in rollout.allowed

    def serving(self, task: str) -> Serving:
        """The version to serve (the pin, else the newest readable good one) and the canary beside it."""
        rollout = self.rollout(task)
        readable = {}
        for version in self.versions(task):
            try:
                readable[version] = self.read(task, version)
            except RegistryError as exc:
                log.warning("skipping %s", exc)
        good = [v for v, r in readable.items() if self.good(r, rollout)]
        if rollout.pin is not None and rollout.pin in readable:
            primary, pinned = rollout.pin, True
        else:
            primary, pinned = max(good, default=None), False
        canary = rollout.canary
        if canary is not None and (canary.version not in readable or canary.version == primary):
            canary = None
        return Serving(primary=primary, canary=canary, pinned=pinned)

    def served(self) -> dict[str, AdapterRecord]:
        """The record each task serves now (see `serving`); tasks with nothing servable are left out."""
        found = {}
        for task in self.tasks():
            try:
                version = self.serving(task).primary
            except RegistryError as exc:
                log.warning("skipping task %s: %s", task, exc)
                continue
            if version is not None:
                found[task] = self.read(task, version)
        return found

    def remove(self, task: str, version: int | None = None) -> list[int]:
        """Delete one version (or the whole task); atomic: renamed out of sight first, then deleted."""
        versions = self.versions(task)
        gone = versions if version is None else [version]
        if not versions or (version is not None and version not in versions):
            raise RegistryError(f"registry {self.root} has no {task}" + (f"/v{version}" if version else "")
                                + f"; versions of {task!r}: {versions}")
        source = self.root / task if version is None else self.version_dir(task, version)
        trash = self.root / STAGING / f"removed-{task}-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, trash)
        except OSError as exc:
            raise RegistryError(f"cannot remove {source} ({exc.strerror}); nothing changed") from exc
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed %s %s", task, [f"v{v}" for v in gone])
        return gone


@contextmanager
def _locked(folder: Path):
    """An exclusive advisory lock on `folder/.lock`: read-modify-write of rollout.json, one at a time."""
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version_number(name: str) -> int | None:
    """`v<N>` -> N; anything else in a task folder is not a version."""
    match = VERSION_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
