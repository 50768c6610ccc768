"""Serving: vLLM multi-LoRA from the adapter registry, started with the router by `mtft-serve`."""

from .config import ServeConfig, load_config
from .stack import ServeError, ServingPlan, Stack, plan, router_config, vllm_command
from .zero import ZERO_ADAPTER, write_zero_adapter

__all__ = ["ZERO_ADAPTER", "ServeConfig", "ServeError", "ServingPlan", "Stack", "load_config", "plan",
           "router_config", "vllm_command", "write_zero_adapter"]
