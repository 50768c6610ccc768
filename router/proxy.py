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
from .fields import CHAT as CHAT_FIELDS
from .fields import COMPLETION as COMPLETION_FIELDS
from .fields import SHARED, check, honoured
from .table import Route, RouteRequest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
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
    top_logprobs: int | None = None
    """chat from a completion: alternatives per token the client asked for; None: no logprobs."""


def load_json(raw: bytes) -> dict:
    """A request body as a JSON object (400 for anything else)."""
    try:
        data = orjson.loads(raw)  # a few times faster than json's on a request; nesting past 1024 is an error
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return data


def parse(data: dict, path: str, task_header: str | None) -> tuple[CompletionBody | ChatBody, RouteRequest]:
    """The validated body and what routing looks at (400 for bad fields)."""
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
    """The vLLM call for a routed request, after refusing (400) any field it would not honour."""
    sent = body.model_dump(exclude_unset=True)
    chat = isinstance(body, ChatBody)
    on_adapter = route.record is not None
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    check(sent, fields, on_adapter)
    wants_usage = bool((sent.get("stream_options") or {}).get("include_usage"))
    asked = frozenset(f for key, names in ASKED_FOR.items() if sent.get(key) not in (None, False) for f in names)
    payload = honoured(sent, fields, on_adapter)
    if not on_adapter:
        payload = _greedy_by_default({**payload, "model": route.upstream_model})
        return Exchange(path, _with_usage(payload, body.stream), False, wants_usage, asked)
    record = route.record
    if chat:
        payload = {key: value for key, value in payload.items() if key in SHARED}
        if "max_completion_tokens" in sent and "max_tokens" not in payload:
            payload["max_tokens"] = sent["max_completion_tokens"]
        top = _chat_logprobs(sent)
        payload.pop("logprobs", None)
        if top is not None:
            payload["logprobs"] = top
        _one_user_message(body.messages)
        payload["prompt"] = render_prompt(record.template, record.prefix, route.text or "")
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        rendered = [render_prompt(record.template, record.prefix, _strip(p, record.prefix)) for p in prompts]
        payload["prompt"] = rendered[0] if isinstance(body.prompt, str) else rendered
        top = None
    payload["model"] = route.upstream_model
    payload["stream"] = body.stream
    # Defaults are the evaluation's: greedy, the task's answer length and stop strings.
    payload.setdefault("max_tokens", record.max_new_tokens)
    _greedy_by_default(payload)
    if record.stop:
        payload.setdefault("stop", record.stop)
    return Exchange(COMPLETIONS, _with_usage(payload, body.stream), chat, wants_usage, asked, top)


def _greedy_by_default(payload: dict) -> dict:
    """`payload`, greedy unless it sets a temperature: as the evaluation decodes (OpenAI's own default is
    1.0). A request for several answers (`n` > 1) keeps vLLM's default, since greedy ones would all be one."""
    if (payload.get("n") or 1) == 1:
        payload.setdefault("temperature", 0.0)
    return payload


def _chat_logprobs(sent: dict) -> int | None:
    """How many alternatives per token a chat request asked for (0: the chosen token's only); None: no logprobs."""
    top = sent.get("top_logprobs")
    if not sent.get("logprobs"):
        if top is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "invalid_request", "top_logprobs")
        return None
    if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
        raise APIError(400, f"'top_logprobs' must be an integer from 0 to 20, not {top!r}", "invalid_request",
                       "top_logprobs")
    return top or 0


def _one_user_message(messages: list[Message]) -> None:
    """Refuse a chat request to a task adapter unless it is one user message: routing took the task
    input (`Route.text`) from it, and a task answers one input through the prompt it was trained on,
    so a system message or earlier turns would be dropped unseen. The refusal names the message."""
    for i, message in enumerate(messages):
        if message.role != "user":
            raise APIError(400, f"messages[{i}] has role {message.role!r}: a task adapter answers one user "
                           "message through the prompt it was trained on (its own system text included); "
                           "send conversations to model 'base'", "unsupported_message", f"messages[{i}]")
        if isinstance(message.content, list) and any(part.get("type") != "text" for part in message.content):
            raise APIError(400, f"messages[{i}] has a non-text part: the endpoint serves text only",
                           "unsupported_message", f"messages[{i}].content")
    if len(messages) != 1:
        raise APIError(400, f"{len(messages)} messages: a task adapter answers one user message (the task "
                       "input); earlier turns would be dropped, so send one turn, or the conversation to "
                       "model 'base'", "unsupported_message", "messages")


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


def chat_answer(completion: dict, model: str, top: int | None = None, asked: frozenset[str] = frozenset()) -> dict:
    """A completion as the chat completion the client asked for (logprobs in chat's shape)."""
    out = {
        "id": "chatcmpl-" + str(completion.get("id", "")).removeprefix("cmpl-"),
        "object": "chat.completion",
        "created": completion.get("created", int(time.time())),
        "model": model,
        "choices": [
            {"index": c["index"], "message": {"role": "assistant", "content": c.get("text", "")},
             "finish_reason": c.get("finish_reason"), "logprobs": chat_logprobs(c.get("logprobs"), top),
             **_asked(c, asked)}
            for c in completion.get("choices", [])
        ],
        "usage": completion.get("usage"),
    }
    return out | _asked(completion, asked)


def chat_chunk(chunk: dict, started: set[int], model: str, top: int | None = None,
               asked: frozenset[str] = frozenset()) -> dict:
    """A completion stream chunk as a chat stream chunk; the first delta of each choice carries the role."""
    choices = []
    for c in chunk.get("choices", []):
        delta = {"content": c.get("text", "")}
        if c["index"] not in started:
            started.add(c["index"])
            delta = {"role": "assistant", **delta}
        choices.append({"index": c["index"], "delta": delta, "finish_reason": c.get("finish_reason"),
                        "logprobs": chat_logprobs(c.get("logprobs"), top), **_asked(c, asked)})
    out = {"id": "chatcmpl-" + str(chunk.get("id", "")).removeprefix("cmpl-"), "object": "chat.completion.chunk",
           "created": chunk.get("created", int(time.time())), "model": model, "choices": choices}
    if chunk.get("usage") is not None:
        out["usage"] = chunk["usage"]
    return out | _asked(chunk, asked)


def _asked(data: dict, asked: frozenset[str]) -> dict:
    return {key: data[key] for key in asked if key in data}


def chat_logprobs(logprobs: dict | None, top: int | None) -> dict | None:
    """Completion logprobs (`tokens`, `token_logprobs`, `top_logprobs` as token -> logprob) in chat's shape:
    `{"content": [{token, logprob, bytes, top_logprobs: [the `top` most likely, most likely first]}]}`."""
    if top is None or logprobs is None:
        return None
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or ())
    content = []
    for token, logprob, alternatives in zip(logprobs.get("tokens") or (), logprobs.get("token_logprobs") or (), tops):
        ranked = sorted((alternatives or {}).items(), key=lambda item: -item[1])[:top]
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked]})
    return {"content": content, "refusal": None}


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
