"""One inference request through the router: route it, forward it to vLLM, reshape the answer.

From `route()` on, a request is an `InFlight`: it holds its adapter in the live table (a
version swap unloads the old adapter only when no request holds it) and is counted in
the request metrics. `InFlight.close()` does both, once, whichever way the request ends:
an error, a whole answer, or a stream. A stream ends in the StreamingResponse's
background task, or in the relay's `finally` when the client went away (Starlette then
skips background tasks on ASGI 2.4 servers); whichever comes first counts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from .config import RouterConfig
from .errors import APIError, Unavailable
from .live import LiveTable
from .metrics import UNROUTED, RequestMetrics
from .proxy import Exchange, chat_answer, chat_chunk, exchange, parse, upstream_error
from .table import Route, route

log = logging.getLogger(__name__)


class InFlight:
    """A routed request until its answer is out; `close()` may be called any number of times."""

    def __init__(self, chosen: Route, live: LiveTable, metrics: RequestMetrics):
        self.route = chosen
        self.upstream: httpx.Response | None = None
        self.usage: dict | None = None
        """vLLM's token counts: in the answer, or in a stream's last chunk."""
        self._live = live
        self._metrics = metrics
        self._started = time.perf_counter()
        self._closed = False
        live.acquire(chosen)  # before any await: a swap from now on waits for this request

    async def close(self, status: int, usage: dict | None = None, code: str | None = None) -> None:
        """Close vLLM's response, release the adapter and count the request: the first call only."""
        if self._closed:
            return
        self._closed = True  # before the await: a second caller must not get in meanwhile
        self.usage = usage or self.usage
        try:
            if self.upstream is not None:
                await self.upstream.aclose()
        finally:
            self._live.release(self.route)
            r = self.route
            self._metrics.observe(r.task, r.adapter, r.matched, status, time.perf_counter() - self._started,
                                  self.usage, code)


async def infer(request: Request, path: str, raw: bytes, allowed: frozenset[str] | None) -> Response:
    """Answer one completion or chat request (`raw` is its body) as OpenAI would."""
    state = request.app.state
    body, wanted = parse(raw, path, request.headers.get("x-task"))
    try:
        chosen = route(wanted, state.live.table)
    except APIError as exc:
        state.metrics.observe(UNROUTED, UNROUTED, "none", exc.status, 0.0, None, exc.code)
        raise
    if allowed is not None and chosen.task not in allowed:
        raise APIError(403, f"this API key may not use task {chosen.task!r}", "task_not_allowed", "model")
    call = exchange(body, path, chosen)
    inflight = InFlight(chosen, state.live, state.metrics)
    headers = {"X-MTFT-Task": chosen.task, "X-MTFT-Adapter": chosen.adapter, "X-MTFT-Route": chosen.matched}
    try:
        inflight.upstream = await _send(state.client, state.config, call, body.stream)
        if inflight.upstream.status_code >= 400:
            await inflight.upstream.aread()
            raise _mapped_error(inflight.upstream, chosen, state.live, state.config)
        if not body.stream:
            answer = inflight.upstream.json()
            await inflight.close(200, answer.get("usage"))
            return JSONResponse(chat_answer(answer) if call.chat_from_completion else answer, headers=headers)
    except APIError as exc:
        await inflight.close(exc.status, code=exc.code)
        raise
    except Exception:
        await inflight.close(500, code="internal_error")  # what the error handler will answer
        raise
    return StreamingResponse(_relay(inflight, call), media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(inflight.close, 200))


async def _send(client: httpx.AsyncClient, config: RouterConfig, call: Exchange, stream: bool) -> httpx.Response:
    upstream_request = client.build_request("POST", config.upstream + call.path, json=call.payload)
    try:
        return await client.send(upstream_request, stream=stream)
    except httpx.TimeoutException as exc:
        raise APIError(504, f"vLLM did not answer within {config.upstream_timeout_s} s", "upstream_timeout") from exc
    except httpx.TransportError as exc:
        raise Unavailable(f"vLLM is unreachable ({exc!r}); retry shortly", config.retry_after_s) from exc


def _mapped_error(upstream: httpx.Response, chosen: Route, live: LiveTable, config: RouterConfig) -> APIError:
    if upstream.status_code == 404:
        # We route only to adapters we loaded: vLLM lacking one means it restarted and
        # has not been reloaded yet. Reload now; the client retries.
        live.wake.set()
        return Unavailable(f"adapter {chosen.upstream_model} is being reloaded into vLLM", config.retry_after_s)
    return upstream_error(upstream.status_code, upstream.content)


async def _relay(inflight: InFlight, call: Exchange) -> AsyncIterator[bytes]:
    """vLLM's server-sent events, reshaped for the client; the usage chunk is kept for the metrics."""
    started: set[int] = set()
    try:
        async for line in inflight.upstream.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                yield b"data: [DONE]\n\n"
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                inflight.usage = chunk["usage"]
                if not call.client_wants_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk.pop("usage")
            if call.chat_from_completion:
                chunk = chat_chunk(chunk, started)
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except httpx.TransportError as exc:
        log.warning("stream from vLLM broke off: %r", exc)
    finally:
        await inflight.close(200)
