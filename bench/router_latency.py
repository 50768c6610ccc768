"""What the router costs and how fast a hot-add goes live, measured on a real `mtft-serve` stack.

    python bench/router_latency.py [--registry runs/registry] [--requests 200] [--max-tokens 4] [--trials 5]

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
import random
import shutil
import signal
import statistics
import subprocess
import threading
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from report import save  # noqa: E402

from mtft.registry import Registry, render_prompt  # noqa: E402

ADMIN_KEY = "bench-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


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


def first_answer(client: httpx.Client, url: str, task: str, started: float, adapter: str | None = None,
                 timeout_s: float = 60) -> float:
    """Seconds from `started` to `task`'s first answer (from `adapter`, if given)."""
    while time.monotonic() - started < timeout_s:
        response = client.post(url + "/v1/completions", json={"model": task, "prompt": "hello", "max_tokens": 1})
        if response.status_code == 200 and adapter in (None, response.headers["x-mtft-adapter"]):
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


def cpu_s(pid: int) -> float:
    """The process's CPU seconds so far (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_router(state: Path, registry: Path, name: str, port: int, **options) -> tuple[subprocess.Popen, str]:
    """Another router on the stack's vLLM (started as mtft-serve starts its own), serving `registry`."""
    registry.mkdir()
    config = {**json.loads((state / "router.json").read_text()), "registry": str(registry), "port": port, **options}
    (state / f"{name}.json").write_text(json.dumps(config))
    process = subprocess.Popen([sys.executable, "-m", "mtft.router", str(state / f"{name}.json")],
                               env={**os.environ, "MTFT_ADMIN_KEY": ADMIN_KEY},
                               stdout=open(state / f"{name}.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while not _ready(url):
        if process.poll() is not None:
            sys.exit(f"router {name} failed; see {state}/{name}.log")
        time.sleep(0.2)
    return process, url


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def swap_windows(client: httpx.Client, router: str, registry: Registry, swapped, others: list[str],
                 window_s: float, clients: int = 4) -> dict[str, list[float]]:
    """Latencies (ms) of requests to `others`, in alternating windows without and with a new version of
    `swapped` published (and waited for) every second; two windows of each."""
    source = registry.version_dir(swapped.task, swapped.version)
    windows: dict[str, list[float]] = {"no swap": [], "version swap every 1 s": []}
    current = ["no swap"]
    stopping = threading.Event()

    def closed_loop(i: int) -> None:
        with httpx.Client(timeout=60) as own:
            while not stopping.is_set():
                window, task = current[0], others[i % len(others)]
                started = time.perf_counter()
                own.post(router + "/v1/completions", json={"model": task, "prompt": "hello world", "max_tokens": 4,
                                                           "temperature": 0}).raise_for_status()
                if current[0] == window:
                    windows[window].append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=closed_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    swaps = 0
    try:
        time.sleep(1)  # warm-up, not counted
        for window in [*windows] * 2:
            current[0] = window
            ends = time.monotonic() + window_s
            while time.monotonic() < ends:
                if window == "no swap":
                    time.sleep(0.05)
                    continue
                new = registry.publish(source, swapped)
                first_answer(client, router, swapped.task, time.monotonic(), new.name)
                swaps += 1
                time.sleep(max(0.0, 1.0 - (time.monotonic() % 1.0)))
    finally:
        stopping.set()
        for thread in threads:
            thread.join()
    print(f"{swaps} version swaps of {swapped.task} in {2 * window_s:g} s")
    return windows


def hot_add(client: httpx.Client, work: Path, registry: Registry, record, router: str, args) -> None:
    """B3: the three ways to go live side by side, other tasks' latency during swaps, idle CPU."""
    state = work / "state"
    ready = json.loads((state / "ready.json").read_text())
    polled_root, default_root = work / "registry-polled", work / "registry-default"
    polling, polled_url = side_router(state, polled_root, "polling", args.port + 1, watch=False, poll_s=2.0)
    default, _ = side_router(state, default_root, "default", args.port + 2, poll_s=2.0)
    polled, source = Registry(polled_root), registry.version_dir(record.task, record.version)
    others = ["base", *(task for task in registry.tasks() if task != args.swap_task)]
    ways = {"notifications (poll 30 s)": ("watched", registry, router),
            "poll every 2 s (watch off)": ("polled", polled, polled_url),
            "POST /admin/adapters": ("posted", None, polled_url)}
    times: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for trial in range(args.trials):
            for way, (short, target, url) in ways.items():
                task = f"b3-{short}-{trial}"
                changed = record.model_copy(update={"task": task, "prefix": f"{task}: "})
                if target is not None:
                    started = time.monotonic()
                    published = target.publish(source, changed)
                else:  # the version lands (a rename, as publish does), then the router is told at once
                    staged = Registry(work / "staged")
                    published = staged.publish(source, changed)
                    started = time.monotonic()
                    os.rename(staged.root / task, polled.root / task)
                    client.post(url + "/admin/adapters", json={"task": task}, headers=ADMIN).raise_for_status()
                # By its adapter: before the task is known, learned routing may answer its name from another.
                times[way].append(first_answer(client, url, task, started, published.name))
                client.delete(f"{url}/admin/adapters/{task}", headers=ADMIN).raise_for_status()
            time.sleep(random.Random(trial).uniform(0.2, 2.2))  # publishes fall at other phases of the poll
        windows = swap_windows(client, router, registry, registry.latest()[args.swap_task], others, args.window_s)
        idle = {"stack's router (notifications, poll 30 s)": ready["router_pid"],
                "watch off, poll 2 s": polling.pid, "notifications, poll 2 s (the default)": default.pid}
        time.sleep(2)
        before, started = {k: cpu_s(pid) for k, pid in idle.items()}, time.monotonic()
        time.sleep(args.idle_s)
        cpu = {k: (cpu_s(pid) - before[k]) / (time.monotonic() - started) * 1000 for k, pid in idle.items()}
    finally:
        for process in (polling, default):
            process.send_signal(signal.SIGTERM)
            process.wait(30)

    lines = ["| publish -> first routed answer | median s | min s | max s |", "|---|---|---|---|"]
    lines += [f"| {way} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |" for way, v in times.items()]
    lines += ["", "| other tasks' latency (4 closed-loop clients) | requests | p50 ms | p99 ms | p99 ratio |",
              "|---|---|---|---|---|"]
    calm = percentile(windows["no swap"], 0.99)
    lines += [f"| {w} | {len(v)} | {percentile(v, 0.5):.1f} | {percentile(v, 0.99):.1f} | "
              f"{percentile(v, 0.99) / calm:.2f} |" for w, v in windows.items()]
    lines += ["", "| router idle | CPU ms per s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in cpu.items()]
    table = "\n".join(lines)
    print("\n" + table)
    save("B3-hot-add", "Hot-add: publish to first routed answer, and other tasks' latency during a version swap",
         table, {"publish_to_answer_s": times, "latency_ms": windows, "idle_cpu_ms_per_s": cpu,
                 "trials": args.trials, "window_s": args.window_s},
         notes=[f"{args.trials} trials per way, taken in turns; tiny test model, 2 CPU cores shared by vLLM and "
                "three routers.",
                "Notifications: inotify through watchfiles, 50 ms quiet time; the poll is the fallback.",
                "The poll-only figure depends on where in its 2 s period the publish falls: 0-2 s plus the load.",
                f"Swap windows: {args.window_s:g} s each, two of each kind in turns; p99 ratio = p99 / no-swap p99.",
                f"Idle CPU counts clock ticks ({1000 / os.sysconf('SC_CLK_TCK'):g} ms each) over {args.idle_s:g} s: "
                "smaller differences than one tick per window do not show."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, help="default: train the tiny test tasks first")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--serve-flag", action="append", default=[], help="extra mtft-serve flag (repeat)")
    parser.add_argument("--trials", type=int, default=5, help="B3: publishes per way of going live")
    parser.add_argument("--window-s", type=float, default=10.0, help="B3: length of each latency window")
    parser.add_argument("--idle-s", type=float, default=10.0, help="B3: how long the routers' idle CPU is measured")
    parser.add_argument("--swap-task", default="yesno", help="B3: the task whose version is swapped")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtft-bench-"))
    shutil.copytree(args.registry or tiny_registry(work / "tiny"), work / "registry")
    registry = Registry(work / "registry")
    (work / "state").mkdir()
    process = start(work / "registry", work / "state", args.port, ["--poll-s", "30", *args.serve_flag])
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

            hot_add(client, work, registry, record, router, args)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
