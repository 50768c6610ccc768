"""Hot-adding while serving: new tasks and versions go live with zero failed or mis-routed requests,
a publish is seen at once through filesystem notifications (the poll as fallback), bad adapters
are refused with their reasons, and a killed vLLM comes back by itself."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import openai
import pytest
from serving import API_KEY, TEXTS, Load, RunningStack, answer, extra_router, wait_until_served

from mtft.registry import RECORD_FILE, Registry, checksum

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow


def test_hot_added_task_goes_live_under_load_without_a_failed_or_misrouted_request(client, stack):
    jobs = [(task, text) for task in ("yesno", "echo") for text in TEXTS]
    alone = {job: answer(client, *job) for job in jobs}
    with Load(client, jobs) as load:
        time.sleep(0.5)
        started = time.monotonic()
        stack.publish_copy("echo", task="shout", prefix="shout: ")
        live_after = wait_until_served(client, "shout", "shout-v1")
        time.sleep(0.5)
        load.until(21)
    print(f"publish-to-first-routed-answer: {time.monotonic() - started:.2f} s (poll 0.5 s; {live_after:.2f} s)")
    assert not load.failures
    assert len(load.answers) > 20
    assert all(alone[job] == (text, adapter) for job, text, adapter in load.answers)
    stack.admin("DELETE", "/shout").raise_for_status()


def test_new_version_replaces_the_old_without_a_failed_or_misrouted_request(client, stack):
    registry = Registry(stack.registry)
    stack.publish_copy("yesno", task="swap", prefix="swap: ")
    wait_until_served(client, "swap", "swap-v1")
    jobs = [("swap", text) for text in TEXTS]
    v1 = {job: answer(client, *job)[0] for job in jobs}
    with Load(client, jobs) as load:
        time.sleep(0.5)
        # v2: other weights (echo's) under the same task record, so answers tell versions apart.
        echo = registry.latest()["echo"]
        swap = registry.latest()["swap"]
        registry.publish(registry.version_dir("echo", echo.version), swap)
        wait_until_served(client, "swap", "swap-v2")
        load.until(len(load.answers) + 8)  # past the 4 threads' requests in flight: some reach v2
    v2 = {job: answer(client, *job)[0] for job in jobs}
    assert v1 != v2
    assert not load.failures
    by_version = Counter(adapter for _, _, adapter in load.answers)
    assert by_version["swap-v1"] and by_version["swap-v2"], by_version
    expected = {"swap-v1": v1, "swap-v2": v2}
    assert all(expected[adapter][job] == text for job, text, adapter in load.answers)
    # The old version leaves vLLM once its requests are done; its name is never reused.
    status = stack.admin("GET").json()
    assert "swap-v1" not in status["retiring"]
    held = {m["id"] for m in _vllm_models(stack)}
    assert "swap-v2" in held and "swap-v1" not in held
    stack.admin("DELETE", "/swap").raise_for_status()
    with pytest.raises(openai.NotFoundError):
        answer(client, "swap", TEXTS[0])


def test_a_publish_goes_live_on_its_notification_long_before_the_next_poll(stack, tmp_path):
    """Two more routers polling every 30 s, one watching the registry, one not (the negative control)."""
    registry = Registry(tmp_path / "registry")
    registry.root.mkdir()
    with extra_router(stack, registry.root, tmp_path / "watching", poll_s=30) as watching, \
            extra_router(stack, registry.root, tmp_path / "polling", poll_s=30, watch=False) as polling:
        watched, polled = (openai.OpenAI(base_url=r.url + "/v1", api_key=API_KEY, max_retries=0)
                           for r in (watching, polling))
        wait_for_log(watching, f"watching {registry.root.resolve()}")
        started = time.monotonic()
        stack.publish_copy("yesno", registry, task="watched", prefix="watched: ")
        live_after = wait_until_served(watched, "watched", "watched-v1", timeout_s=10)
        with pytest.raises(openai.NotFoundError):
            answer(polled, "watched", TEXTS[0])
        print(f"publish -> first routed answer: {live_after:.2f} s with notifications (poll 30 s)")
        assert time.monotonic() - started < 15  # both routers' next poll is 30 s after their start
        watching.admin("DELETE", "/watched").raise_for_status()
    assert "watching" in watching.logs() and "watching" not in polling.logs()


def test_without_the_registry_folder_the_poll_picks_up_changes_until_notifications_can_start(stack, tmp_path):
    registry = Registry(tmp_path / "not-yet")
    with extra_router(stack, registry.root, tmp_path / "router", poll_s=0.5) as router:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key=API_KEY, max_retries=0)
        stack.publish_copy("yesno", registry, task="late", prefix="late: ")
        wait_until_served(client, "late", "late-v1", timeout_s=10)
        wait_for_log(router, f"watching {registry.root.resolve()}")
        router.admin("DELETE", "/late").raise_for_status()
    logs = router.logs()
    assert f"registry {registry.root.resolve()} does not exist yet: polling it every 0.5 s until it does" in logs
    assert logs.index("does not exist yet") < logs.index(f"watching {registry.root.resolve()}"), logs


def wait_for_log(router: RunningStack, text: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in router.logs():
        assert time.monotonic() < deadline, f"{text!r} not logged\n{router.logs()}"
        time.sleep(0.05)


def _vllm_models(stack) -> list[dict]:
    import httpx

    return httpx.get(f"http://127.0.0.1:{stack.state()['vllm_port']}/v1/models").json()["data"]


def _edit_config(folder, **changes) -> None:
    """Change adapter_config.json and re-sign the record, so only the change itself is wrong."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    record = json.loads((folder / RECORD_FILE).read_text())
    (folder / RECORD_FILE).write_text(json.dumps({**record, "checksum": checksum(folder)}))


