"""One vLLM backend as the router knows it, and the few HTTP calls the router makes to it.

Per backend the router keeps its state (`joining` until checked and reloaded, `healthy` in
rotation, `down` out of it, rechecked with back-off), its requests in flight (in all and per
adapter), and exactly the adapters the router loaded there: `loaded` changes only when a
load answers 200 (added after) or an unload is sent (removed before), so a poll comparing it
with vLLM's `/v1/models` can tell a restart from the router's own changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import httpx

from .placement import BackendView

log = logging.getLogger(__name__)
State = Literal["joining", "healthy", "down"]
CHECK_TIMEOUT_S = 5.0


class Down(Exception):
    """The backend did not answer (refused, reset, gone): it leaves rotation."""


class Refused(Exception):
    """The backend answered a load with an error: it cannot serve that adapter."""


class Backend:
    def __init__(self, url: str, slots: int):
        self.url = url.rstrip("/")
        self.slots = slots
        self.state: State = "joining"
        self.reason = "not checked yet"
        self.loaded: set[str] = set()
        self.refused: dict[str, str] = {}
        """adapter -> what the backend said when it refused to load it."""
        self.inflight = 0
        self.adapter_inflight: Counter[str] = Counter()
        self.last_used: dict[str, float] = {}
        self.served = 0
        self.failures = 0
        """consecutive failed checks or requests: the back-off's exponent."""
        self.next_check = 0.0
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    def view(self) -> BackendView:
        return BackendView(self.url, self.healthy, self.inflight, frozenset(self.loaded), self.slots,
                           frozenset(+self.adapter_inflight), dict(self.last_used), frozenset(self.refused))

    # -- requests ---------------------------------------------------------------------------
    def acquire(self, adapter: str) -> None:
        self.inflight += 1
        self.adapter_inflight[adapter] += 1
        self.last_used[adapter] = time.monotonic()
        self.served += 1

    def release(self, adapter: str) -> None:
        self.inflight -= 1
        self.adapter_inflight[adapter] -= 1

    # -- state ------------------------------------------------------------------------------
    def fail(self, why: str, poll_s: float, backoff_max_s: float) -> None:
        """Out of rotation; checked again at once the first time, then after poll_s, 2 poll_s, ... up to the cap."""
        if self.state != "down":
            log.warning("backend %s out of rotation: %s", self.url, why)
        self.state, self.reason = "down", why
        self.failures += 1
        delay = 0.0 if self.failures == 1 else min(poll_s * 2 ** (self.failures - 2), backoff_max_s)
        self.next_check = time.monotonic() + delay

    def join(self) -> None:
        self.state, self.reason, self.failures = "healthy", "", 0

    # -- HTTP -------------------------------------------------------------------------------
    async def check(self, client: httpx.AsyncClient) -> set[str]:
        """vLLM's `/health`, then the model names it serves (`/v1/models`); Down if either fails."""
        try:
            health = await client.get(self.url + "/health", timeout=CHECK_TIMEOUT_S)
            if health.status_code != 200:
                raise Down(f"/health answered {health.status_code}")
            models = await client.get(self.url + "/v1/models", timeout=CHECK_TIMEOUT_S)
            models.raise_for_status()
            return {model["id"] for model in models.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise Down(f"check failed: {exc!r}") from exc

    async def load(self, client: httpx.AsyncClient, name: str, path: Path) -> None:
        response = await self._post(client, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if response.status_code != 200:
            # 400 for a name it holds already: loaded before the router knew (mtft-serve's --lora-modules).
            if response.status_code == 400 and name in await self.check(client):
                self.loaded.add(name)
                return
            message = _error_message(response)
            self.refused[name] = message
            raise Refused(f"{self.url} refused {name}: {message}")
        self.loaded.add(name)

    async def unload(self, client: httpx.AsyncClient, name: str) -> None:
        self.loaded.discard(name)
        try:
            response = await self._post(client, "/v1/unload_lora_adapter", {"lora_name": name})
            log.info("unloaded %s from %s (vLLM answered %d)", name, self.url, response.status_code)
        except Down:
            log.info("%s is unreachable; %s is gone with it", self.url, name)

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict[str, object]) -> httpx.Response:
        try:
            return await client.post(self.url + path, json=body, timeout=60.0)
        except httpx.TransportError as exc:
            raise Down(f"{path} failed: {exc!r}") from exc

    def status(self) -> dict[str, object]:
        return {"url": self.url, "state": self.state, "reason": self.reason, "inflight": self.inflight,
                "slots": self.slots, "adapters": sorted(self.loaded), "refused": self.refused}


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", response.json())
        return f"{response.status_code} {error.get('message', error) if isinstance(error, dict) else error}"
    except (ValueError, AttributeError):
        return f"{response.status_code} {response.text[:300]}"
