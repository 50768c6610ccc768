"""Learned routing: a request that names no task goes to the served task its input is most like.

Pure tests of the profile and the index on the demo tasks' real data, then route() over a
route table, then the real router and vLLM (the session stack of tests/serving.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from mtft.registry import (
    ROUTING_FILE,
    AdapterRecord,
    BaseModelRef,
    ProfileError,
    PromptTemplate,
    Registry,
    RoutingProfile,
    checksum,
    read_profile,
)
from mtft.registry.routing_profile import KEEP, build_profile, featurize
from mtft.router import APIError
from mtft.router.learned import DEFAULT_THRESHOLD, LearnedIndex
from mtft.router.table import BASE, NotFound, RouteRequest, RouteTable, route

pytest_plugins = ["serving"]

DEMO_DATA = Path(__file__).resolve().parents[1] / "train" / "demo" / "data"
DEMO = ("ticket", "contact", "isodate")
UNLIKE_ANY = "{[]}#### @@@@ ~~~~ ^^^^ |||| %%%% &&&& ++++"


def inputs(task: str, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (DEMO_DATA / f"{task}.{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def profiles() -> dict[str, RoutingProfile]:
    return {task: build_profile(inputs(task, "train"), f"sha256:{task}") for task in DEMO}


def test_a_profile_keeps_the_heaviest_buckets_heaviest_first_and_is_reproducible():
    """The centroid is cut to the KEEP buckets most inputs share; a republish computes the same profile."""
    draw = random.Random(0)
    texts = ["the shared part of every input, then " + "".join(draw.choices("qwxzjkvy", k=12)) for _ in range(600)]
    profile = build_profile(texts, "sha256:t")
    weights = profile.weights
    assert len(profile.buckets) == KEEP < len({b for t in texts for b in featurize(t)[0][0]})
    assert weights == sorted(weights, reverse=True) and abs(sum(w * w for w in weights) - 1) < 1e-4
    shared = set(featurize("the shared part of every input, then")[0][0].tolist())
    assert shared <= set(profile.buckets[: len(shared) + 16])
    assert build_profile(texts, "sha256:t") == profile


def test_held_out_demo_inputs_go_to_their_task(profiles):
    index = LearnedIndex(profiles)
    for task in DEMO:
        decisions = [index.classify(text) for text in inputs(task, "eval")]
        routed = [d.task for d in decisions if d.score >= DEFAULT_THRESHOLD]
        assert routed.count(task) / len(decisions) >= 0.95, (task, routed)


def test_an_input_unlike_every_task_scores_below_the_threshold(profiles):
    decision = LearnedIndex(profiles).classify(UNLIKE_ANY)
    assert decision.score < DEFAULT_THRESHOLD / 2


def test_only_allowed_tasks_are_ever_chosen(profiles):
    index = LearnedIndex(profiles)
    for allowed in (frozenset({"isodate"}), frozenset({"contact", "isodate"}), frozenset({"base"})):
        for task in DEMO:
            for text in inputs(task, "eval")[:10]:
                decision = index.classify(text, allowed)
                assert decision is None if allowed == {"base"} else decision.task in allowed


def test_adding_a_task_does_not_change_another_tasks_gate_score(profiles):
    """The gate depends on the chosen task's own profile only; the IDF only picks the task."""
    text = inputs("isodate", "eval")[0]
    alone = LearnedIndex({"isodate": profiles["isodate"]}).classify(text)
    together = LearnedIndex(profiles).classify(text)
    assert (alone.task, together.task) == ("isodate", "isodate")
    assert alone.score == pytest.approx(together.score)


def test_an_empty_index_decides_nothing():
    assert LearnedIndex({}).classify("anything") is None


