"""Step plans of per-task adapters: one task alone (`mtft-train adapters`), or N in lockstep (`--one-pass`).

Both train `TaskLoRA` layers (separate: one LoRA per task), give each task its own optimizer,
schedule and per-token mean loss, and read each task's batches from its own stream, so an
adapter trained in lockstep equals the one trained alone.
The shared adapter's plan is in `shared.py`; the loop that runs them all is `loop.train`.
"""

from __future__ import annotations

import torch

from .batches import BatchStream, Tokenized
from .loop import Draw, TaskStep, total_steps
from .spec import TrainingSpec
from .tasklora import TaskLoRA


def own_means(losses: torch.Tensor, grouped: list[tuple[str, int]], counts: dict[str, int]) -> torch.Tensor:
    """Σ_t (task t's summed example losses / its answer tokens in the step): every adapter as if alone."""
    loss, start = losses.new_zeros(()), 0
    for task, count in grouped:
        loss = loss + losses[start:start + count].sum() / counts[task]
        start += count
    return loss


class _PerTask:
    """What both per-task plans share: a batch stream, a step count and an optimizer per task."""

    per_example = False

    def __init__(self, items: dict[str, list[Tokenized]], t: TrainingSpec, own: dict[str, TrainingSpec] | None = None):
        """`own`: a task's training where it sets its own budget (`tasks[].training`), else `t`."""
        self.tasks, self.items, self.grad_accum = list(items), items, t.grad_accum
        self.streams = {n: BatchStream(v, t.batch_size, t.seed, t.batching == "length") for n, v in items.items()}
        self.trainings = {n: (own or {}).get(n, t) for n in items}
        self.totals = {n: total_steps(len(v), self.trainings[n]) for n, v in items.items()}
        self.total_steps = max(self.totals.values())

    def objective(self, losses, grouped, counts, first: bool) -> torch.Tensor:
        return own_means(losses, grouped, counts)

    def evaluations(self, step: int) -> None:
        return None

    def observe_eval(self, step: int, scores: dict[str, float]) -> None:
        pass

    def steps(self, task: str) -> int:
        return self.totals[task]

    def state_dict(self) -> dict:
        return {"streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, stream in self.streams.items():
            stream.load_state_dict(state["streams"][name])


class LockstepPlan(_PerTask):
    """Every task's adapter in one pass: step k holds each task's k-th batch, the batch it would get alone."""

    name = "one pass"

    def __init__(self, lora: TaskLoRA, items: dict[str, list[Tokenized]], t: TrainingSpec,
                 own: dict[str, TrainingSpec] | None = None):
        super().__init__(items, t, own)
        self.lora, self.model = lora, lora.model

    def optimizers(self) -> dict[str, tuple[list[dict], int]]:
        return {n: ([{"params": self.lora.parameters(n), "lr": self.trainings[n].learning_rate}], self.totals[n])
                for n in self.tasks}

    def draw(self, step: int) -> Draw:
        active = [n for n in self.tasks if step < self.totals[n]]
        parts = [[(n, i) for n in active for i in self.streams[n].next()[1]] for _ in range(self.grad_accum)]
        return Draw(parts, active)

    def rows(self, grouped):
        return self.lora.rows(grouped)

    def record(self, step: int, stats: dict[str, TaskStep]) -> dict:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.lora.state_dict()

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.load_state_dict(tensors)


class LoraPlan(LockstepPlan):
    """One task's adapter, trained alone: lockstep over that task only, with its epoch in the log."""

    def __init__(self, lora: TaskLoRA, task: str, items: list[Tokenized], t: TrainingSpec):
        super().__init__(lora, {task: items}, t)
        self.name, self._epoch = task, 0

    def draw(self, step: int) -> Draw:
        parts = []
        for _ in range(self.grad_accum):
            self._epoch, ids = self.streams[self.name].next()
            parts.append([(self.name, i) for i in ids])
        return Draw(parts, [self.name])

    def record(self, step: int, stats: dict[str, TaskStep]) -> dict:
        return {"epoch": self._epoch}
