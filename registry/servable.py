"""What vLLM can serve: checked before training starts and again at publish.

vLLM's LoRA support is narrower than PEFT's. An adapter outside it is either
refused at load time or, worse, loads and silently acts as the base model
(modules that do not overlap the served ones), so we refuse it up front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py).
SERVABLE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Projections vLLM applies LoRA to in decoder-only Llama-style models.
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rank_problems(rank: int) -> list[str]:
    if rank not in SERVABLE_RANKS:
        return [f"rank {rank} cannot be served by vLLM; use one of {list(SERVABLE_RANKS)}"]
    return []


def module_problems(modules: Iterable[str]) -> list[str]:
    bad = sorted(set(modules) - set(SERVABLE_MODULES))
    if bad:
        return [
            f"target modules {bad} cannot be served by vLLM; choose from {list(SERVABLE_MODULES)}"
        ]
    return []


def adapter_config_problems(config: Mapping[str, object]) -> list[str]:
    """Every reason vLLM would refuse (or silently mis-serve) this adapter_config.json."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    problems += rank_problems(int(config.get("r", 0)))
    modules = config.get("target_modules") or []
    if isinstance(modules, str):
        problems.append(
            f"target_modules is the pattern {modules!r}; list module names from {list(SERVABLE_MODULES)}"
        )
    else:
        problems += module_problems(modules)
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save {config['modules_to_save']} is set; vLLM cannot serve fully trained modules"
        )
    if config.get("use_dora"):
        problems.append("use_dora is set; vLLM cannot serve DoRA adapters")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; vLLM serves LoRA adapters with bias 'none' only")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set; vLLM needs one rank and alpha for every module")
    return problems
