"""Load through the real stack: 1,000 requests, 64 at a time, over four tasks and the base model,
completions and chat, streamed and not, with a new version of one task published halfway.

The pass mark: no request fails, and every answer comes from the adapter its task maps to, by
the X-MTFT-Adapter header and by its text, which must equal HF + PEFT's greedy answer for that
adapter. The four tasks' adapters (yesno, echo, and yesno's weights with their B matrices scaled by
-4 and by -1), the new version (scaled by -2) and the base model answer each text differently
(checked first), so an answer from a wrong adapter cannot pass.
Before the new version is live every answer comes from the old one; once one answer came from
the new, every request sent after it gets the new one.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from serving import API_KEY, RunningStack, publish_changed, publish_copy

from mtft.registry import AdapterRecord, Registry, render_prompt

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow
REQUESTS, CONCURRENCY, SWAP_AT = 1000, 64, 500
TEXTS = ["the quick brown fox", "hello world paris", "a lazy dog jumps", "berlin london"]
WAYS = ("completion", "completion streamed", "chat", "chat streamed")
BASE_TOKENS = 8  # base requests name their max_tokens; task requests take their task's


@dataclass(frozen=True)
class Job:
    model: str  # a task, or "base"
    text: str
    way: str


@dataclass
class Outcome:
    job: Job
    sent: float
    done: float
    adapter: str = ""
    text: str = ""
    error: Exception | None = None


def hf_answers(tiny_base: Path, adapters: dict[str, tuple[Path, AdapterRecord]]) -> dict[tuple[str, str, bool], str]:
    """HF + PEFT greedy answers: (adapter name, text, chat?) -> answer; the base model under "base"
    (its chat answers through the tokenizer's chat template, as vLLM renders them)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.train import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ends = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=False) for t in TEXTS]
    expected = {}
    for chat, prompts in ((False, TEXTS), (True, chats)):
        answers = generate(model, tokenizer, prompts, BASE_TOKENS, ends, batch_size=1)
        expected |= {("base", t, chat): a for t, a in zip(TEXTS, answers)}
    for name, (folder, record) in adapters.items():
        model = PeftModel.from_pretrained(model, folder)
        end_ids = ends if record.template.format == "chat" else ends[1:]
        prompts = [render_prompt(record.template, record.prefix, t) for t in TEXTS]
        answers = generate(model, tokenizer, prompts, record.max_new_tokens, end_ids, batch_size=1)
        # A task renders chat and completion requests alike (the task's own template).
        expected |= {(name, t, chat): a for t, a in zip(TEXTS, answers) for chat in (False, True)}
        model = model.unload()
    return expected


@pytest.fixture
def load_tasks(stack: RunningStack, tiny_base: Path, tmp_path: Path):
    """(the tasks, the next version of `load-flip` ready to publish, expected answers); withdrawn at the end."""
    registry = Registry(stack.registry)
    for task, scale in (("load-flip", -4.0), ("load-mix", -1.0)):
        publish_changed(registry, "yesno", task, scale=scale, into=tmp_path / task)
    nxt = Registry(tmp_path / "next")
    publish_changed(registry, "yesno", "load-flip", scale=-2.0, into=tmp_path / "flip-next", target=nxt)
    tasks = {task: registry.latest()[task] for task in ("yesno", "echo", "load-flip", "load-mix")}
    adapters = {r.name: (registry.version_dir(t, r.version), r) for t, r in tasks.items()}
    swap_to = tasks["load-flip"].model_copy(update={"version": tasks["load-flip"].version + 1})
    adapters[swap_to.name] = (nxt.version_dir("load-flip", 1), nxt.latest()["load-flip"])
    expected = hf_answers(tiny_base, adapters)
    yield tasks, nxt, swap_to.name, expected
    for task in ("load-flip", "load-mix"):
        stack.admin("DELETE", f"/{task}")


def jobs(tasks: list[str]) -> list[Job]:
    models = [*tasks, "base"]
    every = [Job(m, t, w) for m in models for t in TEXTS for w in WAYS]
    return random.Random(0).choices(every, k=REQUESTS)


async def ask(client: openai.AsyncOpenAI, job: Job) -> Outcome:
    outcome = Outcome(job, time.monotonic(), 0.0)
    chat, streamed = job.way.startswith("chat"), job.way.endswith("streamed")
    api = client.chat.completions if chat else client.completions
    options = {"messages": [{"role": "user", "content": job.text}]} if chat else {"prompt": job.text}
    if job.model == "base":
        options["max_tokens"] = BASE_TOKENS
    try:
        if streamed:
            async with api.with_streaming_response.create(model=job.model, stream=True, **options) as response:
                outcome.adapter = response.headers["x-mtft-adapter"]
                pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or ""
                          async for c in await response.parse() if c.choices]
            outcome.text = "".join(pieces)
        else:
            raw = await api.with_raw_response.create(model=job.model, **options)
            outcome.adapter, choice = raw.headers["x-mtft-adapter"], raw.parse().choices[0]
            outcome.text = choice.message.content if chat else choice.text
    except Exception as exc:  # every failure counts; none is expected
        outcome.error = exc
    outcome.done = time.monotonic()
    return outcome


