"""The router over N backends, against fake vLLM processes that die, refuse and restart on cue.

The router is the real app on a real port, driven by the `openai` client; each backend is
tests/fake_vllm.py in its own process, so a SIGKILL resets its connections the way a dead
vLLM does, and a restarted one comes back empty. Fast: no model runs. The same faults on
real vLLM replicas are in test_scale_out.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from fake_vllm import FakeVLLM, publish_zero, serve_in_thread, wait_for

from mtft.registry import Registry
from mtft.router import RouterConfig, create_app
from mtft.router.config import Keys
from mtft.serve.stack import free_port

ADMIN = "admin-key"
FINGERPRINT = "tiny-fingerprint"  # the fakes serve "tiny", whatever the records' base says


@pytest.fixture
def registry(tiny_base: Path, tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    publish_zero(registry, tiny_base, base_fingerprint=FINGERPRINT)
    return registry


@contextmanager
def router(registry: Registry, backends: list[FakeVLLM | str], **options) -> Iterator[tuple[str, openai.OpenAI]]:
    config = RouterConfig(registry=registry.root, backends=[getattr(b, "url", b) for b in backends],
                          base_model="tiny", base_name="tiny", base_fingerprint=FINGERPRINT, max_rank=16,
                          poll_s=0.2, backoff_max_s=0.5, port=free_port(), **options)
    with serve_in_thread(create_app(config, Keys(admin=ADMIN)), config.port):
        url = f"http://127.0.0.1:{config.port}"
        wait_for(lambda: httpx.get(url + "/ready").status_code == 200, 10)
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)


def backends(url: str) -> dict[str, dict]:
    status = httpx.get(url + "/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    return {b["url"]: b for b in status["backends"]}


def metric(url: str, name: str, backend: str | None = None) -> float:
    prefix = f'{name}{{backend="{backend}"}} ' if backend else f"{name} "
    return next(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
                if line.startswith(prefix))


def ask(client: openai.OpenAI, task: str = "yesno") -> str:
    return client.completions.create(model=task, prompt="is it?").choices[0].text


@pytest.fixture
def pair() -> Iterator[list[FakeVLLM]]:
    fakes = [FakeVLLM(free_port(), "--delay", "1.0").start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        fake.process.kill()


def test_each_adapter_lives_on_k_backends_and_spills_onto_one_more_when_they_are_busy(registry, tmp_path):
    fakes = [FakeVLLM(free_port(), "--delay", "1.0").start() for _ in range(3)]
    try:
        with router(registry, fakes, copies=1, spill_inflight=2) as (url, client):
            def holders() -> list[str]:
                return sorted(u for u, b in backends(url).items() if "yesno-v1" in b["adapters"])

            assert len(holders()) == 1
            threads = [threading.Thread(target=ask, args=(client,)) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(holders()) == 2  # k + 1, however busy: spill-over is bounded too
            assert metric(url, "mtft_backend_adapters", holders()[0]) == 1
    finally:
        for fake in fakes:
            fake.process.kill()


def test_a_backend_killed_mid_request_leaves_rotation_and_its_requests_are_retried_once(registry, pair):
    with router(registry, pair) as (url, client):
        answers, threads = [], [threading.Thread(target=lambda: answers.append(ask(client))) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: all(b["inflight"] for b in backends(url).values()))  # both have requests in flight
        pair[0].kill()
        for thread in threads:
            thread.join()
        assert answers == [f"{pair[1].port}:yesno-v1"] * 4  # every one answered, by the survivor
        assert metric(url, "mtft_retries_total") >= 1
        assert (backends(url)[pair[0].url]["state"], metric(url, "mtft_backend_healthy", pair[0].url)) == ("down", 0)
        assert ask(client) == f"{pair[1].port}:yesno-v1"


def test_a_stream_cut_off_by_its_backend_ends_in_an_error_not_a_short_answer(registry, pair):
    with router(registry, pair) as (url, client):
        stream = client.completions.create(model="yesno", prompt="is it?", stream=True)
        first = next(iter(stream))
        assert first.choices[0].text == "x"
        busy = next(fake for fake in pair if backends(url)[fake.url]["inflight"])
        busy.kill()
        with pytest.raises(openai.APIError, match="failed mid-stream") as caught:
            list(stream)
        assert caught.value.body["code"] == "upstream_failed"
        assert ask(client).endswith(":yesno-v1")  # the next request goes to the other backend


def test_a_version_one_backend_refuses_does_not_go_live_and_the_old_one_keeps_serving(registry, tiny_base):
    fakes = [FakeVLLM(free_port()).start(), FakeVLLM(free_port(), "--max-rank", "8").start()]
    try:
        with router(registry, fakes) as (url, client):
            publish_zero(registry, tiny_base, rank=16, base_fingerprint=FINGERPRINT)  # v2: the second refuses rank 16
            admin = {"Authorization": f"Bearer {ADMIN}"}
            response = httpx.post(url + "/admin/adapters", json={"task": "yesno"}, headers=admin)
            assert response.status_code == 422
            assert f"{fakes[1].url} refused yesno-v2: 500 LoRA rank 16 is greater than max_lora_rank 8" in \
                response.json()["error"]["message"]
            assert {ask(client).split(":")[1] for _ in range(4)} == {"yesno-v1"}
            assert all(b["adapters"] == ["yesno-v1"] for b in backends(url).values())  # unloaded where it loaded
            rejected = httpx.get(url + "/admin/adapters", headers=admin).json()["rejected"]
            assert [(r["task"], r["version"]) for r in rejected] == [("yesno", 2)]
    finally:
        for fake in fakes:
            fake.process.kill()


def test_a_backend_restarted_empty_gets_its_adapters_back_before_any_request(registry, pair, tiny_base, tmp_path):
    publish_zero(registry, tiny_base, "echo", base_fingerprint=FINGERPRINT)
    with router(registry, pair) as (url, client):
        wait_for(lambda: len(backends(url)[pair[0].url]["adapters"]) == 2)
        pair[0].kill()
        wait_for(lambda: backends(url)[pair[0].url]["state"] == "down")
        events = tmp_path / "events.jsonl"
        pair[0].start("--events", str(events))  # same port, nothing loaded
        failures: list[Exception] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                for task in ("yesno", "echo"):
                    try:
                        ask(client, task)
                    except openai.APIError as exc:
                        failures.append(exc)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: backends(url)[pair[0].url]["state"] == "healthy", 10)
            wait_for(lambda: '"complete"' in events.read_text(), 10)  # it takes traffic again
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == []
        seen = [json.loads(line) for line in events.read_text().splitlines()]
        first_request = next(i for i, e in enumerate(seen) if e["what"] == "complete")
        assert {e["model"] for e in seen[:first_request] if e["what"] == "load"} == {"yesno-v1", "echo-v1"}


def test_a_backend_that_never_answers_is_out_of_rotation_and_says_why(registry, pair):
    dead = f"http://127.0.0.1:{free_port()}"
    with router(registry, [pair[0], dead]) as (url, client):
        assert ask(client).endswith(":yesno-v1")
        status = backends(url)[dead]
        assert (status["state"], status["adapters"]) == ("down", [])
        assert "ConnectError" in status["reason"]
        assert (metric(url, "mtft_backend_healthy", dead), metric(url, "mtft_backend_healthy", pair[0].url)) == (0, 1)


def test_with_no_backend_in_rotation_requests_get_503_with_retry_after(registry, pair):
    with router(registry, pair) as (url, client):
        for fake in pair:
            fake.kill()
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client)
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"].isdigit()
        assert caught.value.body["code"] == "upstream_unavailable"
        wait_for(lambda: httpx.get(url + "/ready").status_code == 503)
        assert "no backend is in rotation" in httpx.get(url + "/ready").json()["error"]["message"]


def test_an_adapter_asked_for_while_its_eviction_is_under_way_is_loaded_again_not_refused(registry, tiny_base):
    """One slot, two tasks asked for at once: every load evicts the other, which vLLM stops listing
    before it can load it again. A load of the evicted one must wait for that unload, never turn
    into a lasting refusal. (With one slot, a request whose adapter cannot get the slot while the
    other has requests in flight gets 503 with Retry-After: that is the design.)"""
    publish_zero(registry, tiny_base, "echo", base_fingerprint=FINGERPRINT)
    fake = FakeVLLM(free_port(), "--unload-delay", "0.2").start()
    try:
        with router(registry, [fake], slots=1) as (url, client):
            answers: list[tuple[str, str]] = []

            def asker(task: str) -> None:
                for _ in range(6):
                    try:
                        answers.append((task, ask(client, task).split(":")[1]))
                    except openai.APIStatusError as error:
                        answers.append((task, f"{error.status_code} {error.message}"))

            threads = [threading.Thread(target=asker, args=(task,)) for task in ("yesno", "echo") * 2]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            busy = "503 Error code: 503 - every healthy backend's slots hold adapters with requests in flight"
            assert all(answer == f"{task}-v1" or answer.startswith(busy) for task, answer in answers), answers
            assert {answer for _, answer in answers} >= {"yesno-v1", "echo-v1"}
            assert backends(url)[fake.url]["refused"] == {}
    finally:
        fake.process.kill()
