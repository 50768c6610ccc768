"""`make deploy-check`: the stack from the built images (mtft:cpu, mtft:router), run in containers by
deploy/compose.yaml and deploy/compose.scale.yaml, driven through the official `openai` client.

1. the `train` profile trains the demo task ticket into the registry volume;
2. the `serve` container gets ready and answers ticket as a completion, a chat and a stream, and
   its /metrics counts them;
3. contact, trained by a `train` container while serving, is hot-added and answered;
4. the scale-out file: the router image over two `--vllm-only` backends; backend vllm-0's container
   is killed while non-streamed requests run, and none of them fails (the router sends them to
   vllm-1); restarted, it rejoins with both adapters loaded on it again;
5. every container runs as uid 1000 and every file in the registry volume is owned by it.

Every container uses the host's network and listens on 127.0.0.1 only, on free ports. Each wait
has a time limit; everything the check started (containers, volumes) is removed at the end,
also on failure or Ctrl-C. Logs go to runs/deploy-check/. Compose is `docker compose` v2 where
installed, else Debian's `docker-compose` (v1): both run the same files.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mtft.serve.demo import ask, wait_for
from mtft.serve.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LOGS = ROOT / "runs" / "deploy-check"
PROJECT = "mtft-check"
KEY = "deploy-check-key"
UID = "1000"  # deploy/Dockerfile's user
DATA = ROOT / "train" / "demo" / "data"
PREFIXES = {"ticket": "ticket: ", "contact": "contact: "}  # train/demo/tasks.yaml
TARGET = {"ticket": "label", "contact": "json"}  # the field each task's answer is
# What this check relies on in the compose files and the code (tests/test_deploy_images.py holds them to it):
PORT_VARIABLES = ("MTFT_PORT", "MTFT_VLLM_0_PORT", "MTFT_VLLM_1_PORT")  # vllm-<i> listens on MTFT_VLLM_<i>_PORT
VARIABLES = {*PORT_VARIABLES, "MTFT_BIND", "MTFT_API_KEYS", "MTFT_ADMIN_KEY"}  # every variable the files read
SERVICES = {"compose.yaml": ("serve", "train"), "compose.scale.yaml": ("router", "vllm-0", "vllm-1")}
TRAIN_RUNS = {"ticket": (), "contact": ("--resume",)}  # appended to the train service's command
METRICS = REQUESTS, RETRIES, HEALTHY, ADAPTERS = (
    "mtft_requests_total", "mtft_retries_total", "mtft_backend_healthy", "mtft_backend_adapters")
TRAFFIC = 48  # non-streamed requests while a backend is killed, 4 at a time
KILL_AFTER = 8  # ... once this many have answered


class CheckFailed(Exception):
    pass


def step(title: str):
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def done(started: float, detail: str = "") -> None:
    print(f"   ok ({time.monotonic() - started:.0f} s){': ' + detail if detail else ''}", flush=True)


class Stack:
    """One compose project (both files share it, hence its registry volume) on free loopback ports."""

    def __init__(self) -> None:
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        self.compose = ["docker", "compose"] if v2.returncode == 0 else [shutil.which("docker-compose") or "docker-compose"]
        version = subprocess.run([*self.compose, "version", "--short"], capture_output=True, text=True).stdout.strip()
        print(f"compose: {' '.join(self.compose)} {version}")
        taken: set[int] = set()
        ports = {name: taken.add(p) or p for name in PORT_VARIABLES for p in [free_port(taken)]}
        # The shell's values of the files' variables must not leak in; unset MTFT_ADMIN_KEY: no /admin.
        self.env = {k: v for k, v in os.environ.items() if k not in VARIABLES and not k.startswith("COMPOSE_")}
        self.env.update({name: str(port) for name, port in ports.items()}, MTFT_BIND="127.0.0.1", MTFT_API_KEYS=KEY)
        self.url = f"http://127.0.0.1:{ports['MTFT_PORT']}"
        self.backends = [f"http://127.0.0.1:{ports[f'MTFT_VLLM_{i}_PORT']}" for i in range(2)]
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def run(self, file: str, *args: str, log: str, timeout_s: float) -> None:
        argv = [*self.compose, "-p", PROJECT, "-f", str(DEPLOY / file), "--profile", "train", *args]
        with (LOGS / log).open("a") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            try:
                code = subprocess.run(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                raise CheckFailed(f"{' '.join(args[:2])} took over {timeout_s:.0f} s; see {LOGS / log}") from None
        if code != 0:
            raise CheckFailed(f"{' '.join(argv)} exited {code}; last lines of {LOGS / log}:\n{tail(LOGS / log)}")

    def container(self, file: str, service: str) -> str:
        argv = [*self.compose, "-p", PROJECT, "-f", str(DEPLOY / file), "ps", "-q", service]
        found = subprocess.run(argv, env=self.env, capture_output=True, text=True).stdout.split()
        if not found:
            raise CheckFailed(f"no container for {service} ({file})")
        return found[0]

    def train(self, task: str) -> None:
        command = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["train"]["command"]
        self.run("compose.yaml", "run", "--rm", "train", *command, "--task", task, *TRAIN_RUNS[task],
                 log=f"train-{task}.log", timeout_s=900)

    def down(self) -> None:
        for file in ("compose.scale.yaml", "compose.yaml"):
            self.run(file, "down", "--volumes", "--remove-orphans", log="down.log", timeout_s=120)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(url: str, path: str, containers: list[str], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        for c in containers:
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", c], capture_output=True, text=True)
            if state.stdout.strip() not in ("running", "restarting"):
                logs = subprocess.run(["docker", "logs", "--tail", "30", c], capture_output=True, text=True)
                raise CheckFailed(f"container {c[:12]} is {state.stdout.strip()}:\n{logs.stdout}{logs.stderr}")
        time.sleep(2)
    raise CheckFailed(f"{url}{path} did not answer 200 within {timeout_s:.0f} s")


def example(task: str, i: int = 0) -> tuple[str, str]:
    row = json.loads((DATA / f"{task}.eval.jsonl").read_text().splitlines()[i])
    return row["text"], row[TARGET[task]]


def answer(client: openai.OpenAI, task: str, how: str, i: int = 0) -> str:
    """Ask `task` one held-out example `how` (prefix: completion, model: chat, stream: chat streamed)."""
    text, expected = example(task, i)
    routed, adapter, got = ask(client, task, PREFIXES[task], text, how)
    if got.strip() != expected:
        raise CheckFailed(f"{task} asked by {how} (routed by {routed}, adapter {adapter}): {got.strip()!r}, "
                          f"expected {expected!r}")
    return adapter


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(found: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and labels.items() <= dict(ls).items())


def kill_mid_traffic(stack: Stack, victim: str) -> tuple[int, float]:
    """Non-streamed requests, 4 at a time; the victim is killed once KILL_AFTER answered. (answered, retries)"""
    jobs = [(("ticket", "contact")[i % 2], ("prefix", "model")[i // 2 % 2], i % 4) for i in range(TRAFFIC)]
    answered, failures = 0, []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(answer, stack.client, *job) for job in jobs]
        for future in concurrent.futures.as_completed(futures, timeout=600):
            try:
                future.result()
                answered += 1
            except Exception as exc:  # every failure is reported, none may happen
                failures.append(repr(exc))
            if answered + len(failures) == KILL_AFTER:
                subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
                print(f"   killed vllm-0's container {victim[:12]} after {KILL_AFTER} answers", flush=True)
    if failures:
        raise CheckFailed(f"{len(failures)} of {TRAFFIC} non-streamed requests failed: {failures[:3]}")
    return answered, sample(metrics(stack.url), RETRIES)


def rejoined(stack: Stack, backend: str, adapters: set[str], timeout_s: float) -> float:
    """Seconds until the router has `backend` in rotation with every adapter loaded there (its own /v1/models too)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        found = metrics(stack.url)
        if sample(found, HEALTHY, backend=backend) == 1 and \
                sample(found, ADAPTERS, backend=backend) >= len(adapters):
            if adapters <= adapters_on(backend):
                return time.monotonic() - started
        time.sleep(2)
    raise CheckFailed(f"{backend} did not rejoin with {sorted(adapters)} within {timeout_s:.0f} s")


