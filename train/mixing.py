"""How often each task is sampled in joint training, and which examples fill a mixed batch.

Static strategies turn task sizes into one distribution; `DynamicMixing` re-weights
towards tasks that learn slowly; `TaskSampler` turns a distribution into rows of
(task, example index). Everything is seeded and has a state dict, so a resumed run
draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .spec import MixingSpec

EMA_ALPHA = 0.1  # weight of the newest loss in a task's running loss
MIN_SLOWNESS = 1e-3  # keeps Σ slowness > 0 when every task is solved


def task_probabilities(mixing: MixingSpec, sizes: dict[str, int]) -> dict[str, float]:
    """The static share of each task (keys in the order of `sizes`); dynamic starts uniform."""
    if not sizes:
        raise ValueError("no tasks to mix: sizes is empty")
    empty = [t for t, n in sizes.items() if n <= 0]
    if empty:
        raise ValueError(f"tasks {empty} have no training examples; every mixed task needs at least one")
    strategy = mixing.strategy
    if strategy == "proportional":
        raw = {t: float(n) for t, n in sizes.items()}
    elif strategy in ("uniform", "dynamic"):
        raw = {t: 1.0 for t in sizes}
    elif strategy in ("temperature", "sqrt"):
        power = 0.5 if strategy == "sqrt" else 1.0 / mixing.temperature
        # Scale by the largest size first: n**(1/T) of big tasks stays finite and exact-ish.
        largest = max(sizes.values())
        raw = {t: (n / largest) ** power for t, n in sizes.items()}
    elif strategy == "capped":
        assert mixing.cap is not None  # MixingSpec requires cap for this strategy
        raw = {t: float(min(n, mixing.cap)) for t, n in sizes.items()}
    elif strategy == "explicit":
        weights = mixing.weights or {}
        missing = [t for t in sizes if t not in weights]
        if missing:
            raise ValueError(f"explicit mixing has no weight for tasks {missing}; weights name {sorted(weights)}")
        raw = {t: float(weights[t]) for t in sizes}
        if not sum(raw.values()) > 0:
            raise ValueError(f"explicit mixing weights for tasks {list(sizes)} sum to 0; give at least one > 0")
    else:
        raise ValueError(f"unknown mixing strategy {strategy!r}")
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


class DynamicMixing:
    """Samples slowly learning tasks more often; every task keeps at least floor / N."""

    def __init__(self, tasks: list[str], floor: float, update_every: int, signal: Literal["loss", "eval"]):
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be non-empty and distinct, got {tasks}")
        if not 0 <= floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {floor}")
        if update_every <= 0:
            raise ValueError(f"update_every must be > 0, got {update_every}")
        if signal not in ("loss", "eval"):
            raise ValueError(f"signal must be 'loss' or 'eval', got {signal!r}")
        self.tasks = list(tasks)
        self.floor = floor
        self.update_every = update_every
        self.signal = signal
        self._first: dict[str, float] = {}
        self._ema: dict[str, float] = {}
        self._scores: dict[str, float] = {}
        self._current = {t: 1.0 / len(tasks) for t in tasks}

    def _check(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; tasks are {self.tasks}")

    def observe_loss(self, task: str, loss: float) -> None:
        """Record one step's mean loss of `task`."""
        self._check(task)
        if not math.isfinite(loss):
            raise ValueError(f"loss of task {task!r} is {loss}; mixing needs finite losses")
        if task not in self._first:
            self._first[task] = self._ema[task] = float(loss)
        else:
            self._ema[task] = (1 - EMA_ALPHA) * self._ema[task] + EMA_ALPHA * float(loss)

    def observe_eval(self, scores: dict[str, float]) -> None:
        """Record the latest eval metric per task, in [0, 1], higher is better."""
        for task, score in scores.items():
            self._check(task)
            if not 0 <= score <= 1:
                raise ValueError(f"eval score of task {task!r} is {score}; scores must be in [0, 1]")
            self._scores[task] = float(score)

    def _slowness(self, task: str) -> float:
        if self.signal == "eval":
            return max(1.0 - self._scores[task], MIN_SLOWNESS) if task in self._scores else 1.0
        if task not in self._first:
            return 1.0
        first = self._first[task]
        # A task whose first loss is already 0 has nothing left to learn.
        return max(self._ema[task] / first, MIN_SLOWNESS) if first > 0 else MIN_SLOWNESS

    def probabilities(self, step: int) -> dict[str, float]:
        """The share of each task at `step`; re-weighted only every `update_every` steps."""
        if step % self.update_every == 0:
            slowness = {t: self._slowness(t) for t in self.tasks}
            total = sum(slowness.values())
            n = len(self.tasks)
            self._current = {t: self.floor / n + (1 - self.floor) * s / total for t, s in slowness.items()}
        return dict(self._current)

    def state_dict(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "first": dict(self._first),
            "ema": dict(self._ema),
            "scores": dict(self._scores),
            "current": dict(self._current),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["tasks"] != self.tasks:
            raise ValueError(f"mixing state is for tasks {state['tasks']}, not {self.tasks}")
        self._first = dict(state["first"])
        self._ema = dict(state["ema"])
        self._scores = dict(state["scores"])
        self._current = dict(state["current"])


class TaskSampler:
    """Draws (task, example index) rows: tasks from a distribution, examples epoch by epoch."""

    def __init__(self, sizes: dict[str, int], seed: int):
        empty = [t for t, n in sizes.items() if n <= 0]
        if not sizes or empty:
            raise ValueError(f"every task needs at least one example; sizes are {sizes}")
        self.sizes = dict(sizes)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch = {t: 0 for t in sizes}
        self._position = {t: 0 for t in sizes}
        self.counts = {t: 0 for t in sizes}
        self._orders: dict[str, tuple[int, list[int]]] = {}  # task -> (epoch, order); a cache

    def _order(self, task: str) -> list[int]:
        """The task's example order in its current epoch: a pure function of seed, task, epoch."""
        epoch = self._epoch[task]
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            pos = list(self.sizes).index(task)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + 7919 * pos + epoch)
            cached = (epoch, torch.randperm(self.sizes[task], generator=gen).tolist())
            self._orders[task] = cached
        return cached[1]

    def _next(self, task: str) -> int:
        index = self._order(task)[self._position[task]]
        self._position[task] += 1
        if self._position[task] == self.sizes[task]:
            self._epoch[task] += 1
            self._position[task] = 0
        return index

    def draw(self, probs: dict[str, float], n: int) -> list[tuple[str, int]]:
        """`n` rows, grouped by task in the order of `sizes` (the loop relies on contiguous tasks)."""
        unknown = [t for t in probs if t not in self.sizes]
        if unknown:
            raise ValueError(f"probabilities name unknown tasks {unknown}; tasks are {list(self.sizes)}")
        weights = [float(probs.get(t, 0.0)) for t in self.sizes]
        if min(weights) < 0 or not sum(weights) > 0 or not all(map(math.isfinite, weights)):
            raise ValueError(f"probabilities must be finite, >= 0 and not all 0, got {probs}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        picks = torch.multinomial(torch.tensor(weights, dtype=torch.float64), n, True, generator=self._generator)
        per_task = torch.bincount(picks, minlength=len(weights)).tolist()
        rows = []
        # Each task's stream is independent, so taking its k rows together equals taking them in draw order.
        for task, k in zip(self.sizes, per_task):
            rows.extend((task, self._next(task)) for _ in range(k))
            self.counts[task] += k
        return rows

    def state_dict(self) -> dict:
        return {
            "sizes": dict(self.sizes),
            "seed": self.seed,
            "generator": self._generator.get_state().tolist(),
            "epoch": dict(self._epoch),
            "position": dict(self._position),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["sizes"] != self.sizes or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for sizes {state['sizes']} seed {state['seed']}, not {self.sizes} seed {self.seed}"
            )
        self._generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._epoch = dict(state["epoch"])
        self._position = dict(state["position"])
        self.counts = dict(state["counts"])
        self._orders = {}


def chi_square_p(observed: list[int], expected_probs: list[float]) -> float:
    """Pearson goodness-of-fit p-value of counts against probabilities (categories with p=0 skipped)."""
    if len(observed) != len(expected_probs):
        raise ValueError(f"{len(observed)} counts but {len(expected_probs)} probabilities")
    if any(o > 0 and p == 0 for o, p in zip(observed, expected_probs)):
        return 0.0  # a category that cannot occur did
    kept = [(o, p) for o, p in zip(observed, expected_probs) if p > 0]
    total, mass = sum(o for o, _ in kept), sum(p for _, p in kept)
    df = len(kept) - 1
    if total == 0 or df == 0:
        return 1.0
    # Normalised over the kept categories, so probabilities that round to 0.999… are fine.
    stat = sum((o - total * p / mass) ** 2 / (total * p / mass) for o, p in kept)
    a, x = torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, x))
