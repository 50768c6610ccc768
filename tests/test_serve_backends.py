"""`mtft-serve --backend URL`: backends started elsewhere, checked at startup (fake vLLM processes, real mtft-serve).

A backend that does not answer leaves the stack degraded (the log says which and why) or, if no
backend answers at all, stops it with a clear message; one that answers misconfigured (runtime
LoRA loading off, another base model) stops it at once. No vLLM runs: tests/fake_vllm.py plays it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fake_vllm import FakeVLLM, publish_zero, wait_for

from mtft.registry import Registry
from mtft.serve.stack import free_port

MTFT_SERVE = str(Path(sys.executable).with_name("mtft-serve"))


@pytest.fixture(scope="module")
def registry(tiny_base: Path, tmp_path_factory) -> Registry:
    """One adapter on the real tiny base (so mtft-serve can plan), zero weights (the fakes never read them)."""
    registry = Registry(tmp_path_factory.mktemp("serve-backends") / "registry")
    publish_zero(registry, tiny_base)
    return registry


def serve(registry: Registry, state: Path, *flags: str) -> subprocess.Popen:
    argv = [MTFT_SERVE, "--registry", str(registry.root), "--replicas", "0", "--state-dir", str(state),
            "--no-base-workaround", "--poll-s", "0.2", "--backend-timeout-s", "1", *flags]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize(("fake_flags", "fake_base", "message"), [
    (None, None, r"no backend answered within 1 s: http://127\.0\.0\.1:\d+: no answer: ConnectError"),
    (["--no-runtime-lora"], None, "runtime LoRA loading is off: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    ([], "another-model", "serves .*another-model.*, not the base model"),
])
def test_a_backend_that_cannot_serve_stops_the_start_with_the_reason(registry, tiny_base, tmp_path, fake_flags,
                                                                     fake_base, message):
    fake = FakeVLLM(free_port(), *(fake_flags or []), base=fake_base or str(tiny_base))
    if fake_flags is not None:
        fake.start()
    try:
        process = serve(registry, tmp_path, "--backend", fake.url, "--port", str(free_port()))
        output, _ = process.communicate(timeout=60)
    finally:
        if fake.process:
            fake.kill()
    assert process.returncode == 1, output
    assert re.search(message, output), output


def test_a_backend_that_never_answers_gives_a_degraded_start_that_says_which_and_why(registry, tiny_base, tmp_path):
    fake = FakeVLLM(free_port(), base=str(tiny_base)).start()
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    process = serve(registry, tmp_path, "--backend", fake.url, "--backend", dead, "--port", str(port))
    try:
        wait_for(lambda: (tmp_path / "ready.json").exists() or process.poll() is not None, 60)
        assert process.poll() is None
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        assert client.completions.create(model="yesno", prompt="x").choices[0].text == f"{fake.port}:yesno-v1"
        healthy = {line.split('"')[1]: line.split()[-1] for line in
                   httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
                   if line.startswith("mtft_backend_healthy{")}
        assert healthy == {fake.url: "1.0", dead: "0.0"}
    finally:
        fake.kill()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    degraded = next(line for line in output.splitlines() if "degraded start" in line)
    assert fake.url in degraded and f"{dead} (no answer: ConnectError" in degraded
