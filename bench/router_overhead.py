"""B2: what the router costs per request, the same load straight to the backend and through the router.

    python bench/router_overhead.py [--requests 400] [--concurrency 1 32] [--rounds 4] [--baseline REV]
                                    [--stack-prompts 128] [--stack-concurrency 32] [--no-stack]

Part 1, the router's own cost: the backend is the test suite's fake vLLM (tests/fake_vllm.py,
its own process, answers at once), so what differs between the two paths is the router alone:
body parse, route, re-serialise, relay, reshape. The router runs as `mtft-serve` starts it
(`python -m mtft.router CONFIG`); the load generator is an aiohttp client in this process. Each
round sends the same requests both ways, one after the other, in alternating order; the table
gives p50/p99 latency, the router's added p50/p99 (router minus direct percentiles), the
throughput ratio, and the CPU each process spent per request (ms), for whole answers and
streams (20 chunks each). On 2 cores the three processes share the CPUs: at 32 concurrent the
machine is saturated and the ratio is about (generator + fake) / (generator + fake + router) CPU
per request, so it includes the generator's and the fake's share, not the router's alone.
`--baseline REV` adds the router as it was at git revision REV, in the same rounds.

Part 2, a real stack: `mtft-serve` on the test suite's tiny model and tasks (trained first,
about 20 s), and vLLM's own serving benchmark (`vllm.benchmarks.serve`, streamed completions)
pointed at the router (task by `model`) and at vLLM directly (the prompt the router renders, the
adapter's name), alternately: throughput ratio, added p50/p99 end-to-end latency and TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fake_vllm import FakeVLLM, publish_zero, wait_for  # noqa: E402
from report import save  # noqa: E402
from router_latency import start as start_stack  # noqa: E402
from router_latency import tiny_registry  # noqa: E402

from mtft.registry import Registry, render_prompt  # noqa: E402
from mtft.router import RouterConfig  # noqa: E402
from mtft.serve.stack import free_port  # noqa: E402

KEY = "B2-router-overhead"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def one_load(url: str, body: dict, requests: int, concurrency: int) -> tuple[list[float], float]:
    """(each request's latency in ms, requests/s) for `requests` requests, `concurrency` at a time."""
    latencies: list[float] = []
    payload, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession, queue) -> None:
        for _ in queue:
            started = time.perf_counter()
            async with session.post(url + "/v1/completions", data=payload, headers=headers) as response:
                if body.get("stream"):
                    async for _ in response.content:
                        pass
                else:
                    await response.read()
                response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        warm = iter(range(max(concurrency, 20)))  # open the connections, warm the caches
        await asyncio.gather(*(worker(session, warm) for _ in range(concurrency)))
        latencies.clear()
        queue = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, queue) for _ in range(concurrency)))
        return latencies, requests / (time.perf_counter() - started)


