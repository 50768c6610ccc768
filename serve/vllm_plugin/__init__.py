"""A vLLM general plugin: grouped, correct LoRA ops for vLLM's CPU build (docs/vllm-cpu-lora-plugin.md).

Installed with mtft, it loads in every vLLM process through the `vllm.general_plugins` entry
point `mtft_cpu_lora`; `MTFT_VLLM_CPU_LORA_OPS=0` turns it off, `=fused` keeps the fused layer path in torch (no compiled
kernel), `=grouped` leaves out the fused layer path.
"""

from .lora_ops import native_half
from .plugin import (
    ENV, FUSED, GROUPED, KERNEL, OFF, TESTED_VERSIONS, active_mode, applies, cpu_build_version, is_patched, patch,
    prepare, register, restore, vllm_ops,
)

__all__ = ["ENV", "FUSED", "GROUPED", "KERNEL", "OFF", "TESTED_VERSIONS", "active_mode", "applies",
           "cpu_build_version", "is_patched", "native_half", "patch", "prepare", "register", "restore", "vllm_ops"]
