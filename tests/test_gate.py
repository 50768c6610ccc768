"""Publish gates and the registry commands on real tiny adapters: a worse retrain is published as
rejected and never serves; pins, rollbacks, canaries and removal; `registry eval` reproduces the
published score; every bad input is refused with its reason and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtft.registry import Registry
from mtft.train import load_spec
from mtft.train.cli import REJECTED_EXIT, app
from mtft.train.gate import judge
from mtft.train.spec import GateSpec, SpecError
from mtft.train.check import RunOptions, check_run

from conftest import tiny_spec


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def gated_spec(folder: Path, base: Path, gate: dict | None = None, **training) -> Path:
    """The tiny spec, yesno scored by chrF (the tiny model learns its characters, not its labels)."""
    path = tiny_spec(folder, base, **training)
    raw = yaml.safe_load(path.read_text())
    raw["tasks"][0].update(metric="chrf", labels=None)
    if gate is not None:
        raw["publish"] = {"gate": gate}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def good(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """yesno v1 trained well enough to beat the base model: (registry, run folder)."""
    folder = tmp_path_factory.mktemp("gate")
    spec = gated_spec(folder, tiny_base, max_steps=80, learning_rate=3e-2, eval_every=None)
    result = cli("adapters", "--config", spec, "--task", "yesno", "--registry", folder / "registry",
                 "--output", folder / "run")
    assert result.exit_code == 0, result.output
    return folder / "registry", folder / "run"


@pytest.fixture
def registry(good, tmp_path) -> Path:
    """A copy of the good registry, for a test to change."""
    return Path(shutil.copytree(good[0], tmp_path / "registry"))


def test_judge_min_and_no_worse():
    assert judge(GateSpec(min=0.5), 0.6, None).passed
    assert judge(GateSpec(min=0.5), 0.4, None).reason == "0.400 < min 0.5"
    worse = judge(GateSpec(no_worse=0.01), 0.8, (2, 0.875))
    assert (worse.passed, worse.baseline, worse.baseline_version) == (False, 0.875, 2)
    assert worse.reason == "0.800 < v2's 0.875 - 0.01"
    assert judge(GateSpec(no_worse=0.1), 0.8, (2, 0.875)).passed
    assert judge(GateSpec(no_worse=0.0), 0.5, None).rule == "no_worse: 0 (no version serving yet)"


def test_a_worse_retrain_is_published_rejected_and_the_old_version_keeps_serving(registry, tmp_path, tiny_base):
    store = Registry(registry)
    first = store.read("yesno", 1).metrics
    assert first["adapter"] > first["base"] + 0.1, f"precondition: v1 must have learnt something ({first})"
    # One step at a tiny learning rate (the base model's answers), evaluated on other examples (another
    # seed), so the gate must score the serving v1 again on this run's eval data to compare like with like.
    spec = gated_spec(tmp_path, tiny_base, {"no_worse": 0.0, "min_eval_examples": 5},
                      max_steps=1, learning_rate=1e-7, seed=1, eval_every=None)
    result = cli("adapters", "--config", spec, "--task", "yesno", "--registry", registry, "--output", tmp_path / "run")
    assert result.exit_code == REJECTED_EXIT, result.output
    assert "yesno v2 failed its publish gate" in result.output
    assert "mtft-train registry pin yesno 2 --force" in result.output
    v2 = store.read("yesno", 2)
    assert v2.rejected and v2.gate.baseline_version == 1 and v2.gate.rule == "no_worse: 0 vs v1"
    assert v2.eval_hash != store.read("yesno", 1).eval_hash
    assert (tmp_path / "run" / "predictions" / "yesno" / "serving-v1.jsonl").exists(), "v1 was not scored again"
    assert v2.gate.baseline > v2.gate.score == v2.metrics["adapter"]
    assert store.serving("yesno").primary == 1
    shown = cli("registry", "show", "yesno", "--registry", registry).output
    assert "yesno: serves v1" in shown and "rejected" in shown and "failed: " in shown
    # Forcing it through is explicit, and recorded.
    refused = cli("registry", "pin", "yesno", 2, "--registry", registry)
    assert refused.exit_code == 2 and "failed its publish gate" in refused.output and "--force" in refused.output
    assert store.serving("yesno").primary == 1
    forced = cli("registry", "pin", "yesno", 2, "--force", "--registry", registry)
    assert forced.exit_code == 0, forced.output
    assert store.serving("yesno").primary == 2 and store.rollout("yesno").allowed == (2,)


def test_pin_rollback_canary_promote_and_remove(registry):
    store = Registry(registry)
    source = store.read("yesno", 1)
    for _ in range(2):  # v2, v3: the same weights, as good
        store.publish(store.version_dir("yesno", 1), source)
    assert store.serving("yesno").primary == 3
    assert cli("registry", "rollback", "yesno", "--registry", registry).exit_code == 0
    assert store.serving("yesno").model_dump() == {"primary": 2, "canary": None, "pinned": True}
    canary = cli("registry", "promote", "yesno", 3, "--canary", "10%", "--registry", registry)
    assert canary.exit_code == 0 and "v3 answers 10 % of requests (canary)" in canary.output
    assert store.serving("yesno").canary.version == 3 and store.serving("yesno").primary == 2
    assert cli("registry", "promote", "yesno", 3, "--registry", registry).exit_code == 0
    assert store.serving("yesno").model_dump() == {"primary": 3, "canary": None, "pinned": False}
    assert cli("registry", "pin", "yesno", 1, "--registry", registry).exit_code == 0
    assert cli("registry", "unpin", "yesno", "--registry", registry).exit_code == 0
    assert store.serving("yesno").primary == 3
    refused = cli("registry", "remove", "yesno", 3, "--registry", registry)
    assert refused.exit_code == 2 and "serves now" in refused.output and store.versions("yesno") == [1, 2, 3]
    assert cli("registry", "remove", "yesno", 1, "--registry", registry).exit_code == 0
    assert store.versions("yesno") == [2, 3]
    assert cli("registry", "remove", "yesno", 3, "--force", "--registry", registry).exit_code == 0
    assert store.serving("yesno").primary == 2
    assert cli("registry", "remove", "yesno", "--registry", registry).exit_code == 2
    assert cli("registry", "remove", "yesno", "--force", "--registry", registry).exit_code == 0
    assert "yesno" not in store.tasks()


@pytest.mark.parametrize(("args", "message"), [
    (("pin", "yesno", 9), "yesno has no v9; versions: [1]"),
    (("pin", "nope", 1), "has no task 'nope'"),
    (("promote", "yesno", 1, "--canary", "150%"), "must be above 0 % and below 100 %"),
    (("promote", "yesno", 1, "--canary", "0"), "must be above 0 % and below 100 %"),
    (("promote", "yesno", 1, "--canary", "10%"), "yesno v1 serves already"),
    (("rollback", "yesno"), "no good version older than v1"),
    (("remove", "yesno", 1), "yesno v1 serves now"),
    (("remove", "yesno", 4), "has no yesno/v4"),
])
def test_bad_registry_commands_are_refused_and_change_nothing(registry, args, message):
    before = sorted(str(p.relative_to(registry)) for p in registry.rglob("*"))
    result = cli("registry", *args, "--registry", registry)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(str(p.relative_to(registry)) for p in registry.rglob("*")) == before


@pytest.mark.parametrize("args", [("show", "yesno"), ("pin", "yesno", 1), ("promote", "yesno", 1, "--canary", "5%"),
                                  ("rollback", "yesno"), ("remove", "yesno", 1)])
def test_a_damaged_rollout_file_is_named_by_every_command(registry, args):
    (registry / "yesno" / "rollout.json").write_text("{not json")
    result = cli("registry", *args, "--registry", registry)
    assert result.exit_code == 2 and "yesno/rollout.json" in result.output and "fix or delete it" in result.output
    assert "Traceback" not in result.output and Registry(registry).versions("yesno") == [1]


def test_registry_eval_reproduces_the_published_score(good, registry, tmp_path):
    _, run = good
    # The run's eval split, as a data file: the rows its predictions came from, in their order.
    rows = []
    for line in (run / "predictions" / "yesno" / "adapter.jsonl").read_text().splitlines():
        path, _, number = json.loads(line)["where"].rpartition(":")
        rows.append(Path(path).read_text().splitlines()[int(number) - 1])
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(rows) + "\n")
    result = cli("registry", "eval", "yesno", "--data", data, "--registry", registry)
    assert result.exit_code == 0, result.output
    published = Registry(registry).read("yesno", 1).metrics["adapter"]
    assert published > 0
    assert f"yesno v1 chrf = {published:.3f}" in result.output and f"on {len(rows)} examples" in result.output


def test_registry_eval_names_the_rows_its_template_cannot_fill(registry, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fine", "label": "yes"}) + "\n" + json.dumps({"label": "no"}) + "\n")
    result = cli("registry", "eval", "yesno", "--data", data, "--registry", registry)
    assert result.exit_code == 2
    assert f"{data}:2: row lacks ['text']" in result.output


def test_a_gate_needs_enough_eval_examples(tmp_path, tiny_base):
    spec = load_spec(gated_spec(tmp_path, tiny_base, {"min": 0.5}))  # 12 eval examples per task
    check_run(spec, RunOptions(output=tmp_path / "run", registry=tmp_path / "reg"))
    strict = load_spec(gated_spec(tmp_path, tiny_base, {"min": 0.5, "min_eval_examples": 20}))
    with pytest.raises(SpecError, match=r"publish.gate judges versions on the eval split, which has 12 examples"):
        check_run(strict, RunOptions(output=tmp_path / "run", registry=tmp_path / "reg"))


def test_a_gate_without_a_rule_is_a_spec_error_with_its_line(tmp_path, tiny_base):
    with pytest.raises(SpecError, match=r"tasks.yaml:\d+: publish.gate: .*a gate needs min, no_worse or both"):
        load_spec(gated_spec(tmp_path, tiny_base, {"min_eval_examples": 5}))


def test_shared_exports_go_through_the_same_gate(tmp_path, tiny_base):
    spec = gated_spec(tmp_path, tiny_base, {"min": 1.01}, max_steps=4, eval_every=None)  # no score reaches it
    result = CliRunner().invoke(app, ["shared", "--config", str(spec), "--registry", str(tmp_path / "reg"),
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == REJECTED_EXIT, result.output
    store = Registry(tmp_path / "reg")
    assert {t: store.read(t, 1).rejected for t in store.tasks()} == {"yesno": True, "echo": True}
    assert store.served() == {}


def test_a_shared_export_worse_than_the_per_task_adapter_is_marked_and_the_better_one_keeps_serving(
        registry, tmp_path, tiny_base):
    """Negative transfer, made certain: the shared run barely trains. `no_worse: 0` is prefer-the-better."""
    spec = gated_spec(tmp_path, tiny_base, {"no_worse": 0.0, "min_eval_examples": 5},
                      max_steps=1, learning_rate=1e-7, eval_every=None)
    result = CliRunner().invoke(app, ["shared", "--config", str(spec), "--registry", str(registry),
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == REJECTED_EXIT, result.output
    store = Registry(registry)
    per_task = store.read("yesno", 1).metrics["adapter"]
    assert f"{per_task:.3f} (better)" in result.output
    assert "negative transfer: yesno's shared export scores" in result.output
    assert store.read("yesno", 2).trained_by == "mtft-train shared" and store.read("yesno", 2).rejected
    assert store.serving("yesno").primary == 1
    assert store.serving("echo").primary == 1  # no per-task echo adapter to be worse than
