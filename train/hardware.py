"""The choices made for the machine a run is on: CPU threads, the base's dtype, its attention.

Each honours the spec where it names a value; under `auto` it picks from the hardware and
says why, so a log shows what was chosen and how to override it.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def set_threads(requested: int | None, processes: int = 1) -> int:
    """All cores (shared by this machine's training processes) by default; a server beside training
    should get an explicit lower count."""
    threads = requested or max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    reason = "from the spec" if requested else (
        f"all cores over {processes} processes" if processes > 1 else "all cores") + (
        " (set training.threads to share the machine)")
    log.info("using %d CPU threads: %s", threads, reason)
    return threads


def choose_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The frozen base's dtype and why: bfloat16 only where the hardware computes it natively."""
    if requested != "auto":
        return getattr(torch, requested), "from training.dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bfloat16 natively"
        return torch.float32, "auto: this GPU has no native bfloat16"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16, "auto: the CPU has AVX-512-bf16/AMX"
    return torch.float32, ("auto: this CPU has no AVX-512-bf16/AMX, where bfloat16 is emulated and many "
                           "times slower (set training.dtype: bfloat16 to force it)")


def choose_attention(requested: str, device: torch.device) -> tuple[str, str]:
    """transformers' `attn_implementation` for training and why (bench/train_speed.py times both on CPU)."""
    if requested != "auto":
        return requested, "from training.attention"
    if device.type == "cpu":
        return "eager", "auto: on CPU the eager backward is faster than torch's flash attention"
    return "sdpa", "auto: not a CPU"
