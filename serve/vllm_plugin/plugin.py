"""Swap vLLM's CPU LoRA ops for mtft's grouped ones, and its linear-layer LoRA entry point for
the compiled kernel (or the fused torch path where the kernel is not built), in the process that
calls this.

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

import torch

from . import fused, kernel, lora_ops

# vLLM attaches its handler to the `vllm` logger only; a child of it puts our one line into every
# vLLM process's log, formatted like vLLM's own.
logger = logging.getLogger(f"vllm.plugins.{__name__}")

ENTRY_POINT = "mtft_cpu_lora"  # its name in pyproject.toml's vllm.general_plugins
ENV = "MTFT_VLLM_CPU_LORA_OPS"
# kernel: the fused layout multiplied by the compiled kernel (lora_kernel.cpp) for small batches;
# fused: the same layout in torch, one shrink and one expand per layer (fused.py), where the kernel
# is not built; grouped: the grouped ops alone (`lora_ops`), for every batch. Each hands the
# batches it does not take to the next, and all compare side by side in `make bench`.
KERNEL, FUSED, GROUPED, OFF = "kernel", "fused", "grouped", "off"
ENV_VALUES = {"1": KERNEL, "on": KERNEL, "true": KERNEL, "kernel": KERNEL, "fused": FUSED, "grouped": GROUPED,
              "0": OFF, "off": OFF, "false": OFF}
CPU_DISTRIBUTION = "vllm-cpu"
TESTED_VERSIONS = frozenset({"0.32.0"})
OPS = ("bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "sgmv_expand", "sgmv_expand_slice", "sgmv_shrink")
# punica_cpu binds the ops at import (`from vllm.lora.ops.torch_ops import ...`): patching only
# the defining module would leave its names pointing at vLLM's functions.
MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
ENTRY = "add_lora_linear"  # PunicaWrapperCPU's method every LoRA linear layer calls
LOGITS = "add_lora_logits"  # and the one vLLM's LoRA wrapper of the LM head calls every step
EMBEDDING = "add_lora_embedding"  # and the one its LoRA wrapper of the token embedding calls every step
SKIPPED = (LOGITS, EMBEDDING)  # skipped while no slot holds weights for them (_any_slot_written)

DESCRIPTIONS = {KERNEL: ", one compiled shrink and expand per layer for small batches",
                FUSED: ", one fused shrink and expand per layer for small batches", GROUPED: ""}

_vllm_ops: dict[str, Callable] = {}


def mode_by_env() -> str:
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
    """vLLM's own op functions and `PunicaWrapperCPU.add_lora_linear` / `add_lora_logits`, whether
    or not they are patched now."""
    module = importlib.import_module(MODULES[0])
    ops = {name: _vllm_ops.get(name, getattr(module, name)) for name in OPS}
    wrapper = _wrapper_class()
    return {**ops, **{name: _vllm_ops.get(name) or wrapper.__dict__[name] for name in (ENTRY, *SKIPPED)}}


def _wrapper_class() -> type:
    wrapper = importlib.import_module(MODULES[-1]).PunicaWrapperCPU
    for name in (ENTRY, *SKIPPED):
        _vllm_ops.setdefault(name, wrapper.__dict__[name])
    return wrapper


def _step_plan(wrapper) -> fused.Plan | None:
    """The batch's fused plan, worked out once per step by its first LoRA layer: the same for all
    of the step's layers (about 120 calls per decode step of SmolLM2-135M).

    vLLM's `update_metadata` writes the per-token slots into the same tensor in place (`copy_`)
    whenever the batch changes, which bumps its version; the version and the tensor's identity
    therefore name the batch. The prefill segments are `unique_consecutive` of the same indices."""
    def work_out() -> fused.Plan | None:
        slots, lengths = torch.unique_consecutive(wrapper.token_lora_indices, return_counts=True)
        return fused.plan(tuple(slots.tolist()), tuple(lengths.tolist()))

    return _per_version(wrapper, "_mtft_plan", wrapper._token_lora_indices, work_out)


def _per_version(owner, attribute: str, tensor: torch.Tensor, compute: Callable):
    """`compute()`, kept on `owner` until `tensor` is replaced or written in place (its version)."""
    cached = owner.__dict__.get(attribute)
    if cached is None or cached[0] is not tensor or cached[1] != tensor._version:
        cached = (tensor, tensor._version, compute())
        setattr(owner, attribute, cached)
    return cached[2]


def fused_add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                          lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                          *, buffer: tuple[torch.Tensor, ...] | None = None, **kwargs) -> None:
    """`PunicaWrapperCPU.add_lora_linear` (same signature), fused where the batch is small."""
    batch = _step_plan(self)
    if batch is None or kwargs.get("add_inputs", True) is not True:
        _vllm_ops[ENTRY](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        return
    # One cache per wrapper (one per model): the layers' slot tensors live as long as it does.
    cache = self.__dict__.setdefault("_mtft_stacked", {})
    weights = fused.stacked(cache, lora_a_stacked, lora_b_stacked, output_slices)
    fused.lora_linear(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), weights, batch, scale)


def kernel_add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                           lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                           *, buffer: tuple[torch.Tensor, ...] | None = None, **kwargs) -> None:
    """`PunicaWrapperCPU.add_lora_linear` (same signature): the compiled kernel where it takes the
    batch, else the torch fused path (which hands large batches on to the grouped ops).

    A decode step calls this about 120 times, so every microsecond of Python here is about a tenth
    of a millisecond per step: it reads the wrapper's slot buffer whole (the kernel reads its first
    `rows` entries) and views or slices only where vLLM's tensors need it."""
    batch = _step_plan(self)  # worked out once per step
    if batch is not None and batch.slots == 0:
        return  # no row has an adapter (base traffic): not even the stacked weights' lookup
    rows = self.indices_len[0]  # tokens in the batch: token_lora_indices without slicing it
    y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    dtype = kernel.weight_dtype(lora_a_stacked[0], x2)
    layout = kernel.layout(dtype)
    # Where the kernel multiplies bf16 natively (PAIRS) it takes every batch: its panels read each
    # weight once per few rows, as a matmul does, and a prefill that mixes adapters is one call
    # instead of one per slot and slice. Elsewhere only up to MAX_ROWS rows (decode steps, short
    # prefills), where it is faster than the torch path or even with it; longer prefills keep the
    # grouped ops' big matmuls (bench/lora_layer.py, bench/lora_throughput.py).
    if ((rows > fused.MAX_ROWS and layout != fused.PAIRS) or (kwargs and kwargs.get("add_inputs", True) is not True)
            or x2.dtype != y2.dtype or x2.shape[0] < rows or y2.stride(-1) != 1 or x2.stride(-1) != 1):
        fused_add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer,
                              **kwargs)
        return
    # The kernel's own copies (its layout, the model's dtype), beside the torch path's.
    cache = self.__dict__.setdefault("_mtft_kernel", {})
    weights = fused.stacked(cache, lora_a_stacked, lora_b_stacked, output_slices, dtype, layout)
    if x2.shape[0] != rows:
        x2, y2 = x2[:rows], y2[:rows]
    kernel.lora_linear(y2, x2, weights, self._token_lora_indices, output_slices, scale)


