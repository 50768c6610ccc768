"""The run's frozen base model: loaded once (4-bit where the spec asks, sharded under FSDP), and the
one owner of its `nn.Module`.

Training puts task LoRA layers into it (`task_layers`), the publish gate a published adapter
(`adapter`); each is a `with` block that hands the base back bare on leaving, so a recipe
reads top to bottom and nothing else ever swaps the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mtft.registry import BaseModelRef, fingerprint

from .check import Checked
from .hardware import choose_attention, choose_dtype
from .quantization import load_config
from .spec import Spec
from .tasklora import TaskLoRA, peft_init

log = logging.getLogger(__name__)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (in train mode; evaluation is untouched).

    Non-reentrant checkpointing: it backpropagates into the LoRA weights inside a layer although
    the layer's input (from the frozen embedding) needs no gradient, so the input-grad hook the
    reentrant variant needs (`enable_input_require_grads`) is not used; it also replays the
    layer's RNG state, so dropout draws the same masks in the recompute.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class FrozenBase:
    """The base model in the run's dtype and attention on its device, its registry reference and the
    spec's LoRA config; the initial LoRA every training starts from."""

    def __init__(self, spec: Spec, checked: Checked, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.spec, self.target_modules = spec, list(checked.target_modules)
        self.ref = BaseModelRef(name=spec.base_model, path=str(checked.base_dir),
                                fingerprint=fingerprint(checked.base_dir))
        self.dtype, reason = choose_dtype(spec.training.dtype, device)
        log.info("base model in %s: %s", str(self.dtype).removeprefix("torch."), reason)
        self.attention, reason = choose_attention(spec.training.attention, device)
        log.info("attention: %s (%s)", self.attention, reason)
        torch.manual_seed(spec.training.seed)
        quantization = spec.training.base_quantization
        if quantization is None:
            self.model = AutoModelForCausalLM.from_pretrained(checked.base_dir, dtype=self.dtype,
                                                              attn_implementation=self.attention)
            self.model.to(device)
        else:  # bitsandbytes quantizes as it loads, on the device (a 4-bit model cannot be moved after)
            log.info("base model loaded %d-bit %s by bitsandbytes (training.base_quantization)",
                     quantization.bits, quantization.type)
            self.model = AutoModelForCausalLM.from_pretrained(
                checked.base_dir, dtype=self.dtype, attn_implementation=self.attention, device_map={"": device},
                quantization_config=load_config(quantization, self.dtype))
        self.model.requires_grad_(False)
        if spec.training.gradient_checkpointing:
            checkpoint_activations(self.model)
        self._initial: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None  # see initial_lora
        self._shards: list | None = None  # the FSDP units of a sharded base (`shard`)
        self._reshard = True

    def shard(self, accelerator) -> None:
        """Shard the base over the launch's processes with accelerate's FSDP2 (its plugin's wrap policy,
        resharding and offload): each holds 1/N of every decoder layer and gathers a layer's weights
        while it computes. The LoRA layers go in afterwards, so FSDP never sees them: they stay whole
        on every process and their gradients are summed as without sharding (`processes.py`)."""
        from accelerate.utils import fsdp2_prepare_model
        from torch.distributed.fsdp import FSDPModule

        self.initial_lora()  # PEFT draws it on the whole base, before any weight is a shard
        self.model = fsdp2_prepare_model(accelerator, self.model)
        self._shards = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        self._reshard = accelerator.state.fsdp_plugin.reshard_after_forward
        log.info("base model sharded over %d processes (FSDP2, %d units)", accelerator.num_processes, len(self._shards))

    @contextmanager
    def whole(self) -> Iterator[None]:
        """Inside, every process holds the whole base and the main one may run forwards alone
        (evaluation, the publish gate); every process must enter together. A no-op unsharded."""
        if self._shards is None:
            yield
            return
        for unit in self._shards:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            # The root keeps its weights gathered between forwards, as accelerate set it up.
            for unit in self._shards:
                if unit is not self.model:
                    unit.set_reshard_after_forward(self._reshard, recurse=False)
                unit.reshard()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def lora_config(self):
        from peft import LoraConfig

        lora = self.spec.lora
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")

    def initial_lora(self) -> dict[str, torch.Tensor]:
        """PEFT's initial LoRA for the spec, drawn from the seed, with torch's RNG left where drawing
        it leaves it: every training starts from the same LoRA and RNG state however many tasks ran
        before. Drawn once per run (wrapping the base in PEFT is the slow part); later calls only
        restore the RNG state."""
        if self._initial is None:
            torch.manual_seed(self.spec.training.seed)
            init, self.model = peft_init(self.model, self.lora_config())
            self._initial = init, torch.get_rng_state()
        torch.set_rng_state(self._initial[1])
        return self._initial[0]

    @contextmanager
    def task_layers(self, tasks: list[str], shared: bool = False) -> Iterator[TaskLoRA]:
        """`tasks`' LoRA layers in the base, each starting from the initial LoRA: one per task, or
        one shared by all (`multitask.task_embedding`). The base is bare again after the block."""
        lora, embedding = self.spec.lora, self.spec.multitask.task_embedding
        conditioning = dict(up_projections=embedding.up_projections, tau=embedding.mix_temperature) if shared else {}
        layers = TaskLoRA(self.model, tasks, self.initial_lora(), lora.rank, lora.alpha, lora.dropout, shared=shared,
                          **conditioning)
        try:
            yield layers
        finally:
            self.model = layers.remove()

    @contextmanager
    def adapter(self, folder: Path) -> Iterator[torch.nn.Module]:
        """The base with the PEFT adapter in `folder` applied, in eval mode; bare again after the block."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.model, folder)
        try:
            yield model.eval()
        finally:
            self.model = model.unload()
