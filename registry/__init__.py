"""The adapter-registry contract: the only module train, serve and router share.

An adapter is PEFT files plus an `mtft.json` record; `train` publishes,
`serve` loads them into vLLM, `router` reads the task -> adapter table and
renders prompts with the record's template.
"""

from .check import confinement_problems, servable_problems
from .record import ADAPTER_FILES, RECORD_FILE, TASK_NAME, AdapterRecord, BaseModelRef, checksum, fingerprint
from .routing_profile import ROUTING_FILE, ProfileError, RoutingProfile, read_profile
from .servable import (
    FUSED_MODULES,
    SERVABLE_MODULES,
    SERVABLE_RANKS,
    VLLM_LORA_MODULES,
    BaseModules,
    adapter_config_problems,
    base_modules,
    module_problems,
    rank_problems,
    weight_problems,
)
from .store import Registry, RegistryError
from .template import PromptTemplate, render_input, render_prompt, render_target, template_fields

__all__ = [
    "ADAPTER_FILES",
    "FUSED_MODULES",
    "RECORD_FILE",
    "ROUTING_FILE",
    "SERVABLE_MODULES",
    "SERVABLE_RANKS",
    "TASK_NAME",
    "VLLM_LORA_MODULES",
    "AdapterRecord",
    "BaseModules",
    "BaseModelRef",
    "ProfileError",
    "PromptTemplate",
    "Registry",
    "RegistryError",
    "RoutingProfile",
    "adapter_config_problems",
    "base_modules",
    "checksum",
    "confinement_problems",
    "fingerprint",
    "module_problems",
    "rank_problems",
    "read_profile",
    "render_input",
    "render_prompt",
    "render_target",
    "servable_problems",
    "template_fields",
    "weight_problems",
]
