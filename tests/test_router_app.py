"""The router's HTTP app against a fake vLLM: a request in flight is counted out exactly once.

The router is the real app on a real port; only vLLM is replaced, by a small Starlette
app that streams slowly enough for a client to hang up half-way. Fast: no model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route as Endpoint

from mtft.registry import AdapterRecord, BaseModelRef, PromptTemplate, Registry, fingerprint
from mtft.router import RouterConfig, create_app
from mtft.router.config import Keys
from mtft.router.inference import InFlight
from mtft.router.live import LiveTable
from mtft.router.metrics import RequestMetrics
from mtft.router.table import Route
from mtft.serve import write_zero_adapter
from mtft.serve.stack import free_port

ADMIN = "admin-key"
CHUNKS = 20  # the fake vLLM's stream: 20 chunks, 50 ms apart, then usage and [DONE]


def fake_vllm(base: str) -> Starlette:
    held: set[str] = set()

    async def models(_request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": name} for name in (base, *sorted(held))]})

    async def load(request: Request) -> JSONResponse:
        held.add((await request.json())["lora_name"])
        return JSONResponse({})

    async def unload(request: Request) -> JSONResponse:
        held.discard((await request.json())["lora_name"])
        return JSONResponse({})

    async def completions(request: Request):
        body = await request.json()
        usage = {"prompt_tokens": 3, "completion_tokens": CHUNKS, "total_tokens": CHUNKS + 3}
        if not body.get("stream"):
            return JSONResponse({"id": "cmpl-1", "model": body["model"], "usage": usage,
                                 "choices": [{"index": 0, "text": "x" * CHUNKS, "finish_reason": "length"}]})

        async def lines():
            for _ in range(CHUNKS):
                await asyncio.sleep(0.05)
                chunk = {"id": "cmpl-1", "model": body["model"], "choices": [{"index": 0, "text": "x"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    return Starlette(routes=[Endpoint("/v1/models", models), Endpoint("/v1/load_lora_adapter", load, methods=["POST"]),
                             Endpoint("/v1/unload_lora_adapter", unload, methods=["POST"]),
                             Endpoint("/v1/completions", completions, methods=["POST"])])


@contextlib.contextmanager
def serve_in_thread(app, port: int) -> Iterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def registry(tiny_base: Path, tmp_path_factory) -> Registry:
    """One servable adapter, `yesno-v1` (zero weights: the fake vLLM never reads them)."""
    folder = write_zero_adapter(tiny_base, ["q_proj"], 8, tmp_path_factory.mktemp("adapter"))
    registry = Registry(tmp_path_factory.mktemp("router-app") / "registry")
    base = BaseModelRef(name="tiny", path=str(tiny_base), fingerprint=fingerprint(tiny_base))
    registry.publish(folder, AdapterRecord(task="yesno", prefix="yesno: ", base_model=base, rank=8, alpha=8,
                                           target_modules=["q_proj"], metric="accuracy", max_new_tokens=4,
                                           template=PromptTemplate(input="{text}", target="{label}")))
    return registry


@pytest.fixture(scope="module")
def config(registry: Registry) -> Iterator[RouterConfig]:
    """The router's config, with the fake vLLM it names running."""
    vllm_port = free_port()
    with serve_in_thread(fake_vllm("tiny"), vllm_port):
        yield RouterConfig(registry=registry.root, upstream=f"http://127.0.0.1:{vllm_port}", base_model="tiny",
                           base_name="tiny", base_fingerprint=registry.latest()["yesno"].base_model.fingerprint,
                           max_rank=8, poll_s=0.2, port=free_port())


@pytest.fixture(scope="module")
def router(config: RouterConfig) -> Iterator[str]:
    with serve_in_thread(create_app(config, Keys(admin=ADMIN)), config.port):
        url = f"http://127.0.0.1:{config.port}"
        wait_for(lambda: httpx.get(url + "/ready").status_code == 200)
        yield url


