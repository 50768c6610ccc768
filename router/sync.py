"""Keeping the live route table in step with the registry and the backends, in the background.

A loop (every `poll_s`) checks the backends (`Pool.check`: health, and reloading a backend that
lost its adapters before it takes traffic again), then compares the registry's signature (a few
stat calls) and serves what changed: new versions, pins, canaries, removals. With `watch` on,
filesystem notifications (inotify, via watchfiles) wake that loop as soon as anything under the
registry changes, so a publish goes live in well under a second; the poll stays as the fallback,
and is the only path while the registry folder does not exist or notifications cannot be had.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from pathlib import Path

from watchfiles import awatch

from mtft.registry import RegistryError
from mtft.registry.rollout import Rollout

from .errors import APIError, Unavailable
from .live import LiveTable

log = logging.getLogger(__name__)
# watchfiles' thread checks for events every STEP_MS and yields once none came for that long: the
# step trades idle CPU against how soon a publish (a rename) is seen. A burst (copying a large
# adapter) is reported at least every DEBOUNCE_MS.
STEP_MS, DEBOUNCE_MS = 50, 500


class RegistrySync:
    """Owns the background loop that brings `live` to what the registry says: the registry's last
    signature, each task's rollout as last read, and the watch on the registry folder."""

    def __init__(self, live: LiveTable):
        self.live, self.registry, self.config = live, live.registry, live.config
        self._signature: tuple | None = None
        self._rollouts: dict[str, Rollout] = {}  # as last read, per task

    async def run(self) -> None:
        """Sync every `poll_s`, or at once when woken (a registry change, a backend that failed)."""
        stop, wake = asyncio.Event(), self.live.pool.wake
        watcher = asyncio.get_running_loop().create_task(self._watch(stop)) if self.config.watch else None
        try:
            while True:
                try:
                    await self.sync()
                except Exception:  # the loop must outlive any one bad poll
                    log.exception("sync failed")
                with suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.config.poll_s)
                wake.clear()
        finally:
            # Its thread sees `stop` within STEP_MS; cancelling alone would leave it blocked until its timeout.
            stop.set()
            if watcher is not None:
                await asyncio.wait([watcher], timeout=2)

    async def _watch(self, stop: asyncio.Event) -> None:
        """Set `wake` whenever something under the registry changes, until `stop`; without notifications,
        say so once and leave the poll to it."""
        root, wake = self.registry.root.resolve(), self.live.pool.wake
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
                    wake.set()
                    if not root.is_dir():
                        break  # the folder itself went: its notifications end with it
            except FileNotFoundError:
                continue  # it vanished before the watch began
            except (OSError, RuntimeError) as exc:  # e.g. inotify's watch limit (fs.inotify.max_user_watches)
                log.warning("cannot watch %s for changes (%s): polling it every %g s only", root, exc,
                            self.config.poll_s)
                return
            wake.set()

    async def sync(self) -> None:
        """One poll: check the backends (reloading one that lost its adapters), then pick up registry changes."""
        live = self.live
        await live.pool.check(live.wanted(), live.path_of)
        if not live.pool.healthy:
            if live.scanned:
                log.warning("no backend in rotation; requests get 503 until one is back")
            return
        signature = self.registry.signature()
        if signature != self._signature and await self._scan():
            self._signature = signature
        if not live.scanned:
            log.info("ready: %d tasks %s on %d of %d backends", len(live.table.current), live.table.tasks,
                     len(live.pool.healthy), len(live.pool.backends))
        live.scanned = True

    async def _scan(self) -> bool:
        """Serve what the registry says (new versions, pins, canaries), drop what vanished; False if a
        backend was away (try again next poll)."""
        live, complete = self.live, True
        on_disk = self.registry.tasks()
        await live.know(*on_disk)
        for task in on_disk:
            try:
                serving, rollout = self.registry.serving(task), self.registry.rollout(task)
            except RegistryError as exc:
                log.warning("task %s: %s; serving what it served", task, exc)
                continue
            if self._rollouts.get(task, rollout) != rollout:  # a user's new decision: try refused versions again
                live.forget_rejections(task)
            self._rollouts[task] = rollout
            current = live.table.current.get(task)
            primary = serving.primary
            if primary is None and current is not None:  # every servable version was removed or rejected
                log.info("task %s has no version left to serve", task)
                await live.remove(task)
                continue
            try:
                if primary is not None and (current is None or current.version != primary) \
                        and (task, primary) not in live.rejected and live.withdrawn.get(task) != primary:
                    await live.add(task, primary)
                if task in live.table.current and (serving.canary is None
                                                   or (task, serving.canary.version) not in live.rejected):
                    await live.split(task, serving.canary)
            except Unavailable as exc:
                log.warning("cannot serve %s as the registry says now: %s", task, exc.message)
                complete = False
            except APIError:
                pass  # logged and listed by add() / split()
        for task in set(live.table.current) - set(on_disk):
            log.info("task %s vanished from the registry", task)
            await live.remove(task)
        return complete


def _visible(root: Path, path: str) -> bool:
    """Changes under the registry's hidden bookkeeping (`.staging/`, where a version is written before its
    rename; `.lock`; a rollout.json being staged) wake nobody: the rename that follows does."""
    inside = Path(path)
    return not inside.is_relative_to(root) or not any(p.startswith(".") for p in inside.relative_to(root).parts)
