"""The router's HTTP surface: an OpenAI-compatible proxy in front of one vLLM on loopback.

One `httpx.AsyncClient` lives for the app's lifespan. Both inference
endpoints go through `infer`: authenticate, parse, `route()`, count the
request in flight on its adapter, forward, reshape. Streams are relayed with
`client.send(stream=True)` and the upstream response is closed (and the
request counted out) in the StreamingResponse's background task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .config import Keys, RouterConfig
from .errors import APIError, Unavailable, error_response
from .live import LiveTable
from .metrics import UNROUTED, Metrics
from .proxy import CHAT, COMPLETIONS, Exchange, chat_answer, chat_chunk, exchange, parse, upstream_error
from .table import BASE, Route, route

log = logging.getLogger(__name__)


def create_app(config: RouterConfig, keys: Keys | None = None) -> FastAPI:
    keys = keys if keys is not None else Keys.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        timeout = httpx.Timeout(config.upstream_timeout_s, connect=2.0)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            live = LiveTable(config, client)
            app.state.live, app.state.client = live, client
            loop = asyncio.create_task(live.run())
            try:
                yield
            finally:
                loop.cancel()

    app = FastAPI(title="mtft router", lifespan=lifespan)
    for kind in (APIError, HTTPException, Exception):  # one handler; Exception: a bug still answers in shape
        app.add_exception_handler(kind, error_response)

    def allowed_tasks(request: Request) -> frozenset[str] | None:
        if not keys.api:
            return None
        key = _bearer(request)
        if key not in keys.api:
            raise APIError(401, "missing or unknown API key (Authorization: Bearer <key>)", "invalid_api_key")
        return keys.api[key]

    def check_admin(request: Request) -> None:
        if keys.admin is None:
            raise APIError(401, "admin endpoints are off: set MTFT_ADMIN_KEY", "admin_disabled")
        if _bearer(request) != keys.admin:
            raise APIError(401, "missing or wrong admin key", "invalid_admin_key")

    async def infer(request: Request, path: str) -> Response:
        allowed = allowed_tasks(request)
        live: LiveTable = request.app.state.live
        raw = await _read_body(request, config.max_body_bytes)
        body, wanted = parse(raw, path, request.headers.get("x-task"))
        started = time.perf_counter()
        try:
            chosen = route(wanted, live.table)
        except APIError as exc:
            metrics.observe(UNROUTED, UNROUTED, "none", exc.status, 0.0, None, exc.code)
            raise
        if allowed is not None and chosen.task not in allowed:
            raise APIError(403, f"this API key may not use task {chosen.task!r}", "task_not_allowed", "model")
        plan = exchange(body, path, chosen)
        live.acquire(chosen)  # before any await: a swap now waits for this request
        try:
            upstream = await _send(request.app.state.client, config, plan, body.stream)
            if upstream.status_code >= 400:
                await upstream.aread()
                await upstream.aclose()
                raise _mapped_error(upstream, chosen, live, config)
        except APIError as exc:
            live.release(chosen)
            metrics.observe(chosen.task, chosen.adapter, chosen.matched, exc.status,
                            time.perf_counter() - started, None, exc.code)
            raise
        headers = {"X-MTFT-Task": chosen.task, "X-MTFT-Adapter": chosen.adapter, "X-MTFT-Route": chosen.matched}
        if not body.stream:
            answer = upstream.json()
            await upstream.aclose()
            live.release(chosen)
            metrics.observe(chosen.task, chosen.adapter, chosen.matched, 200,
                            time.perf_counter() - started, answer.get("usage"))
            return JSONResponse(chat_answer(answer) if plan.chat_from_completion else answer, headers=headers)
        usage: dict = {}
        finished: list[bool] = []

        async def finish() -> None:
            # Runs as the background task, and from the relay's `finally` when the client
            # went away (Starlette then skips background tasks); whichever comes first.
            if finished:
                return
            finished.append(True)
            await upstream.aclose()
            live.release(chosen)
            metrics.observe(chosen.task, chosen.adapter, chosen.matched, 200,
                            time.perf_counter() - started, usage.get("usage"))

        return StreamingResponse(_relay(upstream, plan, usage, finish), media_type="text/event-stream",
                                 headers=headers, background=BackgroundTask(finish))

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await infer(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await infer(request, CHAT)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        allowed = allowed_tasks(request)  # a key limited to some tasks sees only those
        table = request.app.state.live.table
        data = [{"id": BASE, "object": "model", "owned_by": "mtft", "root": config.base_name,
                 "adapter": table.base_target}]
        data += [{"id": r.task, "object": "model", "owned_by": "mtft", "parent": BASE, "adapter": r.name,
                  "version": r.version, "prefix": r.prefix} for r in table.current.values()
                 if allowed is None or r.task in allowed]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> dict:
        live: LiveTable = request.app.state.live
        if not live.ready:
            raise Unavailable("vLLM is not ready", config.retry_after_s)
        return {"status": "ready", "tasks": live.table.tasks}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/adapters")
    async def list_adapters(request: Request) -> dict:
        check_admin(request)
        return request.app.state.live.status()

    @app.post("/admin/adapters")
    async def add_adapter(request: Request) -> dict:
        check_admin(request)
        task, version = _admin_target(await _read_body(request, config.max_body_bytes), config)
        record = await request.app.state.live.add(task, version)
        return {"task": record.task, "version": record.version, "adapter": record.name}

    @app.delete("/admin/adapters/{task}")
    async def remove_adapter(task: str, request: Request) -> dict:
        check_admin(request)
        record = await request.app.state.live.remove(task)
        return {"task": record.task, "version": record.version, "adapter": record.name, "removed": True}

    return app


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _admin_target(raw: bytes, config: RouterConfig) -> tuple[str, int | None]:
    """`{"task": t, "version": n}` or `{"path": "<task>/v<n>"}` (relative to, and inside, the registry)."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise APIError(400, f"request body is not JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict) or set(data) - {"task", "version", "path"}:
        raise APIError(400, "body must be {task, version?} or {path}", "invalid_request")
    if "path" in data:
        root = config.registry.resolve()
        folder = (config.registry / str(data["path"])).resolve()
        if not folder.is_relative_to(root) or folder.parent.parent != root or not folder.name[1:].isdigit():
            raise APIError(422, f"path {data['path']!r} resolves to {folder}, not <registry>/<task>/v<N> "
                           f"inside {root}", "adapter_rejected", "path")
        return folder.parent.name, int(folder.name[1:])
    if not isinstance(data.get("task"), str):
        raise APIError(400, "body needs a 'task' (and optionally a 'version')", "invalid_request", "task")
    version = data.get("version")
    if version is not None and not isinstance(version, int):
        raise APIError(400, "'version' must be an integer", "invalid_request", "version")
    return data["task"], version


async def _send(client: httpx.AsyncClient, config: RouterConfig, plan: Exchange, stream: bool) -> httpx.Response:
    request = client.build_request("POST", config.upstream + plan.path, json=plan.payload)
    try:
        return await client.send(request, stream=stream)
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


async def _relay(upstream: httpx.Response, plan: Exchange, usage: dict, finish) -> AsyncIterator[bytes]:
    started: set[int] = set()
    try:
        async for line in upstream.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                yield b"data: [DONE]\n\n"
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage["usage"] = chunk["usage"]
                if not plan.client_wants_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk.pop("usage")
            if plan.chat_from_completion:
                chunk = chat_chunk(chunk, started)
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except httpx.TransportError as exc:
        log.warning("stream from vLLM broke off: %r", exc)
    finally:
        if not upstream.is_stream_consumed:
            await finish()
