"""What the router costs and how fast a hot-add goes live, measured on a real `mtft-serve` stack.

    python bench/router_latency.py [--registry runs/registry] [--requests 200] [--max-tokens 4]

Without --registry (as `make bench` runs it) it trains the test suite's two tiny tasks on
its tiny random Llama first (about 20 s).

Starts `mtft-serve` on a copy of the registry (so the hot-add leaves the
original alone), then sends the same requests alternately through the router
and straight to vLLM (same rendered prompt, same adapter name), one at a
time, and prints p50/p99 of both side by side. Then publishes a copy of an
adapter as a new task and times publish -> first routed answer, once picked
up by the registry poller (default 2 s interval) and once via
`POST /admin/adapters`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mtft.registry import Registry, render_prompt

ADMIN_KEY = "bench-admin"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start(registry: Path, state: Path, port: int, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MTFT_ADMIN_KEY": ADMIN_KEY}
    argv = [str(Path(sys.executable).with_name("mtft-serve")), "--registry", str(registry), "--port", str(port),
            "--state-dir", str(state), *flags]
    process = subprocess.Popen(argv, env=env, stdout=open(state / "serve.log", "ab"), stderr=subprocess.STDOUT)
    while not (state / "ready.json").exists():
        if process.poll() is not None:
            sys.exit(f"mtft-serve failed; see {state}/*.log")
        time.sleep(0.2)
    return process


def first_answer(client: httpx.Client, url: str, task: str, started: float, timeout_s: float = 60) -> float:
    while time.monotonic() - started < timeout_s:
        response = client.post(url + "/v1/completions", json={"model": task, "prompt": "hello", "max_tokens": 1})
        if response.status_code == 200:
            return time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(task)


def tiny_registry(folder: Path) -> Path:
    """The test suite's tiny base and its two tiny tasks (tests/conftest.py), trained and published."""
    from mtft.train import RunOptions, load_spec, train_adapters

    spec = importlib.util.spec_from_file_location("mtft_tests_conftest", Path(__file__).parents[1] / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    (folder / "base").mkdir(parents=True)
    base = conftest.build_tiny_base(folder / "base")
    train_adapters(load_spec(conftest.tiny_spec(folder, base)), RunOptions(output=folder / "run", registry=folder / "registry"))
    return folder / "registry"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, help="default: train the tiny test tasks first")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--serve-flag", action="append", default=[], help="extra mtft-serve flag (repeat)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtft-bench-"))
    shutil.copytree(args.registry or tiny_registry(work / "tiny"), work / "registry")
    registry = Registry(work / "registry")
    (work / "state").mkdir()
    process = start(work / "registry", work / "state", args.port, args.serve_flag)
    try:
        ready = json.loads((work / "state" / "ready.json").read_text())
        router, vllm = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{ready['vllm_port']}"
        record = next(iter(registry.latest().values()))
        texts = ["the quick brown fox", "hello world", "a lazy dog jumps over", "berlin london paris"]
        timings: dict[str, list[float]] = {"router": [], "vLLM direct": []}
        with httpx.Client(timeout=60) as client:
            for i in range(args.requests + 10):  # the first 10 of each warm up and are dropped
                text = texts[i % len(texts)]
                calls = {
                    "router": (router, {"model": record.task, "prompt": text}),
                    "vLLM direct": (vllm, {"model": record.name, "prompt": render_prompt(record.template, record.prefix, text)}),
                }
                for name, (base, body) in (calls.items() if i % 2 else reversed(calls.items())):
                    started = time.perf_counter()
                    response = client.post(base + "/v1/completions",
                                           json={**body, "max_tokens": args.max_tokens, "temperature": 0})
                    response.raise_for_status()
                    if i >= 10:
                        timings[name].append((time.perf_counter() - started) * 1000)
            print(f"\nstack: vLLM startup {ready['vllm_startup_s']} s, whole stack {ready['startup_s']} s; "
                  f"task {record.task}, {args.requests} sequential requests of {args.max_tokens} tokens each way")
            print(f"{'path':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
            for name, values in timings.items():
                print(f"{name:<12} {percentile(values, 0.5):8.1f} {percentile(values, 0.99):8.1f} {statistics.mean(values):8.1f}")
            added = [a - b for a, b in zip(timings["router"], timings["vLLM direct"])]
            print(f"{'router adds':<12} {percentile(added, 0.5):8.1f} {percentile(added, 0.99):8.1f} {statistics.mean(added):8.1f}")

            started = time.monotonic()
            registry.publish(registry.version_dir(record.task, record.version),
                             record.model_copy(update={"task": "bench-polled", "prefix": "bench-polled: "}))
            polled = first_answer(client, router, "bench-polled", started)
            source = registry.version_dir(record.task, record.version)
            staged = Registry(work / "staged")
            staged.publish(source, record.model_copy(update={"task": "bench-posted", "prefix": "bench-posted: "}))
            started = time.monotonic()
            os.rename(staged.root / "bench-posted", registry.root / "bench-posted")
            client.post(router + "/admin/adapters", json={"task": "bench-posted"},
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).raise_for_status()
            posted = first_answer(client, router, "bench-posted", started)
            print(f"publish -> first routed answer: {polled:.2f} s via the registry poller, "
                  f"{posted:.3f} s via POST /admin/adapters")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
