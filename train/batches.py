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


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
