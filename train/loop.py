"""The training loop of every recipe: optimizer steps, evaluations, checkpoints, exact resume, run-log rows.

What differs between recipes is a step plan (`StepPlan`): which parameters train under which
optimizer, which examples make up each step, how the examples' losses combine, and any state of its
own. The loop owns the rest. A checkpoint holds the trainable tensors, every optimizer and
schedule, the plan's state, the step and the RNG state, so a run killed at any point and resumed
produces the same weights as one that was never interrupted.

Under `accelerate launch` every process runs this loop on its share of each step's rows
(`processes.Ranks`): the gradients are summed once per step, so N processes train what one
trains on the same global batch; only the main process writes the run log and checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_scheduler

from .batches import IGNORE, Row, Tokenized, collate, forwards, pack, runs
from .processes import Ranks
from .runlog import RunLog
from .spec import TrainingSpec

log = logging.getLogger(__name__)

Evaluator = Callable[[list[str], str], dict[str, float]]  # (tasks, label) -> score per task


@dataclass(frozen=True)
class Draw:
    """The examples of one optimizer step and which optimizers step after it."""

    parts: list[list[Row]]  # grad_accum micro-batches
    stepped: list[str]  # optimizer keys (lockstep: the tasks still training)


@dataclass(frozen=True)
class TaskStep:
    """One task's share of a step: mean loss, examples, answer tokens, and its weight in the step's loss."""

    loss: float
    examples: int
    tokens: int
    share: float


class StepPlan(Protocol):
    """What a recipe trains; `plans.py` and `shared.py` hold the three implementations."""

    name: str  # progress bar and log label
    tasks: list[str]
    items: dict[str, list[Tokenized]]
    model: torch.nn.Module
    total_steps: int
    per_example: bool  # normalise each task's loss by its examples instead of its answer tokens

    def optimizers(self) -> dict[str, tuple[list[dict], int]]:
        """Per optimizer key: its parameter groups and how many steps its schedule spans."""

    def draw(self, step: int) -> Draw: ...

    def rows(self, grouped: list[tuple[str, int]]) -> AbstractContextManager:
        """Forwards inside see which task each run of batch rows belongs to."""

    def objective(self, losses: torch.Tensor, grouped: list[tuple[str, int]], counts: dict[str, int],
                  first: bool) -> torch.Tensor:
        """This forward's part of the step's loss from its examples' `losses` (grouped by task as in
        `grouped`); `counts` are the whole step's normalisers per task."""

    def record(self, step: int, stats: dict[str, TaskStep]) -> dict:
        """Observe a finished step; returns what the plan adds to its log row."""

    def evaluations(self, step: int) -> list[str] | None:
        """Tasks the plan needs evaluated after `step` (a stage's end), besides `eval_every`."""

    def observe_eval(self, step: int, scores: dict[str, float]) -> None: ...

    def steps(self, task: str) -> int:
        """The step a task's training ends at."""

    def tensors(self) -> dict[str, torch.Tensor]: ...

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Loop:
    """Where a training writes and what it runs on; `train` is the loop itself."""

    training: TrainingSpec
    checkpoint: Path
    log: RunLog
    accelerator: object
    pad_id: int
    evaluate: Evaluator | None = None


