"""The live route table: hot-adding, replacing and withdrawing adapters while requests flow.

Every change follows one path: validate (`mtft.registry.servable_problems`
plus a prefix clash check) -> `POST /v1/load_lora_adapter` -> swap in a new
immutable `RouteTable`. A replaced version is unloaded only once its
in-flight requests are done, so a swap fails or mis-routes no request. A
rejected adapter is logged and listed with its reasons; serving is untouched.

A background loop (every `poll_s`) compares the registry's signature (a few
stat calls) and asks vLLM which adapters it holds: after vLLM restarts it has
lost the runtime-loaded ones, and this loop loads them again. `synced` says
whether the last poll reached vLLM; `/ready` answers from it. The registry
alone knows its folder layout; this module only asks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from mtft.registry import TASK_NAME, AdapterRecord, Registry, servable_problems

from .config import RouterConfig
from .errors import APIError, Unavailable
from .table import Route, RouteTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    task: str
    version: int
    reasons: list[str]
    at: float


class LiveTable:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.registry = Registry(config.registry)
        self.table = RouteTable(
            base_names=frozenset({"base", config.base_name, config.base_model}),
            base_target=config.base_adapter or config.base_model,
            default=config.default,
        )
        self.synced = False
        self.rejected: dict[tuple[str, int], Rejection] = {}
        self.withdrawn: dict[str, int] = {}
        self.inflight: Counter[str] = Counter()
        self.retiring: set[str] = set()
        self.wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._signature: tuple | None = None
        self._background: set[asyncio.Task] = set()  # unloads in progress

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
        """Validate, load and route one registry version (the newest by default); raise if refused."""
        if not TASK_NAME.match(task):
            raise APIError(400, f"task {task!r} is not a task name", "invalid_task", "task")
        versions = self.registry.versions(task)
        version = version if version is not None else self.registry.newest_version(task)
        if version is None or version not in versions:
            raise APIError(404, f"registry {self.registry.root} has no {task}/v{version}", "unknown_adapter", "task")
        async with self._lock:
            # In a thread: the checksum reads every adapter byte, and requests must keep flowing.
            record, problems = await asyncio.to_thread(
                servable_problems, self.registry, task, version, self.config.base_fingerprint, self.config.max_rank)
            if record is not None and (owner := self.table.prefix_owner(record)):
                problems.append(f"prefix {record.prefix!r} already routes task {owner!r}")
            if record is not None and record.task != task:
                problems.append(f"record says task {record.task!r}, folder says {task!r}")
            if problems:
                self.rejected[(task, version)] = Rejection(task, version, problems, time.time())
                log.warning("rejected %s/v%d: %s", task, version, "; ".join(problems))
                raise APIError(422, f"adapter {task}/v{version} rejected: " + "; ".join(problems),
                               "adapter_rejected", "task")
            try:
                await self._load(record)
            except Unavailable:
                raise
            except APIError as exc:
                self.rejected[(task, version)] = Rejection(task, version, [exc.message], time.time())
                log.warning("rejected %s/v%d: %s", task, version, exc.message)
                raise APIError(422, f"adapter {task}/v{version} rejected: {exc.message}", "adapter_rejected",
                               "task") from exc
            self.rejected.pop((task, version), None)
            self.withdrawn.pop(task, None)
            old = self.table.current.get(task)
            self.table = self.table.with_adapter(record)
            if old is not None and old.name != record.name:
                self._retire(old.name)
            log.info("serving %s as %s (route table has %d tasks)", task, record.name, len(self.table.current))
            return record

    async def remove(self, task: str) -> AdapterRecord:
        """Stop routing a task; its adapter unloads after in-flight requests. Re-added by POST or a newer version."""
        async with self._lock:
            record = self.table.current.get(task)
            if record is None:
                raise APIError(404, f"task {task!r} is not served; served: {self.table.tasks}", "unknown_task", "task")
            self.table = self.table.without_task(task)
            self.withdrawn[task] = record.version
            self._retire(record.name)
            log.info("withdrew %s (%s)", task, record.name)
            return record

    def _retire(self, name: str) -> None:
        self.retiring.add(name)
        if not self.inflight[name]:
            self._spawn(self._unload(name))

    async def _load(self, record: AdapterRecord) -> None:
        path = self.registry.version_dir(record.task, record.version).resolve()
        response = await self._post("/v1/load_lora_adapter", {"lora_name": record.name, "lora_path": str(path)})
        if response.status_code == 200 or (response.status_code == 400 and record.name in await self._held()):
            return  # 400 with the name listed: preloaded by mtft-serve (--lora-modules)
        raise APIError(502, f"vLLM refused {record.name}: {response.text[:500]}", "upstream_refused")

    async def _held(self) -> set[str]:
        """The adapter (and base) names vLLM serves now."""
        try:
            response = await self.client.get(self.config.upstream + "/v1/models", timeout=5.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise Unavailable(f"vLLM is unreachable: {exc!r}", self.config.retry_after_s) from exc
        return {model["id"] for model in response.json()["data"]}

    async def _unload(self, name: str) -> None:
        if self.inflight[name] or name not in self.retiring:
            return
        self.retiring.discard(name)
        try:
            response = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
            log.info("unloaded %s (vLLM answered %d)", name, response.status_code)
        except Unavailable:
            log.info("vLLM unreachable; %s is gone with it", name)

    async def _post(self, path: str, body: dict[str, object]) -> httpx.Response:
        try:
            return await self.client.post(self.config.upstream + path, json=body)
        except httpx.TransportError as exc:
            raise Unavailable(f"vLLM is unreachable: {exc!r}", self.config.retry_after_s) from exc

    def _spawn(self, coroutine) -> None:
        job = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    # -- the background loop ---------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the loop must outlive any one bad poll
                log.exception("sync failed")
                self.synced = False
            try:
                await asyncio.wait_for(self.wake.wait(), self.config.poll_s)
            except TimeoutError:
                pass
            self.wake.clear()

    async def sync(self) -> None:
        """One poll: reload what a restarted vLLM lost, then pick up registry changes."""
        try:
            held = await self._held()
        except Unavailable as exc:
            if self.synced:
                log.warning("%s; requests get 503 until it is back", exc.message)
            self.synced = False
            return
        for record in list(self.table.current.values()):
            if record.name not in held:
                log.info("vLLM lacks %s (restarted?); loading it again", record.name)
                await self._load(record)
        signature = self.registry.signature()
        if signature != self._signature:
            await self._scan()
            self._signature = signature
        if not self.synced:
            log.info("ready: %d tasks %s", len(self.table.current), self.table.tasks)
        self.synced = True

    async def _scan(self) -> None:
        on_disk = self.registry.tasks()
        for task in on_disk:
            newest = self.registry.newest_version(task)
            current = self.table.current.get(task)
            if newest is None or (current and current.version >= newest):
                continue
            if (task, newest) in self.rejected or self.withdrawn.get(task, -1) >= newest:
                continue
            try:
                await self.add(task, newest)
            except APIError:
                pass  # logged and listed by add()
        for task in set(self.table.current) - set(on_disk):
            log.info("task %s vanished from the registry", task)
            await self.remove(task)

    def status(self) -> dict[str, object]:
        return {
            "served": [{"task": r.task, "version": r.version, "adapter": r.name, "prefix": r.prefix,
                        "inflight": self.inflight[r.name]} for r in self.table.current.values()],
            "retiring": sorted(self.retiring),
            "rejected": [{"task": r.task, "version": r.version, "reasons": r.reasons, "at": r.at}
                         for r in self.rejected.values()],
            "withdrawn": self.withdrawn,
        }
