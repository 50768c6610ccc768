"""Tokenized examples and the deterministic order they are batched in.

The order is a pure function of (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example

IGNORE = -100  # label value that cross-entropy skips: prompt tokens carry no loss
GROUP_SPAN = 64  # batches per length-sorted group: long enough to cut padding, short enough to mix


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize(examples: list[Example], tokenizer, end_id: int, max_length: int) -> tuple[list[Tokenized], int]:
    """Prompt tokens are masked; the answer ends with `end_id` so the model learns to stop.

    The prompt is tokenized alone, exactly as a server tokenizes it at inference.
    Over-long examples lose the start of their prompt, never their answer.
    Returns the tokenized examples and how many were truncated.
    """
    out, truncated = [], 0
    for example in examples:
        prompt = tokenizer(example.prompt).input_ids
        answer = tokenizer(example.target, add_special_tokens=False).input_ids + [end_id]
        answer = answer[:max_length]
        room = max_length - len(answer)
        if len(prompt) > room:
            truncated += 1
            prompt = prompt[len(prompt) - room :] if room > 0 else []
        out.append(Tokenized(prompt + answer, [IGNORE] * len(prompt) + answer))
    return out, truncated


def epoch_batches(items: list[Tokenized], batch_size: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """Indices of each batch of one epoch, in order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(items), generator=generator).tolist()
    if by_length:
        span = batch_size * GROUP_SPAN
        order = [
            i
            for start in range(0, len(order), span)
            for i in sorted(order[start : start + span], key=lambda j: len(items[j].input_ids))
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if by_length:
        # Sorted groups would otherwise run short-to-long; shuffle whole batches.
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def micro_batches(items: list[Tokenized], batch_size: int, seed: int, by_length: bool):
    """Endless stream of (epoch, batch indices), epoch after epoch."""
    epoch = 0
    while True:
        for batch in epoch_batches(items, batch_size, seed, epoch, by_length):
            yield epoch, batch
        epoch += 1


class BatchStream:
    """One task's micro-batches, epoch after epoch; its whole state is how many it handed out."""

    def __init__(self, items: list[Tokenized], batch_size: int, seed: int, by_length: bool):
        self._args = (items, batch_size, seed, by_length)
        self.load_state_dict({"taken": 0})

    def next(self) -> tuple[int, list[int]]:
        """(epoch, example indices) of the next micro-batch."""
        self.taken += 1
        return next(self._stream)

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        """Replay the stream up to where it was: resuming skips exactly the batches already trained on."""
        self._stream, self.taken = micro_batches(*self._args), 0
        for _ in range(state["taken"]):
            self.next()


def collate(items: list[Tokenized], pad_id: int, rows: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a forward: one example per row, or (`rows`: example indices per row) packed.

    `example` says which item each token belongs to (-1: padding), so losses can be summed per
    example however they are laid out. Packed rows carry `position_ids` that restart at every
    example, from which transformers builds a block-diagonal causal mask: no example attends to
    another, and each token sees the positions it would see alone.
    """
    packed = rows is not None
    rows = rows if packed else [[i] for i in range(len(items))]
    width = max(sum(len(items[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    ids, labels = torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE, dtype=torch.long)
    example, mask = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(items[i].input_ids)
            ids[r, at:at + n] = torch.tensor(items[i].input_ids)
            labels[r, at:at + n] = torch.tensor(items[i].labels)
            labels[r, at] = IGNORE  # never a target: the token before it belongs to another example
            example[r, at:at + n] = i
            positions[r, at:at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "example": example}
    return batch | ({"position_ids": positions} if packed else {})


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens, first fit by decreasing length."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


Row = tuple[str, int]  # (task, example index)
PADDING_SLACK = 1.25  # a forward's padded tokens may exceed its real tokens by this factor


def forwards(rows: list[Row], items: dict[str, list[Tokenized]], tasks: list[str], min_rows: int) -> list[list[Row]]:
    """Split a micro-batch into forwards of similar length, each with its rows grouped by task.

    Tasks differ in length (a chat task's prompts can be twice a label task's), and padding every
    row of a mixed batch to the longest would waste more compute than batching saves. Loss
    normalisers cover the whole step, so how rows are split into forwards changes nothing else.
    """
    length = {row: len(items[row[0]][row[1]].input_ids) for row in rows}
    chunks, current, tokens = [], [], 0
    for row in sorted(rows, key=length.__getitem__):
        if len(current) >= min_rows and (len(current) + 1) * length[row] > PADDING_SLACK * (tokens + length[row]):
            chunks.append(current)
            current, tokens = [], 0
        current.append(row)
        tokens += length[row]
    chunks.append(current)
    return [sorted(chunk, key=lambda row: tasks.index(row[0])) for chunk in chunks]


def runs(rows: list[Row]) -> list[tuple[str, int]]:
    """[(task, consecutive rows)]: the rows grouped by task, in order."""
    out: list[tuple[str, int]] = []
    for task, _ in rows:
        if out and out[-1][0] == task:
            out[-1] = (task, out[-1][1] + 1)
        else:
            out.append((task, 1))
    return out
