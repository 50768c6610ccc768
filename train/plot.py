"""PNG figures of per-task training curves: people would rather look than read JSONL."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics: dict[str, Path], out: Path, metric_names: dict[str, str]) -> None:
    """One panel per task: training loss (left axis) and eval score (right axis) over steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    tasks = [t for t, p in metrics.items() if p.exists()]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [json.loads(line) for line in metrics[task].read_text().splitlines()]
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if losses:
            ax.plot(*zip(*losses), color="tab:blue", lw=1)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss", color="tab:blue")
        evals = sorted((r["step"], r["eval"]) for r in rows if "eval" in r)
        if evals:
            right = ax.twinx()
            right.plot(*zip(*evals), "o-", color="tab:orange")
            right.set_ylabel(f"eval {metric_names[task]}", color="tab:orange")
            right.set_ylim(0, 1.02)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_joint(metrics: Path, out: Path, metric_names: dict[str, str], stage_ends: list[int] | None = None) -> None:
    """A multi-task run: one training-loss curve per task (left) and one eval curve per task (right).

    Transfer, interference and forgetting show as curves moving together or apart; dashed lines
    mark the ends of sequential stages.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics.exists():
        return
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, task in enumerate(metric_names):
        color = f"C{i}"
        losses = [(r["step"], r["tasks"][task]["loss"]) for r in rows if task in r.get("tasks", {})]
        if losses:
            loss_ax.plot(*zip(*losses), color=color, lw=1, label=task)
        evals = sorted((r["step"], r["eval"][task]) for r in rows if task in (r.get("eval") or {}))
        if evals:
            eval_ax.plot(*zip(*evals), "o-", color=color, label=f"{task} ({metric_names[task]})")
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