def total_steps(examples: int, t: TrainingSpec) -> int:
    """Optimizer steps: `max_steps`, else `epochs` over `examples`."""
    if t.max_steps is not None:
        return t.max_steps
    batches = -(-examples // t.batch_size)
    return max(1, round(t.epochs * batches / t.grad_accum))


def train(plan: StepPlan, setup: Loop, resume: bool) -> None:
    """Train `plan` in place, from its last checkpoint if `resume` and there is one."""
    t = setup.training
    optimizers, schedulers = {}, {}
    for key, (groups, steps) in plan.optimizers().items():
        optimizers[key] = torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        schedulers[key] = get_scheduler(t.schedule, optimizers[key], t.warmup_steps, steps)
    params = [p for o in optimizers.values() for g in o.param_groups for p in g["params"]]
    ranks = Ranks(setup.accelerator)
    found = latest_checkpoint(setup.checkpoint) if resume else None
    start, seen = 0, {}  # seen: realised examples per task so far
    if found:
        start, seen = _restore(found, plan, optimizers, schedulers)
        log.info("%s: resuming at step %d/%d from %s", plan.name, start, plan.total_steps, found)
    if ranks.is_main:
        setup.log.truncate(start)
    plan.model.train()
    bar = tqdm(total=plan.total_steps, initial=start, desc=plan.name, unit="step", dynamic_ncols=True,
               disable=not ranks.is_main)
    for step in range(start, plan.total_steps):
        began = time.perf_counter()
        ranks.seed_step(t.seed, step)
        draw = plan.draw(step)
        stats, tokens = _forward_backward(plan, draw, setup, ranks, params)
        for key in draw.stepped:
            optimizers[key].step()
            schedulers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
        for task, s in stats.items():
            seen[task] = seen.get(task, 0) + s.examples
        seconds = time.perf_counter() - began
        row = {"step": step + 1, "loss": sum(s.share * s.loss for s in stats.values()),
               "lr": schedulers[draw.stepped[0]].get_last_lr()[0], "tokens_per_s": tokens / seconds,
               "seconds": seconds, "tasks": {n: {"loss": s.loss, "examples": s.examples, "tokens": s.tokens}
                                             for n, s in stats.items()},
               "seen": dict(seen), **plan.record(step, stats)}
        bar.update(1)
        bar.set_postfix({n[:8]: f"{s.loss:.3f}" for n, s in stats.items()} | {"tok_s": f"{row['tokens_per_s']:.0f}"})
        due = plan.evaluations(step + 1)
        if setup.evaluate and (due or (t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < plan.total_steps)):
            row["eval"] = setup.evaluate(due or plan.tasks, f"step-{step + 1}")
            plan.observe_eval(step + 1, row["eval"])
            plan.model.train()
        if ranks.is_main:
            setup.log.append(row)
        if ranks.is_main and ((step + 1) % t.checkpoint_every == 0 or step + 1 == plan.total_steps):
            _save(setup.checkpoint, plan, optimizers, schedulers, step + 1, seen)
    bar.close()


def _forward_backward(plan: StepPlan, draw: Draw, setup: Loop, ranks: Ranks,
                      params: list[torch.nn.Parameter]) -> tuple[dict[str, TaskStep], int]:
    """This process's forwards and backwards of one optimizer step, then every process's gradients
    summed; returns the whole step's per-task stats and tokens."""
    targets: dict[str, int] = {}
    examples: dict[str, int] = {}
    for part in draw.parts:
        for task, i in part:
            targets[task] = targets.get(task, 0) + sum(x != IGNORE for x in plan.items[task][i].labels)
            examples[task] = examples.get(task, 0) + 1
    counts = examples if plan.per_example else targets
    sums = dict.fromkeys(counts, 0.0)
    tokens, accelerator = 0, setup.accelerator
    t = setup.training
    # Normalisers above cover the whole step; each process runs its own share of every micro-batch.
    parts = [ranks.shard(part, lambda row: len(plan.items[row[0]][row[1]].input_ids)) for part in draw.parts]
    if t.packing:  # whole micro-batches, each task's rows packed apart (a packed row is one task's)
        chunks = [sorted(part, key=lambda row: plan.tasks.index(row[0])) for part in parts if part]
    else:
        width = max(1, t.batch_size // ranks.count // 2)
        chunks = [rows for part in parts if part for rows in forwards(part, plan.items, plan.tasks, width)]
    # Agreed before any forward: on a sharded base each pass gathers weights with every process.
    idle = ranks.most(len(chunks)) - len(chunks)
    for m, rows in enumerate(chunks):
        grouped = runs(rows)
        items = [plan.items[n][i] for n, i in rows]
        layout, row_runs = (_packed(items, grouped, t.max_length) if t.packing else (None, grouped))
        batch = {k: v.to(accelerator.device) for k, v in collate(items, setup.pad_id, layout).items()}
        # Backward inside `rows`: with gradient checkpointing it reruns the forwards, which ask which
        # task each row is for.
        with plan.rows(row_runs):
            with accelerator.autocast():
                losses = answer_loss(plan.model, batch, plan.per_example)
            # `first`: a step's once-only terms go into one forward of one process (the main has rows first).
            accelerator.backward(plan.objective(losses, grouped, counts, first=m == 0 and ranks.is_main))
        start = 0
        for task, count in grouped:
            sums[task] += losses[start:start + count].sum().item()
            start += count
        tokens += int(batch["attention_mask"].sum())
    for _ in range(idle):
        _idle_pass(plan, setup, params)
    names = list(counts)
    *summed, tokens = ranks.sum_gradients(params, [sums[n] for n in names] + [tokens])
    sums = dict(zip(names, summed))
    whole = sum(counts.values())
    return {n: TaskStep(sums[n] / counts[n], examples[n], targets[n], counts[n] / whole) for n in counts}, int(tokens)


def _idle_pass(plan: StepPlan, setup: Loop, params: list[torch.nn.Parameter]) -> None:
    """A forward and backward that changes no gradient, for a process with fewer forwards than another
    in a step on a sharded base, whose every pass gathers weights with every process: one example
    at zero weight, and a parameter that had no gradient before has none after (adding zeros to one
    that had changes nothing), so what the optimizers see is what they would without it."""
    task = plan.tasks[0]
    batch = {k: v.to(setup.accelerator.device) for k, v in collate([plan.items[task][0]], setup.pad_id).items()}
    bare = [p for p in params if p.grad is None]
    with plan.rows([(task, 1)]):
        with setup.accelerator.autocast():
            losses = answer_loss(plan.model, batch, plan.per_example)
        setup.accelerator.backward(losses.sum() * 0)
    for p in bare:
        p.grad = None


def _packed(items: list[Tokenized], grouped: list[tuple[str, int]], capacity: int):
    """Each task's examples packed into rows of `capacity` tokens; (rows, [(task, row count)])."""
    rows, row_runs, start = [], [], 0
    for task, count in grouped:
        packed = [[start + i for i in row] for row in pack([len(t.input_ids) for t in items[start:start + count]],
                                                            capacity)]
        rows += packed
        row_runs.append((task, len(packed)))
        start += count
    return rows, row_runs


def answer_loss(model, batch: dict[str, torch.Tensor], per_example: bool = False) -> torch.Tensor:
    """Each example's summed next-token loss over its answer tokens (their mean, if `per_example`).

    The one loss every plan trains on, per example in the order the batch was collated from,
    packed or not. The LM head runs only on the answer tokens' positions: prompt tokens carry no
    loss, and their vocabulary-wide logits are most of the compute of a short-answer task
    (SmolLM2's head is 576 x 49,152). `logits_to_keep` narrows the model's own forward to the
    columns where some row has an answer; a pre-hook on the head then takes exactly the answer
    positions of those columns, which matters most for packed rows, whose answers are spread over
    nearly every column. The model's own post-processing of logits (scaling, soft-capping) is
    elementwise, so it still applies.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
    kept = targets[:, keep]
    valid = kept != IGNORE
    layout = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {
        "attention_mask": batch["attention_mask"]}
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: (args[0][valid].unsqueeze(0), *args[1:]))
    try:
        # use_cache=False: transformers builds the packed (block-diagonal) mask only without a KV cache.
        logits = model(input_ids=batch["input_ids"], logits_to_keep=keep, use_cache=False, **layout).logits
    finally:
        hook.remove()
    per_token = F.cross_entropy(logits[0].float(), kept[valid], reduction="none")
    owner = batch["example"][:, 1:][:, keep][valid]
    count = int(batch["example"].max()) + 1
    sums = per_token.new_zeros(count).index_add(0, owner, per_token)
    if per_example:
        sums = sums / per_token.new_zeros(count).index_add(0, owner, torch.ones_like(per_token)).clamp(min=1)
    return sums


def latest_checkpoint(ckpt: Path) -> Path | None:
    # A kill between the two renames in _save leaves only the previous checkpoint.
    for candidate in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (candidate / "state.pt").exists():
            return candidate
    return None


def _save(ckpt: Path, plan: StepPlan, optimizers: dict, schedulers: dict, step: int, seen: dict[str, int]) -> None:
    """Write tensors and training state atomically: a kill leaves the old or the new checkpoint."""
    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in plan.tensors().items()}, tmp / "adapter.safetensors")
    torch.save({"step": step, "seen": seen, "plan": plan.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "state.pt")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ckpt, old)
    os.rename(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _restore(ckpt: Path, plan: StepPlan, optimizers: dict, schedulers: dict) -> tuple[int, dict[str, int]]:
    state = torch.load(ckpt / "state.pt", weights_only=False)
    plan.load_tensors(load_file(ckpt / "adapter.safetensors"))
    plan.load_state_dict(state["plan"])
    for key in optimizers:
        optimizers[key].load_state_dict(state["optimizers"][key])
        schedulers[key].load_state_dict(state["schedulers"][key])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["seen"]
