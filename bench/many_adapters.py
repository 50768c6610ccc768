"""B5: hundreds of adapters behind one endpoint, with k batch slots in vLLM and a host LRU.

    .venv/bin/python bench/many_adapters.py                                 # 500 adapters, 600 requests a mix
    .venv/bin/python bench/many_adapters.py --adapters 100 --requests 150   # a quicker look

Builds the test suite's tiny random Llama (tests/conftest.py), trains its `yesno` task once at
rank 1, and publishes --adapters copies with seeded random weights as tasks t000, t001, ...
through the registry API (real versions: checksums, routing profiles). Then, in this run:

- startup: `mtft-serve --max-loras K --max-cpu-loras C` on a registry of one of those adapters,
  and on the registry of all of them (the router loads each one while it scans, evicting as it
  goes); startup time, router and vLLM RSS, and the size of both `/metrics` pages;
- cold vs warm: one at a time, a task the router holds nowhere (its first request loads it), then
  the same task at once again, --probes times: time to first token of each;
- mixes, each --requests streamed completions of --max-tokens, --concurrency at a time, through
  the router, by model name: one task (always warm; on both stacks), a Zipf mix (s = --zipf,
  ranks shuffled over the tasks) and a uniform mix over all of them: requests/s, the share that
  succeed, time to first token and latency, adapter loads and evictions (counted in the router's
  log: it keeps at most C adapters loaded in vLLM and unloads the least recently used; vLLM moves
  adapters between its K batch slots and that cache by itself, unseen), and /metrics after each.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from report import out_dir, save  # noqa: E402
from router_latency import ADMIN_KEY, percentile, start  # noqa: E402  (one way to start a stack for benches)

from mtft.registry import Registry  # noqa: E402

LOADED = re.compile(r"loaded (\S+) on http")
EVICTED = re.compile(r"evicting (\S+) from ")


@dataclass(frozen=True)
class Result:
    task: str
    status: int
    """200, the HTTP status of a refusal, or 0 when no answer came."""
    ttft_s: float | None
    seconds: float
    error: str = ""


def tiny_adapters(folder: Path, count: int, rank: int, seed: int) -> tuple[Path, Path]:
    """(a registry with the first copy, a registry with all `count`): one trained tiny adapter, re-drawn."""
    import torch
    from safetensors.torch import load_file, save_file

    from mtft.train import RunOptions, load_spec, train_adapters

    spec_file = importlib.util.spec_from_file_location("mtft_tests_conftest", BENCH.parent / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(conftest)
    (folder / "base").mkdir(parents=True)
    base = conftest.build_tiny_base(folder / "base")
    spec = load_spec(conftest.tiny_spec(folder, base, max_steps=4, eval_every=None))
    spec.lora.rank, spec.lora.alpha = rank, 2.0 * rank
    spec.tasks = [t for t in spec.tasks if t.name == "yesno"]
    train_adapters(spec, RunOptions(output=folder / "run", registry=folder / "trained"))
    trained = Registry(folder / "trained")
    record, source = trained.read("yesno", 1), trained.version_dir("yesno", 1)
    weights = load_file(source / "adapter_model.safetensors")
    inputs = [json.loads(line)["text"] for line in (folder / "yesno.jsonl").read_text().splitlines()]
    one, every = Registry(folder / "one"), Registry(folder / "every")
    staged = folder / "staged"
    staged.mkdir()
    shutil.copyfile(source / "adapter_config.json", staged / "adapter_config.json")
    for i in range(count):
        generator = torch.Generator().manual_seed(seed + i)
        save_file({k: torch.randn(v.shape, generator=generator) * v.float().std().clamp_min(1e-3)
                   for k, v in weights.items()}, staged / "adapter_model.safetensors")
        copy = record.model_copy(update={"task": f"t{i:03d}", "prefix": f"t{i:03d}: "})
        for registry in (one, every) if i == 0 else (every,):
            registry.publish(staged, copy, routing_inputs=inputs)
    return one.root, every.root


async def ask(client, task: str, max_tokens: int) -> Result:
    import openai

    began = time.perf_counter()
    first = None
    try:
        stream = await client.completions.create(model=task, prompt="hello world", max_tokens=max_tokens,
                                                 temperature=0, stream=True)
        async for _ in stream:
            first = first or time.perf_counter() - began
        return Result(task, 200, first, time.perf_counter() - began)
    except openai.APIStatusError as exc:
        return Result(task, exc.status_code, None, time.perf_counter() - began, exc.message)
    except openai.APIError as exc:
        return Result(task, 0, None, time.perf_counter() - began, str(exc))


async def send(url: str, tasks: list[str], concurrency: int, max_tokens: int) -> tuple[list[Result], float]:
    """Every task in `tasks` asked once, `concurrency` at a time; (results, wall seconds)."""
    import openai

    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=120) as client:
        async def one(task: str) -> Result:
            async with gate:
                return await ask(client, task, max_tokens)

        began = time.perf_counter()
        results = await asyncio.gather(*(one(t) for t in tasks))
        return list(results), time.perf_counter() - began


class Stack:
    """One running `mtft-serve` and what this bench reads from it."""

    def __init__(self, registry: Path, state: Path, port: int, flags: list[str]):
        state.mkdir(parents=True)
        began = time.perf_counter()
        self.process = start(registry, state, port, flags)
        self.wall_s = time.perf_counter() - began
        self.state = state
        self.ready = json.loads((state / "ready.json").read_text())
        self.url = f"http://127.0.0.1:{port}"
        self.vllm = f"http://127.0.0.1:{self.ready['vllm_port']}"
        self.http = httpx.Client(timeout=60)

    def log_counts(self) -> tuple[int, int]:
        """(adapter loads, evictions) the router has logged so far."""
        text = (self.state / "router.log").read_text(errors="replace")
        return len(LOADED.findall(text)), len(EVICTED.findall(text))

    def loaded(self) -> set[str]:
        status = self.http.get(self.url + "/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        return {a for b in status.raise_for_status().json()["backends"] for a in b["adapters"]}

    def metrics(self, url: str) -> dict[str, object]:
        """Size of a /metrics page: bytes, series, and the metrics with the most series."""
        text = self.http.get(url + "/metrics").raise_for_status().text
        names = [re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"]
        return {"bytes": len(text.encode()), "series": len(names),
                "most": Counter(names).most_common(3)}

    def rss_mib(self) -> dict[str, float]:
        import psutil

        vllm = psutil.Process(self.ready["vllm_pid"])
        return {"router": psutil.Process(self.ready["router_pid"]).memory_info().rss / 2**20,
                "vllm": sum(p.memory_info().rss for p in [vllm, *vllm.children(recursive=True)]) / 2**20}

    def snapshot(self) -> dict[str, object]:
        return {"router_metrics": self.metrics(self.url), "vllm_metrics": self.metrics(self.vllm),
                "rss_mib": self.rss_mib()}

    def mix(self, name: str, tasks: list[str], args: argparse.Namespace) -> dict[str, object]:
        loads, evictions = self.log_counts()
        results, wall = asyncio.run(send(self.url, tasks, args.concurrency, args.max_tokens))
        time.sleep(0.2)  # the router's last log lines
        loads_after, evictions_after = self.log_counts()
        ok = [r for r in results if r.status == 200]
        failures: dict[str, dict] = {}
        for r in results:
            if r.status != 200:
                seen = failures.setdefault(str(r.status), {"count": 0, "first": r.error[:300]})
                seen["count"] += 1
        return {"mix": name, "requests": len(results), "ok": len(ok), "wall_s": wall, "rps": len(ok) / wall,
                "failures": failures, "distinct_tasks": len(set(tasks)),
                "ttft_ms": _spread([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
                "latency_ms": _spread([r.seconds * 1e3 for r in ok]),
                "loads": loads_after - loads, "evictions": evictions_after - evictions,
                "per_task_ttft_ms": _per_task(ok), "ttft_each_ms": [r.ttft_s * 1e3 for r in ok if r.ttft_s],
                **self.snapshot()}

    def probe(self, tasks: list[str], probes: int, max_tokens: int) -> list[dict[str, float]]:
        """Cold then warm time to first token, one request at a time, for tasks held nowhere."""
        rows = []
        for task in tasks:
            if len(rows) == probes:
                break
            if any(name.startswith(f"{task}-v") for name in self.loaded()):
                continue
            (cold,), _ = asyncio.run(send(self.url, [task], 1, max_tokens))
            (warm,), _ = asyncio.run(send(self.url, [task], 1, max_tokens))
            if cold.status == warm.status == 200:
                rows.append({"task": task, "cold_ms": cold.ttft_s * 1e3, "warm_ms": warm.ttft_s * 1e3})
        return rows

    def stop(self) -> None:
        """Stop the stack; its logs are kept under the bench output (logs/many_adapters/)."""
        self.http.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        keep = out_dir() / "logs" / "many_adapters" / self.state.name
        keep.mkdir(parents=True, exist_ok=True)
        for log in self.state.glob("*.log"):
            shutil.copyfile(log, keep / log.name)


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "mean": statistics.mean(values)}


def _per_task(results: list[Result]) -> dict[str, float]:
    times: dict[str, list[float]] = {}
    for r in results:
        if r.ttft_s is not None:
            times.setdefault(r.task, []).append(r.ttft_s * 1e3)
    return {task: statistics.median(values) for task, values in times.items()}


def plot(mixes: list[dict], ranks: dict[str, int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    zipf = next(m for m in mixes if m["mix"].startswith("Zipf"))
    tasks = sorted(zipf["per_task_ttft_ms"], key=ranks.get)
    right.scatter([ranks[t] for t in tasks], [zipf["per_task_ttft_ms"][t] for t in tasks], s=8)
    right.set(xscale="log", yscale="log", xlabel="task popularity rank in the Zipf mix (1: most asked)",
              ylabel="median time to first token, ms", title="Zipf mix: time to first token by task rank")
    for m in mixes:
        values = sorted(m["ttft_each_ms"])
        left.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{m['stack']}: {m['mix']}")
    left.set(xscale="log", xlabel="time to first token, ms", ylabel="share of requests",
             title="time to first token by mix (CDF)")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=500)
    parser.add_argument("--rank", type=int, default=1, help="LoRA rank of every adapter (vLLM allows 1, 8, ...)")
    parser.add_argument("--max-loras", type=int, default=8, help="vLLM's batch slots (k)")
    parser.add_argument("--max-cpu-loras", type=int, default=32, help="vLLM's host LRU: what the router keeps loaded")
    parser.add_argument("--requests", type=int, default=600, help="requests per mix")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.1, help="the Zipf mix's exponent s")
    parser.add_argument("--probes", type=int, default=20, help="cold-then-warm request pairs")
    parser.add_argument("--port", type=int, default=8795)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtft-bench-many-"))
    flags = ["--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras)]
    try:
        began = time.perf_counter()
        one, every = tiny_adapters(work / "tiny", args.adapters, args.rank, args.seed)
        publish_s = time.perf_counter() - began
        tasks = Registry(every).tasks()
        rng = random.Random(args.seed)
        by_rank = rng.sample(tasks, len(tasks))
        ranks = {task: i + 1 for i, task in enumerate(by_rank)}
        weights = [1 / r ** args.zipf for r in range(1, len(tasks) + 1)]
        hot = by_rank[0]
        stacks, mixes = {}, []
        for label, registry in (("1 adapter", one), (f"{len(tasks)} adapters", every)):
            stack = Stack(registry, work / label.replace(" ", "-"), args.port, flags)
            try:
                loads, evictions = stack.log_counts()
                stacks[label] = {"startup_s": stack.ready["startup_s"], "vllm_startup_s": stack.ready["vllm_startup_s"],
                                 "wall_s": stack.wall_s, "loads": loads, "evictions": evictions, **stack.snapshot()}
                warm_task = hot if label != "1 adapter" else "t000"
                mixes.append({**stack.mix("one task", [warm_task] * args.requests, args), "stack": label})
                if label == "1 adapter":
                    continue
                stacks[label]["probes"] = stack.probe(by_rank[::-1], args.probes, args.max_tokens)
                mixes.append({**stack.mix(f"Zipf s={args.zipf:g}", rng.choices(by_rank, weights, k=args.requests),
                                          args), "stack": label})
                mixes.append({**stack.mix("uniform", rng.choices(tasks, k=args.requests), args), "stack": label})
            finally:
                stack.stop()
        report(args, publish_s, stacks, mixes, ranks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, publish_s: float, stacks: dict, mixes: list[dict], ranks: dict) -> None:
    small, large = stacks.values()
    n = len(ranks)
    warm = next(m for m in mixes if m["mix"] == "one task" and m["stack"] != "1 adapter")
    lines = ["| stack | mix | requests | succeeded | req/s | vs one task | TTFT p50 ms | TTFT p99 ms | latency p50 ms "
             "| latency p99 ms | tasks asked | adapter loads | evictions | evictions / request |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in mixes:
        lines.append(f"| {m['stack']} | {m['mix']} | {m['requests']} | {m['ok'] / m['requests']:.1%} | {m['rps']:.1f} "
                     f"| {m['rps'] / warm['rps']:.2f}x | {m['ttft_ms']['p50']:.0f} | {m['ttft_ms']['p99']:.0f} "
                     f"| {m['latency_ms']['p50']:.0f} | {m['latency_ms']['p99']:.0f} | {m['distinct_tasks']} "
                     f"| {m['loads']} | {m['evictions']} | {m['evictions'] / m['requests']:.2f} |")
    after = mixes[-1]
    lines += ["", "| stack | startup s (vLLM / whole) | router RSS MiB | vLLM RSS MiB | router /metrics at start "
              "| router /metrics after its mixes | vLLM /metrics after its mixes | loads / evictions at startup |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    last = {m["stack"]: m for m in mixes}
    for label, s in stacks.items():
        m = last[label]
        lines.append(f"| {label} | {s['vllm_startup_s']:.1f} / {s['startup_s']:.1f} | {m['rss_mib']['router']:.0f} "
                     f"| {m['rss_mib']['vllm']:.0f} | {_size(s['router_metrics'])} | {_size(m['router_metrics'])} "
                     f"| {_size(m['vllm_metrics'])} | {s['loads']} / {s['evictions']} |")
    lines.append(f"| ratio {n} / 1 | {large['vllm_startup_s'] / small['vllm_startup_s']:.2f}x / "
                 f"{large['startup_s'] / small['startup_s']:.2f}x | "
                 f"{after['rss_mib']['router'] / last['1 adapter']['rss_mib']['router']:.2f}x | "
                 f"{after['rss_mib']['vllm'] / last['1 adapter']['rss_mib']['vllm']:.2f}x | "
                 f"{large['router_metrics']['series'] / small['router_metrics']['series']:.1f}x series | "
                 f"{after['router_metrics']['series'] / last['1 adapter']['router_metrics']['series']:.1f}x series | "
                 f"{after['vllm_metrics']['series'] / last['1 adapter']['vllm_metrics']['series']:.1f}x series | |")
    probes = large["probes"]
    cold = statistics.median([p["cold_ms"] for p in probes]) if probes else float("nan")
    hot = statistics.median([p["warm_ms"] for p in probes]) if probes else float("nan")
    asked = {t for m in mixes if m["stack"] != "1 adapter" for t in m["per_task_ttft_ms"]} | {p["task"] for p in probes}
    per_task = (after["router_metrics"]["series"] - large["router_metrics"]["series"]) / max(len(asked), 1)
    lines += ["", f"cold vs warm, one request at a time ({len(probes)} tasks held nowhere, each asked twice): "
              f"time to first token p50 {cold:.0f} ms cold vs {hot:.0f} ms warm: **{cold / hot:.1f}x**"]
    notes = [f"{n} tiny adapters (rank {args.rank}, all seven projections, on the tests' 2-layer random Llama) "
             f"published through the registry API in {publish_s:.0f} s (training the one they are drawn from included)",
             f"mtft-serve --max-loras {args.max_loras} --max-cpu-loras {args.max_cpu_loras}: the router keeps at most "
             f"{args.max_cpu_loras} adapters loaded in vLLM and evicts the least recently used; {args.requests} "
             f"streamed completions of {args.max_tokens} tokens per mix, {args.concurrency} in flight, by model name",
             "vs one task: requests/s over the one-task mix on the same stack (always warm)",
             f"router /metrics grew by {per_task:.0f} series per task asked ({len(asked)} tasks) (per-task labels "
             "on request counters and the latency histogram): bounded by the registry's task count, not by requests",
             "vLLM /metrics' largest families after the mixes: " + ", ".join(
                 f"{name} {count} series" for name, count in after["vllm_metrics"]["most"])]
    table = "\n".join(lines)
    print(table)
    print("\n".join(notes))
    (out_dir() / "plots").mkdir(parents=True, exist_ok=True)
    path = plot(mixes, ranks, out_dir() / "plots" / "many_adapters.png")
    save("B5-many-adapters", f"{n} adapters, k = {args.max_loras} slots, host LRU of {args.max_cpu_loras}", table,
         {"args": vars(args), "publish_s": publish_s, "stacks": stacks, "mixes": mixes, "ranks": ranks}, notes,
         [path])


def _size(metrics: dict[str, int]) -> str:
    return f"{metrics['bytes'] / 1024:.0f} KiB, {metrics['series']} series"


if __name__ == "__main__":
    main()
