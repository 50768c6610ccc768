"""The serving stack's processes: N vLLM children on loopback, then the router in front of them.

`Stack` owns the processes: it starts every vLLM child at once (each on a free port with its own
cores, `plan.cpu_binds`) and waits for their `/v1/models`, checks each `--backend` started
elsewhere, writes the router's config (`plan.router_config`) and starts it, waits for `/ready`,
restarts a child that dies (the router takes it out of rotation and reloads its adapters before
it takes traffic again), and on stop terminates each child's whole process group. Children also
get SIGTERM if this process dies (PR_SET_PDEATHSIG), so nothing is orphaned. With `--vllm-only`
it runs one vLLM backend on the public address and no router.

Of the router, this package uses only its config model (`mtft.router.config`):
the router is a child started from a file, and the file's schema is the
router's own. The router imports nothing from here.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .config import ServeConfig
from .plan import ServeError, cpu_binds, cpu_problems, plan, router_config, vllm_command, vllm_dtype
from .zero import ZERO_ADAPTER, write_zero_adapter

log = logging.getLogger(__name__)
PROBE = "mtft-probe-no-such-adapter"


@dataclass
class Child:
    """One vLLM process this stack runs, restarted in place when it dies."""

    index: int
    host: str
    port: int
    cpus: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarting: bool = False

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    @property
    def log_name(self) -> str:
        return "vllm.log" if self.index == 0 else f"vllm-{self.index}.log"


def free_port(taken: set[int] | None = None) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in (taken or set()):
            return port


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when mtft-serve dies, however it dies."""
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Stack:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.state_dir = Path(config.state_dir or tempfile.mkdtemp(prefix="mtft-serve-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.router: subprocess.Popen | None = None
        self.backends: list[str] = []
        self.stopping = False

    def start(self) -> None:
        started = time.monotonic()
        (self.state_dir / "serve.json").write_text(self.config.model_dump_json(indent=2))  # what was asked
        self.plan = plan(self.config)
        zero_dir = None
        if self.plan.zero_modules:
            zero_dir = write_zero_adapter(self.plan.base_dir, self.plan.zero_modules, self.plan.max_rank,
                                          self.state_dir / ZERO_ADAPTER)
        self.children = self._children(zero_dir)
        if self.children:
            # Here, not at import: the plugin imports torch, which a router-only install does not have.
            from .vllm_plugin import cpu_build_version, prepare

            if cpu_build_version() is not None and (problems := cpu_problems(self.plan.base_dir)):
                raise ServeError("; ".join(problems))

            log.info("%s", prepare())
        for child in self.children:
            self._start_child(child)
        for child in self.children:
            self._wait(child.url + "/v1/models", child.process, "vLLM", child.log_name)
        self.vllm_startup_s = time.monotonic() - started
        if self.config.vllm_only:
            if self.config.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("vLLM's adapter load/unload routes are open on %s:%d: keep it on a network only the "
                            "router reaches", self.config.host, self.config.port)
            self._ready(started)
            return
        self.backends = [c.url for c in self.children] + self._external_backends()
        routing = router_config(self.config, self.plan, self.backends, zero_dir)
        (self.state_dir / "router.json").write_text(routing.model_dump_json(indent=2))
        self.router = self._spawn([sys.executable, "-m", "mtft.router", str(self.state_dir / "router.json")],
                                  dict(os.environ), "router.log")
        self._wait(f"{self.url}/ready", self.router, "router", "router.log")
        self._ready(started)

    def _children(self, zero_dir: Path | None) -> list[Child]:
        if self.config.vllm_only:
            places = [(self.config.host, self.config.port, self.config.vllm_cpus)]
        else:
            binds = cpu_binds(self.config.vllm_cpus, self.config.replicas, sorted(os.sched_getaffinity(0)))
            taken = {self.config.port}
            places = []
            for i, cpus in enumerate(binds):
                port = self.config.vllm_port + i if self.config.vllm_port else free_port(taken)
                taken.add(port)
                places.append(("127.0.0.1", port, cpus))
        children = []
        for i, (host, port, cpus) in enumerate(places):
            argv, env = vllm_command(self.config, self.plan, port, zero_dir, cpus, host)
            children.append(Child(i, host, port, cpus, argv, env))
        return children

    def _external_backends(self) -> list[str]:
        """Every --backend; fails if none answers and no child runs, warns about each that does not answer."""
        urls = [url.rstrip("/") for url in self.config.backends]
        problems = self._probe(urls)
        answering = [url for url in urls if url not in problems]
        if problems and not answering and not self.children:
            raise ServeError("no backend answered within {:.0f} s: {}".format(
                self.config.backend_timeout_s, "; ".join(f"{url}: {why}" for url, why in problems.items())))
        if problems:
            serving = [c.url for c in self.children] + answering
            log.warning("degraded start: serving on %s; out of rotation until it answers: %s", serving,
                        "; ".join(f"{url} ({why})" for url, why in problems.items()))
        return urls

    def _probe(self, urls: list[str]) -> dict[str, str]:
        """Why each backend that is not usable is not, waiting up to backend_timeout_s for those that do not answer."""
        deadline = time.monotonic() + self.config.backend_timeout_s
        problems = {url: "not checked" for url in urls}
        while True:
            for url in [u for u, why in problems.items() if why.startswith(("not checked", "no answer"))]:
                why = _backend_problem(url, str(self.plan.base_dir))
                if why is None:
                    del problems[url]
                else:
                    problems[url] = why
            waiting = [u for u, why in problems.items() if why.startswith("no answer")]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        wrong = {url: why for url, why in problems.items() if not why.startswith("no answer")}
        if wrong:  # it answers, so it is running misconfigured: say so now, not after hours of 503s
            raise ServeError("; ".join(f"--backend {url}: {why}" for url, why in wrong.items()))
        return problems

    def _ready(self, started: float) -> None:
        self.startup_s = time.monotonic() - started
        self._write_state()
        tasks = [a.task for a in self.plan.adapters]
        if self.config.vllm_only:
            log.info("vLLM backend ready at %s in %.1f s, sized for tasks %s; point a router at it with --backend %s",
                     self.children[0].url, self.startup_s, tasks, self.children[0].url)
        else:
            log.info("ready at %s in %.1f s (vLLM %.1f s); tasks %s on %d backends; logs in %s", self.url,
                     self.startup_s, self.vllm_startup_s, tasks, len(self.backends), self.state_dir)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.port}"

    def _start_child(self, child: Child) -> None:
        log.info("starting vLLM %d on %s (rank cap %d, %d slots, KV cache %g GiB, cpus %s, dtype %s: %s)",
                 child.index, child.url, self.plan.max_rank, self.plan.max_loras, self.config.kv_cache_gib, child.cpus,
                 *vllm_dtype(self.config.dtype))
        child.process = self._spawn(child.argv, child.env, child.log_name)
        child.started = time.monotonic()

    def _spawn(self, argv: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen:
        output = open(self.state_dir / log_name, "ab")
        return subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _wait(self, url: str, process: subprocess.Popen, what: str, log_name: str) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServeError(f"{what} exited with {process.returncode} while starting; see "
                                 f"{self.state_dir}/{log_name}")
            if _answers(url, 2.0):
                return
            time.sleep(0.5)
        raise ServeError(f"{what} did not answer {url} within {self.config.startup_timeout_s:.0f} s")

    def supervise(self) -> int:
        """Block until stopped; restart a vLLM child that dies. Returns an exit code."""
        while not self.stopping:
            time.sleep(0.5)
            if self.router is not None and self.router.poll() is not None:
                log.error("the router exited with %s; stopping", self.router.returncode)
                return 1
            for child in self.children:
                if self.stopping:
                    break
                if child.process.poll() is not None:
                    if not self.config.restart_vllm:
                        log.error("vLLM %d exited with %s; stopping", child.index, child.process.returncode)
                        return 1
                    log.warning("vLLM %d exited with %s; restarting it (out of rotation meanwhile)", child.index,
                                child.process.returncode)
                    _stop_group(child.process)  # its engine process may outlive it
                    self._start_child(child)
                    child.restarting = True
                    self._write_state()
                elif child.restarting and _answers(child.url + "/v1/models", 0.5):
                    child.restarting = False
                    log.info("vLLM %d back after %.1f s", child.index, time.monotonic() - child.started)
        return 0

    def _write_state(self) -> None:
        """ready.json: the running stack's URL, pids, ports and tasks; written once it is ready."""
        first = self.children[0] if self.children else None
        state = {
            "url": self.children[0].url if self.config.vllm_only else self.url,
            "router_pid": self.router.pid if self.router else None,
            "vllm_pid": first.process.pid if first else None, "vllm_port": first.port if first else None,
            "replicas": [{"url": c.url, "pid": c.process.pid, "cpus": c.cpus} for c in self.children],
            "backends": self.backends, "vllm_startup_s": round(self.vllm_startup_s, 1),
            "startup_s": round(self.startup_s, 1), "tasks": [a.task for a in self.plan.adapters],
            "rejected": self.plan.rejected}
        staged = self.state_dir / "ready.json.tmp"
        staged.write_text(json.dumps(state, indent=2))
        staged.rename(self.state_dir / "ready.json")  # readers never see half a file

    def stop(self) -> None:
        self.stopping = True
        for process in [self.router, *(c.process for c in self.children)]:
            if process is not None:
                _stop_group(process)


def _answers(url: str, timeout_s: float) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _backend_problem(url: str, base_model: str) -> str | None:
    """Why the vLLM at `url` cannot be a backend ("no answer ..." while it may still come), or None."""
    try:
        if httpx.get(url + "/health", timeout=2.0).status_code != 200:
            return "no answer yet: /health is not 200"
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=2.0).json()["data"]]
        # With runtime loading on, unloading an unknown adapter is vLLM's own 404 error body;
        # with it off the route does not exist (a framework 404 without one).
        probe = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": PROBE}, timeout=2.0)
        runtime_loading = probe.status_code != 404 or "error" in _json_object(probe)
    except httpx.HTTPError as exc:
        return f"no answer: {exc!r}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"does not answer like vLLM: {exc!r}"
    if base_model not in models:
        return f"serves {models}, not the base model {base_model} (start it with --model {base_model})"
    if not runtime_loading:
        return ("runtime LoRA loading is off: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                "(mtft-serve --vllm-only does)")
    return None


def _json_object(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _stop_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the child's process group (vLLM's engine and workers too), SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anyone left in the group (engine core, workers)?
        except ProcessLookupError:
            break
        process.poll()  # reap the leader so the group can empty
        time.sleep(0.1)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
