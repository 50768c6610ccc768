"""Requests in flight per adapter, and retired adapters that unload once their last request is done.

A swap of the route table never fails a request: the version it replaced is retired, and is
unloaded from every backend only when no request counted on it is left and it does not serve
again (a rollback, or the old version become the canary).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable


class RequestCounts:
    """Owns the in-flight count per adapter name, the retiring adapters waiting for theirs to reach
    zero, and the unloads running in the background."""

    def __init__(self, unload: Callable[[str], Awaitable[None]], serves: Callable[[str], bool]):
        """`unload(name)` takes an adapter off every backend; `serves(name)`: the route table routes to it."""
        self.inflight: Counter[str] = Counter()
        self.retiring: set[str] = set()
        self._unload_everywhere, self._serves = unload, serves
        self._background: set[asyncio.Task] = set()

    def acquire(self, name: str) -> None:
        """Count a request on adapter `name`; call right after routing it, before any await."""
        self.inflight[name] += 1

    def release(self, name: str) -> None:
        self.inflight[name] -= 1
        if self.inflight[name] <= 0:
            del self.inflight[name]
            if name in self.retiring:
                self._spawn(self._unload(name))

    def retire(self, name: str) -> None:
        """Unload `name` once no request uses it (now, if none does)."""
        self.retiring.add(name)
        if not self.inflight[name]:
            self._spawn(self._unload(name))

    def keep(self, name: str) -> None:
        """`name` serves again (a rollback): it must not be unloaded."""
        self.retiring.discard(name)

    async def _unload(self, name: str) -> None:
        if self.inflight[name] or name not in self.retiring:
            return
        self.retiring.discard(name)
        if self._serves(name):
            return  # it serves again (a rollback, or the old version became the canary)
        await self._unload_everywhere(name)

    def _spawn(self, coroutine) -> None:
        job = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(job)
        job.add_done_callback(self._background.discard)
