"""The router's backends together: where each request goes, where adapters are loaded, who is healthy.

`Pool` applies the pure policy in `placement.py` to the live `Backend`s:

- `pick` places one request (loading its adapter there first if placement says so) and
  counts it on that backend; `failed` takes a backend out of rotation when a request finds
  it gone (passive detection), `lost` when it lacks an adapter the router loaded there.
- `place_new` loads a new adapter, or a task's new version, on every backend where it will be
  served; if any of them refuses it, it is unloaded from the others and refused as a whole,
  so it never goes live half-way.
- `check` (every poll) asks each healthy backend, and each one that is down once its back-off
  has passed, for `/health` and its models (active detection). A backend that answers again,
  or has lost adapters (it restarted), is out of rotation until the pinned and most used
  adapters are loaded on it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import httpx

from .backends import Backend, Down, Refused
from .config import RouterConfig
from .errors import Unavailable
from .placement import NoPlacement, Policy, home, place, rejoin

log = logging.getLogger(__name__)
PathOf = Callable[[str], Path | None]
"""An adapter name's folder, for vLLM to load; None: the router cannot load it."""


class Pool:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.backends = [Backend(url, config.slots) for url in config.backends]
        self._by_url = {b.url: b for b in self.backends}
        self.pinned: frozenset[str] = frozenset()
        """adapter names on every backend: the zero adapter and the pinned tasks' current versions."""
        self.uses: Counter[str] = Counter()
        self.retried = 0
        self.wake = asyncio.Event()

    @property
    def policy(self) -> Policy:
        return Policy(self.config.copies, self.config.spill_inflight, self.pinned)

    @property
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    # -- requests ---------------------------------------------------------------------------
    async def pick(self, adapter: str, path_of: PathOf, exclude: frozenset[str] = frozenset()) -> Backend:
        """A backend for one request to `adapter` (vLLM's model name), counted on it; Unavailable if none."""
        name = None if adapter == self.config.base_model else adapter
        for _ in range(len(self.backends) + 1):  # a refusal or a failure moves on to the next placement
            try:
                placement = place(name, [b.view() for b in self.backends], self.policy, exclude)
            except NoPlacement as exc:
                raise Unavailable(str(exc), self.config.retry_after_s) from exc
            backend = self._by_url[placement.backend]
            if placement.load:
                try:
                    await self.ensure(backend, name, path_of(name), placement.evict)
                except Refused as exc:
                    log.warning("%s; placing it elsewhere", exc)
                    continue
                except Down as exc:
                    self.failed(backend, str(exc))
                    continue
            if backend.healthy and (name is None or name in backend.loaded):
                backend.acquire(adapter)
                self.uses[adapter] += 1
                return backend
        raise Unavailable(f"could not place {adapter} on any backend; see /admin/adapters", self.config.retry_after_s)

    def failed(self, backend: Backend, why: str) -> None:
        backend.fail(why, self.config.poll_s, self.config.backoff_max_s)
        self.wake.set()

    def lost(self, backend: Backend, adapter: str) -> None:
        """vLLM answered 404 for an adapter the router loaded there: it restarted behind our back."""
        if backend.healthy:
            log.warning("backend %s lacks %s (restarted?): out of rotation until reloaded", backend.url, adapter)
            backend.state, backend.reason, backend.next_check = "joining", f"lacked {adapter}", 0.0
        self.wake.set()

    # -- adapters ---------------------------------------------------------------------------
    async def ensure(self, backend: Backend, name: str, path: Path | None, evict: Sequence[str] = ()) -> None:
        """`name` loaded on `backend`, after unloading `evict` (those still idle there) to free slots."""
        async with backend.locks[name]:
            if name in backend.loaded:
                return
            if path is None:
                backend.refused[name] = "the router knows no folder to load it from"
                raise Refused(f"{backend.url} lacks {name} and the router knows no folder to load it from")
            for old in evict:
                # Under `old`'s own lock, so that no request loads it again while vLLM still holds it
                # (vLLM would answer "already loaded", then list it as gone). One that is being
                # loaded or evicted now is left alone: taking its lock here could deadlock.
                if backend.locks[old].locked():
                    continue
                async with backend.locks[old]:
                    if old in backend.loaded and not backend.adapter_inflight[old] and old not in self.pinned:
                        log.info("evicting %s from %s (least recently used) to load %s", old, backend.url, name)
                        await backend.unload(self.client, old)
            await backend.load(self.client, name, path)
            log.info("loaded %s on %s", name, backend.url)

    async def place_new(self, name: str, path: Path, replacing: str | None, pinned: bool) -> list[str]:
        """Load `name` wherever it will be served, all or nothing; the backends' URLs."""
        policy = replace(self.policy, pinned=self.pinned | {name}) if pinned else self.policy
        prefer = frozenset(b.url for b in self.backends if replacing in b.loaded)
        try:
            targets = home(name, [b.view() for b in self.backends], policy, prefer,
                           frozenset({replacing}) if replacing else frozenset())
        except NoPlacement as exc:
            raise Unavailable(str(exc), self.config.retry_after_s) from exc
        chosen = [self._by_url[p.backend] for p in targets]
        results = await asyncio.gather(*(self.ensure(b, name, path, p.evict) for b, p in zip(chosen, targets)),
                                       return_exceptions=True)
        for backend, result in zip(chosen, results):
            if isinstance(result, Down):
                self.failed(backend, str(result))  # it left rotation: no longer a place it will be served
            elif isinstance(result, BaseException) and not isinstance(result, Refused):
                raise result
        done = [b for b, result in zip(chosen, results) if result is None]
        refusals = [str(result) for result in results if isinstance(result, Refused)]
        if refusals or not done:
            await asyncio.gather(*(b.unload(self.client, name) for b in done))
            if refusals:
                raise Refused("; ".join(refusals))
            raise Unavailable(f"every backend chosen for {name} went down while loading it", self.config.retry_after_s)
        return [b.url for b in done]

    async def unload_everywhere(self, name: str) -> None:
        await asyncio.gather(*(b.unload(self.client, name) for b in self.backends if name in b.loaded))

    # -- health -----------------------------------------------------------------------------
    async def check(self, wanted: Sequence[str], path_of: PathOf) -> None:
        """One poll; `wanted`: the adapters served now, most used first, for backends that (re)join."""
        now = time.monotonic()
        due = [b for b in self.backends if b.healthy or b.next_check <= now]
        await asyncio.gather(*(self._check(b, wanted, path_of) for b in due))

    async def _check(self, backend: Backend, wanted: Sequence[str], path_of: PathOf) -> None:
        before = set(backend.loaded)
        try:
            held = await backend.check(self.client)
        except Down as exc:
            self.failed(backend, str(exc))
            return
        if self.config.base_model not in held:
            self.failed(backend, f"serves {sorted(held)}, not the base model {self.config.base_model}")
            return
        # Only what the router loaded before asking and still counts as loaded: a load or an
        # unload of its own during the call is not a loss.
        lost = (before & backend.loaded) - held
        if backend.healthy and not lost:
            return
        if lost:
            log.warning("backend %s lost %s (restarted?): out of rotation until reloaded", backend.url, sorted(lost))
        await self._rejoin(backend, held, wanted, path_of)

    async def _rejoin(self, backend: Backend, held: set[str], wanted: Sequence[str], path_of: PathOf) -> None:
        """Reload the pinned and most used adapters, then (only then) put the backend in rotation."""
        started = time.monotonic()
        backend.state = "joining"
        backend.refused.clear()  # a new process, perhaps started with other limits: it may load them now
        previous = frozenset(backend.loaded)
        backend.loaded = held & (set(wanted) | previous)  # what it serves already counts
        todo = rejoin(backend.view(), [b.view() for b in self.backends], self.policy, previous, wanted)
        for name in todo:
            try:
                await self.ensure(backend, name, path_of(name))
            except Refused as exc:
                log.warning("%s; it will not be placed there", exc)
            except Down as exc:
                self.failed(backend, str(exc))
                return
        backend.join()
        log.info("backend %s in rotation with %d adapters (%d loaded in %.2f s)", backend.url, len(backend.loaded),
                 len(todo), time.monotonic() - started)

    def status(self) -> list[dict[str, object]]:
        return [b.status() for b in self.backends]
