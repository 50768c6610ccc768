"""Per-task evaluation: greedy generation on the held-out split, scored with the task's metric."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example
from .metrics import score


@dataclass(frozen=True)
class Evaluation:
    score: float
    predictions: list[str]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, end_ids: list[int], batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding (what a server's greedy decoding returns)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p).input_ids for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_ids,
            pad_token_id=pad_id,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def evaluate(model, tokenizer, examples: list[Example], metric: str, labels: list[str] | None,
             max_new_tokens: int, end_ids: list[int], batch_size: int) -> Evaluation:
    predictions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, end_ids, batch_size)
    value = score(metric, predictions, [e.target.strip() for e in examples], labels=labels)
    return Evaluation(value, predictions)
