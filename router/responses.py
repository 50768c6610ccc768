"""OpenAI's Responses API (`/v1/responses`) as a chat request, and the chat answer back as a response.

A Responses request is translated into the chat request it means (`to_chat`) and then takes
chat's path through the router: the same routing, keys, metrics, field checks and, on a task
adapter, the same template rendering. The chat answer becomes a `response` object
(`from_chat`), and a chat stream becomes the Responses event stream (`Events`). Fields that ask
for what this server does not keep (stored responses, conversations, background runs) are
refused like any other: 400 naming the field (`FIELDS`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson

from .errors import APIError
from .fields import CHAT, INERT, PASS, Field, check

RESPONSES = "/v1/responses"
_NO_STATE = "is not supported: the server keeps no responses or conversations (send the whole input each time)"
_TOOLS = "is not supported on /v1/responses: send tool requests to /v1/chat/completions with model 'base'"
LOGPROBS_INCLUDE = "message.output_text.logprobs"

FIELDS: dict[str, Field] = {
    "model": Field(PASS, PASS, note="as in chat: a task, `task@vN`, 'base' or an alias"),
    "input": Field(PASS, PASS, note="a string, or messages with text parts (on an adapter: one user message)"),
    "instructions": Field(PASS, "is refused on a task adapter: it is a system message, and the task answers "
                          "through the prompt it was trained on; send it to model 'base'", note="a system message"),
    "stream": Field(PASS, PASS), "max_output_tokens": Field(PASS, PASS), "temperature": Field(PASS, PASS),
    "top_p": Field(PASS, PASS), "top_logprobs": Field(PASS, PASS), "user": Field(PASS, PASS),
    "text": Field(PASS, PASS, note="`format`: text, json_object or json_schema, as chat's response_format"),
    "include": Field(PASS, PASS, note=f"only {LOGPROBS_INCLUDE!r}", harmless=([],)),
    "metadata": Field(INERT, INERT), "safety_identifier": Field(INERT, INERT),
    "prompt_cache_key": Field(INERT, INERT), "prompt_cache_retention": Field(INERT, INERT),
    "prompt_cache_options": Field(INERT, INERT), "stream_options": Field(INERT, INERT),
    "parallel_tool_calls": Field(INERT, INERT),
    "service_tier": Field(*["is not supported: one tier serves every request"] * 2, harmless=("auto", "default")),
    "store": Field(_NO_STATE, _NO_STATE, harmless=(False,)),
    "previous_response_id": Field(_NO_STATE, _NO_STATE), "conversation": Field(_NO_STATE, _NO_STATE),
    "background": Field(*["is not supported: every response is answered in the request"] * 2, harmless=(False,)),
    "context_management": Field(_NO_STATE, _NO_STATE),
    "tools": Field(_TOOLS, _TOOLS, harmless=([],)), "tool_choice": Field(_TOOLS, _TOOLS, harmless=("none", "auto")),
    "max_tool_calls": Field(_TOOLS, _TOOLS),
    "prompt": Field(*["is not supported: the server keeps no prompt templates"] * 2),
    "reasoning": Field(*["is not supported: no model here is a reasoning model"] * 2),
    "truncation": Field(*["is not supported: a prompt too long for the model is an error"] * 2,
                        harmless=("disabled",)),
    "image": Field(*["is not supported: the endpoint serves text only"] * 2),
    "access_programs": Field(*["is not supported"] * 2), "background_options": Field(*["is not supported"] * 2),
    "moderation": Field(*["is not supported: the server runs no moderation"] * 2),
    "enable_response_messages": Field(*[_NO_STATE] * 2, harmless=(False,)),
    "previous_input_messages": Field(_NO_STATE, _NO_STATE),
}
# vLLM's extras on its own /v1/responses: carried into the chat request, with chat's rules.
VLLM_EXTRAS = ("cache_salt", "ec_transfer_params", "frequency_penalty", "ignore_eos", "include_stop_str_in_output",
               "kv_transfer_params", "logit_bias", "min_p", "presence_penalty", "priority", "repetition_penalty",
               "request_id", "seed", "session_id", "skip_special_tokens", "stop", "stop_token_ids",
               "structured_outputs", "top_k", "vllm_xargs", "watermarking", "chat_template_kwargs",
               "include_reasoning", "media_io_kwargs", "mm_payload", "mm_processor_kwargs", "return_mm_kwargs")
FIELDS |= {name: CHAT[name] for name in VLLM_EXTRAS}
# Chat's names for what a Responses request calls otherwise: errors name the client's field.
RENAMED = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input",
           "logprobs": "include"}


def to_chat(data: Mapping) -> dict:
    """The chat request a Responses request means (400 for what it cannot)."""
    check(data, FIELDS, adapter=False)
    chat = {key: data[key] for key in ("model", "stream", "temperature", "top_p", "user", "top_logprobs",
                                       *VLLM_EXTRAS) if key in data}
    messages = [{"role": "system", "content": data["instructions"]}] if data.get("instructions") else []
    chat["messages"] = messages + _messages(data.get("input"))
    if data.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = data["max_output_tokens"]
    include = data.get("include") or []
    unknown = [i for i in include if i != LOGPROBS_INCLUDE]
    if unknown:
        raise APIError(400, f"'include' {unknown} is not supported: only {LOGPROBS_INCLUDE!r}", "unsupported_field",
                       "include")
    if include or data.get("top_logprobs") is not None:
        chat["logprobs"] = True
    text = data.get("text") or {}
    if set(text) - {"format"}:
        raise APIError(400, f"'text' may only set 'format', not {sorted(set(text) - {'format'})}", "unsupported_field",
                       "text")
    if text.get("format"):
        chat["response_format"] = _response_format(text["format"])
    return chat


def _messages(given) -> list[dict]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise APIError(400, "'input' must be a string or a non-empty list of messages", "invalid_request", "input")
    messages = []
    for i, item in enumerate(given):
        if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
            raise APIError(400, f"input[{i}] is not a message: the endpoint takes text messages only (no tool "
                           "outputs, items or references)", "invalid_request", f"input[{i}]")
        content = item.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") in
                     ("input_text", "output_text", "text")]
            if len(parts) != len(content):
                raise APIError(400, f"input[{i}] has a non-text part: the endpoint serves text only",
                               "invalid_request", f"input[{i}].content")
            content = "".join(parts)
        messages.append({"role": item["role"], "content": content})
    return messages


def _response_format(given: Mapping) -> dict:
    kind = given.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = {key: given[key] for key in ("name", "schema", "strict", "description") if key in given}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(400, f"'text.format.type' {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                   "invalid_request", "text.format")


def renamed(error: APIError, request: Mapping) -> APIError:
    """A chat-path error about a translated request, naming the client's Responses field (`request`)."""
    if not error.param:
        return error
    head, _, rest = error.param.partition("[")
    if head == "messages" and rest:
        index, _, tail = rest.partition("]")
        shift = 1 if request.get("instructions") else 0
        param = "instructions" if shift and index == "0" else f"input[{int(index) - shift}]{tail}"
        if param == "instructions":
            error.message = error.message.replace("messages[0] has role 'system'", "'instructions' is a system message")
        error.message = error.message.replace(f"messages[{index}]", param)
    else:
        param = RENAMED.get(head, head) + (f"[{rest}" if rest else "")
        error.message = error.message.replace(f"'{head}'", f"'{param}'")
    error.param = param
    return error


