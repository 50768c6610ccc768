"""The live route table: hot-adding, replacing and withdrawing adapters while requests flow.

Every change follows one path: validate (`mtft.registry.servable_problems`
plus a prefix clash check) -> load it on every backend where it will be served
(`Pool.place_new`: all of them or none) -> swap in a new immutable `RouteTable`.
So a version is live only once it is loaded wherever it is served, and an
adapter one backend refuses never goes live (the old version keeps serving).
A replaced version is retired (`inflight.RequestCounts`): unloaded, from every
backend, only once its in-flight requests are done, so a swap fails or
mis-routes no request. A rejected adapter is logged and listed with its
reasons; serving is untouched. The admin API changes the table directly;
`sync.RegistrySync` changes it to follow the registry. The registry alone
knows its folder layout; this module only asks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

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
from mtft.registry.rollout import Canary

from .backends import Refused
from .config import RouterConfig
from .errors import APIError
from .inflight import RequestCounts
from .pool import Pool
from .public import Public
from .table import Route, RouteTable, Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """Why a version was refused, and when: listed by the admin API until it serves or its rollout changes."""

    task: str
    version: int
    reasons: list[str]
    at: float


class LiveTable:
    """Owns the current `RouteTable` and every change to it (add, canary split, remove), the versions it
    refused or a user withdrew, the pool of backends they load on, and the in-flight counts that
    decide when a replaced version unloads; `status` is what the admin API lists."""

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
        self.scanned = False  # set by `RegistrySync` once it has read the registry into the table
        self.rejected: dict[tuple[str, int], Rejection] = {}
        self.withdrawn: dict[str, int] = {}
        self.went_live: Counter[tuple[str, str]] = Counter()  # (task, adapter) -> times it went live (/metrics)
        self.requests = RequestCounts(self.pool.unload_everywhere, self._serves)
        self._lock = asyncio.Lock()

    @property
    def synced(self) -> bool:
        """The registry was read and at least one backend is in rotation."""
        return self.scanned and bool(self.pool.healthy)

    @property
    def inflight(self) -> Counter[str]:
        """Requests in flight per adapter name."""
        return self.requests.inflight

    def acquire(self, route: Route) -> None:
        """Count a request on its adapter; call right after `route()`, before any await."""
        self.requests.acquire(route.upstream_model)

    def release(self, route: Route) -> None:
        self.requests.release(route.upstream_model)

    async def add(self, task: str, version: int | None = None) -> AdapterRecord:
        """Validate, load and route one registry version (the one the registry says serves); raise if refused."""
        async with self._lock:
            record = await self._admit(task, version, replacing=self.table.current.get(task))
            old = self.table.current.get(task)
            self.withdrawn.pop(task, None)
            profile = await asyncio.to_thread(self._profile, record)
            self._swap(self.table.with_adapter(record, profile))
            if old is not None and old.name != record.name:
                self.requests.retire(old.name)
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
                self.requests.retire(have.record.name)
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
        self.requests.keep(record.name)  # a version coming back (a rollback) must not be unloaded
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
            self.requests.retire(record.name)
            if canary is not None:
                self.requests.retire(canary.record.name)
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

    async def know(self, *tasks: str) -> None:
        """Tasks in the registry: a `model` naming one never takes the learned route (table.py)."""
        if not self.table.known_tasks.issuperset(tasks):
            async with self._lock:
                self._know(*tasks)

    def _know(self, *tasks: str) -> None:
        if not self.table.known_tasks.issuperset(tasks):
            self._swap(replace(self.table, known_tasks=self.table.known_tasks | set(tasks)))

    def forget_rejections(self, task: str) -> None:
        """Try `task`'s refused versions again (a user's new rollout decision)."""
        self.rejected = {k: v for k, v in self.rejected.items() if k[0] != task}

    def _swap(self, table: RouteTable) -> None:
        """One reference swap; the pinned set follows the pinned tasks' current versions (and canaries)."""
        serving = {r.name for r in self.table.records()}
        self.went_live.update((r.task, r.name) for r in table.records() if r.name not in serving)
        self.table = table
        pinned = {r.name for r in table.records() if r.task in self.config.pin}
        self.pool.pinned = frozenset(pinned | {self.config.base_adapter} - {None})

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

    def _serves(self, name: str) -> bool:
        return any(r.name == name for r in self.table.records())

    def status(self) -> dict[str, object]:
        return {
            "served": [{"task": r.task, "version": r.version, "adapter": r.name, "prefix": r.prefix,
                        "inflight": self.inflight[r.name], "learned": r.name in self.table.learned_names}
                       for r in self.table.current.values()],
            "canaries": [{"task": t, "version": c.record.version, "adapter": c.record.name, "percent": c.percent,
                          "inflight": self.inflight[c.record.name]} for t, c in self.table.canaries.items()],
            "retiring": sorted(self.requests.retiring),
            "rejected": [{"task": r.task, "version": r.version, "reasons": r.reasons, "at": r.at}
                         for r in self.rejected.values()],
            "withdrawn": self.withdrawn,
            "backends": self.pool.status(),
        }

