"""`mtft-train registry ...`: see what is published and decide which version serves.

Every change is one atomic rewrite of `<registry>/<task>/rollout.json`; routers
watching the registry follow it within a poll, with no restart.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtft.registry import AdapterRecord, Registry, RegistryError
from mtft.registry.rollout import Canary, Rollout, Serving, parse_percent

from .base import mtft_home
from .spec import SpecError

registry_app = typer.Typer(no_args_is_help=True, help="""See published adapters and choose which version serves.

Example: mtft-train registry show ticket; mtft-train registry promote ticket 3 --canary 10%""")

RegistryOption = Annotated[
    Optional[Path],
    typer.Option("--registry", help="adapter registry folder [default: $MTFT_REGISTRY or $MTFT_HOME/registry]"),
]
TaskArgument = Annotated[str, typer.Argument(help="task name", show_default=False)]
VersionArgument = Annotated[int, typer.Argument(help="version number (N of vN)", show_default=False)]
ForceOption = Annotated[bool, typer.Option("--force", help="also a version its publish gate rejected")]


def registry_path(value: Path | None) -> Path:
    return value or Path(os.environ.get("MTFT_REGISTRY") or mtft_home() / "registry")


def fail(exc: Exception | str, code: int = 2) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _score(record: AdapterRecord, key: str) -> str:
    return f"{record.metrics[key]:.3f}" if key in record.metrics else "-"


@registry_app.command("list")
def registry_list(
    registry: RegistryOption = None,
    all_versions: Annotated[bool, typer.Option("--all", help="every version, not only the newest")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON record per line")] = False,
) -> None:
    """List published adapters with their eval scores.

    Example: mtft-train registry list --all
    """
    store = Registry(registry_path(registry))
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
        rows.append((r.task, f"v{r.version}", json.dumps(r.prefix), r.metric, _score(r, "base"), _score(r, "adapter"),
                     str(r.rank), r.created.strftime("%Y-%m-%d %H:%M") if r.created else "-"))
    typer.echo(table(rows))


def _state(store: Registry, record: AdapterRecord, serving: Serving, rollout: Rollout) -> str:
    if record.version == serving.primary:
        return "serving (pinned)" if serving.pinned else "serving"
    if serving.canary and record.version == serving.canary.version:
        return f"canary {serving.canary.percent:g} %"
    if record.rejected:
        return "rejected, forced" if store.good(record, rollout) else "rejected"
    return "published"


def _describe(store: Registry, task: str) -> str:
    serving = store.serving(task)
    text = f"{task}: serves v{serving.primary}" if serving.primary else f"{task}: serves nothing"
    if serving.pinned:
        text += " (pinned: later versions wait for `unpin` or `promote`)"
    if serving.canary:
        text += f"; v{serving.canary.version} answers {serving.canary.percent:g} % of requests (canary)"
    return text


@registry_app.command()
def show(task: TaskArgument, registry: RegistryOption = None) -> None:
    """Show a task's versions: scores, gate verdicts, and which one serves.

    Example: mtft-train registry show ticket
    """
    store = _store(registry, task)
    rollout, serving = store.rollout(task), store.serving(task)
    rows = [("version", "state", "base", "adapter", "gate", "trained by", "created")]
    for v in store.versions(task):
        try:
            r = store.read(task, v)
        except RegistryError as exc:
            rows.append((f"v{v}", "unreadable", "-", "-", str(exc)[:60], "-", "-"))
            continue
        gate = "-" if r.gate is None else ("passed" if r.gate.passed else f"failed: {r.gate.reason}")
        rows.append((f"v{v}", _state(store, r, serving, rollout), _score(r, "base"), _score(r, "adapter"), gate,
                     r.trained_by, r.created.strftime("%Y-%m-%d %H:%M") if r.created else "-"))
    typer.echo(_describe(store, task) + "\n\n" + table(rows))


@registry_app.command()
def pin(task: TaskArgument, version: VersionArgument, registry: RegistryOption = None, force: ForceOption = False) -> None:
    """Serve exactly this version, whatever is published later (also a rollback to any version).

    Example: mtft-train registry pin ticket 2
    """
    _change(registry, task, {"pin": version, "canary": None}, version, force)


@registry_app.command()
def unpin(task: TaskArgument, registry: RegistryOption = None) -> None:
    """Serve the newest version that passed its gate again.

    Example: mtft-train registry unpin ticket
    """
    _change(registry, task, {"pin": None})


@registry_app.command()
def promote(
    task: TaskArgument,
    version: VersionArgument,
    canary: Annotated[Optional[str], typer.Option(help="give it only this share of requests, e.g. 10%; "
                                                  "the version serving now keeps the rest")] = None,
    registry: RegistryOption = None,
    force: ForceOption = False,
) -> None:
    """Make a version the one that serves, or first a canary with a share of the traffic.

    A canary splits requests by a stable hash of their `user` field (else API key, else text).

    Example: mtft-train registry promote ticket 3 --canary 10%  (later: mtft-train registry promote ticket 3)
    """
    store = _store(registry, task)
    if canary is not None:
        try:
            percent = parse_percent(canary)
        except ValueError as exc:
            fail(exc)
        primary = store.serving(task).primary
        if primary == version:
            fail(f"{task} v{version} serves already; pin the version that should keep the rest first "
                 f"(mtft-train registry pin {task} <version>)")
        update = {"pin": primary, "canary": Canary(version=version, percent=percent)}
    else:
        newest_good = max((v for v in store.versions(task) if v != version and _good(store, task, v)), default=0)
        update = {"pin": None if version > newest_good else version, "canary": None}  # newest: unpinned
    _change(registry, task, update, version, force)


@registry_app.command()
def rollback(task: TaskArgument, registry: RegistryOption = None) -> None:
    """Serve the newest good version older than the one serving now (and pin it).

    Example: mtft-train registry rollback ticket
    """
    store = _store(registry, task)
    primary = store.serving(task).primary
    older = [v for v in store.versions(task) if primary is not None and v < primary and _good(store, task, v)]
    if not older:
        fail(f"{task} has no good version older than v{primary} to roll back to; versions: {store.versions(task)}")
    _change(registry, task, {"pin": older[-1], "canary": None}, older[-1])


@registry_app.command()
def remove(
    task: TaskArgument,
    version: Annotated[Optional[int], typer.Argument(help="one version; default: the whole task")] = None,
    registry: RegistryOption = None,
    force: Annotated[bool, typer.Option("--force", help="even a version that serves (or the task serving it)")] = False,
) -> None:
    """Delete a version (or a task) from the registry; never what serves, without --force.

    Example: mtft-train registry remove ticket 1
    """
    store = _store(registry, task)
    serving = store.serving(task)
    live = {serving.primary, serving.canary.version if serving.canary else None} - {None}
    hit = live if version is None else live & {version}
    if hit and not force:
        fail(f"{task} v{min(hit)} serves now; pin or promote another version first, or pass --force")
    if version is not None and version in live:  # forced: the registry then serves the next good version
        store.update_rollout(task, lambda r: r.model_copy(update={
            "pin": None if r.pin == version else r.pin,
            "canary": None if r.canary and r.canary.version == version else r.canary}))
    try:
        gone = store.remove(task, version)
    except RegistryError as exc:
        fail(exc)
    typer.echo(f"removed {task} {', '.join(f'v{v}' for v in gone)}"
               + (f"\n{_describe(store, task)}" if store.versions(task) else ""))


@registry_app.command("eval")
def evaluate_published(
    task: TaskArgument,
    data: Annotated[Path, typer.Option(help="JSONL/CSV/TSV rows with the fields the task's template uses")],
    version: Annotated[Optional[int], typer.Option(help="default: the version serving now")] = None,
    registry: RegistryOption = None,
    limit: Annotated[Optional[int], typer.Option(help="only the first N rows", min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size", min=1)] = 16,
) -> None:
    """Score a published adapter on any data file, with its task's template and metric.

    Example: mtft-train registry eval ticket --data new_tickets.jsonl
    """
    from .published import score_published

    setup_logging()
    store = _store(registry, task)
    version = version if version is not None else store.serving(task).primary
    try:
        record = store.read(task, version) if version is not None else None
        if record is None:
            raise RegistryError(f"{task} has no version serving; give --version")
        result = score_published(store, record, data, limit, batch_size)
    except (RegistryError, SpecError) as exc:
        fail(exc)
    low, high = result.interval()
    published = record.metrics.get("adapter")
    typer.echo(f"{task} v{version} {record.metric} = {result.score:.3f} [95% {low:.3f}, {high:.3f}] on "
               f"{len(result.scores)} examples of {data}"
               + (f" (published: {published:.3f} on its eval split)" if published is not None else ""))


def _store(registry: Path | None, task: str) -> Registry:
    """The registry, once it is known to hold `task` with a readable rollout state."""
    store = Registry(registry_path(registry))
    if not store.versions(task):
        fail(f"registry {store.root} has no task {task!r}; tasks: {store.tasks()}")
    try:
        store.serving(task)
    except RegistryError as exc:
        fail(exc)
    return store


def _good(store: Registry, task: str, version: int) -> bool:
    try:
        return store.good(store.read(task, version))
    except RegistryError:
        return False


def _change(registry: Path | None, task: str, update: dict, version: int | None = None, force: bool = False) -> None:
    """Check `version` may serve, then set `update`'s fields of the task's rollout state; say what serves."""
    store, forced = _store(registry, task), None
    if version is not None:
        if version not in store.versions(task):
            fail(f"{task} has no v{version}; versions: {store.versions(task)}")
        try:
            record = store.read(task, version)
        except RegistryError as exc:
            fail(exc)
        if record.rejected and not store.good(record):
            if not force:
                fail(f"{task} v{version} failed its publish gate ({record.gate.reason}); "
                     "pass --force to serve it anyway")
            forced = version
    try:
        store.update_rollout(task, lambda r: r.model_copy(update={
            **update, "changed_by": " ".join(sys.argv[1:])[:200],
            "allowed": tuple(sorted({*r.allowed, forced} - {None}))}))
        typer.echo(_describe(store, task))
    except RegistryError as exc:
        fail(exc)
