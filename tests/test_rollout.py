"""Rollouts without HTTP: which version serves (gate verdicts, pins, rollback), canary splits, removal."""

from __future__ import annotations

import json
import math
import threading

import pytest
from helpers import adapter_dir, record, table  # noqa: F401  (a session fixture, a record factory, a route table)

from mtft.registry import Registry, RegistryError
from mtft.registry.rollout import Canary, Gate, Rollout, parse_percent
from mtft.router import RouteRequest, route
from mtft.router.table import Split


def publish(registry: Registry, adapter_dir, passed: bool | None = True, score: float = 0.9) -> int:
    gate = None if passed is None else Gate(passed=passed, rule="min: 0.5", score=score,
                                             reason="" if passed else f"{score} < 0.5")
    return registry.publish(adapter_dir, record().model_copy(update={"gate": gate})).version


def test_the_newest_version_that_passed_its_gate_serves(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    assert [publish(registry, adapter_dir, ok) for ok in (None, True, False)] == [1, 2, 3]
    assert registry.read("yesno", 3).rejected and not registry.read("yesno", 2).rejected
    assert registry.serving("yesno").primary == 2
    assert registry.served()["yesno"].version == 2
    assert registry.latest()["yesno"].version == 3  # the newest is still listed, just not served


def test_a_pin_holds_through_later_publishes_and_unpin_returns_to_the_newest(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    publish(registry, adapter_dir), publish(registry, adapter_dir)
    registry.update_rollout("yesno", lambda r: r.model_copy(update={"pin": 1}))
    publish(registry, adapter_dir)
    assert registry.serving("yesno").model_dump() == {"primary": 1, "canary": None, "pinned": True}
    registry.update_rollout("yesno", lambda r: r.model_copy(update={"pin": None}))
    assert registry.serving("yesno").primary == 3


def test_a_forced_rejected_version_may_serve(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    publish(registry, adapter_dir), publish(registry, adapter_dir, passed=False)
    registry.update_rollout("yesno", lambda r: r.model_copy(update={"allowed": (2,)}))
    assert registry.serving("yesno").primary == 2


def test_a_canary_beside_the_primary_and_none_once_it_is_the_primary(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    publish(registry, adapter_dir), publish(registry, adapter_dir)
    registry.update_rollout("yesno", lambda r: Rollout(pin=1, canary=Canary(version=2, percent=10)))
    assert registry.serving("yesno").canary == Canary(version=2, percent=10)
    registry.update_rollout("yesno", lambda r: Rollout(canary=Canary(version=2, percent=10)))
    assert registry.serving("yesno").model_dump() == {"primary": 2, "canary": None, "pinned": False}


def test_concurrent_rollout_changes_are_never_lost(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    for _ in range(3):
        publish(registry, adapter_dir)

    def allow(version: int) -> None:
        registry.update_rollout("yesno", lambda r: r.model_copy(update={"allowed": (*r.allowed, version)}))

    threads = [threading.Thread(target=allow, args=(v,)) for v in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(registry.rollout("yesno").allowed) == list(range(20))
    assert [p.name for p in (tmp_path / "reg" / "yesno").iterdir() if p.name.startswith(".rollout")] == []


def test_a_damaged_rollout_file_is_an_error_naming_it(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    publish(registry, adapter_dir)
    (tmp_path / "reg" / "yesno" / "rollout.json").write_text('{"pin": "two"}')
    with pytest.raises(RegistryError, match=r"yesno/rollout.json.*fix or delete it"):
        registry.serving("yesno")
    assert registry.served() == {}  # the router serves other tasks; this one waits for a fix


def test_rollout_of_an_unknown_task_is_refused(tmp_path):
    with pytest.raises(RegistryError, match=r"has no task 'nope'"):
        Registry(tmp_path / "reg").update_rollout("nope", lambda r: r)


def test_remove_is_atomic_and_names_what_exists(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    publish(registry, adapter_dir), publish(registry, adapter_dir)
    assert registry.remove("yesno", 1) == [1]
    assert registry.versions("yesno") == [2]
    with pytest.raises(RegistryError, match=r"no yesno/v7; versions of 'yesno': \[2\]"):
        registry.remove("yesno", 7)
    assert registry.remove("yesno") == [2] and registry.tasks() == []
    assert not any((tmp_path / "reg" / ".staging").iterdir())


@pytest.mark.parametrize(("text", "value"), [("10%", 10.0), ("2.5 %", 2.5), ("50", 50.0)])
def test_canary_shares_parse(text, value):
    assert parse_percent(text) == value


@pytest.mark.parametrize("text", ["0%", "100%", "-5%", "150", "ten"])
def test_canary_shares_outside_0_to_100_are_refused(text):
    with pytest.raises(ValueError, match="canary share"):
        parse_percent(text)


def test_a_canary_split_is_sticky_per_key_and_holds_its_share():
    base = table()
    canary = base.current["yesno"].model_copy(update={"version": 3})
    split = base.with_canary("yesno", Split(canary, 10.0))
    keys = [f"user-{i}" for i in range(2000)]
    answered = [route(RouteRequest(model="yesno", text="x", key=k), split).upstream_model for k in keys]
    assert set(answered) == {"yesno-v2", "yesno-v3"}
    share = answered.count("yesno-v3") / len(keys)
    assert abs(share - 0.10) < 4 * math.sqrt(0.1 * 0.9 / len(keys))  # within 4 standard errors
    again = [route(RouteRequest(model="yesno", text="other text", key=k), split).upstream_model for k in keys]
    assert again == answered  # the key decides, not the text
    by_prefix = route(RouteRequest(text="yesno: x", key=keys[answered.index("yesno-v3")]), split)
    assert by_prefix.upstream_model == "yesno-v3"
    assert route(RouteRequest(model="yesno@v3", text="x"), split).upstream_model == "yesno-v3"
    assert route(RouteRequest(model="yesno", text="x", key="k"), base).upstream_model == "yesno-v2"
    promoted = split.with_adapter(canary)
    assert promoted.canaries == {} and promoted.records() == list(promoted.current.values())


def test_the_record_of_a_rejected_version_says_why(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    publish(registry, adapter_dir, passed=False, score=0.25)
    saved = json.loads((registry.version_dir("yesno", 1) / "mtft.json").read_text())
    assert saved["gate"] == {"passed": False, "rule": "min: 0.5", "score": 0.25, "baseline": None,
                             "baseline_version": None, "reason": "0.25 < 0.5"}


def test_publishes_racing_on_one_task_each_get_their_own_whole_version(tmp_path, adapter_dir):
    from concurrent.futures import ThreadPoolExecutor

    registry = Registry(tmp_path / "reg")
    with ThreadPoolExecutor(8) as pool:
        versions = sorted(pool.map(lambda _: publish(registry, adapter_dir), range(16)))
    assert versions == list(range(1, 17)) == registry.versions("yesno")
    assert all(registry.read("yesno", v).version == v for v in versions)
    assert not any((tmp_path / "reg" / ".staging").iterdir())
