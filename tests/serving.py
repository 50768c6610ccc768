"""Fixtures and helpers for the serving tests (a pytest plugin: `pytest_plugins = ["serving"]`).

A plugin, not a test module's fixture, so test_serve.py and test_serve_hotadd.py
share ONE session stack: `mtft-serve` as a real process (vLLM takes ~25-60 s
to start on 2 cores). Each test leaves yesno and echo served as it found them.
`extra_router` starts one more router (a few seconds) on that stack's vLLM, to try
router options without starting another vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from mtft.registry import AdapterRecord, Registry
from mtft.serve.stack import free_port
from mtft.serve.vllm_plugin import ENV as PLUGIN_SWITCH

API_KEY = "test-key"
LIMITED_KEY = "limited-key"  # may use yesno only
ADMIN_KEY = "admin-key"


@dataclass
class RunningStack:
    api_key = API_KEY
    limited_key = LIMITED_KEY
    url: str
    registry: Path
    state_dir: Path
    process: subprocess.Popen

    def state(self) -> dict:
        return json.loads((self.state_dir / "ready.json").read_text())

    def admin(self, method: str, path: str = "", **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}/admin/adapters{path}", timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.logs()
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"stack not ready after {timeout_s} s\n{self.logs()}")

    def publish_copy(self, copied: str, target: Registry | None = None, **changes) -> AdapterRecord:
        """Publish task `copied`'s newest adapter again (into `target`, default this registry), record changed."""
        return publish_copy(Registry(self.registry), copied, target or Registry(self.registry), **changes)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.state_dir.glob("*.log")))


def launch_stack(registry: Path, state_dir: Path, port: int, *flags: str) -> RunningStack:
    """`mtft-serve` started, not waited for (see `wait_started`)."""
    env = {**os.environ, "MTFT_API_KEYS": f"{API_KEY},{LIMITED_KEY}=yesno", "MTFT_ADMIN_KEY": ADMIN_KEY,
           # vLLM's own CPU LoRA ops, not mtft's plugin (issue 5): here the zero adapter alone must
           # keep base answers right, and the mixing bug it works around must stay visible.
           PLUGIN_SWITCH: "0"}
    argv = [str(Path(sys.executable).with_name("mtft-serve")), "--registry", str(registry),
            "--port", str(port), "--state-dir", str(state_dir), "--dtype", "float32", "--poll-s", "0.5",
            "--vllm-arg=--max-model-len=256", "--vllm-arg=--seed=0", *flags]
    log = open(state_dir / "serve.log", "ab")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return RunningStack(f"http://127.0.0.1:{port}", registry, state_dir, process)


