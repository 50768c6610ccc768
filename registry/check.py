"""Whether a published adapter may be loaded by a running server: one check serve and router share.

`mtft-serve` runs it before preloading adapters into vLLM (a bad one must not
stop vLLM from starting) and the router runs it before every hot-add (a bad
one must not reach vLLM at all). Publishing already checked most of this, but
a registry is a plain folder: files get edited, copied between machines or
symlinked in, so serving checks again.
"""

from __future__ import annotations

import json
from pathlib import Path

from .record import ADAPTER_FILES, RECORD_FILE, AdapterRecord, checksum
from .servable import adapter_config_problems
from .store import Registry, RegistryError


def servable_problems(
    registry: Registry, task: str, version: int, base_fingerprint: str, max_rank: int | None
) -> tuple[AdapterRecord | None, list[str]]:
    """The record of `<root>/<task>/v<version>` and every reason not to serve it (empty: serve it)."""
    folder = registry.version_dir(task, version)
    problems = confinement_problems(registry.root, folder)
    if problems:
        return None, problems
    missing = [name for name in (*ADAPTER_FILES, RECORD_FILE) if not (folder / name).is_file()]
    if missing:
        return None, [f"{folder} lacks {missing}"]
    try:
        record = registry.read(task, version)
    except RegistryError as exc:
        return None, [str(exc)]
    if record.checksum != checksum(folder):
        problems.append(f"checksum of {folder} differs from its record: the adapter files were changed")
    if record.base_model.fingerprint != base_fingerprint:
        problems.append(
            f"trained on base {record.base_model.name!r} ({record.base_model.fingerprint[:19]}), "
            f"but the server runs {base_fingerprint[:19]}"
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return record, [*problems, f"{folder}/adapter_config.json is not JSON: {exc}"]
    problems += adapter_config_problems(config)
    rank = int(config.get("r", 0))
    if max_rank is not None and rank > max_rank:
        problems.append(f"rank {rank} exceeds the server's --max-lora-rank {max_rank}; restart with a larger cap")
    return record, problems


def confinement_problems(root: Path, folder: Path) -> list[str]:
    """A folder (and its files) must resolve inside the registry: no `..`, no symlink out."""
    real_root = root.resolve()
    candidates = [folder, *(folder / name for name in (*ADAPTER_FILES, RECORD_FILE))]
    for path in candidates:
        if path.exists() and not path.resolve().is_relative_to(real_root):
            return [f"{path} resolves to {path.resolve()}, outside the registry {real_root}"]
    if not folder.resolve().is_relative_to(real_root):
        return [f"{folder} is outside the registry {real_root}"]
    return []
