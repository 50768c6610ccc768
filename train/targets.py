"""Which of the base's modules get LoRA: `lora.target_modules` resolved against the base itself.

`auto` is every linear projection in the base's decoder layers that vLLM serves LoRA on, so a
Phi-3 base trains its fused `qkv_proj` and `gate_up_proj` where a Llama trains `q_proj` ... `up_proj`.
Named modules must exist in the base: PEFT would skip a missing one silently and still list it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mtft.registry import base_modules

from .spec import Spec

log = logging.getLogger(__name__)


def target_modules(spec: Spec, base_dir: Path) -> tuple[list[str], list[str]]:
    """(the modules to train, problems naming the spec field); problems empty: train them."""
    found = base_modules(base_dir)
    named = spec.lora.target_modules
    where = f"{spec.source}: lora.target_modules"
    if named != "auto":
        return list(named), [f"{where}: {p}" for p in found.problems(named)]
    if not found.servable:
        return [], [f"{where}: auto found no linear projection vLLM serves in the decoder layers of this "
                    f"{found.architecture} base (its linear modules: {list(found.linear)})"]
    if found.known:
        log.info("LoRA on %s: every projection vLLM serves on a %s base", list(found.servable), found.architecture)
    else:
        log.warning("LoRA on %s: %s is not among the families mtft is tested on (docs/models.md); vLLM may "
                    "refuse these modules when it loads the adapter", list(found.servable), found.architecture)
    return list(found.servable), []
