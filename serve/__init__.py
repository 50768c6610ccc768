"""Serving: vLLM multi-LoRA from the adapter registry, started with the router by `mtft-serve`."""

from .config import ServeConfig, load_config
from .stack import Plan, ServeError, Stack, plan, vllm_command
from .zero import ZERO_ADAPTER, write_zero_adapter

__all__ = ["ZERO_ADAPTER", "Plan", "ServeConfig", "ServeError", "Stack", "load_config", "plan",
           "vllm_command", "write_zero_adapter"]
