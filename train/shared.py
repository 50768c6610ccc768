"""The shared adapter's step plan (`mtft-train shared`): mixed batches, stages, loss weighting.

Each micro-batch is drawn by the mixing strategy (`mixing`), or by sequential stages with replay,
and the tasks' losses are combined by the loss weighting:
    L = Σ_t (n_t / N) · (w_t · L_t + r_t)
where L_t is task t's mean loss over its n_t answer tokens (averaging: token) or examples
(averaging: example) in the step, N = Σ n_t, and (w_t, r_t) is (1, 0) for sum, (weight_t, 0) for
static and (exp(-s_t), s_t) with a learned s_t = log σ_t² for uncertainty (Kendall et al. 2018).
With sum this is the plain mean over the mixed batch, so mixing alone sets each task's share.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .batches import Tokenized, collate
from .loop import Draw, TaskStep, answer_loss, total_steps
from .mixing import DynamicMixing, TaskSampler, task_probabilities
from .spec import MultitaskSpec, Spec, TrainingSpec
from .tasklora import TaskLoRA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A run of steps with one task distribution; `probs` None means the mixing strategy."""

    steps: int
    probs: dict[str, float] | None = None
    task: str | None = None  # the task a sequential stage trains
    trained: list[str] = field(default_factory=list)  # tasks trained so far: evaluated at the stage's end


class SharedPlan:
    """One LoRA for every task, conditioned on learned task embeddings (`TaskLoRA(shared=True)`)."""

    name = "shared"

    def __init__(self, lora: TaskLoRA, items: dict[str, list[Tokenized]], t: TrainingSpec, m: MultitaskSpec,
                 stages: list[Stage]):
        self.lora, self.model, self.items, self.tasks = lora, lora.model, items, list(items)
        self.batch_size, self.grad_accum, self.loss_spec, self.stages = t.batch_size, t.grad_accum, m.loss, stages
        self.per_example = m.loss.averaging == "example"
        self.ends = stage_ends(stages)
        self.total_steps = self.ends[-1]
        device = next(iter(lora.parameters())).device
        self.log_var = torch.nn.Parameter(torch.zeros(len(self.tasks), device=device))  # uncertainty s_t
        sizes = {n: len(v) for n, v in items.items()}
        self.sampler = TaskSampler(sizes, t.seed)
        mixing = m.mixing
        self.dynamic = (DynamicMixing(self.tasks, mixing.floor, mixing.update_every, mixing.signal)
                        if mixing.strategy == "dynamic" else None)
        self.static_probs = task_probabilities(mixing, sizes)
        self.history: list[dict] = []  # evaluations at stage ends: the forgetting table
        self._stage, self._probs = 0, self.static_probs

    @property
    def uncertainty(self) -> bool:
        return self.loss_spec.weighting == "uncertainty"

    def optimizers(self) -> dict[str, tuple[list[dict], int]]:
        groups = [{"params": self.lora.parameters()}]
        if self.uncertainty:
            groups.append({"params": [self.log_var], "weight_decay": 0.0})
        return {"shared": (groups, self.total_steps)}

    def draw(self, step: int) -> Draw:
        self._stage = next(i for i, end in enumerate(self.ends) if step < end)
        stage = self.stages[self._stage]
        self._probs = stage.probs or (self.dynamic.probabilities(step) if self.dynamic else self.static_probs)
        return Draw([self.sampler.draw(self._probs, self.batch_size) for _ in range(self.grad_accum)], ["shared"])

    def rows(self, grouped):
        return self.lora.rows(grouped)

    def weights(self) -> dict[str, float]:
        """w_t of the loss formula, per task."""
        if self.loss_spec.weighting == "static":
            return {n: float(self.loss_spec.weights[n]) for n in self.tasks}
        if self.uncertainty:
            return {n: math.exp(-float(self.log_var.detach()[i])) for i, n in enumerate(self.tasks)}
        return dict.fromkeys(self.tasks, 1.0)

    def objective(self, losses, grouped, counts, first: bool) -> torch.Tensor:
        whole = sum(counts.values())
        weights = self.weights()
        loss, start = losses.new_zeros(()), 0
        for task, count in grouped:
            w = torch.exp(-self.log_var[self.tasks.index(task)]) if self.uncertainty else weights[task]
            loss = loss + w * losses[start:start + count].sum() / whole
            start += count
        if first and self.uncertainty:  # r_t once per step, over the whole step's shares
            loss = loss + sum(counts[n] / whole * self.log_var[self.tasks.index(n)] for n in counts)
        return loss

    def record(self, step: int, stats: dict[str, TaskStep]) -> dict:
        if self.dynamic:
            for task, s in stats.items():
                self.dynamic.observe_loss(task, s.loss)
        row = {"mix": self._probs, "loss_weights": self.weights()}
        return row | ({"stage": self._stage} if len(self.stages) > 1 else {})

    def evaluations(self, step: int) -> list[str] | None:
        if len(self.stages) > 1 and step in self.ends:
            return self.stages[self.ends.index(step)].trained
        return None

    def observe_eval(self, step: int, scores: dict[str, float]) -> None:
        if self.dynamic:
            self.dynamic.observe_eval(scores)
        if self.evaluations(step):
            index = self.ends.index(step)
            self.history.append({"stage": index, "task": self.stages[index].task, "step": step, "eval": scores})

    def steps(self, task: str) -> int:
        return self.total_steps

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.lora.state_dict() | {"loss.log_var": self.log_var.detach()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.log_var.data.copy_(tensors.pop("loss.log_var"))
        self.lora.load_state_dict(tensors)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "history": self.history,
                "dynamic": self.dynamic.state_dict() if self.dynamic else None}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.dynamic:
            self.dynamic.load_state_dict(state["dynamic"])
        self.history = state["history"]


