"""Every request field is honoured or refused: the router's field tables, without HTTP.

The tables must name every field the installed `openai` SDK can send and every field vLLM's
requests take, so a new field in either fails here instead of being dropped unseen; the
end-to-end check of what each one does is tests/test_openai_api.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtft.registry import AdapterRecord, BaseModelRef, PromptTemplate
from mtft.router import APIError, RouteRequest, RouteTable, route
from mtft.router import fields as router_fields
from mtft.router import responses
from mtft.router.fields import CHAT, COMPLETION, PASS, check, honoured, reference_table
from mtft.router.proxy import CHAT as CHAT_PATH
from mtft.router.proxy import COMPLETIONS, ChatBody, CompletionBody, chat_answer, chat_logprobs, exchange, parse

DOCS = Path(__file__).parents[1] / "docs" / "openai-api.md"
BASE_REF = BaseModelRef(name="tiny", path="/models/tiny", fingerprint="sha256:" + "1" * 64)
TASK = AdapterRecord(task="yesno", version=1, prefix="yesno: ", base_model=BASE_REF, rank=8, alpha=16,
                     target_modules=["q_proj"], metric="exact_match", max_new_tokens=5,
                     template=PromptTemplate(input="{text}", target="{label}", prompt="{prefix}{input}\nA:"))
TABLE = RouteTable(current={"yesno": TASK}, base_names=frozenset({"base"}), base_target="tiny")


def sdk_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsBase.__annotations__) if hasattr(module, "CompletionCreateParamsBase") \
        else set(module.ResponseCreateParamsBase.__annotations__)


def test_every_field_the_openai_sdk_sends_is_in_a_table():
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.responses import response_create_params

    assert sdk_fields(completion_create_params) - set(COMPLETION) == set()
    assert sdk_fields(chat_params) - set(CHAT) == set()
    assert sdk_fields(response_create_params) - set(responses.FIELDS) == set()


def test_every_field_vllm_takes_is_in_a_table():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    assert set(CompletionRequest.model_fields) - set(COMPLETION) == set()
    assert set(ResponsesRequest.model_fields) - set(responses.FIELDS) == set()
    assert set(ChatCompletionRequest.model_fields) - set(CHAT) == set()
    # what a chat request to a task carries into its completion, vLLM's completions take
    carried = {name for name, field in router_fields.SHARED.items() if field.adapter == PASS}
    assert carried - set(CompletionRequest.model_fields) == set()


@pytest.mark.parametrize(("sent", "adapter", "param", "message"), [
    ({"guided_json": {}}, False, "guided_json", "unknown field 'guided_json'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, True, "tools", "trained without tools"),
    ({"tool_choice": "required"}, True, "tool_choice", "trained without tools"),
    ({"chat_template": "{{ x }}"}, True, "chat_template", "the prompt it was trained on"),
    ({"store": True}, False, "store", "stores nothing"),
    ({"modalities": ["text", "audio"]}, False, "modalities", "text only"),
    ({"prediction": {"type": "content", "content": "x"}}, False, "prediction", "predicted outputs"),
    ({"echo": True}, True, "echo", "rendered prompt"),
    ({"service_tier": "flex"}, False, "service_tier", "one tier"),
])
def test_a_field_that_would_not_be_honoured_is_a_400_naming_it(sent, adapter, param, message):
    with pytest.raises(APIError, match=message) as caught:
        check(sent, CHAT, adapter)
    assert (caught.value.status, caught.value.param) == (400, param)


@pytest.mark.parametrize("sent", [{"store": False}, {"tools": []}, {"tool_choice": "none"}, {"modalities": ["text"]},
                                  {"metadata": {"a": "b"}}, {"service_tier": "auto"}, {"echo": False}])
def test_values_that_ask_for_nothing_are_accepted_and_not_sent_on(sent):
    check(sent, CHAT, adapter=True)
    assert honoured(sent, CHAT, adapter=True) == {}


def test_a_chat_request_to_a_task_carries_every_sampling_field_into_its_completion():
    body = ChatBody.model_validate({
        "model": "yesno", "messages": [{"role": "user", "content": "yesno: is it?"}], "top_k": 3, "min_p": 0.1,
        "repetition_penalty": 1.2, "seed": 4, "logprobs": True, "top_logprobs": 2, "metadata": {"x": "y"},
        "response_format": {"type": "json_object"}, "stop_token_ids": [5], "max_completion_tokens": 3})
    body, wanted = parse(body.model_dump(exclude_unset=True), CHAT_PATH, None)  # routing reads the user message
    call = exchange(body, CHAT_PATH, route(wanted, TABLE))
    assert call.payload == {"model": "yesno-v1", "prompt": "yesno: is it?\nA:", "stream": False, "top_k": 3,
                            "min_p": 0.1, "repetition_penalty": 1.2, "seed": 4, "logprobs": 2,
                            "response_format": {"type": "json_object"}, "stop_token_ids": [5], "max_tokens": 3,
                            "temperature": 0.0}
    assert call.top_logprobs == 2


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it?"}], "messages[0]"),
    ([{"role": "user", "content": "is it?"}, {"role": "assistant", "content": "no"},
      {"role": "user", "content": "and now?"}], "messages[1]"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_a_task_answers_one_user_message_and_refuses_what_it_would_drop(messages, param):
    body = ChatBody.model_validate({"model": "yesno", "messages": messages})
    with pytest.raises(APIError, match="messages|text only") as caught:
        exchange(body, CHAT_PATH, route(RouteRequest(model="yesno"), TABLE))
    assert (caught.value.status, caught.value.param) == (400, param)
    base = ChatBody.model_validate({"model": "base", "messages": messages})
    assert exchange(base, CHAT_PATH, route(RouteRequest(model="base"), TABLE)).payload["messages"] == messages


def test_chat_logprobs_come_back_in_chats_shape_most_likely_first():
    completion = {"id": "cmpl-1", "created": 1, "choices": [{"index": 0, "text": "yes", "finish_reason": "stop",
                  "logprobs": {"tokens": ["y", "es"], "token_logprobs": [-0.1, -0.2], "text_offset": [0, 1],
                               "top_logprobs": [{"y": -0.1, "n": -2.5, "m": -3.0}, {"es": -0.2, "o": -1.0}]}}]}
    answer = chat_answer(completion, "yesno-v1", top=2)
    assert answer["choices"][0]["logprobs"] == {"refusal": None, "content": [
        {"token": "y", "logprob": -0.1, "bytes": [121], "top_logprobs": [
            {"token": "y", "logprob": -0.1, "bytes": [121]}, {"token": "n", "logprob": -2.5, "bytes": [110]}]},
        {"token": "es", "logprob": -0.2, "bytes": [101, 115], "top_logprobs": [
            {"token": "es", "logprob": -0.2, "bytes": [101, 115]}, {"token": "o", "logprob": -1.0, "bytes": [111]}]}]}
    assert chat_logprobs(completion["choices"][0]["logprobs"], None) is None


def test_top_logprobs_without_logprobs_is_refused():
    body = ChatBody.model_validate({"model": "yesno", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    with pytest.raises(APIError, match="needs 'logprobs'"):
        exchange(body, CHAT_PATH, route(RouteRequest(model="yesno"), TABLE))


def test_completion_fields_on_a_task_reach_vllm_with_the_prompt_rendered():
    body = CompletionBody.model_validate({"model": "yesno", "prompt": "is it?", "logprobs": 1, "best_of": 1,
                                          "structured_outputs": {"choice": ["yes", "no"]}})
    call = exchange(body, COMPLETIONS, route(RouteRequest(model="yesno"), TABLE))
    assert call.payload == {"model": "yesno-v1", "prompt": "yesno: is it?\nA:", "stream": False, "logprobs": 1,
                            "structured_outputs": {"choice": ["yes", "no"]}, "max_tokens": 5, "temperature": 0.0}


def test_a_responses_request_is_the_chat_request_it_means():
    chat = responses.to_chat({"model": "yesno", "input": "is it?", "instructions": "be brief", "max_output_tokens": 4,
                              "top_logprobs": 2, "text": {"format": {"type": "json_schema", "name": "a",
                                                                      "schema": {"type": "object"}}},
                              "store": False, "metadata": {"k": "v"}})
    assert chat == {"model": "yesno", "top_logprobs": 2, "logprobs": True, "max_completion_tokens": 4,
                    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it?"}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}
    items = responses.to_chat({"model": "base", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi "}, {"type": "input_text", "text": "there"}]}]})
    assert items["messages"] == [{"role": "user", "content": "hi there"}]


@pytest.mark.parametrize(("data", "param"), [
    ({"model": "base", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"model": "base", "input": "x", "store": True}, "store"),
    ({"model": "base", "input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"model": "base", "input": "x", "include": ["file_search_call.results"]}, "include"),
    ({"model": "base", "input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]}, "input[0]"),
    ({"model": "base", "input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"model": "base", "input": "x", "text": {"format": {"type": "grammar"}}}, "text.format"),
])
def test_responses_fields_the_server_cannot_honour_are_400s(data, param):
    with pytest.raises(APIError) as caught:
        responses.to_chat(data)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_errors_about_a_translated_responses_request_name_the_clients_fields():
    def system_refused():
        return APIError(400, "messages[0] has role 'system'", "unsupported_message", "messages[0]")

    error = responses.renamed(system_refused(), {"input": [{"role": "system", "content": "x"}]})
    assert (error.param, error.message) == ("input[0]", "input[0] has role 'system'")
    error = responses.renamed(system_refused(), {"instructions": "be brief", "input": "x"})
    assert (error.param, error.message) == ("instructions", "'instructions' is a system message")
    error = responses.renamed(APIError(400, "'response_format' x", "unsupported_field", "response_format"), {})
    assert (error.param, error.message) == ("text.format", "'text.format' x")


def test_the_docs_table_is_the_code_table():
    text = DOCS.read_text()
    for title, table in (("Completions", COMPLETION), ("Chat completions", CHAT), ("Responses", responses.FIELDS)):
        section = re.search(rf"### {title} \(`[^`]+`\)\n\n((?:\|.*\n)+)", text)
        assert section, f"docs/openai-api.md lacks the {title} table"
        assert section.group(1).splitlines() == reference_table(table), (
            f"docs/openai-api.md's {title} table differs from the code: regenerate it with "
            "`python -m mtft.router.fields`")
