"""The adapter registry: atomic, versioned publishing of adapters vLLM can serve."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from helpers import adapter_dir, record  # noqa: F401  (a session fixture and a record factory)

from mtft.registry import Registry, RegistryError, checksum


def test_publish_writes_a_whole_versioned_folder(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    first = registry.publish(adapter_dir, record())
    second = registry.publish(adapter_dir, record())
    assert (first.version, second.version) == (1, 2)
    assert second.name == "yesno-v2"
    folder = registry.version_dir("yesno", 1)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "mtft.json"]
    assert registry.read("yesno", 1).checksum == checksum(folder) == first.checksum
    assert registry.latest()["yesno"].version == 2
    assert [r.version for r in registry.records()] == [1, 2]
    assert not list((tmp_path / "reg" / ".staging").iterdir())


def with_config(adapter_dir: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "changed"
    shutil.copytree(adapter_dir, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


UNSERVABLE = [
    ({"r": 4}, r"rank 4 cannot be served by vLLM"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save \['lm_head'\] is set"),
    ({"use_dora": True}, r"use_dora is set"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, r"\['embed_tokens'\] cannot be served"),
    ({"target_modules": "all-linear"}, r"is the pattern 'all-linear'"),
]


@pytest.mark.parametrize("changes, message", UNSERVABLE, ids=[m for _, m in UNSERVABLE])
def test_unservable_adapters_are_refused_and_nothing_is_published(tmp_path, adapter_dir, changes, message):
    registry = Registry(tmp_path / "reg")
    registry.publish(adapter_dir, record())
    with pytest.raises(RegistryError, match=message):
        registry.publish(with_config(adapter_dir, tmp_path, **changes), record())
    assert registry.versions("yesno") == [1]
    assert not list((tmp_path / "reg" / ".staging").iterdir())


def test_a_folder_without_adapter_files_is_refused(tmp_path):
    with pytest.raises(RegistryError, match=r"lacks \['adapter_config.json', 'adapter_model.safetensors'\]"):
        Registry(tmp_path / "reg").publish(tmp_path, record())


def test_a_registry_path_that_is_a_file_is_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RegistryError, match=r"file/reg is not writable .*choose another --registry"):
        Registry(tmp_path / "file" / "reg").check_writable()


def test_a_damaged_record_is_skipped_not_served(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    registry.publish(adapter_dir, record())
    registry.publish(adapter_dir, record())
    (registry.version_dir("yesno", 2) / "mtft.json").write_text("{not json")
    assert registry.latest()["yesno"].version == 1


def test_tasks_and_versions_are_only_what_the_layout_names(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    assert (registry.tasks(), registry.newest_version("yesno"), registry.signature()) == ([], None, ())
    registry.publish(adapter_dir, record("yesno"))
    for stray in ("Not-A-Task", "yesno/draft", "yesno/v2x", "yesno/x3", "yesno/v²"):
        (registry.root / stray).mkdir()
    (registry.root / "notes.txt").write_text("")
    assert registry.tasks() == ["yesno"]  # not .staging, a file, or a name no task may have
    assert (registry.versions("yesno"), registry.newest_version("yesno")) == ([1], 1)


def test_the_signature_changes_with_every_publish(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    registry.publish(adapter_dir, record("yesno"))
    first = registry.signature()
    assert registry.signature() == first
    registry.publish(adapter_dir, record("echo"))  # a new task folder
    second = registry.signature()
    time.sleep(0.05)  # mtimes come from the kernel's coarse clock (a few ms)
    registry.publish(adapter_dir, record("yesno"))  # a new version inside a task folder
    assert len({first, second, registry.signature()}) == 3


@pytest.fixture
def layout(tmp_path) -> Registry:
    registry = Registry(tmp_path / "reg")
    (registry.root / "yesno" / "v1").mkdir(parents=True)
    (tmp_path / "outside" / "v1").mkdir(parents=True)
    (registry.root / "link").symlink_to(tmp_path / "outside")
    return registry


@pytest.mark.parametrize(("path", "expected"), [
    ("yesno/v1", ("yesno", 1)),
    ("yesno/v12", ("yesno", 12)),  # the layout only: whether it exists is the caller's question
    ("./yesno/../yesno/v1", ("yesno", 1)),
])
def test_locate_names_the_task_and_version_of_a_path(layout, path, expected):
    assert layout.locate(path) == expected
    assert layout.locate(layout.root.resolve() / path) == expected  # absolute, inside the registry


@pytest.mark.parametrize("path", [
    "../elsewhere/v1",  # outside
    "/etc/v1",  # absolute, outside
    "yesno/../../x/v1",  # `..` out
    "link/v1",  # a symlink out
    "yesno",  # a task, not a version
    "yesno/latest",  # not v<N>
    "yesno/x1",
    "yesno/v1/mtft.json",  # inside a version
    ".",
])
def test_locate_refuses_paths_that_are_not_a_version_folder_inside_the_registry(layout, path):
    message = rf"path '{re.escape(path)}' resolves to .*, not <registry>/<task>/v<N> inside "
    with pytest.raises(RegistryError, match=message):
        layout.locate(path)