def skipping_add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                             lora_b_stacked: torch.Tensor, scale, **kwargs):
    """`PunicaWrapperCPU.add_lora_logits`, skipped while no slot holds LM-head weights.

    vLLM wraps the LM head for LoRA whatever the adapters train, and its shrink and expand over
    the vocabulary-wide logits are a large share of a small model's decode step, for a delta of
    exactly zero when no adapter has `lm_head` weights (vLLM then zeroes its slot)."""
    if _any_slot_written(self, "_mtft_head", lora_b_stacked):
        return _vllm_ops[LOGITS](self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)
    return y


def skipping_add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                                add_inputs: bool = True, **kwargs):
    """`PunicaWrapperCPU.add_lora_embedding`, skipped while no slot holds embedding weights: vLLM
    wraps the token embedding for LoRA too and expands every token's rank-r row each step, for a
    delta of exactly zero when no adapter trains `embed_tokens` (vLLM zeroes the slot it loads into)."""
    if _any_slot_written(self, "_mtft_embedding", lora_b_stacked):
        return _vllm_ops[EMBEDDING](self, y, x, lora_b_stacked, add_inputs, **kwargs)
    return None


def _any_slot_written(wrapper, attribute: str, lora_b_stacked: torch.Tensor) -> bool:
    """Whether any slot of `lora_b_stacked` is nonzero, looked up once per write of it (its version), not per step."""
    return _per_version(wrapper, attribute, lora_b_stacked, lambda: bool(lora_b_stacked.any()))


