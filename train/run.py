"""`mtft-train adapters`: one LoRA per task on a frozen base, evaluated and published.

Everything that can fail on bad input (spec, data rows, base model, registry)
is checked before the first training step. A run directory records which
tasks are done, so `--resume` skips them and continues the interrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from mtft.registry import AdapterRecord, BaseModelRef, PromptTemplate, Registry, fingerprint

from . import loop
from .base import resolve_base
from .batches import tokenize
from .data import TaskData, load_task_data
from .evaluate import evaluate
from .plot import plot_curves
from .spec import Spec, SpecError, TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    output: Path
    registry: Path
    tasks: list[str] | None = None
    resume: bool = False


class TaskState(BaseModel):
    base_score: float | None = None
    adapter_score: float | None = None
    version: int | None = None


class RunState(BaseModel):
    """`state.json` in the run directory: what a resumed run can skip."""

    tasks: dict[str, TaskState] = {}
    config_hash: str | None = None  # multi-task runs: resume refuses a run made with another config

    @classmethod
    def load(cls, path: Path) -> RunState:
        return cls.model_validate_json(path.read_text()) if path.exists() else cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str
    base: float
    adapter: float  # the published adapter (shared runs: this task's export)
    version: int
    separate: float | None = None  # shared runs: the newest per-task adapter's score, for comparison


def set_threads(requested: int | None) -> int:
    """All cores by default; a server beside training should get an explicit lower count."""
    threads = requested or os.cpu_count() or 1
    torch.set_num_threads(threads)
    reason = "from the spec" if requested else "all cores (set training.threads to share the machine)"
    log.info("using %d CPU threads: %s", threads, reason)
    return threads


def train_adapters(spec: Spec, options: RunOptions) -> list[TaskResult]:
    from peft import LoraConfig, get_peft_model

    ready = prepare(spec, options)
    tasks, tokenizer, data, base_dir = ready.tasks, ready.tokenizer, ready.data, ready.base_dir
    run = open_run(spec, options, ready)
    registry, base_ref, state, state_path, accelerator, model = (
        run.registry, run.base_ref, run.state, run.state_path, run.accelerator, run.model)

    results = []
    for task in tasks:
        task_state = state.tasks.setdefault(task.name, TaskState())
        ends = end_ids(tokenizer, task.template)
        task_dir = options.output / task.name
        task_dir.mkdir(exist_ok=True)

        def run_eval(m, _task=task, _ids=ends) -> float:
            return evaluate(m, tokenizer, data[_task.name].eval, _task.metric, _task.labels,
                            _task.max_new_tokens, _ids, spec.training.eval_batch_size).score

        if task_state.version is None:
            if task_state.base_score is None:
                task_state.base_score = run_eval(model)
                state.save(state_path)
                log.info("%s: base model %s = %.3f", task.name, task.metric, task_state.base_score)
            torch.manual_seed(spec.training.seed)  # the same initial LoRA however many tasks ran before
            lora = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                              target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM")
            peft_model = get_peft_model(model, lora)
            items, truncated = tokenize(data[task.name].train, tokenizer, ends[0], spec.training.max_length)
            if truncated:
                log.warning("%s: %d examples longer than max_length=%d lost the start of their prompt",
                            task.name, truncated, spec.training.max_length)
            job = loop.Job(task.name, items, spec.training, task_dir,
                           config_hash(spec, base_ref.fingerprint, NOT_SHAPING | {"eval_every"},
                                       task=task.model_dump(mode="json")),
                           pad_id(tokenizer, ends))
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            loop.train(peft_model, trainable, job, accelerator, options.resume,
                       on_eval=lambda step: run_eval(peft_model))
            task_state.adapter_score = run_eval(peft_model)
            _log_evals(task_dir / "metrics.jsonl", task_state, job.total_steps)
            adapter_dir = task_dir / "adapter"
            peft_model.save_pretrained(adapter_dir)
            _point_config_at(adapter_dir, base_dir)
            task_state.version = publish(registry, adapter_dir, task, ready, spec, base_ref, task_state,
                                         "mtft-train adapters")
            state.save(state_path)
            model = peft_model.unload()
        results.append(TaskResult(task.name, task.metric, task_state.base_score,
                                  task_state.adapter_score, task_state.version))
    plot_curves({t.name: options.output / t.name / "metrics.jsonl" for t in tasks},
                options.output / "curves.png", {t.name: t.metric for t in tasks})
    write_results(options.output, "adapters", results)
    return results


def save_adapter(model, lora_config, weights: dict, adapter_dir: Path, base_dir: Path):
    """Write `weights` (a PEFT LoRA state dict) as a standard PEFT adapter; returns the bare model."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, lora_config)
    set_peft_model_state_dict(peft_model, weights)
    peft_model.save_pretrained(adapter_dir)
    _point_config_at(adapter_dir, base_dir)
    return peft_model.unload()


