"""Scaling out on real vLLM: `mtft-serve --replicas 2` and a `--vllm-only` backend behind one router.

One stack for this module: two vLLM replicas started by mtft-serve, and a third backend
started apart by `mtft-serve --vllm-only --max-lora-rank 8` (as on another machine) that
the router reaches with `--backend`. Four tasks whose adapters answer differently
(yesno, echo, and sign-flipped / scaled copies of them), yesno pinned on every backend.
Every answer is compared with HF + PEFT's offline answer for its task, so an answer from a
wrong adapter cannot pass. The module's stack is stopped before the session's one-backend
stack starts, so at most three vLLMs run at once (~2.5 GiB each).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serving import (API_KEY, Background, Load, RunningStack, answer, launch_stack, publish_changed, stop_stack,
                     wait_started)

from mtft.registry import Registry, render_prompt
from mtft.serve.stack import free_port

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow
TASKS = ("yesno", "echo", "flip", "loud")
TEXTS = ["the quick brown fox", "hello world paris", "a lazy dog jumps", "berlin london"]
COMMON = ("--dtype", "float32", "--kv-cache-gib", "1", "--vllm-arg=--max-model-len=256", "--vllm-arg=--seed=0")


def offline_answers(registry: Registry, tiny_base: Path) -> dict[tuple[str, str], str]:
    """HF + PEFT greedy answers for every (task, text), and the base model's for ("base", text)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.train import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ends = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    # vLLM's default max_tokens (16): the router leaves base requests as the client sent them.
    expected = dict(zip((("base", t) for t in TEXTS), generate(model, tokenizer, TEXTS, 16, ends, batch_size=1)))
    for task in TASKS:
        record = registry.latest()[task]
        model = PeftModel.from_pretrained(model, registry.version_dir(task, record.version))
        end_ids = ends if record.template.format == "chat" else ends[1:]
        prompts = [render_prompt(record.template, record.prefix, t) for t in TEXTS]
        expected |= dict(zip(((task, t) for t in TEXTS),
                             generate(model, tokenizer, prompts, record.max_new_tokens, end_ids, batch_size=1)))
        model = model.unload()
    return expected


@pytest.fixture(scope="module")
def scaled(trained, tiny_base, tmp_path_factory):
    """(stack, the --vllm-only backend, offline answers); both stopped at the module's end."""
    _, options, _ = trained
    folder = tmp_path_factory.mktemp("scale-out")
    registry = Registry(folder / "registry")
    shutil.copytree(options.registry, registry.root)
    publish_changed(registry, "yesno", "flip", scale=-4.0)
    publish_changed(registry, "echo", "loud", scale=3.0)
    expected = offline_answers(registry, tiny_base)
    for state in ("external", "stack"):
        (folder / state).mkdir()
    external = launch_stack(registry.root, folder / "external", free_port(), "--vllm-only", "--max-lora-rank", "8",
                            "--vllm-cpus", "1", *COMMON)  # beside replica 1: replica 0, killed below, restarts alone
    stack = launch_stack(registry.root, folder / "stack", free_port(), "--replicas", "2", "--max-lora-rank", "16",
                         "--backend", external.url, "--backend-timeout-s", "300", "--pin", "yesno",
                         "--backoff-max-s", "1", *COMMON)
    try:
        wait_started(external)
        wait_started(stack)
        yield stack, external, expected
    finally:
        for running in (stack, external):
            stop_stack(running)


def backends(stack: RunningStack) -> dict[str, dict]:
    return {b["url"]: b for b in stack.admin("GET").json()["backends"]}


def metric(stack: RunningStack, name: str, backend: str) -> float:
    line = next(line for line in httpx.get(stack.url + "/metrics").text.splitlines()
                if line.startswith(f'{name}{{backend="{backend}"}} '))
    return float(line.split()[-1])


@pytest.fixture
def client(scaled) -> openai.OpenAI:
    return openai.OpenAI(base_url=scaled[0].url + "/v1", api_key=API_KEY, max_retries=0)


def test_adapters_are_placed_on_k_backends_pinned_ones_on_all(scaled, client):
    stack, external, expected = scaled
    assert len(set(expected.values())) > len(TASKS), "the tasks must answer differently to catch a wrong adapter"
    held = {url: set(b["adapters"]) for url, b in backends(stack).items()}
    assert len(held) == 3 and external.url in held
    assert all({"yesno-v1", "mtft-base-zero"} <= names for names in held.values()), held
    for task in ("echo", "flip", "loud"):
        assert sum(f"{task}-v1" in names for names in held.values()) == 2, held  # --copies 2 of 3 backends
    for (task, text), offline in expected.items():
        assert client.completions.create(model=task, prompt=text).choices[0].text.strip() == offline, task


