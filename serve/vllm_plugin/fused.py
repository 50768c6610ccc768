"""One shrink and one expand per LoRA layer for small (decode) batches on vLLM's CPU build.

vLLM's CPU punica wrapper runs a layer's LoRA as a shrink and an expand per output slice (q/k/v:
3, gate/up: 2), each a separate op with fixed per-call cost: about 420 calls per decode step of
SmolLM2-135M, which is what kept adapter decode far below base speed. The slices of a layer
share their input, so their A matrices stacked are one matrix and their B matrices placed
block-diagonally are one too: `y[:, :sum(slices)] += (x @ A^T) @ B`. A batch holding several
adapters groups its rows by slot and multiplies each group by its own slot's A and B in one
batched matmul; rows without an adapter are in no group, so they get exactly zero delta.

The stacked weights (`Stacked`) are built once per adapter load, not per step: vLLM writes
adapters into its slot tensors in place, which bumps their version counters, and `stacked`
rebuilds only when those change. fp32 for the torch path here, because CPU bf16 matmuls are
slower than fp32 at these shapes (and without native bf16 much slower); vLLM's shrink multiplies
in fp32 too. The compiled kernel reads them in the model's dtype instead (`kernel.weight_dtype`).
Pure torch; nothing here imports vLLM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import torch

# Batches up to this many rows take the fused path; larger ones (prefill) keep the grouped
# per-slice ops, where the matmuls are large and the per-call cost does not matter.
MAX_ROWS = 256
# At most this many consecutive slots are multiplied at once for a mixed batch; a wider spread
# costs more in wasted products than the per-slice calls it saves.
MAX_SLOTS = 16


# How `Stacked.b` holds each slot's B^T (see Stacked).
DIAGONAL, SIDE_BY_SIDE, PAIRS = "diagonal", "side by side", "pairs"


@dataclass(frozen=True)
class Stacked:
    """A layer's adapters in the fused layout: slot s owns rows [s * block, (s + 1) * block) of `a`.

    `b` holds each slot's B^T in one of three layouts: DIAGONAL, block-diagonally, (slots * block,
    width), so that torch multiplies all slices in one matmul; SIDE_BY_SIDE, the slices side by
    side, (slots * rank, width): the compiled kernel's layout, which skips the zeros and reads each
    slot's weights as one contiguous run; PAIRS, the same with its rank rows interleaved two by two,
    (slots * ceil(rank / 2), width * 2), value (q, j) at [q // 2, 2 * j + q % 2] (an odd rank padded
    with a zero row): what the kernel's AVX-512-bf16 path multiplies, two ranks per instruction."""

    a: torch.Tensor  # (slots * block, in): each slot's slices' A matrices, stacked
    b: torch.Tensor  # B^T in `layout`
    block: int  # slices * rank
    rank: int
    width: int  # sum of the output slices
    layout: str
    versions: tuple[int, ...]  # of the vLLM tensors it was built from

    @classmethod
    def of(cls, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
           output_slices: tuple[int, ...], dtype: torch.dtype = torch.float32, layout: str = DIAGONAL) -> Stacked:
        """From vLLM's per-slice (slots, 1, rank, in) A and (slots, 1, out, rank) B tensors, in `dtype`."""
        if layout not in (DIAGONAL, SIDE_BY_SIDE, PAIRS):
            raise ValueError(f"Stacked layout {layout!r}: valid layouts are {DIAGONAL!r}, {SIDE_BY_SIDE!r}, {PAIRS!r}")
        slots, _, rank, _ = lora_a[0].shape
        block, width = rank * len(lora_a), sum(output_slices)
        diagonal = layout == DIAGONAL
        a = torch.cat([t[:, 0].float() for t in lora_a], dim=1)
        b_rows = block if diagonal else rank + rank % 2 if layout == PAIRS else rank
        b = torch.zeros(slots, b_rows, width)
        for i, (t, offset, size) in enumerate(zip(lora_b, accumulate((0, *output_slices)), output_slices)):
            columns = min(size, t.shape[2])  # vLLM's ops write the columns both have (padding differs)
            rows = slice(i * rank, (i + 1) * rank) if diagonal else slice(0, rank)
            b[:, rows, offset : offset + columns] = t[:, 0, :columns].float().transpose(1, 2)
        if layout == PAIRS:  # (slots, pairs, 2, width) -> (slots, pairs, width, 2)
            b = b.view(slots, -1, 2, width).transpose(2, 3).reshape(slots, -1, 2 * width)
        return cls(a.reshape(slots * block, -1).to(dtype), b.reshape(-1, b.shape[-1]).to(dtype), block, rank, width,
                   layout, _versions(lora_a, lora_b))


def _versions(lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in (*lora_a, *lora_b))


