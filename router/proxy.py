"""What the router sends to vLLM for a routed request, and how vLLM's answer goes back.

Task routes are rendered with `mtft.registry.render_prompt` -- the function
training used -- and sent to vLLM's `/v1/completions` under the adapter's
name, whatever endpoint the client called: a chat request to a task answers
in chat shape (and chat-chunk shape when streamed), built from the completion.
Base routes are sent with only `model` replaced. Every answer and stream chunk goes
back in one shape, OpenAI's (`shaped`): vLLM's own extras (`token_ids`,
`kv_transfer_params`, `stop_reason`, ...) only when the request asked for them, and
`model` the public name of what answered (the adapter, or the base model's public name).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from mtft.registry import render_prompt

from .errors import APIError
from .table import Route, RouteRequest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# Sampling fields a chat request may carry over to the completion it becomes.
SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
            "logit_bias", "user", "max_tokens")
# vLLM-only answer fields, kept when the request set the field that asks for them.
ASKED_FOR = {"return_token_ids": ("token_ids", "prompt_token_ids"), "prompt_logprobs": ("prompt_logprobs",),
             "kv_transfer_params": ("kv_transfer_params",)}
_TOP = ("id", "object", "created", "model", "choices", "usage")
_CHOICE = ("index", "text", "message", "delta", "logprobs", "finish_reason")
_MESSAGE_OPTIONAL = ("tool_calls", "function_call", "refusal", "annotations", "audio")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not read go to vLLM untouched
    model: str | None = None
    prompt: str | list[str]
    stream: bool = False


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message]
    stream: bool = False


@dataclass(frozen=True)
class Exchange:
    """One upstream call: where, what, and how to turn its answer into the client's."""

    path: str
    payload: dict
    chat_from_completion: bool
    client_wants_usage: bool
    asked: frozenset[str] = frozenset()
    """vLLM-only answer fields the client asked for (`ASKED_FOR`)."""


def parse(raw: bytes, path: str, task_header: str | None) -> tuple[CompletionBody | ChatBody, RouteRequest]:
    """The validated body and what routing looks at (400 for bad JSON or fields)."""
    try:
        data = orjson.loads(raw)  # a few times faster than json's on a request; nesting past 1024 is an error
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    kind = ChatBody if path == CHAT else CompletionBody
    try:
        body = kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"invalid field {param!r}: {first['msg']}", "invalid_request", param) from exc
    if isinstance(body, ChatBody):
        users = [m for m in body.messages if m.role == "user"]
        text = users[-1].text() if users else None
    else:
        text = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if body.prompt else None)
    return body, RouteRequest(model=body.model, task_header=task_header, text=text)


def exchange(body: CompletionBody | ChatBody, path: str, route: Route) -> Exchange:
    sent = body.model_dump(exclude_unset=True)
    wants_usage = bool((sent.get("stream_options") or {}).get("include_usage"))
    asked = frozenset(f for key, fields in ASKED_FOR.items() if sent.get(key) not in (None, False) for f in fields)
    if route.record is None:
        # Greedy by default here too: one endpoint, one default (OpenAI's own is 1.0).
        payload = {"temperature": 0.0, **sent, "model": route.upstream_model}
        return Exchange(path, _with_usage(payload, body.stream), False, wants_usage, asked)
    record = route.record
    if isinstance(body, ChatBody):
        payload = {key: sent[key] for key in SAMPLING if key in sent}
        if "max_completion_tokens" in sent and "max_tokens" not in payload:
            payload["max_tokens"] = sent["max_completion_tokens"]
        payload["prompt"] = render_prompt(record.template, record.prefix, route.text or "")
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        rendered = [render_prompt(record.template, record.prefix, _strip(p, record.prefix)) for p in prompts]
        payload = {**sent, "prompt": rendered[0] if isinstance(body.prompt, str) else rendered}
    payload["model"] = route.upstream_model
    payload["stream"] = body.stream
    # Defaults are the evaluation's: greedy, the task's answer length and stop strings.
    payload.setdefault("max_tokens", record.max_new_tokens)
    payload.setdefault("temperature", 0.0)
    if record.stop:
        payload.setdefault("stop", record.stop)
    chat = isinstance(body, ChatBody)
    return Exchange(COMPLETIONS, _with_usage(payload, body.stream), chat, wants_usage, frozenset() if chat else asked)


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def _with_usage(payload: dict, stream: bool) -> dict:
    """Streams ask vLLM for a final usage chunk so token metrics work; the client sees it only if it asked."""
    if stream:
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return payload


def shaped(data: dict, model: str, asked: frozenset[str] = frozenset()) -> dict:
    """vLLM's answer or stream chunk with OpenAI's fields only (and those in `asked`), answered by `model`."""
    out = {key: data[key] for key in _TOP if data.get(key) is not None}
    out["model"] = model
    out["choices"] = [_choice(c, asked) for c in data.get("choices") or ()]
    for key in asked:
        if key in data:
            out[key] = data[key]
    return out


def _choice(choice: dict, asked: frozenset[str]) -> dict:
    out = {key: choice[key] for key in _CHOICE if key in choice}
    for key in ("message", "delta"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items()
                        if k in ("role", "content") or (k in _MESSAGE_OPTIONAL and v is not None)}
    for key in asked:
        if key in choice:
            out[key] = choice[key]
    return out


def chat_answer(completion: dict, model: str) -> dict:
    return {
        "id": "chatcmpl-" + str(completion.get("id", "")).removeprefix("cmpl-"),
        "object": "chat.completion",
        "created": completion.get("created", int(time.time())),
        "model": model,
        "choices": [
            {"index": c["index"], "message": {"role": "assistant", "content": c.get("text", "")},
             "finish_reason": c.get("finish_reason"), "logprobs": None}
            for c in completion.get("choices", [])
        ],
        "usage": completion.get("usage"),
    }


def chat_chunk(chunk: dict, started: set[int], model: str) -> dict:
    """A completion stream chunk as a chat stream chunk; the first delta of each choice carries the role."""
    choices = []
    for c in chunk.get("choices", []):
        delta = {"content": c.get("text", "")}
        if c["index"] not in started:
            started.add(c["index"])
            delta = {"role": "assistant", **delta}
        choices.append({"index": c["index"], "delta": delta, "finish_reason": c.get("finish_reason"),
                        "logprobs": None})
    out = {"id": "chatcmpl-" + str(chunk.get("id", "")).removeprefix("cmpl-"), "object": "chat.completion.chunk",
           "created": chunk.get("created", int(time.time())), "model": model, "choices": choices}
    if chunk.get("usage") is not None:
        out["usage"] = chunk["usage"]
    return out


def upstream_error(status: int, raw: bytes) -> APIError:
    """vLLM's own error, re-raised in our shape (its status, its message, the field it names)."""
    param = None
    try:
        data = json.loads(raw)
        error = data.get("error", data)
        message = error.get("message") if isinstance(error, dict) else str(error)
        param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    except (ValueError, AttributeError):
        message = raw[:500].decode(errors="replace")
    return APIError(status, f"vLLM: {message}", "upstream_error", param)