def test_a_version_that_one_backend_cannot_load_does_not_go_live_and_the_old_one_keeps_serving(scaled, client):
    stack, external, expected = scaled
    registry = Registry(stack.registry)
    # The same answers at rank 16: the replicas (cap 16) load it, the --vllm-only backend (cap 8) cannot.
    v2 = publish_changed(registry, "yesno", "yesno", rank=16, into=registry.root.parent / "yesno-r16")
    deadline = time.monotonic() + 30
    while not any(r["version"] == v2.version for r in stack.admin("GET").json()["rejected"]):
        assert time.monotonic() < deadline, stack.admin("GET").json()
        time.sleep(0.2)
    rejected = next(r for r in stack.admin("GET").json()["rejected"] if r["version"] == v2.version)
    assert f"{external.url} refused yesno-v2" in rejected["reasons"][0]
    assert "greater than max_lora_rank 8" in rejected["reasons"][0]
    assert all("yesno-v2" not in b["adapters"] for b in backends(stack).values())  # unloaded where it loaded
    for text in TEXTS:
        served, adapter = answer(client, "yesno", text)
        assert (served.strip(), adapter) == (expected[("yesno", text)], "yesno-v1")


def test_a_replica_killed_mid_traffic_fails_no_request_and_rejoins_reloaded(scaled, client):
    stack, _, expected = scaled
    replica = stack.state()["replicas"][0]
    before = backends(stack)[replica["url"]]["adapters"]
    jobs = list(expected)  # 4 tasks and the base model, 4 texts each
    # A burst around the kill, a trickle while the replica restarts (a burst then would starve
    # its start for minutes on 2 cores), a burst once it is back.
    with Load(client, jobs, threads=1, limit=3000, pause_s=0.5) as trickle:
        with Load(client, jobs, threads=3, limit=3000, pause_s=0.05) as burst, \
                Streams(client, ["echo", "loud"]) as streams:
            time.sleep(3)
            os.killpg(replica["pid"], signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(3)
        for state in ("out of rotation", "back in rotation"):
            deadline = time.monotonic() + 300
            while (metric(stack, "mtft_backend_healthy", replica["url"]) == 1) == (state == "out of rotation"):
                assert time.monotonic() < deadline, f"never {state}\n{stack.logs()}"
                time.sleep(0.25)
        rejoined, served = time.monotonic(), metric(stack, "mtft_backend_requests_total", replica["url"])
        with Load(client, jobs, threads=3, limit=3000, pause_s=0.05) as after:
            time.sleep(3)
        taken = metric(stack, "mtft_backend_requests_total", replica["url"]) - served
    assert stack.state()["replicas"][0]["pid"] != replica["pid"]  # restarted by mtft-serve
    answers = [a for load in (trickle, burst, after) for a in load.answers]
    print(f"replica back in rotation {rejoined - killed:.1f} s after the kill; {len(answers)} answers "
          f"({len(burst.answers)} in the burst around the kill), {taken:.0f} on the rejoined replica in 3 s; "
          f"streams: {streams.whole} whole, {streams.cut} cut with an error")
    assert [f for load in (trickle, burst, after) for f in load.failures] == []
    wrong = [(job, text) for job, text, _ in answers if text.strip() != expected[job]]
    assert not wrong, wrong[:5]
    assert taken > 0  # it takes traffic again
    assert streams.short == [], "a stream ended early without an error"
    assert set(before) <= set(backends(stack)[replica["url"]]["adapters"])  # its adapters are back
    # Reloaded before traffic: no request found an adapter missing on it (that path logs "lacks").
    assert "lacks" not in (stack.state_dir / "router.log").read_text()


class Streams(Background):
    """Streamed completions of 120 tokens in a loop, one thread per task: each ends whole or with an error."""

    TOKENS = 120

    def __init__(self, client: openai.OpenAI, tasks: list[str]):
        self.client = client
        self.whole, self.cut = 0, 0
        self.short: list[int] = []
        super().__init__(tasks)

    def _run(self, task: str) -> None:
        for _ in range(200):
            if self.stopping.is_set():
                return
            try:
                stream = self.client.completions.create(
                    model=task, prompt=TEXTS[0], max_tokens=self.TOKENS, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "stop": []})
                usage = [chunk.usage for chunk in stream if chunk.usage]
            except openai.APIError:
                self.cut += 1
                continue
            if usage and usage[-1].completion_tokens == self.TOKENS:
                self.whole += 1
            else:
                self.short.append(usage[-1].completion_tokens if usage else 0)

