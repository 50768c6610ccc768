"""The router image: `mtft-serve --replicas 0 --backend URL` runs without torch, transformers, peft or vLLM.

mtft-serve and the router it starts run under a Python whose import system refuses those
packages (a sitecustomize on PYTHONPATH, which the router child inherits) in front of a fake
vLLM (tests/fake_vllm.py), and answer a completion, a chat of a chat-format task (rendered with
jinja2), a stream and a learned-routed request. What both processes had imported at the end
(sys.modules, mapped to distributions) must be installed by deploy/Dockerfile's `router` stage:
its pip list plus what pip pulls in for it (their requirements, read from this environment's
metadata). Their memory, idle and at its peak after a burst of requests, must fit what
tests/test_deploy.py requires of a router-only container (ROUTER_ONLY_GIB).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from deploy_checks import ROUTER_ONLY_GIB, stages
from fake_vllm import FakeVLLM, publish_zero, wait_for
from helpers import blocking_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import CHATML_TEMPLATE
from mtft.registry import PromptTemplate, Registry
from mtft.serve.stack import free_port

pytestmark = pytest.mark.slow
MTFT_SERVE = str(Path(sys.executable).with_name("mtft-serve"))
HEAVY = ("torch", "transformers", "peft", "vllm")
# Imported by the router only because this environment has them (vLLM brings them): FastAPI and
# pydantic look for them and go on without (no form, e-mail or extra-typed fields are used),
# anyio uses sniffio when installed, and uvicorn runs on asyncio and h11 without uvloop,
# httptools and websockets. Checked by running the
# router from a virtual environment holding only the router stage's list (see docs/deploy.md, The router image).
OPTIONAL = {"email-validator", "pydantic-extra-types", "python-multipart", "sniffio", "uvloop", "httptools",
            "websockets"}
SITE_HOOKS = {"_distutils_hack"}  # this venv's setuptools .pth hook, imported by site in every process


def router_requirements() -> list[str]:
    """The router stage's `pip install` requirements (the one with --no-deps installs mtft alone)."""
    return [word for argv in stages()["router"].pip if "--no-deps" not in argv
            for word in argv[2:] if not word.startswith("-")]


def installed_with(requirements: list[str]) -> set[str]:
    """Every distribution pip installs for `requirements`, by this environment's metadata."""
    todo, found = [Requirement(r) for r in requirements], set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        extras = requirement.extras or {""}
        for line in importlib.metadata.requires(name) or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                todo.append(needed)
    return found


def imported_distributions(modules: list[str]) -> set[str]:
    """The third-party distributions behind `modules` (mtft itself left out)."""
    owners = importlib.metadata.packages_distributions()
    tops = {m.partition(".")[0] for m in modules} - set(sys.stdlib_module_names) - SITE_HOOKS
    return {canonicalize_name(d) for top in tops for d in owners.get(top, [])} - {"mtft"}


def missing_from_image(imported: set[str], requirements: list[str]) -> set[str]:
    return imported - installed_with(requirements) - OPTIONAL


def memory_gib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM): resident now and at its peak, GiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))


async def burst(url: str, requests: int, concurrency: int) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one(i: int) -> int:
            async with limit:
                body = {"model": "yesno", "prompt": f"request {i}", "stream": i % 4 == 0}
                return (await client.post("/v1/completions", json=body)).status_code
        return await asyncio.gather(*(one(i) for i in range(requests)))


