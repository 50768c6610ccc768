"""Grouped LoRA shrink/expand ops for vLLM's CPU build: one dense low-rank matmul per adapter slot.

Drop-in replacements for the six functions in `vllm.lora.ops.torch_ops` (same signatures). vLLM's
versions turn the segment metadata back into one adapter index per token and gather a full copy
of the adapter weights for every token (`weights[indices]`), so their cost grows with
tokens x rank x hidden; and index -1 ("no adapter") wraps around to the last slot, so a base
request batched with adapter requests silently gets that adapter (upstream PRs #48421, #49656).

Here tokens are grouped by slot: contiguous runs are sliced, scattered rows gathered once; each
group does `x[rows] @ W[slot].T`; rows with index -1 get exactly zero delta (left untouched when
accumulating, written as zeros when not). Dtype handling follows vLLM's ops: inputs and weights
are cast to the output's dtype before the matmul. Pure torch; nothing here imports vLLM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import torch

# Batches of at most this many rows that hold several adapters (decode steps) run as one matmul
# against all slots at once instead of a small matmul per slot: per-call overhead dominates there.
DENSE_MAX_ROWS = 256
# Scattered rows are written back span by span when spans are this long on average (cheap slice
# adds); shorter spans (decode: one token per request) go through one index_put_.
MIN_MEAN_SPAN = 8


@dataclass(frozen=True)
class Rows:
    """A set of token rows: `index` gathers them in order; `spans` (start, end, offset into the
    gathered block) write them back as slices, or None to write them back through `index`."""

    index: slice | torch.Tensor
    spans: tuple[tuple[int, int, int], ...] | None

    @classmethod
    def of(cls, spans: list[tuple[int, int]]) -> Rows:
        if len(spans) == 1:
            return cls(slice(*spans[0]), None)
        index = torch.cat([torch.arange(start, end) for start, end in spans])
        if len(index) < MIN_MEAN_SPAN * len(spans):
            return cls(index, None)
        offsets = accumulate((end - start for start, end in spans), initial=0)
        return cls(index, tuple((start, end, at) for (start, end), at in zip(spans, offsets)))

    def gather(self, source: torch.Tensor) -> torch.Tensor:
        if isinstance(self.index, slice):
            return source[self.index]
        return source.index_select(0, self.index)

    def write(self, target: torch.Tensor, block: torch.Tensor, add: bool) -> None:
        if isinstance(self.index, slice):
            pieces = [(target[self.index], block)]
        elif self.spans is not None:
            pieces = [(target[start:end], block[at : at + end - start]) for start, end, at in self.spans]
        else:
            target.index_put_((self.index,), block, accumulate=add)
            return
        for destination, source in pieces:
            if add:
                destination += source
            else:
                destination.copy_(source)

    def zero(self, target: torch.Tensor) -> None:
        if isinstance(self.index, slice):
            target[self.index] = 0
        else:
            target.index_fill_(0, self.index, 0)


@dataclass(frozen=True)
class Plan:
    """Which rows each adapter slot owns in one batch, and which rows have no adapter (-1)."""

    groups: tuple[tuple[int, Rows], ...]
    unadapted: Rows | None
    rows: int
    # For the all-slots path: (row, slot) of every row that has an adapter; None: per-slot path.
    dense: tuple[torch.Tensor, torch.Tensor] | None


@functools.lru_cache(maxsize=256)
def _plan(slots: tuple[int, ...], lengths: tuple[int, ...]) -> Plan:
    # Keyed on the segment contents, not tensor identity: vLLM refills the same metadata buffers
    # in place every step, and every layer of a step asks for the same plan.
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
    return Plan(groups, unadapted, rows, dense)


def _segment_plan(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> Plan:
    return _plan(tuple(lora_indices.tolist()), tuple(seq_lens.tolist()))


def _token_plan(token_indices: torch.Tensor) -> Plan:
    slots, lengths = torch.unique_consecutive(token_indices, return_counts=True)
    return _segment_plan(slots, lengths)


def _slot_weights(weights: torch.Tensor) -> torch.Tensor:
    """(slots, 1, out, in) or (slots, out, in) -> (slots, out, in), as vLLM's ops accept both."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, plan: Plan, scaling: float):
    weights = _slot_weights(weights)
    inputs = inputs.to(output.dtype)
    target = output[:, : weights.shape[1]]
    if plan.dense is not None:
        slots, rank, width = weights.shape
        every_slot = inputs[: plan.rows] @ weights.reshape(slots * rank, width).to(output.dtype).t()
        picked = every_slot.view(plan.rows, slots, rank)[plan.dense]
        if plan.unadapted is not None:
            plan.unadapted.zero(target)
        target.index_copy_(0, plan.dense[0], picked * scaling if scaling != 1.0 else picked)
        return
    for slot, rows in plan.groups:
        product = rows.gather(inputs) @ weights[slot].to(output.dtype).t()
        rows.write(target, product * scaling if scaling != 1.0 else product, add=False)
    if plan.unadapted is not None:
        plan.unadapted.zero(target)


def _expand(inputs: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, plan: Plan, add_inputs: bool):
    weights = _slot_weights(weights)
    inputs = inputs.to(target.dtype)
    width = min(weights.shape[1], target.shape[1])
    target = target[:, :width]
    if plan.dense is not None:
        slots, _, rank = weights.shape
        # Each row's input sits in its own slot's block, zeros elsewhere (and everywhere for
        # rows without an adapter), so one matmul against all slots' B gives each row its delta.
        spread = inputs.new_zeros(plan.rows, slots, rank)
        spread[plan.dense] = inputs[plan.dense[0]]
        stacked = weights[:, :width].permute(0, 2, 1).reshape(slots * rank, width).to(target.dtype)
        product = spread.view(plan.rows, slots * rank) @ stacked
        rows = slice(0, plan.rows)
        if add_inputs:
            target[rows] += product
        else:
            target[rows] = product
        return
    for slot, rows in plan.groups:
        rows.write(target, rows.gather(inputs) @ weights[slot, :width].to(target.dtype).t(), add=add_inputs)
    if plan.unadapted is not None and not add_inputs:
        plan.unadapted.zero(target)


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
    _shrink(inputs, lora_a_weights, output_tensor, _segment_plan(lora_indices_tensor, seq_len_tensor), scaling)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
):
    _shrink(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), scaling)


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
    plan = _segment_plan(lora_indices_tensor, seq_len_tensor)
    _expand(inputs, lora_b_weights, output_tensor, plan, add_inputs)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
):
    _expand(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), add_inputs)


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
    plan = _segment_plan(lora_indices_tensor, seq_len_tensor)
    _expand(inputs, lora_b_weights, output_tensor[:, slice_offset : slice_offset + slice_size], plan, add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    plan = _token_plan(lora_indices_tensor)
    _expand(inputs, lora_b_weights, output_tensor[:, slice_offset : slice_offset + slice_size], plan, add_inputs)