def stacked(cache: dict, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
            output_slices: tuple[int, ...], dtype: torch.dtype = torch.float32, layout: str = DIAGONAL) -> Stacked:
    """The layer's `Stacked` (`dtype`, layout) from `cache`, rebuilt when vLLM wrote any of its slot tensors.

    `cache` holds one entry per layer, under `id(lora_a[0])`: keep one cache per layout."""
    key = id(lora_a[0])
    entry = cache.get(key)
    if (entry is None or entry[0] is not lora_a[0] or entry[1].versions != _versions(lora_a, lora_b)
            or entry[1].layout != layout or entry[1].a.dtype != dtype):
        entry = cache[key] = (lora_a[0], Stacked.of(lora_a, lora_b, output_slices, dtype, layout))
    return entry[1]


@dataclass(frozen=True)
class Groups:
    """A batch's rows laid out by slot for batched matmuls: row `ids[i]` goes to row `flat[i]` of
    the (slots x depth) grouped rows, where slot s (relative to the plan's `first`) owns rows
    [s * depth, (s + 1) * depth); shallower groups are padded with zero rows."""

    ids: torch.Tensor
    flat: torch.Tensor
    depth: int
    every_row: bool  # ids == arange(rows): no row without an adapter


@dataclass(frozen=True)
class Plan:
    """Which slots one batch multiplies against, and how each row picks its own."""

    rows: int
    first: int  # first slot used
    slots: int  # consecutive slots from `first`; 0: no row has an adapter
    groups: Groups | None  # None: every row uses `first`


@functools.lru_cache(maxsize=256)
def plan(slots: tuple[int, ...], lengths: tuple[int, ...]) -> Plan | None:
    """The fused plan for segments of (slot, length), -1 meaning no adapter; None where the
    fused path does not fit (too many rows or too wide a spread of slots). Cached on the segment
    contents: consecutive decode steps mostly repeat a batch's make-up."""
    rows = sum(lengths)
    used = sorted({slot for slot, length in zip(slots, lengths) if slot >= 0 and length > 0})
    if not used:
        return Plan(rows, 0, 0, None)
    if rows > MAX_ROWS or used[-1] - used[0] >= MAX_SLOTS:
        return None
    first, count = used[0], used[-1] - used[0] + 1
    if count == 1 and all(slot == first for slot, length in zip(slots, lengths) if length > 0):
        return Plan(rows, first, 1, None)
    ids, slot_of, position, depth = [], [], [], [0] * count
    for slot, length, end in zip(slots, lengths, accumulate(lengths)):
        if slot >= 0:  # an empty segment may name a slot no row uses
            for row in range(end - length, end):
                ids.append(row)
                slot_of.append(slot - first)
                position.append(depth[slot - first])
                depth[slot - first] += 1
    deepest = max(depth)
    flat = [s * deepest + p for s, p in zip(slot_of, position)]
    as_tensor = functools.partial(torch.tensor, dtype=torch.long)
    return Plan(rows, first, count, Groups(as_tensor(ids), as_tensor(flat), deepest, ids == list(range(rows))))


def lora_linear(y: torch.Tensor, x: torch.Tensor, weights: Stacked, batch: Plan, scale: float) -> None:
    """y[:rows, :width] += scale * (x[:rows] @ A_slot^T) @ B_slot, per row's slot; in place."""
    if batch.slots == 0:
        return
    block, width = weights.block, weights.width
    slot_rows = slice(batch.first * block, (batch.first + batch.slots) * block)
    target = y[: batch.rows, :width]
    if batch.groups is None:  # one adapter for every row: two plain matmuls
        low = x[: batch.rows].float() @ weights.a[slot_rows].t()
        if scale != 1.0:
            low.mul_(scale)
        if target.dtype == low.dtype:
            target.addmm_(low, weights.b[slot_rows])  # no product temporary
        else:
            target.add_(low @ weights.b[slot_rows])
        return
    # Several adapters (or rows without one): each slot's rows multiply its own A and B only, as
    # one batched matmul over the slots; zero rows pad the shallower groups. Multiplying every row
    # against every slot's B and masking cost the slots' count times the products.
    g = batch.groups
    rows = x[: batch.rows] if g.every_row else x.index_select(0, g.ids)
    # index_copy_ / index_select on one flat index: cheaper per call than indexing by (slot, position).
    grouped = x.new_zeros(batch.slots * g.depth, x.shape[1], dtype=torch.float32).index_copy_(0, g.flat, rows.float())
    a = weights.a[slot_rows].view(batch.slots, block, -1).transpose(1, 2)
    low = torch.bmm(grouped.view(batch.slots, g.depth, -1), a)
    if scale != 1.0:
        low.mul_(scale)
    delta = torch.bmm(low, weights.b[slot_rows].view(batch.slots, block, width)).view(-1, width).index_select(0, g.flat)
    if g.every_row:
        target.add_(delta)
    else:
        target.index_add_(0, g.ids, delta.to(target.dtype))