LINEAR = {KERNEL: kernel_add_lora_linear, FUSED: fused_add_lora_linear}


def patch(mode: str = KERNEL) -> None:
    """Point every name the CPU punica wrapper reaches the ops through at the grouped ops, and with
    `mode` kernel or fused its `add_lora_linear` at that path and its `add_lora_logits` and
    `add_lora_embedding` at the skipping ones. Raises `kernel.KernelError` (changing nothing) for
    kernel where it is not built."""
    if mode not in (KERNEL, FUSED, GROUPED):
        raise ValueError(f"patch(mode={mode!r}): valid modes are {KERNEL!r}, {FUSED!r} and {GROUPED!r}; "
                         "restore() is off")
    if mode == KERNEL:
        kernel.load()
    originals = vllm_ops()
    _vllm_ops.update(originals)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in OPS:
            setattr(module, name, getattr(lora_ops, name))
    wrapper = _wrapper_class()
    setattr(wrapper, ENTRY, LINEAR.get(mode, _vllm_ops[ENTRY]))
    for name, skipping in ((LOGITS, skipping_add_lora_logits), (EMBEDDING, skipping_add_lora_embedding)):
        setattr(wrapper, name, skipping if mode in LINEAR else _vllm_ops[name])


def restore() -> None:
    """Put vLLM's own ops back (benchmarks switch back and forth inside one engine)."""
    originals = vllm_ops()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in OPS:
            setattr(module, name, originals[name])
    wrapper = _wrapper_class()
    for name in (ENTRY, *SKIPPED):
        setattr(wrapper, name, _vllm_ops[name])


def is_patched() -> bool:
    module = importlib.import_module(MODULES[-1])
    return all(getattr(module, name) is getattr(lora_ops, name) for name in OPS)


def active_mode() -> str:
    """kernel, fused, grouped or off: what this process runs now."""
    if not is_patched():
        return OFF
    entry = _wrapper_class().__dict__[ENTRY]
    return next((mode for mode, linear in LINEAR.items() if entry is linear), GROUPED)


def applies() -> bool:
    """Whether `register` patches in a vLLM process started with this environment: serving code
    can ask this (without importing vLLM's LoRA modules) before dropping the workarounds for the
    base-request mixing bug."""
    # vLLM loads only the plugins VLLM_PLUGINS names, when it is set (comma-separated).
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and ENTRY_POINT not in allowed.split(","):
        return False
    return mode_by_env() != OFF and cpu_build_version() in TESTED_VERSIONS


def prepare() -> str:
    """Build the compiled kernel before vLLM starts, where the plugin will run it (vLLM's processes
    only load a build, never compile); what was done, for the log. Never raises for a failed build:
    the plugin then runs the torch fused path and says so."""
    if not applies() or mode_by_env() != KERNEL:
        return "no compiled LoRA kernel needed (plugin off, not vLLM's CPU build, or another mode)"
    try:
        return f"compiled LoRA kernel ready: {kernel.build()}"
    except kernel.KernelError as error:
        return f"compiled LoRA kernel unavailable, vLLM will use the torch fused path: {error}"


def register() -> None:
    """The vLLM general plugin entry point: patch when the build and version allow it."""
    mode = mode_by_env()
    if mode == OFF:
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
    fallback = ""
    try:
        patch(mode)
    except kernel.KernelError as error:  # kernel mode without a loadable build: patch changed nothing
        mode, fallback = FUSED, f"; the compiled kernel is not in use: {error}"
        patch(mode)
    # A missing kernel is worth a warning: serving works, but decode with adapters is slower.
    logger.log(
        logging.WARNING if fallback else logging.INFO,
        "mtft CPU LoRA ops active (%s %s, pid %d, %s): grouped shrink/expand%s, no-adapter tokens get "
        "zero delta; %s=0 turns them off%s", CPU_DISTRIBUTION, version, os.getpid(), mode, DESCRIPTIONS[mode],
        ENV, fallback,
    )
