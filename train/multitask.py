"""`mtft-train shared` and `mtft-train adapters --one-pass`: every task trained in one run.

The base is loaded once and wrapped with task-conditioned LoRA layers (`tasklora`); `joint`
trains them on mixed batches; every task is then evaluated and exported as an ordinary PEFT LoRA
and published like any adapter. A run folder holds `metrics.jsonl` (per-task losses, realised
counts, mixing and loss weights), `curves.png`, `results.json`, the sequential stages'
`forgetting.txt`, and `state.json` so `--resume` continues an interrupted run.
"""

from __future__ import annotations

import logging

import torch

from mtft.registry import BaseModelRef, Registry

from . import joint
from .batches import tokenize
from .evaluate import evaluate
from .joint import JointJob, Stage
from .loop import append_metrics, total_steps
from .plot import plot_joint
from .run import (
    Prepared,
    RunOptions,
    TaskResult,
    TaskState,
    config_hash,
    end_ids,
    open_run,
    pad_id,
    prepare,
    publish,
    save_adapter,
    write_results,
)
from .spec import Spec, SpecError, TaskSpec
from .tasklora import TaskLoRA, peft_init

log = logging.getLogger(__name__)


def train_multitask(spec: Spec, options: RunOptions, shared: bool) -> list[TaskResult]:
    """Train every selected task in one run: one shared adapter, or one adapter each (one pass)."""
    from peft import LoraConfig

    ready = check_multitask(spec, options, shared)
    tasks, tokenizer, data = ready.tasks, ready.tokenizer, ready.data
    names = [t.name for t in tasks]
    trained_by = "mtft-train shared" if shared else "mtft-train adapters --one-pass"
    run = open_run(spec, options, ready)
    registry, base_ref, state, state_path, accelerator, model = (
        run.registry, run.base_ref, run.state, run.state_path, run.accelerator, run.model)
    ends = {t.name: end_ids(tokenizer, t.template) for t in tasks}
    # eval_every shapes a run here: dynamic mixing can follow the evaluations.
    run_hash = config_hash(spec, base_ref.fingerprint, mode="shared" if shared else "one-pass",
                           tasks=[t.model_dump(mode="json") for t in tasks],
                           multitask=spec.multitask.model_dump(mode="json"))
    if state.config_hash not in (None, run_hash):
        raise SpecError(str(state_path), ["this run was made with a different spec, task selection or base model; "
                                          "rerun without --resume to start over, or restore the spec it was made with"])
    state.config_hash = run_hash
    state.save(state_path)

    def score(m, task: TaskSpec) -> float:
        return evaluate(m, tokenizer, data[task.name].eval, task.metric, task.labels, task.max_new_tokens,
                        ends[task.name], spec.training.eval_batch_size).score

    for task in tasks:
        task_state = state.tasks.setdefault(task.name, TaskState())
        if task_state.base_score is None:
            task_state.base_score = score(model, task)
            state.save(state_path)
            log.info("%s: base model %s = %.3f", task.name, task.metric, task_state.base_score)

    items = {}
    for task in tasks:
        items[task.name], truncated = tokenize(data[task.name].train, tokenizer, ends[task.name][0],
                                               spec.training.max_length)
        if truncated:
            log.warning("%s: %d examples longer than max_length=%d lost the start of their prompt",
                        task.name, truncated, spec.training.max_length)
    lora_config = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                             target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(spec.training.seed)  # the initial LoRA `mtft-train adapters` starts every task from
    init, model = peft_init(model, lora_config)
    embedding = spec.multitask.task_embedding
    lora = TaskLoRA(model, names, init, spec.lora.rank, spec.lora.alpha, spec.lora.dropout, shared,
                    embedding.up_projections, embedding.mix_temperature)

    def on_eval(evaluated: list[str]) -> dict[str, float]:
        scores = {}
        for name in evaluated:
            with lora.task(name):
                scores[name] = score(model, spec.task(name))
        return scores

    pad = pad_id(tokenizer, ends[names[0]])  # padding is masked, so any task's pad id serves
    stages = plan_stages(spec, items, model, lora, pad) if shared else []
    job = JointJob(items, spec.training, spec.multitask, options.output, run_hash, pad, stages)
    history = joint.train(lora, job, options.resume and any(s.version is None for s in state.tasks.values()),
                          accelerator.device, on_eval)
    if history:
        (options.output / "forgetting.txt").write_text(forgetting_table(history, {t.name: t.metric for t in tasks}))

    results = []
    final = {n: state.tasks[n] for n in names}
    pending = [n for n in names if final[n].version is None]
    if pending:
        scores = on_eval(pending)
        exported = {n: lora.export(n) for n in pending}
        model = lora.remove()
        for name in pending:
            task = spec.task(name)
            final[name].adapter_score = scores[name]
            adapter_dir = options.output / name / "adapter"
            model = save_adapter(model, lora_config, exported[name], adapter_dir, ready.base_dir)
            final[name].version = publish(registry, adapter_dir, task, ready, spec, base_ref, final[name], trained_by)
            state.save(state_path)
    ends_of_stages = joint.stage_ends(stages)
    steps = joint.lockstep_steps(job) if not shared else {n: ends_of_stages[-1] for n in names}
    for name in pending:
        for model_name, value, step in (("base", final[name].base_score, 0), ("adapter", final[name].adapter_score, steps[name])):
            append_metrics(options.output / "metrics.jsonl", {"step": step, "eval": {name: value}, "model": model_name})
    for name in names:
        task = spec.task(name)
        results.append(TaskResult(name, task.metric, final[name].base_score, final[name].adapter_score,
                                  final[name].version, per_task_adapter(registry, name, base_ref) if shared else None))
    plot_joint(options.output / "metrics.jsonl", options.output / "curves.png", {t.name: t.metric for t in tasks},
               ends_of_stages[:-1])
    write_results(options.output, "shared" if shared else "one-pass", results)
    return results


