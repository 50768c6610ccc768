"""Conformance: every request field × {base, task adapter} × {completions, chat, responses}, honoured or a 400.

Driven through the real stack (`mtft-serve`: vLLM + router) with the `openai` SDK. For each field of
the router's tables (tests/test_openai_fields.py holds those to the SDK's and vLLM's fields) one
request sets it: a refused field must come back as a 400 whose `param` names it; an honoured one
as an answer, checked for the field's effect where it has one the tiny model can show (`EFFECTS`),
or as vLLM's own 400 where vLLM refuses the value; an inert one as an answer. Streams are checked
against the same answers unstreamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import jsonschema
import openai
import pytest

from mtft.router import fields as router_fields
from mtft.router import responses as router_responses
from mtft.router.fields import INERT, PASS

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow

TARGETS = {"base": "base", "adapter": "echo"}  # echo: the chat-format task of the tiny spec
TABLES = {"completions": router_fields.COMPLETION, "chat": router_fields.CHAT,
          "responses": router_responses.FIELDS}
INPUT = "hello world paris"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}
SDK_NAMES = {}  # endpoint -> the fields the SDK's create() takes by name (the rest go in extra_body)


def sdk_names(endpoint: str) -> set[str]:
    if endpoint not in SDK_NAMES:
        from openai.types import completion_create_params
        from openai.types.chat import completion_create_params as chat_params
        from openai.types.responses import response_create_params

        module = {"completions": completion_create_params, "chat": chat_params}.get(endpoint)
        SDK_NAMES[endpoint] = (set(module.CompletionCreateParamsBase.__annotations__) if module else
                               set(response_create_params.ResponseCreateParamsBase.__annotations__))
    return SDK_NAMES[endpoint]


def send(client: openai.OpenAI, endpoint: str, target: str, **fields) -> dict:
    """One request through the SDK; the answer's JSON (the SDK raises on an error status)."""
    named = {k: v for k, v in fields.items() if k in sdk_names(endpoint)}
    extra = {k: v for k, v in fields.items() if k not in named}
    model = TARGETS[target]
    if endpoint == "completions":
        named.setdefault("prompt", INPUT)
        raw = client.completions.with_raw_response.create(model=model, extra_body=extra, **named)
    elif endpoint == "chat":
        named.setdefault("messages", [{"role": "user", "content": INPUT}])
        raw = client.chat.completions.with_raw_response.create(model=model, extra_body=extra, **named)
    else:
        named.setdefault("input", INPUT)
        raw = client.responses.with_raw_response.create(model=model, extra_body=extra, **named)
    raw.parse()  # the SDK reads it as its own type
    return raw.http_response.json()


def text_of(answer: dict, endpoint: str, choice: int = 0) -> str:
    if endpoint == "responses":
        return answer["output"][0]["content"][0]["text"]
    picked = answer["choices"][choice]
    return picked["text"] if endpoint == "completions" else picked["message"]["content"]


def tokens_out(answer: dict) -> int:
    usage = answer["usage"]
    return usage.get("completion_tokens", usage.get("output_tokens"))


def logprob_rows(answer: dict, endpoint: str) -> list[list[tuple[str, float]]]:
    """Per answer token: the alternatives returned, as (token, logprob), in the endpoint's own shape."""
    if endpoint == "completions":
        return [list(top.items()) for top in answer["choices"][0]["logprobs"]["top_logprobs"]]
    content = (answer["output"][0]["content"][0]["logprobs"] if endpoint == "responses"
               else answer["choices"][0]["logprobs"]["content"])
    return [[(t["token"], t["logprob"]) for t in row["top_logprobs"]] for row in content]


