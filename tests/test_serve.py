"""The serving stack, end to end: `mtft-serve` (real vLLM + real router) driven by the `openai` client.

One stack for the whole session (vLLM takes ~25-60 s to start on 2 cores);
each test leaves it serving yesno and echo as it found them.
"""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from mtft.registry import Registry
from mtft.serve.stack import free_port

from serving import API_KEY, RunningStack, alive, start_stack, stop_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def stack_session(trained, tmp_path_factory) -> RunningStack:
    _, options, _ = trained
    registry = tmp_path_factory.mktemp("serve") / "registry"
    shutil.copytree(options.registry, registry)
    state = tmp_path_factory.mktemp("serve-state")
    stack = start_stack(registry, state, free_port())
    yield stack
    pids = [stack.state()["vllm_pid"], stack.state()["router_pid"]]
    stop_stack(stack)
    assert stack.process.returncode == 0, stack.logs()
    assert not [pid for pid in pids if alive(pid)], "mtft-serve left children running"


@pytest.fixture
def stack(stack_session: RunningStack) -> RunningStack:
    stack_session.wait_ready()
    return stack_session


@pytest.fixture
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=API_KEY, max_retries=0)


def test_completion_routed_by_prefix(client):
    raw = client.completions.with_raw_response.create(model="anything", prompt="yesno: the quick brown fox")
    answer = raw.parse()
    assert raw.headers["x-mtft-task"] == "yesno"
    assert raw.headers["x-mtft-route"] == "prefix"
    assert raw.headers["x-mtft-adapter"] == "yesno-v1"
    assert answer.choices[0].text