@contextmanager
def extra_router(stack: RunningStack, registry: Path, folder: Path, **options) -> Iterator[RunningStack]:
    """A router (`python -m mtft.router`, as mtft-serve starts it) on `stack`'s vLLM serving `registry`,
    its config `stack`'s with `options` changed; ready when the block starts, and it must exit
    cleanly when the block ends (within 10 s of SIGTERM, no traceback). Use task names of its own:
    the adapters it loads share `stack`'s vLLM."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((stack.state_dir / "router.json").read_text())
    port = free_port()
    config |= {"registry": str(registry), "port": port, **options}
    (folder / "router.json").write_text(json.dumps(config))
    env = {**os.environ, "MTFT_API_KEYS": f"{API_KEY},{LIMITED_KEY}=yesno", "MTFT_ADMIN_KEY": ADMIN_KEY}
    with open(folder / "router.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "mtft.router", str(folder / "router.json")], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    router = RunningStack(f"http://127.0.0.1:{port}", registry, folder, process)
    try:
        router.wait_ready(60)
        yield router
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn raises the signal again once it has shut down: -SIGTERM is its clean exit.
        assert process.wait(10) in (0, -signal.SIGTERM) and "Traceback" not in router.logs(), router.logs()


def wait_started(stack: RunningStack, timeout_s: float = 600.0) -> RunningStack:
    deadline = time.monotonic() + timeout_s
    while not (stack.state_dir / "ready.json").exists():
        if stack.process.poll() is not None or time.monotonic() > deadline:
            stop_stack(stack)
            raise RuntimeError(f"mtft-serve did not start\n{stack.logs()}")
        time.sleep(0.25)
    return stack


def answer(client: openai.OpenAI, model: str, text: str, **options) -> tuple[str, str]:
    """(the completion's text, the adapter that answered) for one request."""
    raw = client.completions.with_raw_response.create(model=model, prompt=text, **options)
    return raw.parse().choices[0].text, raw.headers["x-mtft-adapter"]


TEXTS = ["the quick brown fox", "hello world paris", "a lazy dog jumps"]


def wait_until_served(client: openai.OpenAI, task: str, adapter: str, timeout_s: float = 30.0, **options) -> float:
    """Seconds until `task` answers from `adapter`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if answer(client, task, TEXTS[0], **options)[1] == adapter:
                return time.monotonic() - started
        except openai.NotFoundError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{task} was not served by {adapter} within {timeout_s} s")


class Background:
    """Threads running `_run(arg)` for each of `args` while a `with` block lasts."""

    def __init__(self, args: list):
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(arg,)) for arg in args]

    def _run(self, arg) -> None:
        raise NotImplementedError

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


class Load(Background):
    """Background clients sending requests for fixed (model, text) jobs; every answer is recorded.

    Bounded: each thread stops after `limit` requests, or when the block ends.
    """

    def __init__(self, client: openai.OpenAI, jobs: list[tuple[str, str]], threads: int = 4,
                 limit: int | None = None, pause_s: float = 0.0):
        self.client, self.jobs, self.limit, self.pause_s = client, jobs, limit, pause_s
        self.answers: list[tuple[tuple[str, str], str, str]] = []
        self.failures: list[Exception] = []
        super().__init__(list(range(threads)))

    def _run(self, offset: int) -> None:
        for i in range(offset, offset + (self.limit or 1 << 62)):
            if self.stopping.is_set():
                return
            job = self.jobs[i % len(self.jobs)]
            try:
                text, adapter = answer(self.client, *job)
                self.answers.append((job, text, adapter))
            except Exception as exc:  # every failure counts; none is expected
                self.failures.append(exc)
            time.sleep(self.pause_s)

    def until(self, count: int, timeout_s: float = 120.0) -> None:
        """Wait until `count` answers or failures came back: the test's traffic, however slow the machine."""
        deadline = time.monotonic() + timeout_s
        while len(self.answers) + len(self.failures) < count and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_stack(stack: RunningStack) -> None:
    stack.process.send_signal(signal.SIGTERM)
    stack.process.wait(60)


def publish_copy(source: Registry, copied: str, target: Registry, routing_inputs: list[str] | None = None,
                 **changes) -> AdapterRecord:
    """Publish task `copied`'s newest adapter from `source` into `target`, its record changed by `changes`
    (with a routing profile of `routing_inputs`, if given)."""
    record = source.latest()[copied]
    return target.publish(source.version_dir(copied, record.version), record.model_copy(update=changes),
                          routing_inputs=routing_inputs)


def publish_changed(registry: Registry, source: str, task: str, scale: float = 1.0, rank: int | None = None,
                    into: Path | None = None, target: Registry | None = None) -> AdapterRecord:
    """`source`'s adapter published as `task` (into `target`, default `registry`), its B matrices times
    `scale` (other answers), or padded with zeros to `rank` (the same answers from a larger rank)."""
    import torch
    from safetensors.torch import load_file, save_file

    record = registry.latest()[source]
    folder = registry.version_dir(source, record.version)
    out = into or registry.root.parent / f"changed-{task}-{rank}"
    out.mkdir(exist_ok=True)
    tensors = load_file(folder / "adapter_model.safetensors")
    config = (folder / "adapter_config.json").read_text()
    if rank is not None:
        pad = rank - record.rank
        tensors = {k: torch.cat([v, v.new_zeros(pad, v.shape[1])]) if "lora_A" in k else
                   torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1) for k, v in tensors.items()}
        data = json.loads(config)
        config = json.dumps({**data, "r": rank, "lora_alpha": data["lora_alpha"] * rank // record.rank})
    save_file({k: v * scale if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(config)
    changes = {"task": task, "prefix": f"{task}: "} if task != source else {}
    if rank is not None:
        changes |= {"rank": rank, "alpha": record.alpha * rank // record.rank}
    return (target or registry).publish(out, record.model_copy(update=changes))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.fixture(scope="session")
def stack_session(trained, tmp_path_factory) -> RunningStack:
    import shutil

    _, options, _ = trained
    registry = tmp_path_factory.mktemp("serve") / "registry"
    shutil.copytree(options.registry, registry)
    stack = wait_started(launch_stack(registry, tmp_path_factory.mktemp("serve-state"), free_port()))
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