# A value per field that asks for something (refused fields: a value that is not harmless).
SAMPLES = {
    "max_tokens": 2, "max_completion_tokens": 2, "max_output_tokens": 2, "temperature": 0.0, "top_p": 0.9, "n": 2,
    "seed": 7, "stop": ["zz"], "presence_penalty": 0.1, "frequency_penalty": 0.1, "logit_bias": {"40": 100},
    "logprobs": {"completions": 2, "chat": True}, "top_logprobs": 2, "user": "client-1",
    "response_format": {"type": "json_schema", "json_schema": {"name": "yn", "schema": SCHEMA}},
    "text": {"format": {"type": "json_schema", "name": "yn", "schema": SCHEMA}},
    "include": ["message.output_text.logprobs"], "structured_outputs": {"choice": ["yes", "no"]},
    "top_k": 1, "min_p": 0.05, "repetition_penalty": 1.1, "length_penalty": 1.0, "use_beam_search": False,
    "stop_token_ids": [40], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 6,
    "skip_special_tokens": False, "spaces_between_special_tokens": False, "truncate_prompt_tokens": 3,
    "truncation_side": "left", "allowed_token_ids": [40, 41, 42], "bad_words": ["zzz"], "prompt_logprobs": 1,
    "return_token_ids": True, "return_tokens_as_token_ids": True, "logprob_token_ids": [40],
    "return_token_offsets": True, "priority": 0, "request_id": "conformance-1", "cache_salt": "salt-1",
    "kv_transfer_params": {"x": 1}, "ec_transfer_params": {"x": 1}, "vllm_xargs": {"x": 1},
    "add_special_tokens": False, "session_id": "session-1", "thinking_token_budget": 4,
    "repetition_detection": {"x": 1}, "watermarking": {"x": 1}, "stream_interval": 2,
    "routed_experts_prompt_start": 0, "mm_payload": {"x": 1}, "return_mm_kwargs": True, "echo": True,
    "metadata": {"team": "a"}, "safety_identifier": "s-1", "prompt_cache_key": "k-1",
    "prompt_cache_retention": "24h", "prompt_cache_options": {"x": 1}, "service_tier": "flex", "store": True,
    "suffix": "!", "best_of": 2, "prompt_embeds": "AAAA",
    "tools": {"chat": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              "responses": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
    "tool_choice": "required", "parallel_tool_calls": False, "functions": [{"name": "f"}], "function_call": "auto",
    "reasoning_effort": "low", "include_reasoning": False, "return_prompt_text": True,
    "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "chat_template_kwargs": {"x": 1},
    "documents": [{"title": "a", "text": "b"}], "continue_final_message": True, "add_generation_prompt": False,
    "media_io_kwargs": {"x": 1}, "mm_processor_kwargs": {"x": 1}, "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "verbosity": "low", "moderation": {"x": 1},
    "instructions": "Answer briefly.", "previous_response_id": "resp_1", "conversation": "conv_1",
    "background": True, "context_management": [{"type": "compaction"}], "max_tool_calls": 1,
    "prompt": {"id": "pmpt_1"}, "reasoning": {"effort": "low"}, "truncation": "auto", "image": {"x": 1},
    "access_programs": ["x"], "enable_response_messages": True,
    "previous_input_messages": [{"role": "user", "content": "x"}], "background_options": {"x": 1}, "stream_options": {"include_usage": True},
}
# Fields the request needs with it to mean something.
COMPANIONS = {("chat", "top_logprobs"): {"logprobs": True}, ("completions", "min_tokens"): {"max_tokens": 6},
              ("chat", "min_tokens"): {"max_tokens": 6}, ("completions", "logit_bias"): {"return_token_ids": True},
              ("chat", "logit_bias"): {"return_token_ids": True},
              ("completions", "allowed_token_ids"): {"return_token_ids": True},
              ("chat", "allowed_token_ids"): {"return_token_ids": True}}
SPECIAL = {"model", "prompt", "messages", "input", "stream"}  # every request sets these; tested on their own


def token_ids(answer: dict) -> list[int]:
    return answer["choices"][0]["token_ids"]


def valid_json(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


@dataclass(frozen=True)
class Context:
    reference: str
    """the endpoint's greedy answer on the target with nothing else set."""
    tokenizer: object


# What an honoured field does that the test can see: check(answer, endpoint, context) is true.
EFFECTS = {
    "max_tokens": lambda a, e, c: tokens_out(a) <= 2,
    "max_completion_tokens": lambda a, e, c: tokens_out(a) <= 2,
    "max_output_tokens": lambda a, e, c: tokens_out(a) <= 2,
    "n": lambda a, e, c: len(a["choices"]) == 2,
    "logprobs": lambda a, e, c: len(logprob_rows(a, e)) == tokens_out(a) and (
        e != "completions" or all(len(row) >= 2 for row in logprob_rows(a, e))),
    "top_logprobs": lambda a, e, c: [len(row) for row in logprob_rows(a, e)] == [2] * tokens_out(a),
    "include": lambda a, e, c: len(logprob_rows(a, e)) == tokens_out(a),
    "response_format": lambda a, e, c: valid_json(text_of(a, e)),
    "text": lambda a, e, c: valid_json(text_of(a, e)),
    "structured_outputs": lambda a, e, c: text_of(a, e) in ("yes", "no"),
    "min_tokens": lambda a, e, c: tokens_out(a) == 6,
    "logit_bias": lambda a, e, c: (text_of(a, e) == c.tokenizer.decode([40] * tokens_out(a)) if e == "responses"
                                   else set(token_ids(a)) == {40}),
    "allowed_token_ids": lambda a, e, c: set(token_ids(a)) <= {40, 41, 42},
    "return_token_ids": lambda a, e, c: len(token_ids(a)) == tokens_out(a),
    "prompt_logprobs": lambda a, e, c: a["choices"][0].get("prompt_logprobs") or a.get("prompt_logprobs"),
    "echo": lambda a, e, c: e != "completions" or text_of(a, e).startswith(INPUT),
    "top_k": lambda a, e, c: text_of(a, e) == c.reference,  # sent with temperature 1: top-1 sampling is greedy
    "instructions": lambda a, e, c: tokens_out(a) > 0,
}
WITH_TEMPERATURE_1 = {"top_k", "seed", "n"}
JSON_FIELDS = {"completions": "response_format", "chat": "response_format", "responses": "text"}


def json_companions(endpoint: str, tokenizer) -> dict:
    """The tiny random model wanders: JSON answers get room, and no whitespace token (the grammar allows
    whitespace between JSON tokens, and a random model takes it for ever)."""
    blank = {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}
    return {"logit_bias": blank, "max_output_tokens" if endpoint == "responses" else "max_tokens": 64}


def cases() -> list[tuple[str, str, str]]:
    return [(endpoint, name, target) for endpoint, table in TABLES.items() for name in sorted(table)
            if name not in SPECIAL for target in TARGETS]


@pytest.fixture(scope="module")
def tokenizer(trained):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trained[0].base_model)


@pytest.fixture(scope="module")
def references(stack_session) -> dict[tuple[str, str], str]:
    """Each endpoint's greedy answer on each target, with nothing else set."""
    stack_session.wait_ready()
    client = openai.OpenAI(base_url=stack_session.url + "/v1", api_key=stack_session.api_key, max_retries=0)
    return {(endpoint, target): text_of(send(client, endpoint, target), endpoint)
            for endpoint in TABLES for target in TARGETS}


@pytest.mark.parametrize(("endpoint", "name", "target"), cases())
def test_every_field_is_honoured_or_refused(client, references, tokenizer, endpoint, name, target):
    field = TABLES[endpoint][name]
    rule = field.adapter if target == "adapter" else field.base
    sample = SAMPLES[name]
    value = sample.get(endpoint, sample.get("chat")) if isinstance(sample, dict) and name in (
        "logprobs", "tools") else sample
    sent = {name: value, **COMPANIONS.get((endpoint, name), {})}
    if JSON_FIELDS[endpoint] == name:
        sent |= json_companions(endpoint, tokenizer)
    if name in WITH_TEMPERATURE_1:
        sent["temperature"] = 1.0
    if rule not in (PASS, INERT):
        with pytest.raises(openai.BadRequestError) as caught:
            send(client, endpoint, target, **sent)
        assert caught.value.body["param"] == name, caught.value.body
        return
    try:
        answer = send(client, endpoint, target, **sent)
    except openai.BadRequestError as exc:
        # vLLM looked at the value and refused it: honoured-or-400 holds, but a field with a
        # visible effect must work with its sample.
        assert rule == PASS and name not in EFFECTS and exc.body["code"] == "upstream_error", exc.body
        return
    effect = EFFECTS.get(name)
    assert effect is None or effect(answer, endpoint, Context(references[endpoint, target], tokenizer)), answer


def test_seeded_sampling_repeats_on_an_adapter(client):
    for endpoint in TABLES:
        length = {"max_output_tokens" if endpoint == "responses" else "max_tokens": 6}
        answers = [text_of(send(client, endpoint, "adapter", temperature=1.5, seed=seed, ignore_eos=True, **length),
                           endpoint) for seed in (11, 11, 12)]
        assert answers[0] == answers[1], (endpoint, answers)


@pytest.mark.parametrize("target", TARGETS)
def test_stop_strings_cut_the_answer_where_they_start(client, target):
    for endpoint in TABLES:
        length = {"max_output_tokens" if endpoint == "responses" else "max_tokens": 12}
        # no EOS, none of the task's own stop strings, special tokens shown: an answer long enough to cut
        length |= {"ignore_eos": True, "skip_special_tokens": False}
        reference = text_of(send(client, endpoint, target, stop=[], **length), endpoint)
        assert len(reference) >= 4, reference
        stop = reference[2:4]
        answer = text_of(send(client, endpoint, target, stop=[stop], **length), endpoint)
        assert answer == reference[:reference.index(stop)], (endpoint, stop, answer)


@pytest.mark.parametrize("target", TARGETS)
def test_a_json_schema_constrained_answer_validates_on_every_endpoint(client, tokenizer, target):
    for endpoint, field in JSON_FIELDS.items():
        answer = send(client, endpoint, target, **{field: SAMPLES[field]}, **json_companions(endpoint, tokenizer))
        assert valid_json(text_of(answer, endpoint))


def stream_text(client: openai.OpenAI, endpoint: str, target: str, **fields) -> tuple[str, list]:
    """A streamed answer's text and the logprobs that came with it, read through the SDK."""
    model, text, logprobs = TARGETS[target], [], []
    if endpoint == "completions":
        for chunk in client.completions.create(model=model, prompt=INPUT, stream=True, **fields):
            for choice in chunk.choices:
                text.append(choice.text)
                logprobs += choice.logprobs.tokens if choice.logprobs else []
    elif endpoint == "chat":
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": INPUT}],
                                                    stream=True, **fields):
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                logprobs += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    else:
        events = list(client.responses.create(model=model, input=INPUT, stream=True, **fields))
        kinds = [e.type for e in events]
        assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"] and kinds[-1] in ("response.completed",
                                                                              "response.incomplete"), kinds
        assert [e.sequence_number for e in events] == list(range(len(events)))
        for event in events:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
                logprobs += event.logprobs or []
        final = events[-1].response
        assert final.output_text == "".join(text) and final.usage.output_tokens > 0
    return "".join(text), logprobs


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("endpoint", TABLES)
def test_streams_equal_the_answers_unstreamed(client, references, tokenizer, endpoint, target):
    assert stream_text(client, endpoint, target)[0] == references[endpoint, target]
    logprobs = {"completions": {"logprobs": 1}, "chat": {"logprobs": True, "top_logprobs": 1},
                "responses": {"top_logprobs": 1}}[endpoint]
    text, rows = stream_text(client, endpoint, target, **logprobs)
    assert text == references[endpoint, target] and rows, (text, rows)
    field = JSON_FIELDS[endpoint]
    constrained = {field: SAMPLES[field], **json_companions(endpoint, tokenizer)}
    assert valid_json(stream_text(client, endpoint, target, extra_body=constrained)[0])


