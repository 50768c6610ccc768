"""Prompt templates: the one code path that turns a task input into model text.

Training renders every example with these functions and the router renders
every served request with the same ones, reading the template from the
adapter's registry record. That is what makes a served answer equal the answer
the offline evaluation produced for the same input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FRAME_FIELDS = {"prefix", "input"}
SYSTEM_FOLD = "\n\n"  # between the system text and the user text where a template has no system role


def template_fields(text: str) -> list[str]:
    """The `{field}` placeholders of a template, in order of appearance."""
    return FIELD.findall(text)


def fill(text: str, values: Mapping[str, object]) -> str:
    """Replace `{field}` placeholders; other braces (JSON, code) stay literal."""
    return FIELD.sub(lambda m: str(values[m.group(1)]), text)


class PromptTemplate(BaseModel):
    """How a data row becomes a prompt and a target.

    `input` is written over the data's fields and yields the text a client
    would send (after the task prefix). `prompt` frames that text for the
    model in plain format; in chat format the user message is
    `{prefix}{input}` and the base model's chat template frames it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["plain", "chat"] = "plain"
    input: str = Field(description="text over the data fields, e.g. '{sentence}'")
    target: str = Field(description="answer over the data fields, e.g. '{label}'")
    prompt: str = Field(
        default="{prefix}{input}\n",
        description="plain format only: frame around the input; fields {prefix} and {input}",
    )
    system: str | None = Field(default=None, description="chat format only: system message (first in the user "
                               "turn where the base's chat template has no system role)")
    chat_template: str | None = Field(
        default=None,
        description="filled from the base model's tokenizer at training time (chat format)",
    )

    @model_validator(mode="after")
    def _check(self) -> PromptTemplate:
        problems = []
        unknown = set(template_fields(self.prompt)) - FRAME_FIELDS
        if unknown:
            problems.append(
                f"prompt may only use {{prefix}} and {{input}}, not {sorted(unknown)}; "
                "put data fields in 'input'"
            )
        if "{input}" not in self.prompt:
            problems.append("prompt must contain {input}")
        if self.format == "plain" and self.system is not None:
            problems.append("'system' needs format: chat")
        if not template_fields(self.input):
            problems.append("input must use at least one data field, e.g. '{text}'")
        if not self.target.strip():
            problems.append("target must not be empty")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def data_fields(self) -> set[str]:
        """Fields a data row must provide."""
        return set(template_fields(self.input)) | set(template_fields(self.target))


def render_input(template: PromptTemplate, row: Mapping[str, object]) -> str:
    return fill(template.input, row)


def render_target(template: PromptTemplate, row: Mapping[str, object]) -> str:
    return fill(template.target, row)


def render_prompt(template: PromptTemplate, prefix: str, text: str) -> str:
    """The exact model text for a task input `text` (without its prefix)."""
    if template.format == "plain":
        return fill(template.prompt, {"prefix": prefix, "input": text})
    if template.chat_template is None:
        raise ValueError("chat-format template has no chat_template; train it with a chat base model")
    user = f"{prefix}{text}"
    messages = []
    if template.system is not None and takes_system(template.chat_template):
        messages.append({"role": "system", "content": template.system})
    elif template.system is not None:
        user = f"{template.system}{SYSTEM_FOLD}{user}"
    messages.append({"role": "user", "content": user})
    return _render_chat(template.chat_template, messages)


def _render_chat(source: str, messages: list[dict[str, str]]) -> str:
    return _compile_chat(source).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")


@lru_cache(maxsize=32)
def takes_system(chat_template: str) -> bool:
    """Whether a chat template renders a system message. Some families' refuse one (Gemma's raises),
    others drop it unseen; on those the system text goes first in the user turn (`SYSTEM_FOLD`),
    the same in training and serving, since both render through here."""
    from jinja2.exceptions import TemplateError

    probe = "mtft-system-probe"
    try:
        rendered = _render_chat(chat_template, [{"role": "system", "content": probe}, {"role": "user", "content": "x"}])
    except TemplateError:
        return False
    return probe in rendered


@lru_cache(maxsize=32)
def _compile_chat(source: str):
    # Same environment settings transformers uses for apply_chat_template, so the
    # rendered text is identical (a test checks it against the tokenizer).
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