def measured(url: str, body: dict, requests: int, concurrency: int, pids: dict[str, int]) -> dict:
    """One load's latencies and rate, and the CPU seconds per request of each process in `pids`."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    latencies, rate = asyncio.run(one_load(url, body, requests, concurrency))
    cpu = {name: (cpu_seconds(pid) - before[name]) / requests * 1000 for name, pid in pids.items()}
    return {"latencies": latencies, "rate": rate, "cpu_ms": cpu}


def start_router(config: RouterConfig, folder: Path, code: Path | None = None) -> subprocess.Popen:
    """The router on `config`; `code`: a folder holding another `mtft` package to run instead."""
    path = folder / f"router-{config.port}.json"
    path.write_text(config.model_dump_json(exclude_defaults=True))  # an older router may not know newer fields
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None  # ahead of the editable install
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


def fake_backend(args, work: Path) -> tuple[list[dict], list[str]]:
    """Part 1: rows of the router's (and the baseline's) cost against the fake vLLM."""
    base = tiny_base(work)
    registry = Registry(work / "registry")
    record = publish_zero(registry, base)
    fake = FakeVLLM(free_port(), "--chunk-delay", "0", base="tiny").start()
    config = RouterConfig(registry=registry.root, backends=[fake.url], base_model="tiny", base_name="tiny",
                          base_fingerprint=record.base_model.fingerprint, max_rank=8, port=free_port())
    routers: dict[str, subprocess.Popen] = {}
    paths = {"direct": (fake.url, {"model": record.name, "prompt": render_prompt(record.template, record.prefix,
                                                                                 "hello world")}),
             "router": (f"http://127.0.0.1:{config.port}", {"model": record.task, "prompt": "hello world"})}
    rows, lines = [], []
    try:
        routers["router"] = start_router(config, work)
        if args.baseline:
            old = config.model_copy(update={"port": free_port()})
            routers[args.baseline] = start_router(old, work, checkout(args.baseline, work / "baseline"))
            paths[args.baseline] = (f"http://127.0.0.1:{old.port}", paths["router"][1])
        for stream in (False, True):
            for concurrency in args.concurrency:
                seen: dict[str, list[dict]] = {name: [] for name in paths}
                for i in range(args.rounds):
                    for name in (paths if i % 2 else reversed(list(paths))):
                        url, body = paths[name]
                        pids = {"generator": os.getpid(), "fake": fake.process.pid}
                        if name in routers:
                            pids["router"] = routers[name].pid
                        seen[name].append(measured(url, {**body, "stream": stream}, args.requests, concurrency, pids))
                direct = summary(seen["direct"])
                for name in routers:
                    rows.append(row(name, stream, concurrency, direct, summary(seen[name])))
                    lines.append(line(rows[-1]))
                    print(lines[-1], flush=True)
    finally:
        for router in routers.values():
            router.send_signal(signal.SIGTERM)
            router.wait(30)
        fake.kill()
    return rows, lines


def summary(loads: list[dict]) -> dict:
    latencies = [ms for load in loads for ms in load["latencies"]]
    cpu = {name: sum(load["cpu_ms"][name] for load in loads) / len(loads) for name in loads[0]["cpu_ms"]}
    return {"p50": percentile(latencies, .5), "p99": percentile(latencies, .99),
            "rate": sum(load["rate"] for load in loads) / len(loads), "cpu_ms": cpu}


def row(name: str, stream: bool, concurrency: int, direct: dict, routed: dict) -> dict:
    return {"router": name, "kind": "stream" if stream else "whole", "concurrency": concurrency,
            "direct_p50_ms": direct["p50"], "direct_p99_ms": direct["p99"], "router_p50_ms": routed["p50"],
            "router_p99_ms": routed["p99"], "added_p50_ms": routed["p50"] - direct["p50"],
            "added_p99_ms": routed["p99"] - direct["p99"], "direct_rps": direct["rate"], "router_rps": routed["rate"],
            "ratio": routed["rate"] / direct["rate"], "router_cpu_ms": routed["cpu_ms"]["router"],
            "fake_cpu_ms": routed["cpu_ms"]["fake"], "generator_cpu_ms": routed["cpu_ms"]["generator"],
            "direct_cpu_ms": direct["cpu_ms"]["fake"] + direct["cpu_ms"]["generator"]}


HEADER = ("| router | kind | conc | direct p50 | p99 | router p50 | p99 | added p50 | added p99 | req/s direct | "
          "router | ratio | router CPU ms/req | fake+gen CPU ms/req (direct) |\n" + "|---" * 14 + "|")


def line(r: dict) -> str:
    return (f"| {r['router']} | {r['kind']} | {r['concurrency']} | {r['direct_p50_ms']:.2f} | {r['direct_p99_ms']:.2f} "
            f"| {r['router_p50_ms']:.2f} | {r['router_p99_ms']:.2f} | {r['added_p50_ms']:.2f} | "
            f"{r['added_p99_ms']:.2f} | {r['direct_rps']:.0f} | {r['router_rps']:.0f} | {r['ratio']:.2f} | "
            f"{r['router_cpu_ms']:.3f} | {r['direct_cpu_ms']:.3f} |")


def stack_registry(base: str, work: Path) -> Path:
    """A registry with one task, `yesno`: the tiny tasks trained on the tiny base, or a zero adapter
    (rank 8 on q_proj: vLLM runs its LoRA path all the same) on a prepared base such as smollm2-135m."""
    folder = work / f"stack-{base}"
    if base == "tiny":
        shutil.copytree(tiny_registry(work / "tiny"), folder)
    else:
        from mtft.train import resolve_base

        publish_zero(Registry(folder), resolve_base(base), base_name=base)
    return folder


def real_stack(args, work: Path, base: str) -> tuple[list[dict], list[str]]:
    """Part 2: vllm.benchmarks.serve through the router and straight to vLLM, on a real mtft-serve stack."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_benchmark
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    registry = Registry(stack_registry(base, work))
    record = registry.latest()["yesno"]
    state = work / f"state-{base}"
    state.mkdir()
    port = free_port()
    process = start_stack(registry.root, state, port, [])
    ready = json.loads((state / "ready.json").read_text())
    texts = [f"is {word} a word that fits here, yes or no" for word in
             ("berlin", "paris", "a fox", "the dog", "blue", "seven", "tea", "rain")]
    datasets = {}
    for name, prompt in (("router", lambda t: t), ("direct", lambda t: render_prompt(record.template, record.prefix, t))):
        datasets[name] = work / f"prompts-{base}-{name}.jsonl"
        datasets[name].write_text("".join(json.dumps({"prompt": prompt(texts[i % len(texts)])}) + "\n"
                                          for i in range(args.stack_prompts)))
    targets = {"router": (f"http://127.0.0.1:{port}", record.task),
               "direct": (f"http://127.0.0.1:{ready['vllm_port']}", record.name)}
    extra = {"stop": record.stop} if record.stop else {}  # the router adds the record's stop: send it to both
    seen: dict[str, list[dict]] = {"router": [], "direct": []}
    try:
        for i in range(args.rounds):
            for name in (targets if i % 2 else reversed(list(targets))):
                url, model = targets[name]
                parser = FlexibleArgumentParser()
                add_cli_args(parser)
                result = serve_benchmark(parser.parse_args([
                    "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
                    "--tokenizer", record.base_model.path, "--dataset-name", "custom",
                    "--dataset-path", str(datasets[name]), "--custom-output-len", str(args.stack_tokens),
                    "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(args.stack_prompts),
                    "--max-concurrency", str(args.stack_concurrency), "--ignore-eos", "--temperature", "0",
                    "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
                    "--extra-body", json.dumps(extra), "--ready-check-timeout-sec", "0"]))
                if result["failed"]:
                    sys.exit(f"{name}: {result['failed']} of {args.stack_prompts} requests failed: "
                             f"{[e for e in result['errors'] if e][:3]}")
                seen[name].append(result)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)

    def mean(name: str, field: str) -> float:
        return sum(result[field] for result in seen[name]) / len(seen[name])

    fields = ("request_throughput", "output_throughput", "p50_e2el_ms", "p99_e2el_ms", "p50_ttft_ms", "p99_ttft_ms")
    figures = {name: {f: mean(name, f) for f in fields} for name in seen}
    d, r = figures["direct"], figures["router"]
    rows = [{"base": base, "figures": figures, "prompts": args.stack_prompts, "concurrency": args.stack_concurrency,
             "output_tokens": args.stack_tokens, "rounds": args.rounds,
             "ratio": r["request_throughput"] / d["request_throughput"],
             "added_p50_e2el_ms": r["p50_e2el_ms"] - d["p50_e2el_ms"],
             "added_p99_e2el_ms": r["p99_e2el_ms"] - d["p99_e2el_ms"],
             "added_p50_ttft_ms": r["p50_ttft_ms"] - d["p50_ttft_ms"],
             "added_p99_ttft_ms": r["p99_ttft_ms"] - d["p99_ttft_ms"]}]
    lines = [f"| {base} | {name} | {f['request_throughput']:.1f} | {f['output_throughput']:.0f} | {f['p50_e2el_ms']:.1f} | "
             f"{f['p99_e2el_ms']:.1f} | {f['p50_ttft_ms']:.1f} | {f['p99_ttft_ms']:.1f} |" for name, f in figures.items()]
    x = rows[0]
    lines.append(f"| {base} | router - direct | ratio {x['ratio']:.3f} | | {x['added_p50_e2el_ms']:+.1f} | "
                 f"{x['added_p99_e2el_ms']:+.1f} | {x['added_p50_ttft_ms']:+.1f} | {x['added_p99_ttft_ms']:+.1f} |")
    return rows, lines