def publish(registry: Registry, adapter_dir: Path, task: TaskSpec, ready: Prepared, spec: Spec,
            base_ref: BaseModelRef, scores: TaskState, trained_by: str) -> int:
    """Publish one evaluated adapter with its record; returns its version."""
    record = AdapterRecord(
        task=task.name, prefix=task.prefix, template=ready.templates[task.name], base_model=base_ref,
        rank=spec.lora.rank, alpha=spec.lora.alpha, target_modules=list(spec.lora.target_modules),
        metric=task.metric, metrics={"base": scores.base_score, "adapter": scores.adapter_score},
        eval_examples=len(ready.data[task.name].eval), max_new_tokens=task.max_new_tokens, trained_by=trained_by,
    )
    return registry.publish(adapter_dir, record).version


def write_results(output: Path, mode: str, results: list[TaskResult]) -> None:
    """`results.json`: the run's final per-task scores, for scripts and benchmarks."""
    rows = {r.task: {"metric": r.metric, "base": r.base, "adapter": r.adapter, "version": r.version,
                     **({"separate": r.separate} if r.separate is not None else {})} for r in results}
    (output / "results.json").write_text(json.dumps({"mode": mode, "tasks": rows}, indent=2))


@dataclass
class OpenRun:
    """A started run: its registry, base model (loaded once, frozen) and resumable state."""

    registry: Registry
    base_ref: BaseModelRef
    state: RunState
    state_path: Path
    accelerator: object
    model: object


def open_run(spec: Spec, options: RunOptions, ready: Prepared) -> OpenRun:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    base_ref = BaseModelRef(name=spec.base_model, path=str(ready.base_dir), fingerprint=fingerprint(ready.base_dir))
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "spec.json").write_text(spec.model_dump_json(indent=2))
    state_path = options.output / "state.json"
    state = RunState.load(state_path) if options.resume else RunState()
    set_threads(spec.training.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(spec.training.seed)
    model = AutoModelForCausalLM.from_pretrained(ready.base_dir, dtype=torch.float32).to(accelerator.device)
    model.requires_grad_(False)
    return OpenRun(Registry(options.registry), base_ref, state, state_path, accelerator, model)


@dataclass(frozen=True)
class Prepared:
    """Everything validated before training: the selected tasks and their data."""

    tasks: list[TaskSpec]
    base_dir: Path
    tokenizer: object
    templates: dict[str, PromptTemplate]
    data: dict[str, TaskData]


def prepare(spec: Spec, options: RunOptions) -> Prepared:
    """Every check that can fail on bad input, before any training (also `--check`)."""
    from transformers import AutoTokenizer

    tasks = _select(spec, options.tasks)
    Registry(options.registry).check_writable()
    base_dir = resolve_base(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    templates = {t.name: _with_chat_template(t.template, tokenizer, t.name) for t in tasks}
    return Prepared(tasks, base_dir, tokenizer, templates, _load_data(spec, tasks, templates))


def _select(spec: Spec, names: list[str] | None) -> list[TaskSpec]:
    if not names:
        return spec.tasks
    known = [t.name for t in spec.tasks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(str(spec.source), [f"--task {n!r} is not in the spec; tasks are {known}" for n in unknown])
    return [spec.task(n) for n in names]


def _load_data(spec: Spec, tasks: list[TaskSpec], templates: dict[str, PromptTemplate]) -> dict[str, TaskData]:
    data, problems = {}, []
    for task in tasks:
        try:
            data[task.name] = load_task_data(spec, task, templates[task.name], spec.training.seed)
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(str(spec.source), problems)
    return data


def _with_chat_template(template: PromptTemplate, tokenizer, task: str) -> PromptTemplate:
    if template.format != "chat":
        return template
    if not tokenizer.chat_template:
        raise SpecError(task, [f"task {task!r} uses format: chat but the base model's tokenizer has no chat template"])
    return template.model_copy(update={"chat_template": tokenizer.chat_template})


def end_ids(tokenizer, template: PromptTemplate) -> list[int]:
    """Answers end with the chat end token in chat format, with EOS in plain format."""
    eos = tokenizer.eos_token_id
    if template.format == "chat":
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end is not None and im_end != tokenizer.unk_token_id:
            return [im_end] + ([eos] if eos is not None and eos != im_end else [])
    return [eos]


def pad_id(tokenizer, end_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]


NOT_SHAPING = {"checkpoint_every", "threads", "eval_batch_size"}  # settings that change nothing learnt


def config_hash(spec: Spec, base_fingerprint: str, not_shaping: set[str] = NOT_SHAPING, **parts) -> str:
    """Hash of everything that shapes a run's result (`parts`: its tasks and mode); resume refuses a mismatch."""
    shaping = {
        **parts,
        "lora": spec.lora.model_dump(mode="json"),
        "training": spec.training.model_dump(mode="json", exclude=not_shaping),
        "base": base_fingerprint,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _point_config_at(adapter_dir: Path, base_dir: Path) -> None:
    """vLLM's filesystem resolver matches base_model_name_or_path to the served --model."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    path.write_text(json.dumps(config, indent=2))


def _log_evals(metrics_path: Path, state: TaskState, steps: int) -> None:
    loop.append_metrics(metrics_path, {"step": 0, "eval": state.base_score, "model": "base"})
    loop.append_metrics(metrics_path, {"step": steps, "eval": state.adapter_score, "model": "adapter"})
