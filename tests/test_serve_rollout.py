"""Rollouts through the real router and vLLM, with no restart: a rejected version never serves,
rollback and pins take effect within a poll, a canary split holds its share, sticks per user and
never answers from a version outside the split, and promote makes the canary the only version."""

from __future__ import annotations

import math
import time
from collections import Counter

import openai
import pytest
from serving import TEXTS, answer, wait_until_served
from typer.testing import CliRunner

from mtft.registry import Registry
from mtft.registry.rollout import Gate
from mtft.train.cli import app

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow


def registry_cli(stack, *args) -> str:
    result = CliRunner().invoke(app, ["registry", *map(str, args), "--registry", str(stack.registry)])
    assert result.exit_code == 0, result.output
    return result.output


def test_rejected_version_pin_rollback_canary_and_promote_without_a_restart(client, stack):
    registry = Registry(stack.registry)
    source = registry.latest()
    # roll v1: yesno's weights; v2: echo's weights under the same record, so answers tell them apart.
    v1 = stack.publish_copy("yesno", task="roll", prefix="roll: ")
    registry.publish(registry.version_dir("echo", source["echo"].version), v1)
    wait_until_served(client, "roll", "roll-v2")
    answers = {"roll-v2": {t: answer(client, "roll", t)[0] for t in TEXTS}}
    # v3 fails its gate: published, never served.
    rejected = v1.model_copy(update={"gate": Gate(passed=False, rule="min: 0.9", score=0.1, reason="0.100 < min 0.9")})
    registry.publish(registry.version_dir("yesno", source["yesno"].version), rejected)
    time.sleep(2.0)  # four polls
    assert answer(client, "roll", TEXTS[0])[1] == "roll-v2"
    with pytest.raises(openai.NotFoundError):
        answer(client, "roll@v3", TEXTS[0])

    assert "roll: serves v1 (pinned" in registry_cli(stack, "rollback", "roll")
    print(f"rollback answered by v1 after {wait_until_served(client, 'roll', 'roll-v1'):.2f} s")
    answers["roll-v1"] = {t: answer(client, "roll", t)[0] for t in TEXTS}
    assert answers["roll-v1"] != answers["roll-v2"]

    registry_cli(stack, "promote", "roll", 2, "--canary", "30%")
    wait_until_served(client, "roll@v2", "roll-v2")  # the canary is loaded and routable
    users = [f"user-{i}" for i in range(120)]
    seen: dict[str, str] = {}
    for i, user in enumerate(users):
        text = TEXTS[i % len(TEXTS)]
        got, adapter = answer(client, "roll", text, user=user)
        assert adapter in ("roll-v1", "roll-v2"), adapter  # nothing outside the split
        assert got == answers[adapter][text]
        seen[user] = adapter
    share = Counter(seen.values())["roll-v2"] / len(users)
    assert abs(share - 0.30) < 4 * math.sqrt(0.3 * 0.7 / len(users)), share
    for user in users[:30]:  # sticky: the same user, another text, the same version
        assert answer(client, "roll", TEXTS[1], user=user)[1] == seen[user]
    assert any(c["task"] == "roll" and c["percent"] == 30 for c in stack.admin("GET").json()["canaries"])

    registry_cli(stack, "promote", "roll", 2)
    deadline = time.monotonic() + 30
    while {answer(client, "roll", TEXTS[0], user=u)[1] for u in users[:20]} != {"roll-v2"}:
        assert time.monotonic() < deadline, "promote did not take effect"
        time.sleep(0.2)
    registry_cli(stack, "remove", "roll", "--force")
    deadline = time.monotonic() + 30
    while True:
        try:
            answer(client, "roll", TEXTS[0])
        except openai.NotFoundError:
            break
        assert time.monotonic() < deadline, "a removed task kept serving"
        time.sleep(0.2)