STACK_HEADER = ("| base | path | req/s | output tok/s | p50 e2e ms | p99 e2e ms | p50 TTFT ms | p99 TTFT ms |\n"
                + "|---" * 8 + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per round, path and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--baseline", help="also measure the router at this git revision")
    parser.add_argument("--stack-prompts", type=int, default=128, help="part 2: prompts per round and path")
    parser.add_argument("--stack-concurrency", type=int, default=32)
    parser.add_argument("--stack-tokens", type=int, default=16, help="part 2: output tokens per request")
    parser.add_argument("--stack-bases", nargs="+", default=["tiny", "smollm2-135m"],
                        help="part 2: one stack per base (tiny: the router's CPU is a large share of each request; "
                        "smollm2-135m: a real model's)")
    parser.add_argument("--no-stack", action="store_true", help="part 1 only (no vLLM)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtft-overhead-"))
    print(f"part 1: fake vLLM backend; {args.rounds} rounds x {args.requests} requests per cell; latency in ms, "
          f"added = router minus direct percentile, ratio = router / direct requests/s\n{HEADER}", flush=True)
    rows, lines = fake_backend(args, work)
    table = f"{HEADER}\n" + "\n".join(lines)
    data: dict = {"fake_backend": rows}
    notes = ["Part 1 (fake vLLM, answers at once): what differs is the router alone. CPU ms/req is each process's "
             "user+system CPU per request (psutil). On 2 cores at 32 concurrent the machine is saturated, so the "
             "ratio is bounded by (generator + fake) / (generator + fake + router) CPU per request: it includes the "
             "load generator's and the fake's share, not the router's alone."]
    if not args.no_stack:
        print(f"part 2: mtft-serve on {', '.join(args.stack_bases)}; vllm.benchmarks.serve, {args.stack_prompts} prompts at "
              f"{args.stack_concurrency} concurrent, {args.stack_tokens} tokens each, {args.rounds} rounds\n"
              f"{STACK_HEADER}", flush=True)
        stack_rows, stack_lines = [], []
        for base in args.stack_bases:
            rows_, lines_ = real_stack(args, work, base)
            print("\n".join(lines_), flush=True)
            stack_rows += rows_
            stack_lines += lines_
        table += "\n\n" + STACK_HEADER + "\n" + "\n".join(stack_lines)
        data["real_stack"] = stack_rows
        notes.append("Part 2 (real mtft-serve stacks): vLLM's own serving benchmark "
                     "(vllm.benchmarks.serve, streamed completions, ignore_eos) through the router and straight to "
                     "vLLM with the prompt the router renders; figures are the mean over rounds. On the tiny model a "
                     "request costs vLLM little, so the router's CPU, taken from the same 2 cores, is a large share; "
                     "on smollm2-135m (a zero rank-8 adapter) it is what a real model's traffic pays.")
    save(KEY, "Router overhead: through the router vs straight to vLLM", table, data, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