def check_multitask(spec: Spec, options: RunOptions, shared: bool) -> Prepared:
    """`prepare` plus what only a multi-task run needs; every problem before any training."""
    ready = prepare(spec, options)
    names = [t.name for t in ready.tasks]
    problems = []
    if shared and len(names) < 2:
        problems.append("mtft-train shared needs at least two tasks; use mtft-train adapters for a single task")
    order = spec.multitask.sequential.order
    if shared and spec.multitask.schedule == "sequential" and order is not None:
        missing = [n for n in names if n not in order]
        if missing:
            problems.append(f"multitask.sequential.order: tasks {missing} are selected but not in the order "
                            f"{order}; add them or leave them out with --task")
    if problems:
        raise SpecError(str(spec.source), problems)
    return ready


def plan_stages(spec: Spec, items, model, lora: TaskLoRA, pad: int) -> list[Stage]:
    """One stage (joint), or one per task and round (sequential) with replay of earlier tasks."""
    m = spec.multitask
    sizes = {n: len(v) for n, v in items.items()}
    # The compute of N per-task adapters: max_steps per task, or epochs over every task's data.
    t = spec.training
    total = t.max_steps * len(sizes) if t.max_steps is not None else total_steps(sum(sizes.values()), t)
    if m.schedule == "joint":
        return [Stage(total)]
    seq = m.sequential
    order = [n for n in seq.order if n in sizes] if seq.order else _order_by(seq.order_by, items, model, lora, pad)
    count = len(order) * seq.rounds
    per_stage = seq.stage_steps or max(1, total // count)
    stages, trained = [], []
    for stage in range(count):
        task = order[stage % len(order)]
        earlier = [n for n in trained if n != task]
        if earlier and seq.replay > 0:
            weight = sum(sizes[n] for n in earlier)
            probs = {task: 1 - seq.replay} | {n: seq.replay * sizes[n] / weight for n in earlier}
        else:
            probs = {task: 1.0}
        if task not in trained:
            trained.append(task)
        stages.append(Stage(per_stage, probs, task, list(trained)))
    return stages


@torch.no_grad()
def _order_by(measure: str, items, model, lora: TaskLoRA, pad: int) -> list[str]:
    """Task order for a curriculum: spec order, largest first, or easiest (lowest base loss) first."""
    names = list(items)
    if measure == "spec":
        return names
    if measure == "size":
        return sorted(names, key=lambda n: -len(items[n]))
    from .batches import IGNORE, collate

    losses = {}
    device = next(model.parameters()).device
    for name in names:
        sample = items[name][:32]
        batch = {k: v.to(device) for k, v in collate(sample, pad).items()}
        with lora.task(name):  # adapters are zero at the start: this is the base model's loss
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses[name] = float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE))
    log.info("curriculum by base loss (easiest first): %s", {n: round(v, 3) for n, v in sorted(losses.items(), key=lambda x: x[1])})
    return sorted(names, key=losses.__getitem__)


def forgetting_table(history: list[dict], metrics: dict[str, str]) -> str:
    """After each stage: every task seen so far, its metric now and its best at an earlier stage."""
    lines = [f"{'stage':<6}{'trained':<16}{'task':<16}{'metric':<14}{'now':>7}{'best before':>13}{'forgetting':>12}"]
    best: dict[str, float] = {}
    for row in history:
        for task, now in row["eval"].items():
            before = best.get(task)
            drop = f"{before - now:+.3f}" if before is not None else "-"
            lines.append(f"{row['stage']:<6}{row['task']:<16}{task:<16}{metrics[task]:<14}{now:>7.3f}"
                         f"{(f'{before:.3f}' if before is not None else '-'):>13}{drop:>12}")
            best[task] = max(now, before if before is not None else now)
    return "\n".join(lines) + "\n"


def per_task_adapter(registry: Registry, task: str, base: BaseModelRef) -> float | None:
    """The newest separately trained adapter's score for `task` on the same base, for comparison."""
    for record in sorted(registry.records(), key=lambda r: -r.version):
        if (record.task == task and record.trained_by.startswith("mtft-train adapters")
                and record.base_model.fingerprint == base.fingerprint):
            return record.metrics.get("adapter")
    return None
