"""Serving: vLLM multi-LoRA backends sized from the adapter registry, started with the router by `mtft-serve`."""

from .config import ServeConfig, load_config
from .plan import ServeError, ServingPlan, cpu_binds, plan, router_config, vllm_command
from .stack import Stack
from .zero import ZERO_ADAPTER, write_zero_adapter

__all__ = ["ZERO_ADAPTER", "ServeConfig", "ServeError", "ServingPlan", "Stack", "cpu_binds", "load_config", "plan",
           "router_config", "vllm_command", "write_zero_adapter"]
