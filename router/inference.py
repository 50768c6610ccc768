"""One inference request through the router: route it, place it on a backend, forward it, reshape the answer.

From `route()` on, a request is an `InFlight`: it holds its adapter in the live table (a
version swap unloads the old adapter only when no request holds it), is counted on the
backend it runs on, and in the request metrics. `InFlight.close()` undoes the first two
and counts the third, once, whichever way the request ends: an error, a whole answer, or
a stream. A stream ends in the StreamingResponse's background task, or in the relay's
`finally` when the client went away (Starlette then skips background tasks on ASGI 2.4
servers); whichever comes first counts.

A backend that fails a request before answering it (unreachable, reset, lacking the
adapter, or a 5xx while its `/health` fails) leaves rotation, and the request is sent once
more, to another backend. A non-streamed answer is only returned whole, so such a request
never sees the failure; a stream that already started cannot be re-run unseen, so it ends
with an OpenAI-shaped error event instead of `[DONE]` (the `openai` SDK raises it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import httpx
import orjson
from starlette.background import BackgroundTask
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .backends import Backend, Down
from .config import RouterConfig
from .errors import APIError, Unavailable
from .live import LiveTable
from .metrics import UNROUTED, RequestMetrics
from .pool import Pool
from . import responses
from .proxy import CHAT, Exchange, chat_answer, chat_chunk, exchange, load_json, parse, shaped, upstream_error
from .responses import RESPONSES
from .public import Public
from .table import Route, route

log = logging.getLogger(__name__)


class InFlight:
    """A routed request until its answer is out; `close()` may be called any number of times."""

    def __init__(self, chosen: Route, answered_by: str, live: LiveTable, metrics: RequestMetrics):
        self.route = chosen
        self.answered_by = answered_by
        """the public name of what answers: the adapter, or the base model's public name (metrics label)."""
        self.backend: Backend | None = None
        """where it runs now (counted there by `Pool.pick`)."""
        self.upstream: aiohttp.ClientResponse | None = None
        self.usage: dict | None = None
        """vLLM's token counts: in the answer, or in a stream's last chunk."""
        self._live = live
        self._metrics = metrics
        self._started = time.perf_counter()
        self._closed = False
        live.acquire(chosen)  # before any await: a swap from now on waits for this request

    def on(self, backend: Backend) -> None:
        """The request moved to `backend` (a retry): no longer counted where it was."""
        self._leave()
        self.backend = backend

    def _leave(self) -> None:
        if self.backend is not None:
            self.backend.release(self.route.upstream_model)
            self.backend = None

    async def close(self, status: int, usage: dict | None = None, code: str | None = None) -> None:
        """Close vLLM's response, release the adapter and count the request: the first call only."""
        if self._closed:
            return
        self._closed = True  # before the await: a second caller must not get in meanwhile
        self.usage = usage or self.usage
        try:
            if self.upstream is not None:
                _drop(self.upstream)
        finally:
            self._leave()
            self._live.release(self.route)
            r = self.route
            self._metrics.observe(r.task, self.answered_by, r.matched, status, time.perf_counter() - self._started,
                                  self.usage, code)


async def infer(request: Request, path: str, raw: bytes, allowed: frozenset[str] | None) -> Response:
    """Answer one completion, chat or Responses request (`raw` is its body) as OpenAI would."""
    asked = None  # a Responses request: what the client sent, answered in that API's shape
    try:
        data = load_json(raw)
        if path == RESPONSES:
            asked, data, path = data, responses.to_chat(data), CHAT
        return await _infer(request, path, data, allowed, asked)
    except APIError as exc:
        raise responses.renamed(exc, asked) if asked is not None else exc


async def _infer(request: Request, path: str, data: dict, allowed: frozenset[str] | None,
                 asked: dict | None) -> Response:
    state = request.app.state
    body, wanted = parse(data, path, request.headers.get("x-task"))
    # A canary split sticks to the client: OpenAI's `user` field, else the API key, else the text.
    user = (body.model_extra or {}).get("user")
    wanted = replace(wanted, key=user if isinstance(user, str) and user else bearer(request), allowed=allowed)
    try:
        chosen = route(wanted, state.live.table)
    except APIError as exc:
        state.metrics.observe(UNROUTED, UNROUTED, "none", exc.status, 0.0, None, exc.code)
        raise
    if allowed is not None and chosen.task not in allowed:
        raise APIError(403, f"this API key may not use task {chosen.task!r}", "task_not_allowed", "model")
    call = exchange(body, path, chosen)
    answered_by = chosen.record.name if chosen.record else state.public.base
    inflight = InFlight(chosen, answered_by, state.live, state.metrics)
    headers = {"X-MTFT-Task": chosen.task, "X-MTFT-Adapter": answered_by, "X-MTFT-Route": chosen.matched}
    if chosen.score is not None:  # learned routing looked at it: routed there, or below the threshold
        headers["X-MTFT-Learned-Score"] = f"{chosen.score:.3f}"
        state.metrics.observe_learned(chosen.matched, chosen.score)
    try:
        await _open(inflight, state.live, state, call, body.stream)
        if not body.stream:
            answer = orjson.loads(await inflight.upstream.read())
            await inflight.close(200, answer.get("usage"))
            shown = (chat_answer(answer, answered_by, call.top_logprobs, call.asked) if call.chat_from_completion
                     else shaped(answer, answered_by, call.asked))
            if asked is not None:
                shown = responses.from_chat(shown, asked)
            return Response(orjson.dumps(shown), headers=headers, media_type="application/json")
    except APIError as exc:
        await inflight.close(exc.status, code=exc.code)
        raise
    except Exception:
        await inflight.close(500, code="internal_error")  # what the error handler will answer
        raise
    chunks = _relay(inflight, call, state.live.pool, state.public)
    events = _sse(chunks) if asked is None else _responses_events(chunks, inflight, asked)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(inflight.close, 200))


