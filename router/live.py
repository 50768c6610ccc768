"""The live route table: hot-adding, replacing and withdrawing adapters while requests flow.

Every change follows one path: validate (`mtft.registry.servable_problems`
plus a prefix clash check) -> load it on every backend where it will be served
(`Pool.place_new`: all of them or none) -> swap in a new immutable `RouteTable`.
So a version is live only once it is loaded wherever it is served, and an
adapter one backend refuses never goes live (the old version keeps serving).
A replaced version is unloaded, from every backend, only once its in-flight
requests are done, so a swap fails or mis-routes no request. A rejected adapter
is logged and listed with its reasons; serving is untouched.

A background loop (every `poll_s`) checks the backends (`Pool.check`: health,
and reloading a backend that lost its adapters before it takes traffic again),
then compares the registry's signature (a few stat calls) and adds what is new.
With `watch` on, filesystem notifications (inotify, via watchfiles) wake that loop
as soon as anything under the registry changes, so a publish goes live in well
under a second; the poll stays as the fallback, and is the only path while the
registry folder does not exist or notifications cannot be had.
`synced` says the table was read and a backend is in rotation; `/ready` answers
from it. The registry alone knows its folder layout; this module only asks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from watchfiles import awatch

from mtft.registry import (
    TASK_NAME,
    AdapterRecord,
    ProfileError,
    Registry,
    RegistryError,
    RoutingProfile,
    read_profile,
    servable_problems,
)
from mtft.registry.rollout import Canary, Rollout

from .backends import Refused
from .config import RouterConfig
from .errors import APIError, Unavailable
from .pool import Pool
from .public import Public
from .table import Route, RouteTable, Split

log = logging.getLogger(__name__)
# watchfiles' thread checks for events every STEP_MS and yields once none came for that long:
# ~1 ms of CPU per second idle (measured, 2 cores), and a publish (a rename) is seen ~STEP_MS after.
# A burst (copying a large adapter) is reported at least every DEBOUNCE_MS.
STEP_MS, DEBOUNCE_MS = 50, 500


@dataclass(frozen=True)
class Rejection:
    task: str
    version: int
    reasons: list[str]
    at: float


class LiveTable:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient):
        self.config = config
        self.registry = Registry(config.registry)
        self.table = RouteTable(
            base_names=frozenset({"base", config.base_name, config.base_model, Public.of(config).base}),
            base_target=config.base_adapter or config.base_model,
            default=config.default,
            aliases=frozenset(config.model_aliases),
            route_unknown_models=config.route_unknown_models,
            learned_threshold=config.learned_threshold if config.learned_routing else None,
        )
        self.pool = Pool(config, client)
        self.pool.pinned = frozenset({config.base_adapter} - {None})
        self.scanned = False
        self.rejected: dict[tuple[str, int], Rejection] = {}
        self.withdrawn: dict[str, int] = {}
        self.went_live: Counter[tuple[str, str]] = Counter()  # (task, adapter) -> times it went live (/metrics)
        self._rollouts: dict[str, Rollout] = {}  # as last read, per task
        self.inflight: Counter[str] = Counter()
        self.retiring: set[str] = set()
        self._lock = asyncio.Lock()
        self._signature: tuple | None = None
        self._background: set[asyncio.Task] = set()  # unloads in progress

    @property
    def synced(self) -> bool:
        """The registry was read and at least one backend is in rotation."""
        return self.scanned and bool(self.pool.healthy)

    @property
    def wake(self) -> asyncio.Event:
        return self.pool.wake

    # -- requests -------------------------------------------------------------------------
    def acquire(self, route: Route) -> None:
        """Count a request on its adapter; call right after `route()`, before any await."""
        self.inflight[route.upstream_model] += 1

    def release(self, route: Route) -> None:
        name = route.upstream_model
        self.inflight[name] -= 1
        if self.inflight[name] <= 0:
            del self.inflight[name]
            if name in self.retiring:
                self._spawn(self._unload(name))

    # -- changes --------------------------------------------------------------------------
    async def add(self, task: str, version: int | None = None) -> AdapterRecord:
        """Validate, load and route one registry version (the one the registry says serves); raise if refused."""
        async with self._lock:
            record = await self._admit(task, version, replacing=self.table.current.get(task))
            old = self.table.current.get(task)
            self.withdrawn.pop(task, None)
            profile = await asyncio.to_thread(self._profile, record)
            self._swap(self.table.with_adapter(record, profile))
            if old is not None and old.name != record.name:
                self._retire(old.name)
            log.info("serving %s as %s (route table has %d tasks)", task, record.name, len(self.table.current))
            return record

    async def split(self, task: str, canary: Canary | None) -> None:
        """Make `canary` (None: no canary) the task's second version, loaded first wherever it serves."""
        async with self._lock:
            have = self.table.canaries.get(task)
            if (have and (have.record.version, have.percent)) == (canary and (canary.version, canary.percent)):
                return
            split = None
            if canary is not None:
                split = Split(await self._admit(task, canary.version, replacing=None), canary.percent)
            self._swap(self.table.with_canary(task, split))
            if have is not None and (split is None or have.record.name != split.record.name):
                self._retire(have.record.name)
            log.info("task %s: %s", task, f"{split.record.name} answers {split.percent:g} % (canary)" if split
                     else "no canary")

    async def _admit(self, task: str, version: int | None, replacing: AdapterRecord | None) -> AdapterRecord:
        """Check one registry version and load it on every backend where it will serve; APIError if refused."""
        if not TASK_NAME.match(task):
            raise APIError(400, f"task {task!r} is not a task name", "invalid_task", "task")
        versions = self.registry.versions(task)
        if version is None:
            try:
                version = self.registry.serving(task).primary
            except RegistryError as exc:
                raise APIError(409, str(exc), "invalid_rollout", "task") from exc
        if version is None or version not in versions:
            raise APIError(404, f"registry {self.registry.root} has no {task}/v{version}", "unknown_adapter", "task")
        self._know(task)  # before any refusal: a client naming a refused task must not be routed elsewhere
        # In a thread: the checksum reads every adapter byte, and requests must keep flowing.
        record, problems = await asyncio.to_thread(
            servable_problems, self.registry, task, version, self.config.base_fingerprint, self.config.max_rank)
        if record is not None and (owner := self.table.prefix_owner(record)):
            problems.append(f"prefix {record.prefix!r} already routes task {owner!r}")
        if record is not None and record.task != task:
            problems.append(f"record says task {record.task!r}, folder says {task!r}")
        if record is not None and record.rejected and not self.registry.good(record):
            problems.append(f"it failed its publish gate ({record.gate.reason}); to serve it anyway: "
                            f"mtft-train registry pin {task} {version} --force")
        if problems:
            self.rejected[(task, version)] = Rejection(task, version, problems, time.time())
            log.warning("rejected %s/v%d: %s", task, version, "; ".join(problems))
            raise APIError(422, f"adapter {task}/v{version} rejected: " + "; ".join(problems),
                           "adapter_rejected", "task")
        self.retiring.discard(record.name)  # a version coming back (a rollback) must not be unloaded
        try:
            where = await self.pool.place_new(record.name, self._folder(record),
                                              replacing.name if replacing else None, task in self.config.pin)
        except Refused as exc:
            self.rejected[(task, version)] = Rejection(task, version, [str(exc)], time.time())
            log.warning("rejected %s/v%d: %s", task, version, exc)
            raise APIError(422, f"adapter {task}/v{version} rejected: {exc}", "adapter_rejected", "task") from exc
        self.rejected.pop((task, version), None)
        log.info("loaded %s on %s", record.name, where)
        return record

    async def remove(self, task: str) -> AdapterRecord:
        """Stop routing a task; its adapter unloads after in-flight requests. Re-added by POST or a newer version."""
        async with self._lock:
            record = self.table.current.get(task)
            if record is None:
                raise APIError(404, f"task {task!r} is not served; served: {self.table.tasks}", "unknown_task", "task")
            canary = self.table.canaries.get(task)
            self._swap(self.table.without_task(task))
            self.withdrawn[task] = record.version
            self._retire(record.name)
            if canary is not None:
                self._retire(canary.record.name)
            log.info("withdrew %s (%s)", task, record.name)
            return record

    def _profile(self, record: AdapterRecord) -> RoutingProfile | None:
        """The version's routing profile; without a readable one it serves, but only when named."""
        if self.table.learned_threshold is None:
            return None
        try:
            return read_profile(self._folder(record), record.checksum)
        except ProfileError as exc:
            log.warning("%s is not routable by learned routing: %s", record.name, exc)
            return None

    def _know(self, *tasks: str) -> None:
        """Tasks in the registry: a `model` naming one never takes the learned route (table.py)."""
        if not self.table.known_tasks.issuperset(tasks):
            self._swap(replace(self.table, known_tasks=self.table.known_tasks | set(tasks)))

    def _swap(self, table: RouteTable) -> None:
        """One reference swap; the pinned set follows the pinned tasks' current versions (and canaries)."""
        serving = {r.name for r in self.table.records()}
        self.went_live.update((r.task, r.name) for r in table.records() if r.name not in serving)
        self.table = table
        pinned = {r.name for r in table.records() if r.task in self.config.pin}
        self.pool.pinned = frozenset(pinned | {self.config.base_adapter} - {None})

    def _retire(self, name: str) -> None:
        self.retiring.add(name)
        if not self.inflight[name]:
            self._spawn(self._unload(name))

    def _folder(self, record: AdapterRecord) -> Path:
        return self.registry.version_dir(record.task, record.version).resolve()

    def path_of(self, name: str) -> Path | None:
        """The folder vLLM loads adapter `name` from: a served version, or the zero adapter."""
        if name == self.config.base_adapter:
            return self.config.base_adapter_path
        record = next((r for r in self.table.records() if r.name == name), None)
        return self._folder(record) if record is not None else None

    def wanted(self) -> list[str]:
        """The adapters served now, most used first: what a backend that (re)joins loads."""
        names = [r.name for r in self.table.records()]
        if self.config.base_adapter:
            names.append(self.config.base_adapter)
        return sorted(names, key=lambda n: (-self.pool.uses[n], n))

    async def _unload(self, name: str) -> None:
        if self.inflight[name] or name not in self.retiring:
            return
        self.retiring.discard(name)
        if any(r.name == name for r in self.table.records()):
            return  # it serves again (a rollback, or the old version became the canary)
        await self.pool.unload_everywhere(name)

    def _spawn(self, coroutine) -> None:
        job = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    # -- the background loop ---------------------------------------------------------------
    async def run(self) -> None:
        """Sync every `poll_s`, or at once when woken (a registry change, a backend that failed)."""
        stop = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(self._watch(stop)) if self.config.watch else None
        try:
            while True:
                try:
                    await self.sync()
                except Exception:  # the loop must outlive any one bad poll
                    log.exception("sync failed")
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.config.poll_s)
                self.wake.clear()
        finally:
            # Its thread sees `stop` within STEP_MS; cancelling alone would leave it blocked until its timeout.
            stop.set()
            if watcher is not None:
                await asyncio.wait([watcher], timeout=2)

    async def _watch(self, stop: asyncio.Event) -> None:
        """Set `wake` whenever something under the registry changes, until `stop`; without notifications,
        say so once and leave the poll to it."""
        root = self.registry.root.resolve()
        announced = False
        while not stop.is_set():
            if not root.is_dir():
                if not announced:
                    log.info("registry %s does not exist yet: polling it every %g s until it does", root,
                             self.config.poll_s)
                    announced = True
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.poll_s)
                continue
            log.info("watching %s for changes (the %g s poll stays as fallback)", root, self.config.poll_s)
            announced = False
            try:
                async for _ in awatch(root, watch_filter=lambda _, path: _visible(root, path), step=STEP_MS,
                                      debounce=DEBOUNCE_MS, stop_event=stop):
                    self.wake.set()
                    if not root.is_dir():
                        break  # the folder itself went: its notifications end with it
            except FileNotFoundError:
                continue  # it vanished before the watch began
            except (OSError, RuntimeError) as exc:  # e.g. inotify's watch limit (fs.inotify.max_user_watches)
                log.warning("cannot watch %s for changes (%s): polling it every %g s only", root, exc,
                            self.config.poll_s)
                return
            self.wake.set()

    async def sync(self) -> None:
        """One poll: check the backends (reloading one that lost its adapters), then pick up registry changes."""
        await self.pool.check(self.wanted(), self.path_of)
        if not self.pool.healthy:
            if self.scanned:
                log.warning("no backend in rotation; requests get 503 until one is back")
            return
        signature = self.registry.signature()
        if signature != self._signature and await self._scan():
            self._signature = signature
        if not self.scanned:
            log.info("ready: %d tasks %s on %d of %d backends", len(self.table.current), self.table.tasks,
                     len(self.pool.healthy), len(self.pool.backends))
        self.scanned = True

    async def _scan(self) -> bool:
        """Serve what the registry says (new versions, pins, canaries), drop what vanished; False if a
        backend was away (try again next poll)."""
        complete = True
        on_disk = self.registry.tasks()
        if not self.table.known_tasks.issuperset(on_disk):
            async with self._lock:
                self._know(*on_disk)
        for task in on_disk:
            try:
                serving, rollout = self.registry.serving(task), self.registry.rollout(task)
            except RegistryError as exc:
                log.warning("task %s: %s; serving what it served", task, exc)
                continue
            if self._rollouts.get(task, rollout) != rollout:  # a user's new decision: try refused versions again
                self.rejected = {k: v for k, v in self.rejected.items() if k[0] != task}
            self._rollouts[task] = rollout
            current = self.table.current.get(task)
            primary = serving.primary
            if primary is None and current is not None:  # every servable version was removed or rejected
                log.info("task %s has no version left to serve", task)
                await self.remove(task)
                continue
            try:
                if primary is not None and (current is None or current.version != primary) \
                        and (task, primary) not in self.rejected and self.withdrawn.get(task) != primary:
                    await self.add(task, primary)
                if task in self.table.current and (serving.canary is None
                                                   or (task, serving.canary.version) not in self.rejected):
                    await self.split(task, serving.canary)
            except Unavailable as exc:
                log.warning("cannot serve %s as the registry says now: %s", task, exc.message)
                complete = False
            except APIError:
                pass  # logged and listed by add() / split()
        for task in set(self.table.current) - set(on_disk):
            log.info("task %s vanished from the registry", task)
            await self.remove(task)
        return complete

    def status(self) -> dict[str, object]:
        return {
            "served": [{"task": r.task, "version": r.version, "adapter": r.name, "prefix": r.prefix,
                        "inflight": self.inflight[r.name], "learned": r.name in self.table.learned_names}
                       for r in self.table.current.values()],
            "canaries": [{"task": t, "version": c.record.version, "adapter": c.record.name, "percent": c.percent,
                          "inflight": self.inflight[c.record.name]} for t, c in self.table.canaries.items()],
            "retiring": sorted(self.retiring),
            "rejected": [{"task": r.task, "version": r.version, "reasons": r.reasons, "at": r.at}
                         for r in self.rejected.values()],
            "withdrawn": self.withdrawn,
            "backends": self.pool.status(),
        }


def _visible(root: Path, path: str) -> bool:
    """Changes under the registry's hidden bookkeeping (`.staging/`, where a version is written before its
    rename; `.lock`; a rollout.json being staged) wake nobody: the rename that follows does."""
    inside = Path(path)
    return not inside.is_relative_to(root) or not any(p.startswith(".") for p in inside.relative_to(root).parts)