def stage_ends(stages: list[Stage]) -> list[int]:
    """The step each stage ends at (cumulative)."""
    ends, total = [], 0
    for stage in stages:
        total += stage.steps
        ends.append(total)
    return ends


def check_shared(spec: Spec, names: list[str]) -> list[str]:
    """What only a shared run needs of the selected tasks; every problem before any training."""
    problems = []
    if len(names) < 2:
        problems.append("mtft-train shared needs at least two tasks; use mtft-train adapters for a single task")
    order = spec.multitask.sequential.order
    if spec.multitask.schedule == "sequential" and order is not None:
        missing = [n for n in names if n not in order]
        if missing:
            problems.append(f"multitask.sequential.order: tasks {missing} are selected but not in the order "
                            f"{order}; add them or leave them out with --task")
    return problems


def plan_stages(spec: Spec, items: dict[str, list[Tokenized]], lora: TaskLoRA, pad_id: int) -> list[Stage]:
    """One stage (joint), or one per task and round (sequential) with replay of earlier tasks."""
    m, t = spec.multitask, spec.training
    sizes = {n: len(v) for n, v in items.items()}
    # The compute of N per-task adapters: max_steps per task, or epochs over every task's data.
    total = t.max_steps * len(sizes) if t.max_steps is not None else total_steps(sum(sizes.values()), t)
    if m.schedule == "joint":
        return [Stage(total)]
    seq = m.sequential
    order = [n for n in seq.order if n in sizes] if seq.order else _order_by(seq.order_by, items, lora, pad_id)
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
def _order_by(measure: str, items: dict[str, list[Tokenized]], lora: TaskLoRA, pad_id: int) -> list[str]:
    """Task order for a curriculum: spec order, largest first, or easiest (lowest base loss) first."""
    names = list(items)
    if measure == "spec":
        return names
    if measure == "size":
        return sorted(names, key=lambda n: -len(items[n]))
    losses = {}
    device = next(lora.model.parameters()).device
    for name in names:
        batch = {k: v.to(device) for k, v in collate(items[name][:32], pad_id).items()}
        with lora.task(name):  # adapters are zero at the start: this is the base model's loss
            summed = answer_loss(lora.model, batch).sum()
        losses[name] = float(summed / (batch["labels"][:, 1:] >= 0).sum())
    log.info("curriculum by base loss (easiest first): %s",
             {n: round(v, 3) for n, v in sorted(losses.items(), key=lambda x: x[1])})
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
