"""`mtft-train`: thin typer commands that build a config and call a plain function."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtft.registry import Registry, RegistryError

from .base import BaseModelError, mtft_home, resolve_base
from .multitask import check_shared_run, train_one_pass, train_shared
from .processes import is_main_process
from .run import train_adapters
from .session import RunOptions, TaskResult, check_run
from .spec import SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
registry_app = typer.Typer(no_args_is_help=True, help="Inspect the adapter registry.")
app.add_typer(registry_app, name="registry")

RegistryOption = Annotated[
    Optional[Path],
    typer.Option("--registry", help="adapter registry folder [default: $MTFT_REGISTRY or $MTFT_HOME/registry]"),
]


def _registry_path(value: Path | None) -> Path:
    return value or Path(os.environ.get("MTFT_REGISTRY") or mtft_home() / "registry")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="task spec YAML")]
TaskOption = Annotated[Optional[list[str]], typer.Option("--task", "-t", help="train only these tasks")]
OutputOption = Annotated[Optional[Path], typer.Option(help="run folder [default: runs/<spec name>[-shared]]")]
ResumeOption = Annotated[bool, typer.Option(help="continue an interrupted run in the same folder")]
CheckOption = Annotated[bool, typer.Option(help="validate spec, data, base model and registry; train nothing")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads, overriding training.threads", min=1)]


@app.command()
def adapters(
    config: ConfigOption,
    task: TaskOption = None,
    registry: RegistryOption = None,
    output: OutputOption = None,
    resume: ResumeOption = False,
    check: CheckOption = False,
    threads: ThreadsOption = None,
    one_pass: Annotated[bool, typer.Option(
        "--one-pass", help="train every task's adapter in one run on mixed batches (base loaded once); "
        "each adapter equals the one trained alone")] = False,
) -> None:
    """Train one LoRA adapter per task and publish each into the registry."""
    _run(config, task, registry, output or Path("runs") / config.stem, resume, check, threads,
         train_one_pass if one_pass else train_adapters, "adapter", check_run)


@app.command()
def shared(
    config: ConfigOption,
    task: TaskOption = None,
    registry: RegistryOption = None,
    output: OutputOption = None,
    resume: ResumeOption = False,
    check: CheckOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Train one shared adapter conditioned on task embeddings; publish each task's export."""
    _run(config, task, registry, output or Path("runs") / f"{config.stem}-shared", resume, check, threads,
         train_shared, "shared adapter", check_shared_run)


def _run(config: Path, task, registry, output: Path, resume: bool, check: bool, threads, trainer, label: str,
         checker) -> None:
    _logging()
    try:
        spec = load_spec(config)
        if threads is not None:
            spec.training.threads = threads
        options = RunOptions(output=output, registry=_registry_path(registry), tasks=task, resume=resume)
        if check:
            checker(spec, options)
            typer.echo(f"{config}: OK ({len(options.tasks or spec.tasks)} tasks)")
            return
        results = trainer(spec, options)
    except (SpecError, RegistryError, BaseModelError) as exc:
        _fail(exc)
    if not is_main_process():  # under accelerate launch the main process reports for the run
        return
    typer.echo(format_results(results, label))
    typer.echo(f"\nadapters published to {options.registry}; curves in {options.output / 'curves.png'}")


def format_results(results: list[TaskResult], label: str = "adapter") -> str:
    """The final table with 95 % intervals; shared runs add the per-task adapters' scores where the
    registry has them and the examples each task trained on (share of its own run's)."""
    compare = any(r.separate is not None for r in results)
    shared = any(r.seen is not None for r in results)
    head = (("task", "metric", "base (zero-shot)") + (("per-task adapter",) if compare else ())
            + (label, "95% interval", "gain", "version") + (("examples (share)",) if shared else ()))
    rows = [head]
    for r in results:
        separate = (f"{r.separate:.3f}" if r.separate is not None else "-",) if compare else ()
        low, high = r.adapter_interval or (float("nan"), float("nan"))
        seen = (f"{r.seen} ({r.share:.0%})",) if shared else ()
        rows.append((r.task, r.metric, f"{r.base:.3f}", *separate, f"{r.adapter:.3f}", f"[{low:.3f}, {high:.3f}]",
                     f"{r.adapter - r.base:+.3f}", f"v{r.version}", *seen))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


@app.command("prepare-base")
def prepare_base(name: Annotated[str, typer.Argument(help="base model")] = "smollm2-135m") -> None:
    """Convert the embedded base model (or check a folder) ahead of training and serving."""
    _logging()
    try:
        typer.echo(resolve_base(name))
    except BaseModelError as exc:
        _fail(exc)


@registry_app.command("list")
def registry_list(
    registry: RegistryOption = None,
    all_versions: Annotated[bool, typer.Option("--all", help="every version, not only the newest")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON record per line")] = False,
) -> None:
    """Show published adapters with their eval metrics."""
    store = Registry(_registry_path(registry))
    records = store.records() if all_versions else list(store.latest().values())
    if as_json:
        for record in records:
            typer.echo(record.model_dump_json())
        return
    if not records:
        typer.echo(f"no adapters in {store.root}")
        return
    rows = [("task", "version", "prefix", "metric", "base", "adapter", "rank", "created")]
    for r in records:
        rows.append((r.task, f"v{r.version}", json.dumps(r.prefix), r.metric,
                     f"{r.metrics.get('base', float('nan')):.3f}", f"{r.metrics.get('adapter', float('nan')):.3f}",
                     str(r.rank), r.created.strftime("%Y-%m-%d %H:%M") if r.created else "-"))
    typer.echo(_table(rows))


if __name__ == "__main__":
    app()
