"""The serving stack: a vLLM child on loopback sized from the registry, then the router child.

`plan()` reads the registry and decides everything vLLM is started with, the
serving plan (a pure step, tested alone); `router_config()` adds what the
router needs to know about that vLLM to the options passed on. `Stack` owns
the two processes: starts vLLM and waits for `/v1/models`, writes the
router's config and starts it, waits for `/ready`, restarts vLLM if it dies
(the router reloads the adapters it loaded at runtime), and on stop
terminates each child's whole process group. Children also get SIGTERM if
this process dies (PR_SET_PDEATHSIG), so nothing is orphaned.

Of the router, this module uses only its config model (`mtft.router.config`):
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mtft.registry import SERVABLE_MODULES, SERVABLE_RANKS, AdapterRecord, Registry, fingerprint, servable_problems
from mtft.router.config import RouterConfig, RouterOptions

from .config import ServeConfig
from .vllm_plugin import applies
from .zero import ZERO_ADAPTER, write_zero_adapter

log = logging.getLogger(__name__)


class ServeError(Exception):
    """The stack cannot start: no base model, vLLM failed, a port is taken."""


@dataclass(frozen=True)
class ServingPlan:
    """What vLLM is started with, decided from the registry before it starts."""

    base_dir: Path
    base_name: str
    base_fingerprint: str
    adapters: list[AdapterRecord]
    rejected: dict[str, list[str]]
    max_rank: int
    max_loras: int
    max_cpu_loras: int
    zero_modules: list[str] = field(default_factory=list)


def plan(config: ServeConfig) -> ServingPlan:
    registry = Registry(config.registry)
    newest = registry.latest()
    if config.base_model is not None:
        base_dir, base_name = config.base_model.resolve(), str(config.base_model)
    elif newest:
        record = max(newest.values(), key=lambda r: r.created or 0)
        base_dir, base_name = Path(record.base_model.path), record.base_model.name
    else:
        raise ServeError(f"registry {config.registry} has no adapters: pass --base-model to serve the base alone")
    base_fingerprint = fingerprint(base_dir)
    adapters, rejected = [], {}
    for task, record in newest.items():
        checked, problems = servable_problems(registry, task, record.version, base_fingerprint, config.max_lora_rank)
        if problems:
            rejected[record.name] = problems
            log.warning("not serving %s: %s", record.name, "; ".join(problems))
        else:
            adapters.append(checked)
    needed = max((a.rank for a in adapters), default=16)
    max_rank = config.max_lora_rank or min(r for r in SERVABLE_RANKS if r >= needed)
    if max_rank not in SERVABLE_RANKS:
        raise ServeError(f"--max-lora-rank {max_rank} is not one vLLM allows: {list(SERVABLE_RANKS)}")
    # Slots: every task, the zero adapter, and one more so a version swap never waits for a slot.
    max_loras = config.max_loras or len(adapters) + 2
    modules = sorted({m for a in adapters for m in a.target_modules}) or list(SERVABLE_MODULES)
    return ServingPlan(base_dir, base_name, base_fingerprint, adapters, rejected, max_rank, max_loras,
                config.max_cpu_loras or 2 * max_loras, modules if _zero_adapter_needed(config) else [])


def _zero_adapter_needed(config: ServeConfig) -> bool:
    """With mtft's CPU LoRA ops the mixing bug is gone and base traffic skips the LoRA path."""
    if config.base_workaround is not None:
        return config.base_workaround
    return not applies()


def vllm_command(config: ServeConfig, plan: ServingPlan, port: int,
                 zero_dir: Path | None) -> tuple[list[str], dict[str, str]]:
    registry = Registry(config.registry)
    modules = [f"{a.name}={registry.version_dir(a.task, a.version).resolve()}" for a in plan.adapters]
    if zero_dir is not None:
        modules.append(f"{ZERO_ADAPTER}={zero_dir}")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plan.base_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", config.dtype,
            "--enable-lora", "--max-lora-rank", str(plan.max_rank), "--max-loras", str(plan.max_loras),
            "--max-cpu-loras", str(plan.max_cpu_loras), "--uvicorn-log-level", "warning"]
    if modules:
        argv += ["--lora-modules", *modules]
    if config.max_model_len:
        argv += ["--max-model-len", str(config.max_model_len)]
    env = {**os.environ,
           # Runtime adapter loading is "for local development only" in vLLM: this is
           # why vLLM listens on 127.0.0.1 and only the router is public.
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}",
           "VLLM_CPU_OMP_THREADS_BIND": config.vllm_cpus}
    return argv + config.vllm_args, env


