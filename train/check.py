"""What a run is asked to do (`RunOptions`) and everything that can fail on its input, checked first.

`check_run` validates the spec's selected tasks, their data rows, the base model (and whether it
can train 4-bit, where the spec asks), the target modules and the registry before any training, reporting every problem at once; it is all
`--check` runs, and its `Checked` is what a run starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2.exceptions import TemplateError

from mtft.registry import PromptTemplate, Registry, render_prompt

from .base import resolve_base
from .data import TaskData, load_task_data
from .hardware import choose_dtype
from .quantization import base_problems
from .spec import Spec, SpecError, TaskSpec
from .targets import target_modules


@dataclass(frozen=True)
class RunOptions:
    output: Path
    registry: Path
    tasks: list[str] | None = None
    resume: bool = False


@dataclass(frozen=True)
class Checked:
    """Everything validated before training: the selected tasks and their data."""

    tasks: list[TaskSpec]
    base_dir: Path
    tokenizer: object
    templates: dict[str, PromptTemplate]
    data: dict[str, TaskData]
    target_modules: list[str]  # lora.target_modules resolved against the base (`targets.py`)


def check_run(spec: Spec, options: RunOptions) -> Checked:
    """Every check that can fail on bad input, before any training (also `--check`)."""
    from transformers import AutoTokenizer

    tasks = _select(spec, options.tasks)
    Registry(options.registry).check_writable()
    base_dir = resolve_base(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    templates = {t.name: _with_chat_template(t.template, tokenizer, t.name) for t in tasks}
    modules, problems = target_modules(spec, base_dir)
    if spec.training.base_quantization is not None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        problems += base_problems(spec.training.base_quantization, base_dir,
                                  choose_dtype(spec.training.dtype, device)[0], device)
    data = {}
    for task in tasks:
        try:
            data[task.name] = load_task_data(spec, task, templates[task.name], spec.training.seed)
        except SpecError as exc:
            problems += exc.problems
    for task in tasks:
        gate = spec.gate(task)
        if gate is not None and task.name in data and len(data[task.name].eval) < gate.min_eval_examples:
            problems.append(
                f"task {task.name!r}: publish.gate judges versions on the eval split, which has "
                f"{len(data[task.name].eval)} examples (fewer than min_eval_examples: {gate.min_eval_examples}); "
                "give data.eval or a larger eval_fraction, or lower publish.gate.min_eval_examples")
    if problems:
        raise SpecError(str(spec.source), problems)
    return Checked(tasks, base_dir, tokenizer, templates, data, modules)


def _select(spec: Spec, names: list[str] | None) -> list[TaskSpec]:
    if not names:
        return spec.tasks
    known = [t.name for t in spec.tasks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(str(spec.source), [f"--task {n!r} is not in the spec; tasks are {known}" for n in unknown])
    return [spec.task(n) for n in names]


def _with_chat_template(template: PromptTemplate, tokenizer, task: str) -> PromptTemplate:
    if template.format != "chat":
        return template
    if not tokenizer.chat_template:
        raise SpecError(task, [f"task {task!r} uses format: chat but the base model's tokenizer has no chat template"])
    filled = template.model_copy(update={"chat_template": tokenizer.chat_template})
    try:
        render_prompt(filled, "", "x")
    except TemplateError as exc:
        raise SpecError(task, [f"task {task!r} uses format: chat, but the base model's chat template cannot render "
                               f"one user message ({exc}); use format: plain with a prompt of your own"]) from None
    return filled
