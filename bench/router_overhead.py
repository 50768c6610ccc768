"""What the router itself costs per request: the same load straight to a backend and through the router.

    python bench/router_overhead.py [--requests 400] [--concurrency 1 32] [--rounds 4] [--baseline REV]

The backend is the test suite's fake vLLM (tests/fake_vllm.py, its own process, answers at once),
so what differs between the two paths is the router alone: body parse, route, re-serialise,
relay, reshape. The router runs as `mtft-serve` starts it (`python -m mtft.router CONFIG`).
Each round sends the same requests both ways, one after the other, in alternating order; the
table gives p50/p99 latency, the router's added p50/p99 (router minus direct percentiles) and the
throughput ratio at each concurrency, for whole answers and streams (20 chunks each). The load
generator shares the machine's cores with both servers: on 2 cores the ratios include its share.
`--baseline REV` adds the router as it was at git revision REV, measured in the same rounds
(before/after a change, side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fake_vllm import FakeVLLM, publish_zero, wait_for  # noqa: E402

from mtft.registry import Registry, render_prompt  # noqa: E402
from mtft.router import RouterConfig  # noqa: E402
from mtft.serve.stack import free_port  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_load(url: str, body: dict, requests: int, concurrency: int) -> tuple[list[float], float]:
    """(each request's latency in ms, requests/s) for `requests` requests, `concurrency` at a time."""
    latencies: list[float] = []
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in queue:
            started = time.perf_counter()
            if body.get("stream"):
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        pass
            else:
                response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(min(concurrency, 4))))  # warm connections up
        queue = iter(range(requests))
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return latencies, requests / (time.perf_counter() - started)


def start_router(config: RouterConfig, folder: Path, code: Path | None = None) -> subprocess.Popen:
    """The router on `config`; `code`: a folder holding another `mtft` package to run instead."""
    path = folder / f"router-{config.port}.json"
    path.write_text(config.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None  # ahead of the editable install's finder
    process = subprocess.Popen([sys.executable, "-m", "mtft.router", str(path)], env=env,
                               stdout=open(folder / f"router-{config.port}.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{config.port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60)
    return process


def checkout(revision: str, folder: Path) -> Path:
    """The `mtft` packages as they were at `revision`, laid out to import from `folder`."""
    package = folder / "mtft"
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "router", "registry", "serve"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive, check=True)
    return folder


def tiny_base(folder: Path) -> Path:
    spec = importlib.util.spec_from_file_location("mtft_tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    (folder / "base").mkdir(parents=True)
    return conftest.build_tiny_base(folder / "base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per round, path and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--baseline", help="also measure the router at this git revision")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtft-overhead-"))
    base = tiny_base(work)
    registry = Registry(work / "registry")
    record = publish_zero(registry, base)
    fake = FakeVLLM(free_port(), "--chunk-delay", "0", base="tiny").start()
    config = RouterConfig(registry=registry.root, backends=[fake.url], base_model="tiny", base_name="tiny",
                          base_fingerprint=record.base_model.fingerprint, max_rank=8, port=free_port())
    routers = {"router": start_router(config, work)}
    paths = {"direct": (fake.url, {"model": record.name, "prompt": render_prompt(record.template, record.prefix,
                                                                                 "hello world")}),
             "router": (f"http://127.0.0.1:{config.port}", {"model": record.task, "prompt": "hello world"})}
    if args.baseline:
        old = config.model_copy(update={"port": free_port()})
        routers[args.baseline] = start_router(old, work, checkout(args.baseline, work / "baseline"))
        paths[args.baseline] = (f"http://127.0.0.1:{old.port}", paths["router"][1])
    try:
        print(f"router overhead, fake vLLM backend; {args.rounds} rounds x {args.requests} requests per cell; "
              f"latency in ms, added = router minus direct percentile, ratio = router / direct requests/s")
        print(f"{'router':<10} {'kind':<7} {'conc':>4} {'direct p50':>10} {'p99':>7} {'router p50':>10} {'p99':>7} "
              f"{'added p50':>9} {'p99':>7} {'req/s direct':>12} {'router':>7} {'ratio':>6}")
        for stream in (False, True):
            for concurrency in args.concurrency:
                seen = {name: ([], []) for name in paths}
                for i in range(args.rounds):
                    for name in (paths if i % 2 else reversed(list(paths))):
                        url, body = paths[name]
                        latencies, rate = asyncio.run(one_load(url, {**body, "stream": stream}, args.requests,
                                                               concurrency))
                        seen[name][0].extend(latencies)
                        seen[name][1].append(rate)
                d, d_rates = seen["direct"]
                for name in routers:
                    r, r_rates = seen[name]
                    d_rate, r_rate = sum(d_rates) / len(d_rates), sum(r_rates) / len(r_rates)
                    print(f"{name:<10} {'stream' if stream else 'whole':<7} {concurrency:>4} {percentile(d, .5):10.2f} "
                          f"{percentile(d, .99):7.2f} {percentile(r, .5):10.2f} {percentile(r, .99):7.2f} "
                          f"{percentile(r, .5) - percentile(d, .5):9.2f} "
                          f"{percentile(r, .99) - percentile(d, .99):7.2f} {d_rate:12.0f} {r_rate:7.0f} "
                          f"{r_rate / d_rate:6.2f}")
    finally:
        for router in routers.values():
            router.send_signal(signal.SIGTERM)
            router.wait(30)
        fake.kill()


if __name__ == "__main__":
    main()
