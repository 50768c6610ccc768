"""The router's HTTP app against a fake vLLM: a request in flight is counted out exactly once.

The router is the real app on a real port; only vLLM is replaced, by a small Starlette
app (tests/fake_vllm.py) that streams slowly enough for a client to hang up half-way.
Fast: no model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fake_vllm import CHUNKS, app, publish_zero, serve_in_thread, wait_for

from mtft.registry import Registry
from mtft.router import RouterConfig, create_app
from mtft.router.config import Keys
from mtft.router.inference import InFlight
from mtft.router.live import LiveTable
from mtft.router.metrics import RequestMetrics
from mtft.router.table import Route
from mtft.serve.stack import free_port

ADMIN = "admin-key"


@pytest.fixture(scope="module")
def registry(tiny_base: Path, tmp_path_factory) -> Registry:
    """One servable adapter, `yesno-v1` (zero weights: the fake vLLM never reads them)."""
    registry = Registry(tmp_path_factory.mktemp("router-app") / "registry")
    publish_zero(registry, tiny_base)
    return registry


@pytest.fixture(scope="module")
def config(registry: Registry) -> Iterator[RouterConfig]:
    """The router's config, with the fake vLLM it names running."""
    vllm_port = free_port()
    with serve_in_thread(app("tiny"), vllm_port):
        yield RouterConfig(registry=registry.root, backends=[f"http://127.0.0.1:{vllm_port}"], base_model="tiny",
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


def test_closing_a_request_in_flight_again_changes_nothing(config, registry):
    record = registry.latest()["yesno"]

    async def close_three_times() -> tuple[dict, RequestMetrics]:
        async with httpx.AsyncClient() as client:
            live, metrics = LiveTable(config, client), RequestMetrics()
            request = InFlight(Route("model", record.name, record), record.name, live, metrics)
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


@pytest.fixture(scope="module")
def base_by_path(registry: Registry, tiny_base: Path) -> Iterator[str]:
    """A router whose vLLM serves the base as its folder and answers base requests itself (mtft's CPU LoRA
    ops, no zero adapter): vLLM's answers then carry that server path as their `model`."""
    vllm_port, port = free_port(), free_port()
    config = RouterConfig(registry=registry.root, backends=[f"http://127.0.0.1:{vllm_port}"], base_model=str(tiny_base),
                          base_name=str(tiny_base), base_fingerprint=registry.latest()["yesno"].base_model.fingerprint,
                          max_rank=8, poll_s=0.2, port=port)
    with serve_in_thread(app(str(tiny_base)), vllm_port), serve_in_thread(create_app(config, Keys()), port):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/ready").status_code == 200)
        yield url


def test_a_base_served_from_a_folder_is_shown_by_its_name_only(base_by_path, tiny_base):
    requests = [{"model": "base", "prompt": "hi"}, {"model": "base", "prompt": "hi", "stream": True},
                {"model": "base", "prompt": 3}, {"model": tiny_base.name, "prompt": "hi"}]
    with httpx.Client(base_url=base_by_path) as client:
        answers = [client.post("/v1/completions", json=body) for body in requests]
        models = client.get("/v1/models").json()["data"][0]
        metrics = client.get("/metrics").text
    whole, streamed, refused, by_public_name = answers
    assert by_public_name.headers["x-mtft-route"] == "base", "the name a client sees must route back to the base"
    assert models["root"] == models["adapter"] == tiny_base.name
    assert whole.json()["model"] == whole.headers["x-mtft-adapter"] == tiny_base.name
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert {c["model"] for c in chunks} == {tiny_base.name} and streamed.headers["x-mtft-adapter"] == tiny_base.name
    assert refused.status_code == 400 and f'adapter="{tiny_base.name}"' in metrics
    # The fake vLLM's answer text names the model it was asked for; everything else must not.
    shown = [json.dumps({**whole.json(), "choices": None}), str(models), metrics, refused.text, *whole.headers.values()]
    assert not [text for text in shown if str(tiny_base) in text]


def test_a_task_left_with_no_servable_version_stops_being_served(router, registry):
    from mtft.registry.rollout import Gate

    source = registry.latest()["yesno"]
    folder = registry.version_dir("yesno", source.version)
    registry.publish(folder, source.model_copy(update={"task": "fading", "prefix": "fading: "}))
    ask = lambda: httpx.post(router + "/v1/completions", json={"model": "fading", "prompt": "x"})  # noqa: E731
    wait_for(lambda: ask().status_code == 200)
    failed = Gate(passed=False, rule="min: 0.9", score=0.1, reason="0.100 < min 0.9")
    registry.publish(folder, source.model_copy(update={"task": "fading", "prefix": "fading: ", "gate": failed}))
    registry.remove("fading", 1)  # only the rejected v2 is left
    wait_for(lambda: ask().status_code == 404)
    assert "fading" not in httpx.get(router + "/ready").json()["tasks"]
