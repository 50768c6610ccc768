"""What a client sees, end to end (real vLLM, real router): no server path anywhere, and one shape for
every answer, whether the base model or a task answered it, streamed or not, chat or completion."""

from __future__ import annotations

import json

import httpx
import pytest
from serving import LIMITED_KEY

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow

BASE_CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TASK_CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3}
BASE_COMPLETION = {"model": "base", "prompt": "hello", "max_tokens": 3}
TASK_COMPLETION = {"model": "yesno", "prompt": "hello", "max_tokens": 3}


def events(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data
    return [json.loads(d) for d in data[:-1]]


def fields(answers: list[dict]) -> dict[str, set[str]]:
    """The field names at each level, over all `answers` (or stream chunks): answers that look alike have equal ones."""
    choices = [c for a in answers for c in a.get("choices", [])]
    return {"answer": {k for a in answers for k in a}, "choice": {k for c in choices for k in c},
            "message": {k for c in choices for k in c.get("message", c.get("delta", {}))},
            "usage": {k for a in answers for k in a.get("usage") or {}}}


@pytest.fixture(scope="module")
def seen(stack_session) -> dict[str, httpx.Response]:
    """One response of every kind a client can get, keyed by what was asked."""
    stack = stack_session
    stack.wait_ready()
    auth = {"Authorization": f"Bearer {stack.api_key}"}
    asked = {
        "base completion": ("/v1/completions", BASE_COMPLETION),
        "task completion": ("/v1/completions", TASK_COMPLETION),
        "task completion by prefix": ("/v1/completions", {"prompt": "yesno: hello", "max_tokens": 3}),
        "base chat": ("/v1/chat/completions", BASE_CHAT),
        "task chat": ("/v1/chat/completions", TASK_CHAT),
        "base completion streamed": ("/v1/completions", {**BASE_COMPLETION, "stream": True}),
        "task completion streamed": ("/v1/completions", {**TASK_COMPLETION, "stream": True}),
        "base chat streamed": ("/v1/chat/completions", {**BASE_CHAT, "stream": True}),
        "task chat streamed": ("/v1/chat/completions", {**TASK_CHAT, "stream": True}),
        "base completion streamed with usage": ("/v1/completions", {**BASE_COMPLETION, "stream": True,
                                                                    "stream_options": {"include_usage": True}}),
        "task chat streamed with usage": ("/v1/chat/completions", {**TASK_CHAT, "stream": True,
                                                                   "stream_options": {"include_usage": True}}),
        "base completion with token ids": ("/v1/completions", {**BASE_COMPLETION, "return_token_ids": True}),
        "error: vLLM refuses a base request": ("/v1/completions", {**BASE_COMPLETION, "max_tokens": 100_000}),
        "error: vLLM refuses a task request": ("/v1/completions", {**TASK_COMPLETION, "n": -1}),
        "error: unknown task": ("/v1/completions", {"model": "nope", "prompt": "hi"}),
        "error: a path for a model": ("/v1/chat/completions", {**BASE_CHAT, "model": "/no/such/model"}),
    }
    with httpx.Client(base_url=stack.url, headers=auth, timeout=60) as client:
        got = {what: client.post(path, json=body) for what, (path, body) in asked.items()}
        limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
        got["models"] = client.get("/v1/models")
        got["models for a limited key"] = client.get("/v1/models", headers=limited)
        got["error: wrong key"] = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        got["error: key limited to another task"] = client.post("/v1/completions", json={"model": "echo", "prompt": "hi"},
                                                                headers=limited)
        got["error: no such route"] = client.get("/v2/nothing")
        got["ready"] = client.get("/ready")
        got["health"] = client.get("/health")
        got["metrics"] = client.get("/metrics")
    return got


def test_no_response_names_a_server_path(seen, stack, tmp_path_factory):
    # Every server path of this stack (base model, registry, zero adapter, state) lies under it.
    server = str(tmp_path_factory.getbasetemp())
    assert str(stack.registry).startswith(server) and server.startswith("/")
    for what, response in seen.items():
        assert server not in response.text, (what, response.text)
        assert not [v for v in response.headers.values() if server in v], (what, response.headers)
    errors = [r for what, r in seen.items() if what.startswith("error")]
    assert [r.status_code for r in errors] == [400, 400, 404, 404, 401, 403, 404]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in errors)


def test_the_base_model_answers_under_its_public_name(seen):
    base = seen["models"].json()["data"][0]
    assert base["id"] == "base" and "/" not in base["root"] and base["adapter"] == base["root"]
    for what in ("base completion", "base chat", "base completion streamed", "base chat streamed"):
        response = seen[what]
        assert response.headers["x-mtft-adapter"] == base["root"], what
        models = {c["model"] for c in events(response)} if "streamed" in what else {response.json()["model"]}
        assert models == {base["root"]}, what
    assert seen["task completion"].json()["model"] == seen["task completion"].headers["x-mtft-adapter"] == "yesno-v1"
    assert f'adapter="{base["root"]}"' in seen["metrics"].text


@pytest.mark.parametrize("kind", ["completion", "chat", "completion streamed", "chat streamed"])
def test_base_and_task_answers_look_alike(seen, kind):
    base, task = seen[f"base {kind}"], seen[f"task {kind}"]
    assert base.status_code == task.status_code == 200
    if "streamed" in kind:
        assert fields(events(base)) == fields(events(task))
    else:
        assert fields([base.json()]) == fields([task.json()])
        assert fields([base.json()])["answer"] == {"id", "object", "created", "model", "choices", "usage"}


def test_streams_carry_usage_only_when_asked_and_vllm_fields_only_when_asked(seen):
    for what in ("base completion streamed with usage", "task chat streamed with usage"):
        assert events(seen[what])[-1]["usage"]["completion_tokens"] > 0, what
    assert not any("usage" in c for c in events(seen["base completion streamed"]))
    for what in ("base completion", "task completion", "base chat"):
        flat = seen[what].text
        assert "token_ids" not in flat and "kv_transfer_params" not in flat and "stop_reason" not in flat, what
    choice = seen["base completion with token ids"].json()["choices"][0]
    assert len(choice["token_ids"]) == 3 and choice["prompt_token_ids"]