def _wrong_base(folder):
    record = json.loads((folder / RECORD_FILE).read_text())
    record["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (folder / RECORD_FILE).write_text(json.dumps(record))


BAD = {  # case: (how to spoil a good adapter folder, the reason given)
    "wrong-base": (_wrong_base, "trained on base"),
    "rank-too-high": (lambda f: _edit_config(f, r=16), "exceeds the server's --max-lora-rank 8"),
    "modules-to-save": (lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
    "missing-file": (lambda f: (f / "adapter_model.safetensors").unlink(), "lacks"),
    "edited-weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"0" * 64), "checksum"),
    "symlink-out": (lambda f: None, "outside the registry"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_rejected_with_its_reason_while_serving_continues(client, stack, tmp_path, case):
    spoil, reason = BAD[case]
    task = f"bad-{case}"
    # Spoilt outside the registry, then moved in whole, so the poller never sees a good version.
    scratch = Registry(tmp_path / "scratch")
    stack.publish_copy("yesno", scratch, task=task, prefix=f"{task}: ")
    spoil(scratch.version_dir(task, 1))
    if case == "symlink-out":
        os.symlink(scratch.root / task, stack.registry / task)
    else:
        os.rename(scratch.root / task, stack.registry / task)
    response = stack.admin("POST", json={"task": task})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "adapter_rejected"
    assert reason in response.json()["error"]["message"]
    rejected = {(r["task"], r["version"]): r["reasons"] for r in stack.admin("GET").json()["rejected"]}
    assert any(reason in why for why in rejected[(task, 1)])
    with pytest.raises(openai.NotFoundError):
        answer(client, task, TEXTS[0])
    assert answer(client, "yesno", TEXTS[0])[1] == "yesno-v1"


@pytest.mark.parametrize("path", ["../elsewhere/v1", "/etc/v1", "yesno/../../x/v1", "yesno"])
def test_admin_path_outside_the_registry_is_refused(stack, path):
    response = stack.admin("POST", json={"path": path})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "path"


def test_admin_post_and_delete_publish_and_withdraw_a_task(client, stack):
    assert stack.admin("DELETE", "/echo").status_code == 200
    with pytest.raises(openai.NotFoundError):
        answer(client, "echo", TEXTS[0])
    time.sleep(1.5)  # the registry poller must not bring a withdrawn task back
    with pytest.raises(openai.NotFoundError):
        answer(client, "echo", TEXTS[0])
    response = stack.admin("POST", json={"path": "echo/v1"})
    assert response.json() == {"task": "echo", "version": 1, "adapter": "echo-v1"}
    assert answer(client, "echo", TEXTS[0])[1] == "echo-v1"


def test_vllm_killed_under_load_gives_503_with_retry_after_then_recovers_by_itself(client, stack):
    stack.publish_copy("yesno", task="revive", prefix="revive: ")
    wait_until_served(client, "revive", "revive-v1")
    jobs = [(task, text) for task in ("yesno", "echo", "revive") for text in TEXTS[:2]]
    before = {job: answer(client, *job) for job in jobs}
    with Load(client, jobs, threads=4, limit=1000, pause_s=0.25) as load:  # 4 minutes at most
        time.sleep(0.5)
        answered_before_kill = len(load.answers)
        os.killpg(stack.state()["vllm_pid"], signal.SIGKILL)
        with pytest.raises(openai.InternalServerError) as caught:
            answer(client, "yesno", TEXTS[0])
        # The SDK's own retries honour Retry-After; give it long enough for vLLM to restart.
        patient = client.with_options(max_retries=100)
        started = time.monotonic()
        after = {job: answer(patient, *job) for job in jobs}
        print(f"recovered in {time.monotonic() - started:.1f} s")
        answered_at_recovery = len(load.answers)
        time.sleep(1)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"].isdigit()
    assert caught.value.body["code"] == "upstream_unavailable"
    assert after == before  # the runtime-loaded adapter was loaded again too
    # Under load: while vLLM is away every request is a 503 with Retry-After, never a wrong answer.
    assert answered_before_kill and load.failures and len(load.answers) > answered_at_recovery
    assert all(before[job] == (text, adapter) for job, text, adapter in load.answers)
    assert [str(f) for f in load.failures if not (isinstance(f, openai.APIStatusError) and f.status_code == 503
                                                  and f.response.headers.get("retry-after", "").isdigit())] == []
    stack.admin("DELETE", "/revive").raise_for_status()


def test_shared_adapter_exports_are_served_and_routed_like_any_adapter(client, stack, shared_trained, tiny_base):
    """`mtft-train shared` publishes ordinary adapters: the router routes to them, vLLM answers as HF does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.registry import render_prompt
    from mtft.train import generate
    from serving import publish_copy

    shared = Registry(shared_trained[0] / "registry")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    for task in ("yesno", "echo"):
        # Under another name, so the session's yesno and echo stay as they were.
        record = publish_copy(shared, task, Registry(stack.registry), task=f"shared-{task}", prefix=f"shared-{task}: ")
        wait_until_served(client, record.task, record.name)
        raw = client.completions.with_raw_response.create(model="mtft", prompt=record.prefix + TEXTS[1])
        assert (raw.headers["x-mtft-task"], raw.headers["x-mtft-route"]) == (record.task, "prefix")
        model = PeftModel.from_pretrained(base, shared.version_dir(task, shared.latest()[task].version))
        end_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"] if record.template.format == "chat"
                                                  else ["<|endoftext|>"])
        prompts = [render_prompt(record.template, record.prefix, t) for t in TEXTS]
        offline = generate(model, tokenizer, prompts, record.max_new_tokens, end_ids, batch_size=1)
        assert [answer(client, record.task, t)[0].strip() for t in TEXTS] == offline, task
        base = model.unload()
        stack.admin("DELETE", f"/{record.task}").raise_for_status()
