"""The multi-task training recipe: mixed batches through task-conditioned LoRA layers (`tasklora`).

Two modes share it:
- separate (`mtft-train adapters --one-pass`): lockstep. Step k holds every task's k-th batch (the
  batch it would get alone), each task's loss is normalised by its own answer tokens and each task
  has its own optimizer and schedule, so every adapter equals the one trained alone.
- shared (`mtft-train shared`): each micro-batch is drawn by the mixing strategy (`mixing`), or by
  sequential stages with replay, and the tasks' losses are combined by the loss weighting:
      L = Σ_t (n_t / N) · (w_t · L_t + r_t)
  where L_t is task t's mean loss over its n_t answer tokens (averaging: token) or examples
  (averaging: example) in the step, N = Σ n_t, and (w_t, r_t) is (1, 0) for sum, (weight_t, 0) for
  static and (exp(-s_t), s_t) with a learned s_t = log σ_t² for uncertainty (Kendall et al. 2018).
  With sum this is the plain mean over the mixed batch, so mixing alone sets each task's share.
Every step logs per-task losses, realised example counts, mixing probabilities and loss weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_scheduler

from .batches import IGNORE, Tokenized, collate, micro_batches
from .loop import append_metrics, latest_checkpoint, load_checkpoint, save_checkpoint, total_steps, truncate_metrics
from .mixing import DynamicMixing, TaskSampler, task_probabilities
from .spec import MultitaskSpec, TrainingSpec
from .tasklora import TaskLoRA

log = logging.getLogger(__name__)

Evaluator = Callable[[list[str]], dict[str, float]]  # tasks -> score per task


@dataclass(frozen=True)
class Stage:
    """A run of steps with one task distribution; `probs` None means the mixing strategy."""

    steps: int
    probs: dict[str, float] | None = None
    task: str | None = None  # the task a sequential stage trains
    seen: list[str] = field(default_factory=list)  # tasks trained so far: evaluated at the stage's end


@dataclass(frozen=True)
class JointJob:
    items: dict[str, list[Tokenized]]  # per task, in spec order
    training: TrainingSpec
    multitask: MultitaskSpec
    dir: Path
    config_hash: str
    pad_id: int
    stages: list[Stage]  # shared mode only

    @property
    def tasks(self) -> list[str]:
        return list(self.items)


def lockstep_steps(job: JointJob) -> dict[str, int]:
    return {t: total_steps(len(items), job.training) for t, items in job.items.items()}


def train(lora: TaskLoRA, job: JointJob, resume: bool, device, on_eval: Evaluator | None = None) -> list[dict]:
    """Train in place; returns the sequential stages' evaluation rows (the forgetting table)."""
    t = job.training
    metrics_path, ckpt = job.dir / "metrics.jsonl", job.dir / "checkpoint"
    shared = lora.shared
    tasks = job.tasks
    if shared:
        plan_total = sum(s.steps for s in job.stages)
        log_var = torch.nn.Parameter(torch.zeros(len(tasks), device=device))  # uncertainty s_t
        groups = [{"params": lora.parameters()}]
        if job.multitask.loss.weighting == "uncertainty":
            groups.append({"params": [log_var], "weight_decay": 0.0})
        optimizers = {"shared": torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)}
        totals = {"shared": plan_total}
    else:
        log_var = None
        totals = lockstep_steps(job)
        plan_total = max(totals.values())
        optimizers = {name: torch.optim.AdamW(lora.parameters(name), lr=t.learning_rate, weight_decay=t.weight_decay)
                      for name in tasks}
    schedulers = {k: get_scheduler(t.schedule, opt, t.warmup_steps, totals[k]) for k, opt in optimizers.items()}
    sizes = {name: len(items) for name, items in job.items.items()}
    sampler = TaskSampler(sizes, t.seed)
    mixing = job.multitask.mixing
    dynamic = DynamicMixing(tasks, mixing.floor, mixing.update_every, mixing.signal) if mixing.strategy == "dynamic" else None
    static_probs = task_probabilities(mixing, sizes)
    history: list[dict] = []
    seen: dict[str, int] = {}  # realised examples per task, cumulative

    start = 0
    found = latest_checkpoint(ckpt) if resume else None
    if found:
        tensors, state = load_checkpoint(found, job.config_hash, "the multi-task run")
        lora.load_state_dict({k: v.to(device) for k, v in tensors.items() if k != "loss.log_var"})
        if log_var is not None and "loss.log_var" in tensors:
            log_var.data.copy_(tensors["loss.log_var"])
        for k in optimizers:
            optimizers[k].load_state_dict(state["optimizers"][k])
            schedulers[k].load_state_dict(state["schedulers"][k])
        sampler.load_state_dict(state["sampler"])
        if dynamic:
            dynamic.load_state_dict(state["dynamic"])
        history, seen = state["history"], state["seen"]
        start = state["step"]
        truncate_metrics(metrics_path, start)
        log.info("resuming the multi-task run at step %d/%d from %s", start, plan_total, found)
    else:
        metrics_path.unlink(missing_ok=True)

    # Lockstep: each task's own batch stream, exactly as its run alone would read it.
    streams = {} if shared else {name: micro_batches(items, t.batch_size, t.seed, t.batching == "length")
                                 for name, items in job.items.items()}
    for name, stream in streams.items():
        for _ in range(min(start, totals[name]) * t.grad_accum):
            next(stream)

    lora.model.train()
    bar = tqdm(total=plan_total, initial=start, desc="multi-task", unit="step", dynamic_ncols=True)
    ends = stage_ends(job.stages) if shared else []
    for step in range(start, plan_total):
        began = time.perf_counter()
        stage_index = next((i for i, end in enumerate(ends) if step < end), 0)
        if shared:
            stage = job.stages[stage_index]
            probs = stage.probs or (dynamic.probabilities(step) if dynamic else static_probs)
            parts = [sampler.draw(probs, t.batch_size) for _ in range(t.grad_accum)]
        else:
            probs = None
            active = [n for n in tasks if step < totals[n]]
            parts = [[(n, i) for n in active for i in next(streams[n])[1]] for _ in range(t.grad_accum)]
        for part in parts:
            for n, _ in part:
                seen[n] = seen.get(n, 0) + 1
        stats, tokens = _step(lora, job, parts, shared, log_var, device)
        stepped = list(optimizers) if shared else sorted({n for part in parts for n, _ in part})
        for k in stepped:
            optimizers[k].step()
            schedulers[k].step()
            optimizers[k].zero_grad(set_to_none=True)
        if log_var is not None:
            log_var.grad = None
        if dynamic:
            for n, s in stats.items():
                dynamic.observe_loss(n, s["loss"])
        seconds = time.perf_counter() - began
        row = {"step": step + 1, "loss": sum(s["share"] * s["loss"] for s in stats.values()), "lr": schedulers[stepped[0]].get_last_lr()[0],
               "tokens_per_s": tokens / seconds, "seconds": seconds,
               "tasks": {n: {"loss": s["loss"], "examples": s["examples"], "tokens": s["tokens"]} for n, s in stats.items()},
               "seen": dict(seen)}
        if shared:
            row["mix"] = probs
            row["loss_weights"] = _weights(job, log_var)
            if len(job.stages) > 1:
                row["stage"] = stage_index
        bar.update(1)
        bar.set_postfix({n[:8]: f"{s['loss']:.3f}" for n, s in stats.items()} | {"tok_s": f"{row['tokens_per_s']:.0f}"})
        at_stage_end = shared and len(job.stages) > 1 and step + 1 in ends
        if on_eval and (at_stage_end or (t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < plan_total)):
            row["eval"] = on_eval(job.stages[stage_index].seen if at_stage_end else tasks)
            if dynamic:
                dynamic.observe_eval(row["eval"])
            if at_stage_end:
                history.append({"stage": stage_index, "task": job.stages[stage_index].task, "step": step + 1,
                                "eval": row["eval"]})
            lora.model.train()
        append_metrics(metrics_path, row)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == plan_total:
            tensors = lora.state_dict() | ({"loss.log_var": log_var.detach()} if log_var is not None else {})
            save_checkpoint(ckpt, tensors, {
                "step": step + 1, "config_hash": job.config_hash,
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "sampler": sampler.state_dict(), "seen": seen, "dynamic": dynamic.state_dict() if dynamic else None,
                "history": history,
            })
    bar.close()
    return history


