"""The router's app: an OpenAI-compatible proxy in front of N vLLM backends.

`create_app` builds it; the handlers live at module level in `endpoints.py` and find
what they share on `app.state`: `config`, `keys`, `metrics` (request metrics), `public`
(the base model's public name, and the server paths no client may see), and, for the
app's lifespan, `upstream` (one `aiohttp.ClientSession` relaying every inference request
to vLLM), `client` (one `httpx.AsyncClient` for the control calls: health checks, adapter
loads) and `live` (the live route table and its pool of backends, kept in step with the
registry by a background `RegistrySync`). The relay is aiohttp's, and inference takes plain
routes: both cost the router less CPU per request than httpx and FastAPI's routing
(bench/router_overhead.py measures the router's cost); the control calls are few and keep httpx.
`RouterApp` then hands the inference paths to their handlers straight from ASGI, past the
middleware stack and route matching. Every error leaves through one handler in OpenAI's shape,
with server paths replaced.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import aiohttp
import httpx
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .config import Keys, RouterConfig
from .endpoints import INFERENCE, endpoints
from .errors import APIError, error_response
from .live import LiveTable
from .metrics import BackendMetrics, RequestMetrics
from .public import Public
from .sync import RegistrySync


class RouterApp(FastAPI):
    """FastAPI, except that a POST to an inference path goes straight to its handler.

    What Starlette's stack does for it is done here: the app on the scope, and every error
    answered by `error_response`; one that is not ours is re-raised once answered, for the
    server to log, as Starlette's ServerErrorMiddleware does."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = INFERENCE.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await super().__call__(scope, receive, send)
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except (APIError, HTTPException) as exc:
            response = error_response(request, exc)
        except Exception as exc:
            await error_response(request, exc)(scope, receive, send)
            raise
        await response(scope, receive, send)


def create_app(config: RouterConfig, keys: Keys | None = None) -> RouterApp:
    """The router for `config`; keys default to the environment's (`Keys.from_env`)."""
    app = RouterApp(title="mtft router", lifespan=_lifespan)
    app.state.config = config
    app.state.keys = keys if keys is not None else Keys.from_env()
    app.state.metrics = RequestMetrics()
    app.state.public = Public.of(config)
    for kind in (APIError, HTTPException, Exception):  # one handler; Exception: a bug still answers in shape
        app.add_exception_handler(kind, error_response)
    app.include_router(endpoints)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    config: RouterConfig = app.state.config
    timeout = httpx.Timeout(config.upstream_timeout_s, connect=2.0)
    # Idle connections are dropped before vLLM's uvicorn drops them (its keep-alive is 5 s):
    # a request sent on one it just closed would fail, and fail its backend out of rotation.
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0)
    # sock_read, not total: a stream may run long, but a backend silent for that long has failed.
    relay_timeout = aiohttp.ClientTimeout(connect=2.0, sock_read=config.upstream_timeout_s)
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=2.0)
    async with (httpx.AsyncClient(timeout=timeout, limits=limits) as client,
                aiohttp.ClientSession(connector=connector, timeout=relay_timeout) as upstream):
        app.state.client = client
        app.state.upstream = upstream
        app.state.live = LiveTable(config, client)
        backend_metrics = BackendMetrics(app.state.live)
        app.state.metrics.registry.register(backend_metrics)
        poller = asyncio.create_task(RegistrySync(app.state.live).run())
        try:
            yield
        finally:
            poller.cancel()
            app.state.metrics.registry.unregister(backend_metrics)
