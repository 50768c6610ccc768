"""The run log: one `metrics.jsonl` per run folder, one row format for every training mode.

A step row: `step`, `loss` (the step's loss, Σ_t share_t · loss_t), `lr`, `tokens_per_s`,
`seconds`, `tasks` ({task: {loss, examples, tokens}} of the step), `seen` (examples per task so
far), `eval` ({task: score}, where evaluated), and what the plan adds (`epoch`; `mix`,
`loss_weights`, `stage` in shared runs). After training, one row per model evaluated at the end:
`{"step", "model": "base" | "adapter", "eval": {task: score}}`.
`mtft-train adapters` trains its tasks one after another with a step count each: its rows carry
`task`, the task whose training they belong to. Multi-task runs' rows carry none.
Where the spec names experiment trackers (`training.report_to`), every row appended also goes to
them (`trackers.Trackers`), and `close` hands them the final table.
"""

from __future__ import annotations

import json
from pathlib import Path

from .trackers import Trackers

LOG_FILE = "metrics.jsonl"


class RunLog:
    """Appends rows to a run folder's `metrics.jsonl` (and to `trackers`); `task` tags (and scopes) a
    per-task training."""

    def __init__(self, folder: Path, task: str | None = None, trackers: Trackers | None = None):
        self.path, self.task, self.trackers = folder / LOG_FILE, task, trackers

    def scoped(self, task: str) -> RunLog:
        return RunLog(self.path.parent, task, self.trackers)

    def append(self, row: dict) -> None:
        tagged = {"task": self.task, **row} if self.task else row
        with self.path.open("a") as handle:
            handle.write(json.dumps(tagged) + "\n")
        if self.trackers is not None:
            self.trackers.log(tagged)

    def close(self) -> None:
        """The run is over: the trackers get `results.json` and end their run."""
        if self.trackers is not None:
            self.trackers.finish()

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def truncate(self, step: int) -> None:
        """Drop this training's rows after `step` and its final evaluations: a resumed run logs them again."""
        kept = [r for r in self.rows() if r.get("task") != self.task or (r["step"] <= step and "model" not in r)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def plot(rows: list[dict], out: Path, metric_names: dict[str, str], stage_ends: list[int] | None = None) -> None:
    """`curves.png`: one training-loss curve per task (left) and one eval curve per task (right).

    Transfer, interference and forgetting show as curves moving together or apart; dashed lines
    mark the ends of sequential stages.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, task in enumerate(metric_names):
        losses = [(r["step"], r["tasks"][task]["loss"]) for r in rows if task in r.get("tasks", {})]
        if losses:
            loss_ax.plot(*zip(*losses), color=f"C{i}", lw=1, label=task)
        evals = sorted((r["step"], r["eval"][task]) for r in rows if task in (r.get("eval") or {}))
        if evals:
            eval_ax.plot(*zip(*evals), "o-", color=f"C{i}", label=f"{task} ({metric_names[task]})")
    for ax, title in ((loss_ax, "train loss per task"), (eval_ax, "eval metric per task")):
        for end in stage_ends or []:
            ax.axvline(end, color="grey", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    eval_ax.set_ylim(0, 1.02)
    loss_ax.set_yscale("log")  # losses fall by orders of magnitude; a linear axis hides the later curves
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