def from_chat(answer: Mapping, request: Mapping) -> dict:
    """A (non-streamed) chat completion as the response object."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    incomplete = choice.get("finish_reason") == "length"
    item = _item(answer["id"], text, (choice.get("logprobs") or {}).get("content"), incomplete)
    return _response(answer, request, [item], answer.get("usage"), incomplete)


def _item(chat_id: str, text: str, logprobs: list | None, incomplete: bool = False, done: bool = True) -> dict:
    content = [_part(text, logprobs)] if done else []
    return {"type": "message", "id": "msg_" + str(chat_id).removeprefix("chatcmpl-"), "role": "assistant",
            "status": "in_progress" if not done else "incomplete" if incomplete else "completed", "content": content}


def _part(text: str, logprobs: list | None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _response(chat: Mapping, request: Mapping, output: list, usage: Mapping | None, incomplete: bool,
              status: str | None = None) -> dict:
    text_format = (request.get("text") or {}).get("format") or {"type": "text"}
    return {
        "id": "resp_" + str(chat.get("id", "")).removeprefix("chatcmpl-"), "object": "response",
        "created_at": chat.get("created", int(time.time())), "model": chat.get("model"),
        "status": status or ("incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete and not status else None,
        "error": None, "output": output, "usage": _usage(usage),
        "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "top_logprobs": request.get("top_logprobs"), "metadata": request.get("metadata") or {},
        "user": request.get("user"), "store": False, "background": False, "previous_response_id": None,
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "truncation": "disabled",
        "text": {"format": text_format}, "reasoning": None,
    }


def _usage(usage: Mapping | None) -> dict | None:
    if not usage:
        return None
    return {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


class Events:
    """A chat stream's chunks as the Responses event stream: created, the message's text deltas, completed."""

    def __init__(self, request: Mapping):
        self.request = request
        self.sequence = 0
        self.chat: dict = {}
        self.text: list[str] = []
        self.logprobs: list = []
        self.finish: str | None = None
        self.usage: Mapping | None = None

    def _event(self, kind: str, **fields) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def chunk(self, chunk: Mapping) -> list[bytes]:
        """The events one chat chunk makes."""
        events = []
        if not self.chat:
            self.chat = {"id": chunk.get("id", ""), "created": chunk.get("created"), "model": chunk.get("model")}
            started = _response(self.chat, self.request, [], None, False, status="in_progress")
            item = _item(self.chat["id"], "", None, done=False)
            events += [self._event("response.created", response=started),
                       self._event("response.in_progress", response=started),
                       self._event("response.output_item.added", output_index=0, item=item),
                       self._event("response.content_part.added", item_id=item["id"], output_index=0,
                                   content_index=0, part=_part("", None))]
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or ():
            delta = (choice.get("delta") or {}).get("content") or ""
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            self.finish = choice.get("finish_reason") or self.finish
            if delta or logprobs:
                self.text.append(delta)
                self.logprobs += logprobs
                events.append(self._event("response.output_text.delta", item_id=self._item_id(), output_index=0,
                                          content_index=0, delta=delta, logprobs=logprobs))
        return events

    def _item_id(self) -> str:
        return "msg_" + str(self.chat.get("id", "")).removeprefix("chatcmpl-")

    def done(self, usage: Mapping | None) -> list[bytes]:
        """The closing events, once the chat stream ended with [DONE] (`usage`: what vLLM counted)."""
        self.usage = usage or self.usage
        text, incomplete = "".join(self.text), self.finish == "length"
        item = _item(self.chat.get("id", ""), text, self.logprobs, incomplete)
        return [self._event("response.output_text.done", item_id=item["id"], output_index=0, content_index=0,
                            text=text, logprobs=self.logprobs),
                self._event("response.content_part.done", item_id=item["id"], output_index=0, content_index=0,
                            part=item["content"][0]),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event("response.incomplete" if incomplete else "response.completed",
                            response=_response(self.chat, self.request, [item], self.usage, incomplete))]

    def error(self, error: Mapping) -> bytes:
        return self._event("error", code=error.get("code"), message=error.get("message"), param=None, error=error)
