"""Every request field the router knows, and what happens to it on the base model and on a task adapter.

A field is honoured (`PASS`: vLLM carries it out; on an adapter the router carries it into the
completion it sends), accepted because it cannot change the answer (`INERT`: metadata,
cache hints), or refused with a 400 that names it and says why. A field in none of these
tables is refused too: vLLM would log it and ignore it, and a client must never believe a
dropped field was honoured. A refused field is still accepted at a value that asks for
nothing (`harmless`: `store: false`, `tools: []`, `modalities: ["text"]`).

Task adapters answer through their task's trained prompt (the registry's template), so what
would change that prompt -- tools, a system message, another chat template -- is refused on
them, and chat requests become completions (`proxy.exchange`): chat's `logprobs` are reshaped,
`max_completion_tokens` is `max_tokens`. The tables are also the "what the endpoint supports"
reference (docs/openai-api.md is generated from `reference_table`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import APIError

PASS = "honoured"
INERT = "accepted, no effect on the answer"


@dataclass(frozen=True)
class Field:
    base: str
    """PASS, INERT, or why it is refused on the base model."""
    adapter: str
    """the same on a task adapter."""
    harmless: tuple = ()
    """values accepted wherever the field is refused: they ask for nothing."""
    note: str = ""


def _same(rule: str, note: str = "", harmless: tuple = ()) -> Field:
    return Field(rule, rule, harmless, note)


def _adapter_refuses(why: str, harmless: tuple = (), note: str = "") -> Field:
    return Field(PASS, why, harmless, note)


_NOT_STORED = "is not supported: the router stores nothing (send the whole input with each request)"
_TEXT_ONLY = "is not supported: the endpoint serves text only"
_TEMPLATE = ("is refused on a task adapter: the task answers through the prompt it was trained on; "
             "send it to model 'base' to use it")
_TOOLS = ("is refused on a task adapter: the task was trained without tools, so its answers cannot call "
          "them; send tool requests to model 'base'")
_ECHO = "is refused on a task adapter: it would echo the task's rendered prompt, not yours"

# Fields vLLM's completions and chat requests both take, with the same meaning: on an adapter the
# router carries them into the completion it sends (vLLM's CompletionRequest fields).
SHARED: dict[str, Field] = {
    "model": _same(PASS, "a task, `task@vN`, 'base' or an alias ('auto', 'mtft'): see routing"),
    "stream": _same(PASS),
    "stream_options": _same(PASS, "`include_usage` adds the usage chunk; the router always reads usage itself"),
    "max_tokens": _same(PASS, "adapter default: the task's max_new_tokens"),
    "temperature": _same(PASS, "default 0 (greedy) on every route, as in evaluation; with n > 1, 1"),
    "top_p": _same(PASS), "n": _same(PASS), "seed": _same(PASS),
    "stop": _same(PASS, "adapter default: the task's stop strings"),
    "presence_penalty": _same(PASS), "frequency_penalty": _same(PASS), "logit_bias": _same(PASS),
    "logprobs": _same(PASS, "chat on an adapter: reshaped into chat's `logprobs.content`"),
    "user": _same(PASS, "also keeps a client on one side of a canary split"),
    "response_format": _same(PASS, "`json_object` and `json_schema` constrain the answer on adapters too"),
    "structured_outputs": _same(PASS, "vLLM's structured outputs (json, regex, choice, grammar)"),
    # vLLM's sampling and output extras
    **{name: _same(PASS) for name in (
        "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search", "stop_token_ids",
        "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
        "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side", "allowed_token_ids",
        "bad_words", "return_token_ids", "return_tokens_as_token_ids", "logprob_token_ids",
        "return_token_offsets", "priority", "request_id", "cache_salt", "kv_transfer_params", "ec_transfer_params",
        "vllm_xargs", "add_special_tokens", "session_id", "thinking_token_budget", "repetition_detection",
        "watermarking", "stream_interval", "routed_experts_prompt_start")},
    "mm_payload": _same(_TEXT_ONLY), "return_mm_kwargs": _same(_TEXT_ONLY, harmless=(False,)),
    "echo": _adapter_refuses(_ECHO, (False,)),
    "prompt_logprobs": _same(PASS, "on an adapter: of the rendered prompt"),
    # OpenAI's fields that vLLM does not read
    "metadata": _same(INERT, "nothing is stored"),
    "safety_identifier": _same(INERT), "prompt_cache_key": _same(INERT, "vLLM caches shared prefixes by itself"),
    "prompt_cache_retention": _same(INERT), "prompt_cache_options": _same(INERT),
    "service_tier": _same("is not supported: one tier serves every request", harmless=("auto", "default")),
    "store": _same(_NOT_STORED, harmless=(False,)),
}

COMPLETION: dict[str, Field] = {
    **SHARED,
    "prompt": _same(PASS, "on an adapter: the task input, rendered with the task's template"),
    "suffix": _same(PASS, "vLLM refuses it"),
    "best_of": _same("is not supported: vLLM removed best_of; ask for n answers instead", harmless=(1,)),
    "prompt_embeds": _adapter_refuses("is refused on a task adapter: embeddings bypass the task's template"),
}

CHAT: dict[str, Field] = {
    **SHARED,
    "messages": _same(PASS, "on an adapter: one user message, the task input (see multi-turn)"),
    "max_completion_tokens": _same(PASS),
    "top_logprobs": _same(PASS),
    "tools": _adapter_refuses(_TOOLS, ([],), "base: vLLM refuses them unless started with a tool parser"),
    "tool_choice": _adapter_refuses(_TOOLS, ("none",)),
    "parallel_tool_calls": _same(INERT, "no tool calls on adapters"),
    "functions": _same("is not supported: deprecated by OpenAI; use tools", harmless=([],)),
    "function_call": _same("is not supported: deprecated by OpenAI; use tool_choice", harmless=("none",)),
    "reasoning_effort": _adapter_refuses(_TEMPLATE), "include_reasoning": _adapter_refuses(_TEMPLATE, (True,)),
    "return_prompt_text": _adapter_refuses(_TEMPLATE, (False,)),
    "chat_template": _adapter_refuses(_TEMPLATE), "chat_template_kwargs": _adapter_refuses(_TEMPLATE),
    "documents": _adapter_refuses(_TEMPLATE), "add_generation_prompt": _adapter_refuses(_TEMPLATE, (True,)),
    "continue_final_message": _adapter_refuses(_TEMPLATE, (False,)),
    "media_io_kwargs": _same(_TEXT_ONLY), "mm_processor_kwargs": _same(_TEXT_ONLY),
    "audio": _same(_TEXT_ONLY), "modalities": _same(_TEXT_ONLY, harmless=(["text"],)),
    "prediction": _same("is not supported: predicted outputs need speculative decoding the server does not run"),
    "web_search_options": _same("is not supported: the server has no web search"),
    "verbosity": _same("is not supported: no model here takes a verbosity setting"),
    "moderation": _same("is not supported: the server runs no moderation"),
}


def check(sent: Mapping[str, object], fields: Mapping[str, Field], adapter: bool) -> None:
    """Refuse (400, naming the field) the first field of the request that would not be honoured."""
    for name, value in sent.items():
        field = fields.get(name)
        if field is None:
            raise APIError(400, f"unknown field {name!r}: neither OpenAI's API nor vLLM's extras have it "
                           "(see docs/openai-api.md for the fields this endpoint takes)", "unknown_field", name)
        rule = field.adapter if adapter else field.base
        if rule not in (PASS, INERT) and value is not None and value not in field.harmless:
            raise APIError(400, f"{name!r} {rule}", "unsupported_field", name)


def honoured(sent: Mapping[str, object], fields: Mapping[str, Field], adapter: bool) -> dict:
    """The fields vLLM carries out (after `check`): inert ones and harmless values stay here."""
    return {name: value for name, value in sent.items()
            if (fields[name].adapter if adapter else fields[name].base) == PASS}


def reference_table(fields: Mapping[str, Field]) -> list[str]:
    """Markdown rows: field | base model | task adapter | notes."""
    def cell(rule: str, harmless: tuple) -> str:
        if rule in (PASS, INERT):
            return rule
        allowed = f" (accepted: {', '.join(f'`{json.dumps(v)}`' for v in harmless)})" if harmless else ""
        return "400" + allowed

    rows = ["| field | base model | task adapter | notes |", "|---|---|---|---|"]
    for name in sorted(fields):
        f = fields[name]
        why = f.adapter if f.adapter not in (PASS, INERT) else f.base if f.base not in (PASS, INERT) else ""
        notes = "; ".join(n for n in (f.note, why.removeprefix("is ")) if n)
        rows.append(f"| `{name}` | {cell(f.base, f.harmless)} | {cell(f.adapter, f.harmless)} | {notes} |")
    return rows


def reference() -> str:
    """The three tables as docs/openai-api.md shows them (`python -m mtft.router.fields` prints it)."""
    from .responses import FIELDS as RESPONSES

    sections = [("Completions", "/v1/completions", COMPLETION), ("Chat completions", "/v1/chat/completions", CHAT),
                ("Responses", "/v1/responses", RESPONSES)]
    return "\n".join(f"### {title} (`{path}`)\n\n" + "\n".join(reference_table(table)) + "\n"
                     for title, path, table in sections)


if __name__ == "__main__":
    print(reference())