async def run_load(stack: RunningStack, tasks: list[str], swap) -> tuple[list[Outcome], float]:
    """Every job, CONCURRENCY in flight; `swap()` runs (in a thread) once SWAP_AT answers are in."""
    limit, finished = asyncio.Semaphore(CONCURRENCY), 0
    swapped = asyncio.Event()
    swap_started = 0.0

    async def one(client: openai.AsyncOpenAI, job: Job) -> Outcome:
        nonlocal finished, swap_started
        async with limit:
            outcome = await ask(client, job)
        finished += 1
        if finished == SWAP_AT:
            swap_started = time.monotonic()
            await asyncio.to_thread(swap)
            swapped.set()
        return outcome

    async with openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        outcomes = await asyncio.gather(*(one(client, job) for job in jobs(tasks)))
    assert swapped.is_set()
    return outcomes, swap_started


def test_a_thousand_mixed_requests_64_at_a_time_with_a_version_swap_fail_none_and_misroute_none(stack, load_tasks):
    tasks, nxt, new_name, expected = load_tasks
    models = httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    base_name = next(m["root"] for m in models if m["id"] == "base")
    old = {t: r.name for t, r in tasks.items()}
    for text in TEXTS:  # every adapter (and the base) answers each text its own way
        answers = [expected[(name, text, False)] for name in [*old.values(), new_name, "base"]]
        assert len(set(answers)) == len(answers), (text, answers)

    started = time.monotonic()
    outcomes, swap_at = asyncio.run(run_load(
        stack, list(tasks), lambda: publish_copy(nxt, "load-flip", Registry(stack.registry))))
    took = time.monotonic() - started

    failed = [(o.job, repr(o.error)) for o in outcomes if o.error]
    assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"
    allowed = {t: {name} for t, name in old.items()} | {"load-flip": {old["load-flip"], new_name}, "base": {base_name}}
    wrong = [(o.job, o.adapter) for o in outcomes if o.adapter not in allowed[o.job.model]]
    assert not wrong, f"{len(wrong)} answered by a wrong adapter, e.g. {wrong[:3]}"
    answered_by = {base_name: "base"}
    mismatched = [(o.job, o.adapter, o.text) for o in outcomes if o.text.strip() !=
                  expected[(answered_by.get(o.adapter, o.adapter), o.job.text, o.job.way.startswith("chat"))]]
    assert not mismatched, f"{len(mismatched)} answers differ from their adapter's offline answer: {mismatched[:3]}"

    swapped = sorted((o for o in outcomes if o.job.model == "load-flip"), key=lambda o: o.sent)
    first_new = min((o.done for o in swapped if o.adapter == new_name), default=None)
    assert first_new is not None, "the new version never answered"
    assert all(o.adapter == old["load-flip"] for o in swapped if o.done < swap_at)
    assert all(o.adapter == new_name for o in swapped if o.sent > first_new)
    by_way = {w: sum(o.job.way == w for o in outcomes) for w in WAYS}
    print(f"{len(outcomes)} requests ({by_way}) in {took:.1f} s, {CONCURRENCY} at a time; "
          f"{new_name} live {first_new - swap_at:.2f} s after its publish began; "
          f"{sum(o.adapter == old['load-flip'] for o in swapped)} answers from the old version, "
          f"{sum(o.adapter == new_name for o in swapped)} from the new")