@pytest.fixture(scope="module")
def router_run(tiny_base: Path, tmp_path_factory) -> dict:
    """A router-only mtft-serve without the heavy packages, asked every kind of request, then stopped."""
    root = tmp_path_factory.mktemp("router-image")
    registry = Registry(root / "registry")
    record = publish_zero(registry, tiny_base)
    folder = registry.version_dir(record.task, record.version)
    chat = record.model_copy(update={"task": "echo", "prefix": "echo: ", "version": 1, "template": PromptTemplate(
        format="chat", input="{text}", target="{text}", chat_template=CHATML_TEMPLATE)})
    registry.publish(folder, chat, routing_inputs=["the quick brown fox", "a lazy dog jumps", "hello world again"])
    fake = FakeVLLM(free_port(), base=str(tiny_base)).start()
    port = free_port()
    dump = root / "modules"
    process = subprocess.Popen(
        [MTFT_SERVE, "--registry", str(registry.root), "--replicas", "0", "--backend", fake.url,
         "--no-base-workaround", "--port", str(port), "--state-dir", str(root / "state"), "--poll-s", "0.5"],
        env=blocking_env(root / "site", HEAVY, dump), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = {"fake": fake, "answers": {}}
    try:
        wait_for(lambda: (root / "state" / "ready.json").exists() or process.poll() is not None, 60)
        assert process.poll() is None, process.communicate()[0]
        ready = json.loads((root / "state" / "ready.json").read_text())
        pids = {"mtft-serve": process.pid, "router": ready["router_pid"]}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        answers = run["answers"]
        answers["completion"] = client.completions.create(model="yesno", prompt="x").choices[0].text
        answers["chat"] = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hello"}]).choices[0].message.content
        stream = client.chat.completions.create(model="mtft", messages=[{"role": "user", "content": "echo: hi"}],
                                                stream=True)
        answers["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        learned = client.completions.with_raw_response.create(model="mtft", prompt="the quick brown fox")
        answers["learned"] = (learned.headers.get("x-mtft-route"), learned.parse().choices[0].text)
        time.sleep(1.0)  # the idle figure: after startup and a few requests
        run["idle_gib"] = {name: memory_gib(pid)[0] for name, pid in pids.items()}
        began = time.monotonic()
        run["burst_status"] = asyncio.run(burst(f"http://127.0.0.1:{port}", 400, 32))
        run["burst_s"] = time.monotonic() - began
        run["peak_gib"] = {name: memory_gib(pid)[1] for name, pid in pids.items()}
        time.sleep(0.5)  # one more module dump after the last request
        run["modules"] = {json.loads(p.read_text())["argv"][0]: json.loads(p.read_text())["modules"]
                          for p in dump.glob("*.json") if int(p.stem) in pids.values()}
    finally:
        fake.kill()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        run["output"] = process.communicate(timeout=60)[0]
    print(f"router-only memory, GiB: idle {run['idle_gib']}, peak after {len(run['burst_status'])} requests "
          f"(32 at a time, {run['burst_s']:.1f} s) {run['peak_gib']}")
    return run


def test_the_router_serves_every_kind_of_request_without_torch_transformers_peft_or_vllm(router_run, tmp_path):
    port = router_run["fake"].port
    assert router_run["answers"] == {"completion": f"{port}:yesno-v1", "chat": f"{port}:echo-v1",
                                     "stream": "x" * 20, "learned": ("learned", f"{port}:echo-v1")}
    assert set(router_run["burst_status"]) == {200}
    assert len(router_run["modules"]) == 2, "no module list from mtft-serve and its router"
    for argv0, modules in router_run["modules"].items():
        assert not {m.partition(".")[0] for m in modules} & set(HEAVY), argv0
    # The block is real: in the same environment torch, installed here, is not there for a child.
    refused = subprocess.run([sys.executable, "-c", "import importlib.util; assert importlib.util.find_spec('vllm') "
                              "is None; import torch"], env=blocking_env(tmp_path, HEAVY), capture_output=True, text=True)
    assert refused.returncode == 1 and "No module named 'torch'" in refused.stderr, refused.stderr


def test_the_router_image_installs_every_distribution_the_router_imports(router_run):
    requirements = router_requirements()
    imported = set().union(*(imported_distributions(m) for m in router_run["modules"].values()))
    assert {"fastapi", "uvicorn", "httpx", "jinja2", "numpy", "watchfiles"} <= imported  # the run saw real work
    assert missing_from_image(imported, requirements) == set()
    assert not installed_with(requirements) & set(HEAVY)
    # Negative control: a list without one of them is caught.
    for dropped in ("watchfiles", "jinja2"):
        assert dropped in missing_from_image(imported, [r for r in requirements if not r.startswith(dropped)])


def test_the_router_only_processes_fit_the_memory_a_router_pod_is_given(router_run):
    idle, peak = sum(router_run["idle_gib"].values()), sum(router_run["peak_gib"].values())
    assert 0.02 < idle <= peak < ROUTER_ONLY_GIB, (router_run["idle_gib"], router_run["peak_gib"])
