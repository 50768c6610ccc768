"""What vLLM can serve: checked before training starts and again at publish.

vLLM's LoRA support is narrower than PEFT's. An adapter outside it is either
refused at load time or, worse, loads and silently acts as the base model
(modules that do not overlap the served ones), so we refuse it up front.

Which modules get LoRA depends on the base's family: Llama-style checkpoints have separate
`q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj` (vLLM packs them into one layer and takes
their LoRAs apart again), Phi-3's checkpoints store them fused as `qkv_proj` and `gate_up_proj`.
`base_modules` reads a base's own projections; `VLLM_LORA_MODULES` says which of them vLLM serves.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py).
SERVABLE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# The checkpoint modules vLLM 0.32 applies LoRA to, per architecture (config.json's
# `architectures`): every linear layer of its model class, its packed layers spelled as the
# checkpoint modules its `packed_modules_mapping` unpacks them to (vllm/lora/worker_manager.py,
# vllm/model_executor/models/<family>.py). Olmo2 runs on vLLM's transformers backend, which
# swaps each checkpoint Linear for a vLLM linear of the same name.
VLLM_LORA_MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _SPLIT,
    "MistralForCausalLM": _SPLIT,
    "Qwen2ForCausalLM": _SPLIT,
    "Qwen3ForCausalLM": _SPLIT,
    "Gemma2ForCausalLM": _SPLIT,
    "Gemma3ForCausalLM": _SPLIT,
    "Olmo2ForCausalLM": _SPLIT,
    "Phi3ForCausalLM": _FUSED,
}
# Every module name some architecture serves: what a published adapter may name.
SERVABLE_MODULES = tuple(sorted({m for modules in VLLM_LORA_MODULES.values() for m in modules}))
# Fused in the checkpoint itself: one LoRA spans what other families split into several.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LORA_KEY = ".lora_"  # PEFT weight keys: <module path>.lora_A.weight / .lora_B.weight


@dataclass(frozen=True)
class BaseModules:
    """A base model's linear projections inside its decoder layers, and those vLLM serves LoRA on."""

    architecture: str
    linear: tuple[str, ...]  # leaf names, sorted
    servable: tuple[str, ...]  # the default target modules: `linear` that vLLM serves, in checkpoint order
    known: bool  # the architecture is in VLLM_LORA_MODULES (tested); else `servable` is a best guess

    def problems(self, named: Iterable[str]) -> list[str]:
        """Why `named` target modules cannot be trained on this base (empty: they can)."""
        missing = [m for m in named if m not in self.linear]
        if missing:
            return [f"target modules {missing} are not modules of this {self.architecture} base; its decoder "
                    f"layers' linear modules are {list(self.linear)}, of which vLLM serves {list(self.servable)} "
                    "(or leave target_modules: auto)"]
        unserved = [m for m in named if m not in self.servable]
        if unserved:
            return [f"target modules {unserved} cannot be served by vLLM on a {self.architecture} base; "
                    f"choose from {list(self.servable)} (or leave target_modules: auto)"]
        return []


def base_modules(base_dir: Path | str) -> BaseModules:
    """The linear projections of `base_dir`'s decoder layers, read from its config (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    architecture = (config.architectures or [type(config).__name__])[0]
    with torch.device("meta"):  # shapes only: nothing is read or allocated
        model = AutoModelForCausalLM.from_config(config)
    found: dict[str, None] = {}
    for name, module in model.named_modules():
        # Decoder layers sit in a ModuleList (`model.layers.3.self_attn.q_proj`); the LM head does not.
        if isinstance(module, torch.nn.Linear) and any(part.isdigit() for part in name.split(".")):
            found.setdefault(name.rsplit(".", 1)[-1])
    served = VLLM_LORA_MODULES.get(architecture, SERVABLE_MODULES)
    return BaseModules(architecture, tuple(sorted(found)), tuple(m for m in found if m in served),
                       architecture in VLLM_LORA_MODULES)


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


def weight_modules(safetensors_file: Path) -> dict[str, set[str]]:
    """{module leaf name: {"lora_A", "lora_B"} found for it} from a safetensors file's header alone."""
    with Path(safetensors_file).open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))  # the format: u64 header length, then a JSON header
        header = json.loads(handle.read(size))
    found: dict[str, set[str]] = {}
    for key in header:
        if LORA_KEY in key:
            module, _, rest = key.partition(LORA_KEY)
            found.setdefault(module.rsplit(".", 1)[-1], set()).add("lora_" + rest.split(".", 1)[0])
    return found


def weight_problems(config: Mapping[str, object], safetensors_file: Path) -> list[str]:
    """The config's target_modules must be exactly the modules that carry LoRA weights.

    PEFT matches target names silently: on a base without a named module it trains the others
    and still writes every name into adapter_config.json, so the adapter says it adapts what it
    does not (Llama's names on Phi-3 leave only o_proj and down_proj trained).
    """
    named = config.get("target_modules") or []
    if isinstance(named, str):
        return []  # a pattern: adapter_config_problems refuses it
    try:
        found = weight_modules(safetensors_file)
    except (OSError, ValueError, struct.error) as exc:
        return [f"cannot read the tensor names of {safetensors_file}: {exc}"]
    problems = []
    if empty := sorted(set(named) - set(found)):
        problems.append(f"adapter_config.json names target modules {empty} that carry no LoRA weights in "
                        f"{Path(safetensors_file).name} (weights for {sorted(found)}): the base has no such modules")
    if unnamed := sorted(set(found) - set(named)):
        problems.append(f"{Path(safetensors_file).name} has LoRA weights for {unnamed}, which adapter_config.json's "
                        f"target_modules {sorted(named)} does not name")
    if half := sorted(m for m, parts in found.items() if parts != {"lora_A", "lora_B"}):
        problems.append(f"modules {half} have only one of lora_A and lora_B")
    return problems