def test_a_misspelt_model_is_404_model_not_found_naming_the_nearest_task(client):
    for create in (lambda: client.completions.create(model="ehco", prompt="hi"),
                   lambda: client.chat.completions.create(model="ehco", messages=[{"role": "user", "content": "hi"}]),
                   lambda: client.responses.create(model="ehco", input="hi")):
        with pytest.raises(openai.NotFoundError) as caught:
            create()
        assert caught.value.body["code"] == "model_not_found" and "did you mean 'echo'?" in caught.value.body["message"]


def test_auto_and_mtft_let_the_router_choose(client):
    for model in ("auto", "mtft"):
        raw = client.completions.with_raw_response.create(model=model, prompt="echo: " + INPUT)
        assert (raw.headers["x-mtft-task"], raw.headers["x-mtft-route"]) == ("echo", "prefix")


def test_responses_route_and_render_like_chat(client):
    for how in ({"model": "echo", "input": INPUT}, {"model": "auto", "input": "echo: " + INPUT}):
        raw = client.responses.with_raw_response.create(**how)
        chat = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": INPUT}])
        assert raw.parse().output_text == chat.choices[0].message.content
        assert raw.headers["x-mtft-adapter"] == "echo-v1"


def test_a_conversation_sent_to_a_task_is_refused_naming_the_message(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "system", "content": "be brief"},
                                                              {"role": "user", "content": INPUT}])
    assert caught.value.body["param"] == "messages[0]"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="echo", input=INPUT, instructions="be brief")
    assert caught.value.body["param"] == "instructions"
    answer = client.chat.completions.create(model="base", messages=[{"role": "system", "content": "be brief"},
                                                                   {"role": "user", "content": INPUT}], max_tokens=3)
    assert answer.choices[0].message.content is not None


def test_keys_and_metrics_apply_to_the_responses_api(stack):
    limited = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.limited_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        limited.responses.create(model="echo", input=INPUT)
    assert limited.responses.create(model="yesno", input=INPUT).output_text is not None
    metrics = httpx.get(stack.url + "/metrics").text
    assert 'mtft_requests_total{adapter="yesno-v1",route="model",status="200",task="yesno"}' in metrics