def adapters_on(backend: str) -> set[str]:
    """The adapters a vLLM backend has loaded, by its own /v1/models (they name the base as parent)."""
    return {m["id"] for m in httpx.get(backend + "/v1/models", timeout=10).json()["data"] if m.get("parent")}


def owners(containers: list[str]) -> str:
    for c in containers:
        uid = subprocess.run(["docker", "exec", c, "id", "-u"], capture_output=True, text=True).stdout.strip()
        if uid != UID:
            raise CheckFailed(f"container {c[:12]} runs as uid {uid!r}, not {UID}")
    find = ["docker", "run", "--rm", "--network", "none", "-v", f"{PROJECT}_registry:/registry:ro", "mtft:router",
            "find", "/registry", "-printf", "%U %p\n"]
    listed = subprocess.run(find, capture_output=True, text=True, check=True).stdout.splitlines()
    wrong = [line for line in listed if line.split(" ", 1)[0] != UID]
    if wrong or len(listed) < 2:
        raise CheckFailed(f"registry volume: {len(listed)} entries, not owned by uid {UID}: {wrong[:5]}")
    return f"{len(containers)} containers run as uid {UID}; {len(listed)} registry entries owned by uid {UID}"


def check(stack: Stack) -> None:
    started = step("1/5 compose.yaml, profile train: ticket trained into the registry volume")
    stack.train("ticket")
    done(started)

    started = step("2/5 compose.yaml serve: ready, answers ticket (completion, chat, stream), /metrics")
    stack.run("compose.yaml", "up", "-d", "serve", log="serve.log", timeout_s=120)
    ready = wait_ready(stack.url, "/ready", [stack.container("compose.yaml", "serve")], timeout_s=420)
    adapter = {how: answer(stack.client, "ticket", how) for how in ("prefix", "model", "stream")}
    counted = sample(metrics(stack.url), REQUESTS, task="ticket")
    if counted < 3:
        raise CheckFailed(f"/metrics counts {counted} ticket requests after 3")
    done(started, f"ready after {ready:.0f} s; adapter {adapter['prefix']}; /metrics counts {counted:.0f} ticket requests")

    started = step("3/5 contact trained by a train container while serving: hot-added and answered")
    stack.train("contact")
    waited = wait_for(stack.client, "contact", timeout_s=120)
    adapter = {how: answer(stack.client, "contact", how) for how in ("prefix", "model", "stream")}
    done(started, f"answering {waited:.1f} s after training ended; adapter {adapter['model']}")

    started = step("4/5 compose.scale.yaml: router image over two --vllm-only backends; vllm-0 killed mid-traffic")
    stack.run("compose.yaml", "down", log="serve.log", timeout_s=120)  # keeps the registry volume
    stack.run("compose.scale.yaml", "up", "-d", "router", log="scale.log", timeout_s=120)
    containers = [stack.container("compose.scale.yaml", s) for s in SERVICES["compose.scale.yaml"]]
    ready = wait_ready(stack.url, "/ready", containers, timeout_s=600)
    adapters = {m.id for m in stack.client.models.list().data} & set(PREFIXES)
    if adapters != set(PREFIXES):
        raise CheckFailed(f"the router serves {sorted(adapters)}, not {sorted(PREFIXES)}")
    loaded = adapters_on(stack.backends[0])
    if len(loaded) < len(PREFIXES):
        raise CheckFailed(f"vllm-0 holds adapters {sorted(loaded)}: want one per task {sorted(PREFIXES)}")
    answered, retries = kill_mid_traffic(stack, containers[1])
    down = sample(metrics(stack.url), HEALTHY, backend=stack.backends[0])
    print(f"   {answered}/{TRAFFIC} answered, none failed; router retries {retries:.0f}; "
          f"vllm-0 in rotation: {down:.0f}", flush=True)
    # A killed container stays down (docker kill is a manual stop for the restart policy): start it.
    stack.run("compose.scale.yaml", "start", "vllm-0", log="scale.log", timeout_s=120)
    back = rejoined(stack, stack.backends[0], loaded, timeout_s=420)
    after = [answer(stack.client, task, "prefix", 1) for task in PREFIXES]
    done(started, f"ready after {ready:.0f} s; vllm-0 restarted, in rotation with {sorted(loaded)} "
                  f"loaded again after {back:.0f} s; then {len(after)} more answers")

    started = step("5/5 non-root containers, registry volume owned by the image's user")
    done(started, owners(containers))


def main() -> None:
    missing = [i for i in ("mtft:cpu", "mtft:router")
               if subprocess.run(["docker", "image", "inspect", i], capture_output=True).returncode != 0]
    if missing:
        sys.exit(f"deploy-check: no image {', '.join(missing)}: run `make images` first")
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    stack = Stack()
    started = time.monotonic()
    try:
        stack.down()  # what an interrupted earlier run left
        check(stack)
    except CheckFailed as exc:
        print(f"\ndeploy-check FAILED: {exc}\n(logs in {LOGS})", file=sys.stderr)
        sys.exit(1)
    finally:
        stack.down()
        print(f"removed project {PROJECT}'s containers and volumes", flush=True)
    print(f"\ndeploy-check passed in {time.monotonic() - started:.0f} s: 5/5 steps")


if __name__ == "__main__":
    main()
