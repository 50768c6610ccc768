"""Grouped LoRA shrink/expand ops for vLLM's CPU build: one dense low-rank matmul per adapter slot.

Drop-in replacements for the six functions in `vllm.lora.ops.torch_ops` (same signatures). vLLM's
versions turn the segment metadata back into one adapter index per token and gather a full copy
of the adapter weights for every token (`weights[indices]`), so their cost grows with
tokens x rank x hidden; and index -1 ("no adapter") wraps around to the last slot, so a base
request batched with adapter requests silently gets that adapter (upstream PRs #48421, #49656).

Here tokens are grouped by slot. Long runs of one slot (prefill) are matmuls on row slices that
accumulate in place (`addmm_`); short scattered runs (decode) are gathered per slot, or, for
small batches holding several adapters, multiplied against all slots at once. Rows with index
-1 get exactly zero delta: left untouched when accumulating, written as zeros when not.
Dtypes: small batches multiply in fp32. Large ones, on a CPU with native bf16, multiply in the
inputs' dtype where inputs and weights share it (bf16 x bf16 accumulates in fp32 inside the
kernel; only the rank-r product is rounded), else in the output's dtype as vLLM's ops do;
without native bf16 they multiply in fp32 too. Pure torch; nothing here imports vLLM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import torch

# Batches of at most this many rows that hold several adapters (decode steps) run as one matmul
# against all slots at once instead of a small matmul per slot: per-call overhead dominates there.
DENSE_MAX_ROWS = 256
# Runs of one slot this long on average are multiplied slice by slice; shorter ones (decode: one
# token per request) are gathered into one block per slot and scattered back with index_put_.
MIN_MEAN_SPAN = 8


@dataclass(frozen=True)
class Rows:
    """The token rows of one slot: `spans` (start, end) in order, and `index`, the same rows as
    one index tensor when the spans are too short to handle one by one (else None)."""

    spans: tuple[tuple[int, int], ...]
    index: torch.Tensor | None

    @classmethod
    def of(cls, spans: list[tuple[int, int]]) -> Rows:
        rows = sum(end - start for start, end in spans)
        if len(spans) == 1 or rows >= MIN_MEAN_SPAN * len(spans):
            return cls(tuple(spans), None)
        return cls(tuple(spans), torch.cat([torch.arange(start, end) for start, end in spans]))

    def zero(self, target: torch.Tensor) -> None:
        if self.index is not None:
            target.index_fill_(0, self.index, 0)
            return
        for start, end in self.spans:
            target[start:end] = 0


@dataclass(frozen=True)
class Grouping:
    """Which rows each adapter slot owns in one batch, and which rows have no adapter (-1)."""

    groups: tuple[tuple[int, Rows], ...]
    unadapted: Rows | None
    rows: int
    # For the all-slots path: (row, slot) of every row that has an adapter; None: per-slot path.
    dense: tuple[torch.Tensor, torch.Tensor] | None


@functools.lru_cache(maxsize=256)
def _grouping(slots: tuple[int, ...], lengths: tuple[int, ...]) -> Grouping:
    # Keyed on the segment contents, not tensor identity: vLLM refills the same metadata buffers
    # in place every step, and every layer of a step asks for the same grouping.
    ends = list(accumulate(lengths))
    runs: dict[int, list[tuple[int, int]]] = {}
    for slot, length, end in zip(slots, lengths, ends):
        if length > 0:
            runs.setdefault(slot, []).append((end - length, end))
    groups = tuple((slot, Rows.of(spans)) for slot, spans in sorted(runs.items()) if slot >= 0)
    unadapted = Rows.of(runs[-1]) if -1 in runs else None
    rows = ends[-1] if ends else 0
    dense = None
    if len(groups) > 1 and rows <= DENSE_MAX_ROWS:
        pairs = [(row, slot) for slot, spans in runs.items() if slot >= 0
                 for start, end in spans for row in range(start, end)]
        dense = tuple(torch.tensor(column, dtype=torch.long) for column in zip(*pairs))
    return Grouping(groups, unadapted, rows, dense)


def _segment_grouping(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> Grouping:
    return _grouping(tuple(lora_indices.tolist()), tuple(seq_lens.tolist()))


def _token_grouping(token_indices: torch.Tensor) -> Grouping:
    slots, lengths = torch.unique_consecutive(token_indices, return_counts=True)
    return _segment_grouping(slots, lengths)


def _operands(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, grouping: Grouping):
    """(inputs in the matmul dtype, (slots, out, in) weights not yet cast, the matmul dtype).

    Weights are cast per slot where used: casting all slots costs more than the matmul itself."""
    if weights.dim() == 4:  # (slots, 1, out, in), as the LoRA layers stack them
        weights = weights.squeeze(1)
    if grouping.rows <= DENSE_MAX_ROWS or not native_half():
        # Small (decode) batches: CPU bf16 kernels are slower than fp32 at these shapes, and the
        # casts are cheap; vLLM's shrink multiplies in fp32 too. Without native bf16 (AVX2 only)
        # every bf16 matmul is emulated and many times slower than fp32.
        dtype = torch.promote_types(torch.promote_types(inputs.dtype, weights.dtype), torch.float32)
    else:
        dtype = inputs.dtype if inputs.dtype == weights.dtype else output.dtype
    return inputs.to(dtype), weights, dtype


@functools.cache
def native_half() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512-bf16 or AMX), where large bf16
    matmuls beat fp32 ones."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _multiply_into(target: torch.Tensor, inputs: torch.Tensor, rows: Rows, weight_t: torch.Tensor,
                   add: bool, scaling: float = 1.0) -> None:
    """target[rows] (+)= scaling * inputs[rows] @ weight_t."""
    if rows.index is not None:
        product = inputs.index_select(0, rows.index) @ weight_t
        if scaling != 1.0:
            product *= scaling
        target.index_put_((rows.index,), product.to(target.dtype), accumulate=add)
        return
    for start, end in rows.spans:
        destination, source = target[start:end], inputs[start:end]
        if add and scaling == 1.0 and destination.dtype == source.dtype:
            destination.addmm_(source, weight_t)  # no product temporary: half the memory traffic
            continue
        product = source @ weight_t
        if scaling != 1.0:
            product *= scaling
        if add:
            destination += product
        else:
            destination.copy_(product)


def _shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, grouping: Grouping, scaling: float):
    inputs, weights, dtype = _operands(inputs, weights, output, grouping)
    slots, rank, width = weights.shape
    target = output[:, :rank]
    if grouping.unadapted is not None:
        grouping.unadapted.zero(target)
    if grouping.dense is not None:
        every_slot = inputs[: grouping.rows] @ weights.reshape(slots * rank, width).to(dtype).t()
        picked = every_slot.view(grouping.rows, slots, rank)[grouping.dense]
        target.index_copy_(0, grouping.dense[0], (picked * scaling if scaling != 1.0 else picked).to(target.dtype))
        return
    for slot, rows in grouping.groups:
        _multiply_into(target, inputs, rows, weights[slot].to(dtype).t(), add=False, scaling=scaling)


def _expand(inputs: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, grouping: Grouping, add_inputs: bool):
    inputs, weights, dtype = _operands(inputs, weights, target, grouping)
    slots, width, rank = weights.shape
    width = min(width, target.shape[1])  # vLLM's ops write the columns both have (padding differs)
    target = target[:, :width]
    if grouping.unadapted is not None and not add_inputs:
        grouping.unadapted.zero(target)
    if grouping.dense is not None:
        # Each row's input sits in its own slot's block, zeros elsewhere (and everywhere for
        # rows without an adapter), so one matmul against all slots' B gives each row its delta.
        spread = inputs.new_zeros(grouping.rows, slots, rank)
        spread[grouping.dense] = inputs[grouping.dense[0]]
        stacked = weights[:, :width].to(dtype).permute(0, 2, 1).reshape(slots * rank, width)
        _multiply_into(target, spread.view(grouping.rows, slots * rank), Rows(((0, grouping.rows),), None), stacked,
                       add=add_inputs)
        return
    for slot, rows in grouping.groups:
        _multiply_into(target, inputs, rows, weights[slot, :width].to(dtype).t(), add=add_inputs)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
):
    _shrink(inputs, lora_a_weights, output_tensor, _segment_grouping(lora_indices_tensor, seq_len_tensor), scaling)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
):
    _shrink(inputs, lora_b_weights, output_tensor, _token_grouping(lora_indices_tensor), scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
):
    grouping = _segment_grouping(lora_indices_tensor, seq_len_tensor)
    _expand(inputs, lora_b_weights, output_tensor, grouping, add_inputs)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
):
    _expand(inputs, lora_b_weights, output_tensor, _token_grouping(lora_indices_tensor), add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
):
    grouping = _segment_grouping(lora_indices_tensor, seq_len_tensor)
    _expand(inputs, lora_b_weights, output_tensor[:, slice_offset : slice_offset + slice_size], grouping, add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    grouping = _token_grouping(lora_indices_tensor)
    _expand(inputs, lora_b_weights, output_tensor[:, slice_offset : slice_offset + slice_size], grouping, add_inputs)
