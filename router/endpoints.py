"""The router's endpoints, at module level; what they share lives on `app.state` (see `app.py`).

Inference (`/v1/completions`, `/v1/chat/completions`, `/v1/responses`) goes through `inference.infer`;
`/v1/models` lists the tasks a key may use; `/health`, `/ready` and `/metrics` are
for operators; `/admin/adapters` adds, lists and withdraws adapters while serving.
Keys are checked first (a dependency), then the body is read within its size limit.
The inference endpoints (`INFERENCE`) are plain handlers that `RouterApp` calls straight
from ASGI: FastAPI's dependency solving, Starlette's middleware and route matching cost them more
than the rest of the router's own work (bench/router_overhead.py). They stay registered as
Starlette routes too, so other methods on their paths get Starlette's answer (405).
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from mtft.registry import RegistryError

from .errors import APIError, Unavailable
from .inference import bearer, infer
from .live import LiveTable
from .proxy import CHAT, COMPLETIONS
from .responses import RESPONSES
from .table import BASE

endpoints = APIRouter()


async def allowed_tasks(request: Request) -> frozenset[str] | None:
    """The tasks the caller's key may use; None: any (no keys are configured, or the key has no list).

    Async, as every dependency here: FastAPI runs a plain `def` in a worker thread, a hop per request."""
    keys = request.app.state.keys
    if not keys.api:
        return None
    key = bearer(request)
    if key not in keys.api:
        raise APIError(401, "missing or unknown API key (Authorization: Bearer <key>)", "invalid_api_key")
    return keys.api[key]


async def check_admin(request: Request) -> None:
    admin = request.app.state.keys.admin
    if admin is None:
        raise APIError(401, "admin endpoints are off: set MTFT_ADMIN_KEY", "admin_disabled")
    if bearer(request) != admin:
        raise APIError(401, "missing or wrong admin key", "invalid_admin_key")


Allowed = Annotated[frozenset[str] | None, Depends(allowed_tasks)]
admin_only = [Depends(check_admin)]


async def completions(request: Request) -> Response:
    allowed = await allowed_tasks(request)
    return await infer(request, COMPLETIONS, await read_body(request), allowed)


async def chat_completions(request: Request) -> Response:
    allowed = await allowed_tasks(request)
    return await infer(request, CHAT, await read_body(request), allowed)


async def responses(request: Request) -> Response:
    allowed = await allowed_tasks(request)
    return await infer(request, RESPONSES, await read_body(request), allowed)


INFERENCE = {COMPLETIONS: completions, CHAT: chat_completions, RESPONSES: responses}
for _path, _handler in INFERENCE.items():
    endpoints.add_route(_path, _handler, methods=["POST"])


@endpoints.get("/v1/models")
async def models(request: Request, allowed: Allowed) -> dict:
    """A key limited to some tasks sees only those."""
    table, base = request.app.state.live.table, request.app.state.public.base
    data = [{"id": BASE, "object": "model", "owned_by": "mtft", "root": base, "adapter": base}]
    data += [{"id": r.task, "object": "model", "owned_by": "mtft", "parent": BASE, "adapter": r.name,
              "version": r.version, "prefix": r.prefix} for r in table.current.values()
             if allowed is None or r.task in allowed]
    return {"object": "list", "data": data}


@endpoints.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@endpoints.get("/ready")
async def readiness(request: Request) -> dict:
    live: LiveTable = request.app.state.live
    if not live.synced:
        states = ", ".join(f"{b.url}: {b.state} ({b.reason})" for b in live.pool.backends if not b.healthy)
        raise Unavailable(f"no backend is in rotation yet ({states})" if not live.pool.healthy
                          else "the registry has not been read yet", request.app.state.config.retry_after_s)
    return {"status": "ready", "tasks": live.table.tasks}


@endpoints.get("/metrics")
async def request_metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@endpoints.get("/admin/adapters", dependencies=admin_only)
async def list_adapters(request: Request) -> dict:
    return request.app.state.live.status()


@endpoints.post("/admin/adapters", dependencies=admin_only)
async def add_adapter(request: Request) -> dict:
    live: LiveTable = request.app.state.live
    task, version = _admin_target(await read_body(request), live)
    record = await live.add(task, version)
    return {"task": record.task, "version": record.version, "adapter": record.name}


@endpoints.delete("/admin/adapters/{task}", dependencies=admin_only)
async def remove_adapter(task: str, request: Request) -> dict:
    record = await request.app.state.live.remove(task)
    return {"task": record.task, "version": record.version, "adapter": record.name, "removed": True}


async def read_body(request: Request) -> bytes:
    limit = request.app.state.config.max_body_bytes
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


def _admin_target(raw: bytes, live: LiveTable) -> tuple[str, int | None]:
    """`{"task": t, "version": n}` or `{"path": "<task>/v<n>"}` (relative to, and inside, the registry)."""
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict) or set(data) - {"task", "version", "path"}:
        raise APIError(400, "body must be {task, version?} or {path}", "invalid_request")
    if "path" in data:
        try:
            return live.registry.locate(str(data["path"]))
        except RegistryError as exc:
            raise APIError(422, str(exc), "adapter_rejected", "path") from exc
    if not isinstance(data.get("task"), str):
        raise APIError(400, "body needs a 'task' (and optionally a 'version')", "invalid_request", "task")
    version = data.get("version")
    if version is not None and not isinstance(version, int):
        raise APIError(400, "'version' must be an integer", "invalid_request", "version")
    return data["task"], version
