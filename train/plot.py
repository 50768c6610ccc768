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