def inflight(url: str) -> int:
    served = httpx.get(url + "/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()["served"]
    return {s["adapter"]: s["inflight"] for s in served}["yesno-v1"]


def counted(url: str, status: str = "200") -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("mtft_requests_total{") and f'status="{status}"' in line and '"yesno-v1"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_closing_a_request_in_flight_again_changes_nothing(config, registry):
    record = registry.latest()["yesno"]

    async def close_three_times() -> tuple[dict, RequestMetrics]:
        async with httpx.AsyncClient() as client:
            live, metrics = LiveTable(config, client), RequestMetrics()
            request = InFlight(Route("model", record.name, record), live, metrics)
            assert dict(live.inflight) == {"yesno-v1": 1}
            await request.close(200, {"prompt_tokens": 3, "completion_tokens": 4})
            await request.close(200, {"prompt_tokens": 3, "completion_tokens": 4})
            await request.close(503, code="upstream_unavailable")
            return dict(live.inflight), metrics

    held, metrics = asyncio.run(close_three_times())
    labels = {"task": "yesno", "adapter": "yesno-v1"}
    count = metrics.registry.get_sample_value
    assert held == {}
    assert count("mtft_requests_total", {**labels, "route": "model", "status": "200"}) == 1
    assert count("mtft_requests_total", {**labels, "route": "model", "status": "503"}) is None
    assert count("mtft_tokens_total", {**labels, "kind": "completion"}) == 4


def test_a_client_that_hangs_up_mid_stream_is_counted_out_once(router):
    before = counted(router)
    with httpx.stream("POST", router + "/v1/completions", json={"prompt": "yesno: is it?", "stream": True}) as answer:
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ")
        assert inflight(router) == 1
    wait_for(lambda: inflight(router) == 0)
    wait_for(lambda: counted(router) == before + 1)
    time.sleep(CHUNKS * 0.05)  # the rest of vLLM's stream would have arrived by now
    assert counted(router) == before + 1


def test_a_full_stream_is_counted_once_with_its_usage(router):
    before = counted(router)
    with httpx.stream("POST", router + "/v1/completions", json={"prompt": "yesno: is it?", "stream": True}) as answer:
        assert sum(line.startswith("data: {") for line in answer.iter_lines()) == CHUNKS  # usage: not asked for
    wait_for(lambda: counted(router) == before + 1)
    assert inflight(router) == 0
    tokens = 'mtft_tokens_total{adapter="yesno-v1",kind="completion",task="yesno"} '
    assert tokens in httpx.get(router + "/metrics").text


def test_under_asgi_2_4_a_hang_up_is_counted_out_by_the_relay(config):
    """ASGI 2.4 servers report a hang-up as OSError from send(), and Starlette then skips the
    background task; the relay's `finally` must count the request out instead."""
    app = create_app(config, Keys())

    async def hang_up_after_the_first_chunk() -> dict:
        async with app.router.lifespan_context(app):
            while not app.state.live.synced:
                await asyncio.sleep(0.02)
            body = json.dumps({"prompt": "yesno: is it?", "stream": True}).encode()
            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                     "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                     "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]}
            requests = [{"type": "http.request", "body": body, "more_body": False}]
            chunks: list[bytes] = []

            async def receive() -> dict:
                return requests.pop() if requests else {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if message.get("body"):
                    if chunks:
                        raise OSError("the client went away")
                    chunks.append(message["body"])

            with contextlib.suppress(Exception):
                await app(scope, receive, send)
            held = dict(app.state.live.inflight)
            for _ in range(100):
                if not app.state.live.inflight:
                    break
                gc.collect()  # the abandoned relay is finalized (and its `finally` run) once collected
                await asyncio.sleep(0.02)
            return {"chunks": len(chunks), "held": held, "after": dict(app.state.live.inflight)}

    seen = asyncio.run(hang_up_after_the_first_chunk())
    assert (seen["chunks"], seen["after"]) == (1, {})


@pytest.mark.parametrize(("path", "status"), [("yesno/v1", 200), ("yesno/../../x/v1", 422), ("yesno/x1", 422)])
def test_admin_adds_a_version_by_its_registry_path(router, path, status):
    response = httpx.post(router + "/admin/adapters", json={"path": path}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json() == {"task": "yesno", "version": 1, "adapter": "yesno-v1"}
    else:
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("adapter_rejected", "path")