def router_config(config: ServeConfig, plan: ServingPlan, upstream: str, zero_dir: Path | None) -> RouterConfig:
    """The router's options as given to mtft-serve, and what the vLLM at `upstream` was started with."""
    options = config.model_dump(include=set(RouterOptions.model_fields))
    return RouterConfig(**{**options, "registry": config.registry.resolve()}, upstream=upstream,
                        base_model=str(plan.base_dir), base_name=plan.base_name,
                        base_fingerprint=plan.base_fingerprint, max_rank=plan.max_rank,
                        base_adapter=ZERO_ADAPTER if zero_dir else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when mtft-serve dies, however it dies."""
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Stack:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.state_dir = Path(config.state_dir or tempfile.mkdtemp(prefix="mtft-serve-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.vllm: subprocess.Popen | None = None
        self.router: subprocess.Popen | None = None
        self.stopping = False

    def start(self) -> None:
        started = time.monotonic()
        (self.state_dir / "serve.json").write_text(self.config.model_dump_json(indent=2))  # what was asked
        self.plan = plan(self.config)
        zero_dir = None
        if self.plan.zero_modules:
            zero_dir = write_zero_adapter(self.plan.base_dir, self.plan.zero_modules, self.plan.max_rank,
                                          self.state_dir / ZERO_ADAPTER)
        self.vllm_port = self.config.vllm_port or free_port()
        self.vllm_argv, self.vllm_env = vllm_command(self.config, self.plan, self.vllm_port, zero_dir)
        self.vllm_startup_s = self._start_vllm()
        routing = router_config(self.config, self.plan, self.upstream, zero_dir)
        (self.state_dir / "router.json").write_text(routing.model_dump_json(indent=2))
        self.router = self._spawn([sys.executable, "-m", "mtft.router", str(self.state_dir / "router.json")],
                                  dict(os.environ), "router.log")
        self._wait(f"http://{self._client_host()}:{self.config.port}/ready", self.router, "router")
        self.startup_s = time.monotonic() - started
        self._write_state({
            "url": self.url, "vllm_pid": self.vllm.pid, "vllm_port": self.vllm_port,
            "router_pid": self.router.pid, "vllm_startup_s": round(self.vllm_startup_s, 1),
            "startup_s": round(self.startup_s, 1), "tasks": [a.task for a in self.plan.adapters],
            "rejected": self.plan.rejected})
        log.info("ready at %s in %.1f s (vLLM %.1f s); tasks %s; logs in %s", self.url, self.startup_s,
                 self.vllm_startup_s, [a.task for a in self.plan.adapters], self.state_dir)

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    @property
    def url(self) -> str:
        return f"http://{self._client_host()}:{self.config.port}"

    def _client_host(self) -> str:
        return "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host

    def _start_vllm(self) -> float:
        started = time.monotonic()
        log.info("starting vLLM on %s (rank cap %d, %d slots, KV cache %g GiB, cpus %s)", self.upstream,
                 self.plan.max_rank, self.plan.max_loras, self.config.kv_cache_gib, self.config.vllm_cpus)
        self.vllm = self._spawn(self.vllm_argv, self.vllm_env, "vllm.log")
        self._wait(self.upstream + "/v1/models", self.vllm, "vLLM")
        return time.monotonic() - started

    def _spawn(self, argv: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen:
        output = open(self.state_dir / log_name, "ab")
        return subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _wait(self, url: str, process: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServeError(f"{what} exited with {process.returncode} while starting; see "
                                 f"{self.state_dir}/{'vllm' if what == 'vLLM' else 'router'}.log")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServeError(f"{what} did not answer {url} within {self.config.startup_timeout_s:.0f} s")

    def supervise(self) -> int:
        """Block until stopped; restart vLLM when it dies. Returns an exit code."""
        while not self.stopping:
            time.sleep(0.5)
            if self.router.poll() is not None:
                log.error("the router exited with %s; stopping", self.router.returncode)
                return 1
            if self.vllm.poll() is not None and not self.stopping:
                if not self.config.restart_vllm:
                    log.error("vLLM exited with %s; stopping", self.vllm.returncode)
                    return 1
                log.warning("vLLM exited with %s; restarting it (the router answers 503 meanwhile)",
                            self.vllm.returncode)
                _stop_group(self.vllm)  # its engine process may outlive it
                log.info("vLLM back after %.1f s", self._start_vllm())
                self._write_state({**self._state(), "vllm_pid": self.vllm.pid})
        return 0

    def _state(self) -> dict:
        return json.loads((self.state_dir / "ready.json").read_text())

    def _write_state(self, state: dict) -> None:
        """ready.json: the running stack's URL, pids, ports and tasks; written once it is ready."""
        (self.state_dir / "ready.json").write_text(json.dumps(state, indent=2))

    def stop(self) -> None:
        self.stopping = True
        for process in (self.router, self.vllm):
            if process is not None:
                _stop_group(process)


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