def stage_ends(stages: list[Stage]) -> list[int]:
    """The step each stage ends at (cumulative)."""
    ends, total = [], 0
    for stage in stages:
        total += stage.steps
        ends.append(total)
    return ends


def _weights(job: JointJob, log_var) -> dict[str, float]:
    """w_t of the loss formula, per task."""
    loss = job.multitask.loss
    if loss.weighting == "static":
        return {n: float(loss.weights[n]) for n in job.tasks}
    if loss.weighting == "uncertainty":
        return {n: math.exp(-float(log_var.detach()[i])) for i, n in enumerate(job.tasks)}
    return {n: 1.0 for n in job.tasks}


def _step(lora: TaskLoRA, job: JointJob, parts: list[list[tuple[str, int]]], shared: bool, log_var, device):
    """Forward and backward one optimizer step's micro-batches; returns per-task stats and tokens seen."""
    by_example = shared and job.multitask.loss.averaging == "example"
    targets: dict[str, int] = {}
    examples: dict[str, int] = {}
    for part in parts:
        for n, i in part:
            targets[n] = targets.get(n, 0) + sum(x != IGNORE for x in job.items[n][i].labels)
            examples[n] = examples.get(n, 0) + 1
    counts = examples if by_example else targets
    whole = sum(counts.values())
    weights = _weights(job, log_var) if shared else None
    sums = {n: 0.0 for n in counts}
    tokens = 0
    chunks = [chunk for part in parts for chunk in _chunks(part, job, max(1, job.training.batch_size // 2))]
    for m, part in enumerate(chunks):
        rows = [job.items[n][i] for n, i in part]
        runs = _runs([n for n, _ in part])
        batch = {k: v.to(device) for k, v in collate(rows, job.pad_id).items()}
        with lora.rows(runs):
            logits = lora.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                    ignore_index=IGNORE, reduction="none").view(labels.shape)
        per_row = per_token.sum(dim=1)
        if by_example:
            per_row = per_row / (labels != IGNORE).sum(dim=1).clamp(min=1)
        loss = per_row.new_zeros(())
        start = 0
        for n, count in runs:
            part_sum = per_row[start:start + count].sum()
            start += count
            sums[n] += part_sum.item()
            if shared:
                i = job.tasks.index(n)
                w = torch.exp(-log_var[i]) if job.multitask.loss.weighting == "uncertainty" else weights[n]
                loss = loss + w * part_sum / whole
            else:
                loss = loss + part_sum / targets[n]  # each adapter: its own per-token mean, as if alone
        if shared and m == 0 and job.multitask.loss.weighting == "uncertainty":
            loss = loss + sum(counts[n] / whole * log_var[job.tasks.index(n)] for n in counts)
        loss.backward()
        tokens += int(batch["attention_mask"].sum())
    stats = {n: {"loss": sums[n] / counts[n], "examples": examples[n], "tokens": targets[n],
                 "share": counts[n] / whole} for n in counts}
    return stats, tokens


PADDING_SLACK = 1.25  # a forward's padded tokens may exceed its real tokens by this factor


def _chunks(part: list[tuple[str, int]], job: JointJob, min_rows: int) -> list[list[tuple[str, int]]]:
    """Split a micro-batch into forwards of similar length, each with its rows grouped by task.

    Tasks differ in length (a chat task's prompts can be twice a label task's), and padding every
    row of a mixed batch to the longest would waste more compute than batching saves. The loss
    normalisers cover the whole step, so how rows are split into forwards changes nothing else.
    """
    length = {row: len(job.items[row[0]][row[1]].input_ids) for row in part}
    chunks, current, tokens = [], [], 0
    for row in sorted(part, key=length.__getitem__):
        if len(current) >= min_rows and (len(current) + 1) * length[row] > PADDING_SLACK * (tokens + length[row]):
            chunks.append(current)
            current, tokens = [], 0
        current.append(row)
        tokens += length[row]
    chunks.append(current)
    return [sorted(chunk, key=lambda row: job.tasks.index(row[0])) for chunk in chunks]


def _runs(names: list[str]) -> list[tuple[str, int]]:
    """[(task, consecutive rows)] — the batch's rows grouped by task, in order."""
    runs: list[tuple[str, int]] = []
    for n in names:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs
