"""The serving plan: what every vLLM backend is started with, decided from the registry before any starts.

`plan()` reads the registry (a pure step, tested alone): the base model, the adapters that can
be served, vLLM's rank cap and slots, whether base traffic needs the zero adapter.
`vllm_command()` turns it into one vLLM child's command line and environment (the router loads
the task adapters at runtime; only the zero adapter is preloaded), `cpu_binds()` splits the
machine's cores between replicas, and `router_config()` adds what the router must know about
the backends to the options passed on.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mtft.registry import SERVABLE_RANKS, AdapterRecord, Registry, base_modules, fingerprint, servable_problems
from mtft.router.config import RouterConfig, RouterOptions

from .config import ServeConfig
from .zero import ZERO_ADAPTER

log = logging.getLogger(__name__)
REPLICA_SEPARATOR = ";"  # vLLM itself separates tensor-parallel ranks' core lists with "|"
# vLLM's CPU attention (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes): with
# another head size vLLM starts, then its engine dies at the first request.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ServeError(Exception):
    """The stack cannot start: no base model, vLLM failed, a port is taken, no backend answers."""


@dataclass(frozen=True)
class ServingPlan:
    """What every vLLM backend is started with, decided from the registry before one starts."""

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
    newest = registry.served()  # the pinned or newest good version of each task
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
    return ServingPlan(base_dir, base_name, base_fingerprint, adapters, rejected, max_rank, max_loras,
                       config.max_cpu_loras or 2 * max_loras,
                       _zero_modules(base_dir, adapters) if _zero_adapter_needed(config) else [])


def _zero_modules(base_dir: Path, adapters: list[AdapterRecord]) -> list[str]:
    """The zero adapter's modules: the served adapters' own (all trained on this base), else every
    module vLLM serves LoRA on in this base (a Phi-3 has fused qkv_proj where a Llama has q_proj)."""
    return sorted({m for a in adapters for m in a.target_modules}) or list(base_modules(base_dir).servable)


def cpu_problems(base_dir: Path) -> list[str]:
    """Why vLLM's CPU build cannot serve this base: asked before a vLLM starts, not at its first request."""
    import json

    config = json.loads((base_dir / "config.json").read_text())
    text = config.get("text_config") or config  # multimodal checkpoints keep the language model's settings here
    heads = text.get("num_attention_heads")
    head = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else None)
    if head is not None and head not in CPU_HEAD_SIZES:
        return [f"base model {base_dir} has attention heads of size {head}; vLLM's CPU build serves head sizes "
                f"{list(CPU_HEAD_SIZES)} only (its engine would stop at the first request): serve this base with "
                "vLLM's GPU build, or choose a base whose head size is one of these (docs/models.md)"]
    return []


def _zero_adapter_needed(config: ServeConfig) -> bool:
    """With mtft's CPU LoRA ops the mixing bug is gone and base traffic skips the LoRA path."""
    if config.base_workaround is not None:
        return config.base_workaround
    # Here, not at import: the plugin's ops import torch, which a router-only install (--replicas 0
    # --no-base-workaround, deploy/Dockerfile's router image) does not have.
    from .vllm_plugin import applies

    return not applies()


def vllm_dtype(setting: str) -> tuple[str, str]:
    """vLLM's --dtype for the `dtype` setting, and why.

    `auto` is vLLM's own choice (the checkpoint's dtype, bfloat16 for most models) except on vLLM's
    CPU build where the CPU has no native bf16 (AVX-512-bf16/AMX): there every bf16 matmul is
    emulated, and float32 decodes several times faster (SmolLM2-135M, 32 concurrent requests on 2
    AVX2 cores: 134 tokens/s in float32, 39 in bfloat16) for twice the weight memory."""
    if setting != "auto":
        return setting, "from --dtype"
    # Here, not at import: the check imports torch, which a router-only install does not have.
    from . import vllm_plugin

    if vllm_plugin.cpu_build_version() is None:
        return "auto", "auto: vLLM's choice (not the CPU build)"
    if vllm_plugin.lora_ops.native_half():
        return "auto", "auto: vLLM's choice (the CPU computes bfloat16 natively)"
    return "float32", ("auto: this CPU has no AVX-512-bf16/AMX, where bfloat16 is emulated and decodes several "
                       "times slower (--dtype bfloat16 forces it; float32 takes twice the weight memory)")


def vllm_command(config: ServeConfig, plan: ServingPlan, port: int, zero_dir: Path | None, cpus: str,
                 host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """One vLLM backend's command line and environment; `cpus`: its VLLM_CPU_OMP_THREADS_BIND."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plan.base_dir),
            "--host", host, "--port", str(port), "--dtype", vllm_dtype(config.dtype)[0],
            "--enable-lora", "--max-lora-rank", str(plan.max_rank), "--max-loras", str(plan.max_loras),
            "--max-cpu-loras", str(plan.max_cpu_loras), "--uvicorn-log-level", "warning"]
    if zero_dir is not None:
        # Preloaded: base traffic needs it before the router has loaded anything.
        argv += ["--lora-modules", f"{ZERO_ADAPTER}={zero_dir}"]
    if config.max_model_len:
        argv += ["--max-model-len", str(config.max_model_len)]
    env = {**os.environ,
           # Runtime adapter loading is "for local development only" in vLLM: this is
           # why vLLM listens on 127.0.0.1 (or a private network) and only the router is public.
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}",
           "VLLM_CPU_OMP_THREADS_BIND": cpus}
    return argv + config.vllm_args, env


def cpu_binds(setting: str, replicas: int, cores: list[int]) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND for each replica: `auto` splits `cores` evenly (replicas share
    cores only when there are more replicas than cores), `nobind` stays, lists are one per replica."""
    if replicas == 0:
        return []
    if setting == "nobind" or (replicas == 1 and REPLICA_SEPARATOR not in setting):
        return [setting] * replicas
    if setting == "auto":
        per = max(1, len(cores) // replicas)
        return [",".join(str(cores[(i * per + j) % len(cores)]) for j in range(per)) for i in range(replicas)]
    lists = setting.split(REPLICA_SEPARATOR)
    if len(lists) != replicas:
        raise ServeError(f"--vllm-cpus {setting!r} has {len(lists)} core list(s) for {replicas} replicas: give one "
                         f"per replica separated by {REPLICA_SEPARATOR!r} (e.g. '0-3;4-7'), 'auto' or 'nobind'")
    return lists


def router_config(config: ServeConfig, plan: ServingPlan, backends: list[str], zero_dir: Path | None) -> RouterConfig:
    """The router's options as given to mtft-serve, and what the vLLM `backends` were started with."""
    options = config.model_dump(include=set(RouterOptions.model_fields))
    return RouterConfig(**{**options, "registry": config.registry.resolve()}, backends=backends,
                        slots=plan.max_cpu_loras, base_model=str(plan.base_dir), base_name=plan.base_name,
                        base_fingerprint=plan.base_fingerprint, max_rank=plan.max_rank,
                        base_adapter=ZERO_ADAPTER if zero_dir else None, base_adapter_path=zero_dir)
