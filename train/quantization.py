"""A 4-bit frozen base (QLoRA, `training.base_quantization`): bitsandbytes loads it, LoRA trains on top.

Only the frozen base is quantized: the LoRA weights, their gradients and optimizer state stay
float32 and its products run in `training.dtype` (bitsandbytes' compute dtype). The adapter's
modules have the unquantized base's names, so what is published is an ordinary LoRA that vLLM
serves on the full-precision base; what it costs is that it learnt to correct a 4-bit copy of it.

Everything that can make a 4-bit run fail is checked before training (`--check`): the package,
a base already quantized, and a 4-bit product in the compute dtype on this run's device, tried on
a small matrix, so an unusable backend or dtype fails with its reason instead of mid-run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from .spec import QuantizationSpec

EXTRA = "qlora"  # the pip extra that installs bitsandbytes: pip install 'mtft[qlora]'


def installed_problems() -> list[str]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"needs bitsandbytes, which is not installed: pip install 'mtft[{EXTRA}]'"]
    return []


def base_problems(quantization: QuantizationSpec, base_dir: Path, dtype: torch.dtype, device: torch.device) -> list[str]:
    """What keeps this base from training 4-bit in `dtype` on `device`."""
    where = "training.base_quantization"
    if problems := installed_problems():
        return [f"{where}: {p}" for p in problems]
    config = json.loads((base_dir / "config.json").read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        return [f"{where}: base model {base_dir} is already quantized ({method}); base_quantization quantizes a "
                "full-precision base as it loads: point base_model at the unquantized checkpoint, or remove "
                "base_quantization"]
    try:
        _try_product(quantization, dtype, device)
    except Exception as error:  # noqa: BLE001 - any failure of the backend is the answer to report
        dtype_name = str(dtype).removeprefix("torch.")
        return [f"{where}: bitsandbytes cannot run a 4-bit {quantization.type} product in {dtype_name} on "
                f"{device.type} ({type(error).__name__}: {str(error)[:200]}); set training.dtype to one it runs "
                "(float32 runs everywhere), or remove base_quantization to train on the full-precision base"]
    return []


def _try_product(quantization: QuantizationSpec, dtype: torch.dtype, device: torch.device) -> None:
    """A 4-bit Linear's forward and backward on `device`, as training runs them."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type=quantization.type,
                              compress_statistics=quantization.double_quant).to(device)
    x = torch.randn(2, 64, dtype=dtype, device=device, requires_grad=True)
    layer(x).float().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("the backward of a 4-bit product gave no finite gradient")


def load_config(quantization: QuantizationSpec, dtype: torch.dtype):
    """transformers' `quantization_config` for `from_pretrained`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.type,
                              bnb_4bit_use_double_quant=quantization.double_quant, bnb_4bit_compute_dtype=dtype)
