"""Fine-tune a frozen base model for many tasks and publish one LoRA adapter per task.

Example: mtft-train adapters --config tasks.yaml (then serve them all: mtft-serve)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtft.registry import RegistryError

from .adapters import train_adapters
from .base import BaseModelError, resolve_base
from .check import RunOptions, check_run
from .cli_registry import RegistryOption, fail, registry_app, registry_path, setup_logging, table
from .multitask import check_shared_run, train_one_pass, train_shared
from .processes import is_main_process
from .results import TaskResult
from .spec import SpecError
from .spec_file import load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(registry_app, name="registry")
REJECTED_EXIT = 3  # trained and published, but a publish gate kept a version from serving

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
    """Train one LoRA adapter per task on the frozen base and publish each into the registry.

    Example: mtft-train adapters --config tasks.yaml --task ticket
    """
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
    """Train one adapter shared by all tasks (with learned task embeddings); publish each task's exact export.

    Example: mtft-train shared --config tasks.yaml
    """
    _run(config, task, registry, output or Path("runs") / f"{config.stem}-shared", resume, check, threads,
         train_shared, "shared adapter", check_shared_run)


def _run(config: Path, task, registry, output: Path, resume: bool, check: bool, threads, trainer, label: str,
         checker) -> None:
    setup_logging()
    try:
        spec = load_spec(config)
        if threads is not None:
            spec.training.threads = threads
        options = RunOptions(output=output, registry=registry_path(registry), tasks=task, resume=resume)
        if check:
            checker(spec, options)
            typer.echo(f"{config}: OK ({len(options.tasks or spec.tasks)} tasks)")
            return
        results = trainer(spec, options)
    except (SpecError, RegistryError, BaseModelError) as exc:
        fail(exc)
    if not is_main_process():  # under accelerate launch the main process reports for the run
        return
    typer.echo(format_results(results, label))
    typer.echo(f"\nadapters published to {options.registry}; curves in {options.output / 'curves.png'}")
    for r in (r for r in results if r.negative_transfer):
        typer.echo(f"\nnegative transfer: {r.task}'s shared export scores {r.adapter:.3f} (95% up to "
                   f"{r.adapter_interval[1]:.3f}), below its per-task adapter's {r.separate:.3f}. With publish.gate "
                   "{no_worse: 0} the better per-task adapter keeps serving.", err=True)
    for r in (r for r in results if r.rejected):
        typer.echo(f"\n{r.task} v{r.version} failed its publish gate ({r.gate.reason}; rule {r.gate.rule}): it is in "
                   f"the registry marked rejected and does not serve. To serve it anyway: "
                   f"mtft-train registry pin {r.task} {r.version} --force", err=True)
    if any(r.rejected for r in results):
        raise typer.Exit(REJECTED_EXIT)


def format_results(results: list[TaskResult], label: str = "adapter") -> str:
    """The final table with 95 % intervals; shared runs add the per-task adapters' scores where the
    registry has them and the examples each task trained on (share of its own run's)."""
    compare = any(r.separate is not None for r in results)
    shared = any(r.seen is not None for r in results)
    head = (("task", "metric", "base (zero-shot)") + (("per-task adapter",) if compare else ())
            + (label, "95% interval", "gain", "version") + (("examples (share)",) if shared else ()))
    rows = [head]
    for r in results:
        separate = (f"{r.separate:.3f}" + (" (better)" if r.negative_transfer else "") if r.separate is not None
                    else "-",) if compare else ()
        low, high = r.adapter_interval or (float("nan"), float("nan"))
        seen = (f"{r.seen} ({r.share:.0%})",) if shared else ()
        rows.append((r.task, r.metric, f"{r.base:.3f}", *separate, f"{r.adapter:.3f}", f"[{low:.3f}, {high:.3f}]",
                     f"{r.adapter - r.base:+.3f}", f"v{r.version}", *seen))
    return table(rows)


@app.command("prepare-base")
def prepare_base(name: Annotated[str, typer.Argument(help="base model")] = "smollm2-135m") -> None:
    """Convert the embedded base model once (or check a model folder) and print its folder.

    Example: mtft-train prepare-base smollm2-135m
    """
    setup_logging()
    try:
        typer.echo(resolve_base(name))
    except BaseModelError as exc:
        fail(exc)


if __name__ == "__main__":
    app()