def bearer(request: Request) -> str | None:
    """The `Authorization: Bearer <key>` key, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


class BackendFailed(Exception):
    """The backend failed this request before answering: send it once more, elsewhere."""


async def _open(inflight: InFlight, live: LiveTable, state: State, call: Exchange, stream: bool) -> None:
    """Place the call, send it, and leave vLLM's answer on `inflight` (its body still to read)."""
    pool, tried, config = live.pool, set(), state.config
    payload = orjson.dumps(call.payload)
    for attempt in (1, 2):
        backend = await pool.pick(inflight.route.upstream_model, live.path_of, frozenset(tried))
        inflight.on(backend)
        try:
            inflight.upstream = await _send(state.upstream, config, backend, call.path, payload, stream, pool)
            if inflight.upstream.status < 400:
                return
            raise await _mapped_error(inflight.upstream, inflight.route, backend, pool, state.client)
        except BackendFailed as exc:
            if inflight.upstream is not None:
                _drop(inflight.upstream)
                inflight.upstream = None
            tried.add(backend.url)
            if attempt == 1:
                pool.retried += 1
            log.warning("%s: %s%s", backend.url, exc, "; sending it to another backend" if attempt == 1 else "")
    raise Unavailable(f"{inflight.route.upstream_model}: failed on {sorted(tried)}; retry shortly",
                      config.retry_after_s)


_JSON = {"Content-Type": "application/json"}


async def _send(session: aiohttp.ClientSession, config: RouterConfig, backend: Backend, path: str, payload: bytes,
                stream: bool, pool: Pool) -> aiohttp.ClientResponse:
    """vLLM's response; read whole unless it is a stream that started, so a backend breaking off is retried."""
    try:
        upstream = await session.post(backend.url + path, data=payload, headers=_JSON)
        if not stream or upstream.status >= 400:
            await upstream.read()  # kept on the response: `read()` again returns it
        return upstream
    except TimeoutError as exc:  # before ClientError: aiohttp's timeouts are both
        raise APIError(504, f"vLLM did not answer within {config.upstream_timeout_s} s", "upstream_timeout") from exc
    except aiohttp.ClientError as exc:
        pool.failed(backend, f"a request failed: {exc!r}")
        raise BackendFailed(f"request failed: {exc!r}") from exc


def _drop(upstream: aiohttp.ClientResponse) -> None:
    """Done with vLLM's response: its connection goes back to the pool if it was read to the end, else closes."""
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


async def _mapped_error(upstream: aiohttp.ClientResponse, chosen: Route, backend: Backend, pool: Pool,
                        client: httpx.AsyncClient) -> APIError:
    """vLLM's error for the client, or BackendFailed when the backend, not the request, is at fault."""
    if upstream.status == 404:
        # We route only to adapters we loaded: vLLM lacking one means it restarted behind our back.
        pool.lost(backend, chosen.upstream_model)
        raise BackendFailed(f"vLLM lacks {chosen.upstream_model}")
    if upstream.status >= 500:
        try:
            await backend.check(client)
        except Down as exc:
            pool.failed(backend, f"answered {upstream.status}, then {exc}")
            raise BackendFailed(f"answered {upstream.status} and failed its check") from exc
    return upstream_error(upstream.status, await upstream.read())


async def _relay(inflight: InFlight, call: Exchange, pool: Pool, public: Public) -> AsyncIterator[dict | None]:
    """vLLM's stream reshaped for the client, chunk by chunk: None is `[DONE]`, `{"error": ...}` a stream
    that broke off. The usage chunk is kept for the metrics."""
    started: set[int] = set()
    try:
        async for line in inflight.upstream.content:  # one line at a time, b"\n" included
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                yield None
                continue
            chunk = orjson.loads(data)
            if chunk.get("usage"):
                inflight.usage = chunk["usage"]
                if not call.client_wants_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk.pop("usage")
            yield (chat_chunk(chunk, started, inflight.answered_by, call.top_logprobs, call.asked)
                   if call.chat_from_completion else shaped(chunk, inflight.answered_by, call.asked))
    except (aiohttp.ClientError, TimeoutError) as exc:
        backend = inflight.backend
        if backend is not None:
            pool.failed(backend, f"a stream broke off: {exc!r}")
        await inflight.close(502, code="upstream_failed")
        why = public.scrub(f"the backend failed mid-stream ({exc!r}); the answer is incomplete: ask again")
        yield {"error": {"message": why, "type": "service_unavailable", "param": None, "code": "upstream_failed"}}
    finally:
        await inflight.close(200)


async def _sse(chunks: AsyncIterator[dict | None]) -> AsyncIterator[bytes]:
    """Chat and completion streams: each chunk a `data:` event, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield b"data: [DONE]\n\n" if chunk is None else b"data: " + orjson.dumps(chunk) + b"\n\n"
    finally:
        await chunks.aclose()


async def _responses_events(chunks: AsyncIterator[dict | None], inflight: InFlight,
                            asked: dict) -> AsyncIterator[bytes]:
    """A Responses stream: its typed events, built from the chat stream (no `[DONE]` in this API)."""
    events = responses.Events(asked)
    try:
        async for chunk in chunks:
            if chunk is None:
                for event in events.done(inflight.usage):
                    yield event
            elif "error" in chunk:
                yield events.error(chunk["error"])
            else:
                for event in events.chunk(chunk):
                    yield event
    finally:
        await chunks.aclose()