# -- publishing --------------------------------------------------------------------------------------
@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """Files publish accepts: a config and LoRA weights for exactly the modules it names."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}))
    save_file({f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight": torch.zeros(8, 8)
               for m in ("q_proj", "v_proj") for ab in "AB"}, folder / "adapter_model.safetensors")
    return folder


def record(task: str = "ticket") -> AdapterRecord:
    return AdapterRecord(
        task=task, prefix=f"{task}: ", template=PromptTemplate(input="{text}", target="{label}"),
        base_model=BaseModelRef(name="tiny", path="/tiny", fingerprint="sha256:0"),
        rank=8, alpha=16, target_modules=["q_proj", "v_proj"], metric="accuracy", max_new_tokens=4)


def test_publish_writes_the_profile_into_the_version_and_no_training_text(tmp_path, adapter_dir):
    registry = Registry(tmp_path / "reg")
    train = inputs("ticket", "train")
    published = registry.publish(adapter_dir, record(), routing_inputs=train)
    folder = registry.version_dir("ticket", published.version)
    profile = read_profile(folder, published.checksum)
    assert profile.examples == len(train) and profile.adapter_checksum == checksum(folder)
    raw = (folder / ROUTING_FILE).read_text()
    words = {w.strip(".,?!").lower() for text in train for w in text.split() if len(w) >= 4 and w.isalpha()}
    assert not [w for w in words if w in raw.lower()]  # numbers only: no word of any input
    plain = registry.publish(adapter_dir, record())
    assert not (registry.version_dir("ticket", plain.version) / ROUTING_FILE).exists()


@pytest.mark.parametrize(("damage", "message"), [
    (None, "is missing: published without a routing profile"),
    ("{not json", "cannot read routing profile"),
    ('{"schema_version": 1}', "cannot read routing profile .*adapter_checksum"),
    ("other-version", "was made for another adapter"),
    ("bucket-out-of-range", r"buckets must lie in \[0, 2\*\*20\)"),
])
def test_a_missing_or_damaged_profile_is_refused_with_its_path(tmp_path, adapter_dir, damage, message):
    registry = Registry(tmp_path / "reg")
    published = registry.publish(adapter_dir, record(), routing_inputs=inputs("ticket", "train"))
    path = registry.version_dir("ticket", published.version) / ROUTING_FILE
    data = json.loads(path.read_text())
    if damage is None:
        path.unlink()
    elif damage == "other-version":
        path.write_text(json.dumps({**data, "adapter_checksum": "sha256:feed"}))
    elif damage == "bucket-out-of-range":
        path.write_text(json.dumps({**data, "buckets": [1 << 20, *data["buckets"][1:]]}))
    else:
        path.write_text(damage)
    with pytest.raises(ProfileError, match=message) as caught:
        read_profile(path.parent, published.checksum)
    assert str(path) in str(caught.value)


# -- route() over a route table ----------------------------------------------------------------------
def table_of(profiles, tasks=DEMO, threshold: float | None = DEFAULT_THRESHOLD, default: str | None = BASE):
    table = RouteTable(default=default, learned_threshold=threshold)
    for task in tasks:
        table = table.with_adapter(record(task).model_copy(update={"version": 1}), profiles[task])
    return table


def test_un_prefixed_inputs_are_routed_learned_with_their_score(profiles):
    table = table_of(profiles)
    for task in DEMO:
        text = inputs(task, "eval")[1]
        chosen = route(RouteRequest(text=text), table)
        assert (chosen.matched, chosen.task, chosen.text) == ("learned", task, text)
        assert chosen.score >= DEFAULT_THRESHOLD


def test_explicit_routes_win_over_learned(profiles):
    table = table_of(profiles)
    date = inputs("isodate", "eval")[0]
    assert route(RouteRequest(model="ticket", text=date), table).matched == "model"
    assert route(RouteRequest(task_header="contact", text=date), table).task == "contact"
    assert (route(RouteRequest(text="ticket: " + date), table).matched,
            route(RouteRequest(text="ticket: " + date), table).task) == ("prefix", "ticket")
    assert route(RouteRequest(model="base", text=date), table).matched == "base"


def test_an_input_unlike_every_task_takes_the_default_route(profiles):
    chosen = route(RouteRequest(text=UNLIKE_ANY), table_of(profiles))
    assert (chosen.matched, chosen.task) == ("default", BASE) and chosen.score < DEFAULT_THRESHOLD
    assert route(RouteRequest(text=UNLIKE_ANY), table_of(profiles, default="ticket")).task == "ticket"
    with pytest.raises(NotFound, match="no task matches"):
        route(RouteRequest(text=UNLIKE_ANY), table_of(profiles, default=None))


def test_learned_routing_off_sends_everything_unnamed_to_the_default(profiles):
    table = table_of(profiles, threshold=None)
    chosen = route(RouteRequest(text=inputs("isodate", "eval")[0]), table)
    assert (chosen.matched, chosen.score) == ("default", None)


def test_a_key_limited_to_some_tasks_is_only_routed_among_them(profiles):
    table = table_of(profiles)
    for task in DEMO:
        for text in inputs(task, "eval")[:8]:
            chosen = route(RouteRequest(text=text, allowed=frozenset({"isodate"})), table)
            assert chosen.task in ("isodate", BASE)
    assert route(RouteRequest(text=inputs("ticket", "eval")[0], allowed=frozenset({"base"})), table).task == BASE


def test_hot_adds_and_version_swaps_change_what_is_learnable(profiles):
    table = table_of(profiles, tasks=("ticket", "contact"))
    date = inputs("isodate", "eval")[0]
    assert route(RouteRequest(text=date), table).task != "isodate"
    table = table.with_adapter(record("isodate").model_copy(update={"version": 1}), profiles["isodate"])
    assert route(RouteRequest(text=date), table).task == "isodate"
    table = table.with_adapter(record("isodate").model_copy(update={"version": 2}))  # v2 has no profile
    assert route(RouteRequest(text=date), table).task != "isodate"
    assert table.learned_names == {"ticket-v1", "contact-v1"}
    assert "isodate-v1" not in table.profiles  # a replaced version's profile is dropped
    assert route(RouteRequest(text=inputs("ticket", "eval")[0]), table.without_task("ticket")).task != "ticket"


def test_the_option_is_declared_once_and_off_turns_the_index_off(tmp_path):
    import httpx
    import typer

    from mtft.router import RouterConfig
    from mtft.router.live import LiveTable
    from mtft.serve.cli import app

    options = {o for p in typer.main.get_command(app).params for o in (*p.opts, *p.secondary_opts)}
    assert {"--learned-routing", "--no-learned-routing", "--learned-threshold"} <= options
    config = dict(registry=tmp_path, backends=["http://127.0.0.1:9"], base_model="m", base_name="m",
                  base_fingerprint="sha256:0", max_rank=8)
    assert LiveTable(RouterConfig(**config), httpx.AsyncClient()).table.learned_threshold == DEFAULT_THRESHOLD
    assert LiveTable(RouterConfig(**config, learned_routing=False), httpx.AsyncClient()).table.learned_threshold is None


# -- through the real router and vLLM (the session stack: tiny adapters, demo-task inputs) ------------
LEARNED = {"lr-ticket": ("yesno", "ticket"), "lr-date": ("echo", "isodate")}  # task: (adapter copied, inputs)


def wait_for(client, task: str, timeout_s: float = 60.0) -> None:
    import time

    import openai

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.completions.create(model=task, prompt="x", max_tokens=1)
            return
        except openai.NotFoundError:
            time.sleep(0.1)
    raise TimeoutError(f"{task} not served after {timeout_s} s")


@pytest.fixture(scope="module")
def learnable(stack_session):
    """Two tasks with routing profiles of demo-task inputs, published while serving; withdrawn after."""
    import openai

    stack_session.wait_ready()
    client = openai.OpenAI(base_url=stack_session.url + "/v1", api_key=stack_session.api_key, max_retries=0)
    for task, (copied, kind) in LEARNED.items():
        stack_session.publish_copy(copied, task=task, prefix=f"{task}: ", routing_inputs=inputs(kind, "train"))
    for task in LEARNED:
        wait_for(client, task)
    yield client
    for task in LEARNED:
        stack_session.admin("DELETE", f"/{task}").raise_for_status()


def asked(client, text: str, chat: bool = False, **options):
    if chat:
        raw = client.chat.completions.with_raw_response.create(
            model="mtft", messages=[{"role": "user", "content": text}], max_tokens=2, **options)
    else:
        raw = client.completions.with_raw_response.create(model="mtft", prompt=text, max_tokens=2, **options)
    raw.parse()
    return raw.headers



def routed_to(client, text: str) -> str | None:
    """The task that answered an un-named request; None for a 404 (nothing like it, no default)."""
    import openai

    try:
        return asked(client, text)["x-mtft-task"]
    except openai.NotFoundError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_un_prefixed_requests_reach_their_tasks_adapter(learnable, chat):
    for task, (_, kind) in LEARNED.items():
        for text in inputs(kind, "eval")[:4]:
            headers = asked(learnable, text, chat)
            assert (headers["x-mtft-route"], headers["x-mtft-task"], headers["x-mtft-adapter"]) == (
                "learned", task, f"{task}-v1"), text
            assert float(headers["x-mtft-learned-score"]) >= DEFAULT_THRESHOLD


@pytest.mark.slow
def test_explicit_routes_are_unchanged_and_unlike_inputs_get_the_default(learnable, stack):
    import openai

    date = inputs("isodate", "eval")[0]
    raw = learnable.completions.with_raw_response.create(model="lr-ticket", prompt=date, max_tokens=2)
    assert (raw.headers["x-mtft-route"], raw.headers["x-mtft-task"]) == ("model", "lr-ticket")
    assert asked(learnable, "lr-ticket: " + date)["x-mtft-route"] == "prefix"
    with pytest.raises(openai.NotFoundError, match="no task matches"):  # this stack has no --default
        asked(learnable, UNLIKE_ANY)
    metrics = httpx_get(stack.url + "/metrics")
    assert 'mtft_learned_score_count{route="learned"}' in metrics
    assert 'mtft_requests_total{adapter="lr-date-v1",route="learned",status="200",task="lr-date"}' in metrics


def httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10).text


@pytest.mark.slow
def test_a_task_limited_key_is_never_routed_outside_its_tasks(learnable, stack):
    import openai

    limited = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.limited_key, max_retries=0)
    for task, (_, kind) in LEARNED.items():
        for text in inputs(kind, "eval")[:3]:
            assert routed_to(learnable, text) == task  # any task may: its own
            # yesno only: yesno, or nothing like the text it may use and no default (404, never a 403)
            assert routed_to(limited, text) in ("yesno", None)


@pytest.mark.slow
def test_a_hot_added_task_becomes_routable_and_a_damaged_profile_only_unroutable(learnable, stack):
    import os
    import shutil

    from mtft.registry import Registry

    contact = inputs("contact", "eval")[0]
    assert routed_to(learnable, contact) != "lr-contact"
    stack.publish_copy("yesno", task="lr-contact", prefix="lr-contact: ", routing_inputs=inputs("contact", "train"))
    wait_for(learnable, "lr-contact")
    assert (asked(learnable, contact)["x-mtft-route"], asked(learnable, contact)["x-mtft-task"]) == (
        "learned", "lr-contact")
    stack.admin("DELETE", "/lr-contact").raise_for_status()

    # a version whose routing.json is damaged: served by name, never learned, serving goes on
    scratch = Registry(stack.registry.parent / "scratch-damaged")
    stack.publish_copy("yesno", scratch, task="lr-broken", prefix="lr-broken: ", routing_inputs=inputs("contact", "train"))
    (scratch.version_dir("lr-broken", 1) / ROUTING_FILE).write_text("{damaged")
    staged = stack.registry / ".staging" / "lr-broken-copy"
    shutil.copytree(scratch.version_dir("lr-broken", 1), staged)
    (stack.registry / "lr-broken").mkdir()
    os.rename(staged, stack.registry / "lr-broken" / "v1")  # appears whole, as a publish would
    wait_for(learnable, "lr-broken")
    served = {r["task"]: r for r in stack.admin("GET").json()["served"]}
    assert served["lr-broken"]["learned"] is False and served["lr-ticket"]["learned"] is True
    assert routed_to(learnable, contact) != "lr-broken"
    assert asked(learnable, inputs("ticket", "eval")[0])["x-mtft-task"] == "lr-ticket"
    assert "lr-broken-v1 is not routable by learned routing: cannot read routing profile" in (
        stack.state_dir / "router.log").read_text()
    stack.admin("DELETE", "/lr-broken").raise_for_status()


def test_a_model_naming_a_task_not_served_now_is_never_learned_routed(profiles):
    table = replace(table_of(profiles, tasks=("ticket", "contact")),
                    known_tasks=frozenset({"ticket", "contact", "isodate"}))
    date = inputs("isodate", "eval")[0]
    with pytest.raises(APIError, match="task 'isodate' is not served now"):  # withdrawn or removed
        route(RouteRequest(model="isodate", text=date), table)
    assert route(RouteRequest(model="auto", text=inputs("ticket", "eval")[0]), table).matched == "learned"
    lenient = replace(table, route_unknown_models=True)
    assert route(RouteRequest(model="isodate", text=date), lenient).matched == "default"
    assert route(RouteRequest(model="gpt-4o", text=inputs("ticket", "eval")[0]), lenient).matched == "learned"


@pytest.mark.slow
def test_training_publishes_a_routing_profile_of_the_training_inputs(trained):
    _, options, _ = trained
    registry = Registry(options.registry)
    for task, record in registry.latest().items():
        profile = read_profile(registry.version_dir(task, record.version), record.checksum)
        assert profile.examples == 36, task  # the tiny spec: 48 rows, a quarter held out for eval
