"""Per-task evaluation: greedy generation on the held-out split, scored with the task's metric.

Every evaluation can save its predictions (input, prediction, reference, per-example score) so a
user can read the errors behind a score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import Example
from .metrics import bootstrap_interval, score, score_examples


@dataclass(frozen=True)
class Evaluation:
    score: float
    predictions: list[str]
    scores: list[float]  # per example, in the order of the examples
    references: list[str]
    metric: str
    labels: list[str] | None

    def interval(self) -> tuple[float, float]:
        """Bootstrap 95 % interval of `score`; on demand: corpus metrics recompute it 200 times."""
        return bootstrap_interval(self.metric, self.predictions, self.references, labels=self.labels)

    def save(self, path: Path, examples: list[Example]) -> None:
        """One JSON row per example: where it came from, input, prediction, reference, score."""
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"where": e.where, "input": e.input, "prediction": p, "reference": e.target.strip(), "score": s}
                for e, p, s in zip(examples, self.predictions, self.scores)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def end_ids(tokenizer, template_format: str) -> list[int]:
    """Answers end with the chat end token in chat format, with EOS in plain format."""
    eos = tokenizer.eos_token_id
    if template_format == "chat":
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end is not None and im_end != tokenizer.unk_token_id:
            return [im_end] + ([eos] if eos is not None and eos != im_end else [])
    return [eos]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, end_ids: list[int], batch_size: int,
             desc: str | None = None) -> list[str]:
    """Greedy answers, batched with left padding (what a server's greedy decoding returns)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    answers = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None, dynamic_ncols=True):
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
            # One process generates; transformers would otherwise wait for the others at every token on a
            # sharded (FSDP) base, whose weights `FrozenBase.whole` has gathered for this process already.
            synced_gpus=False,
        )
        answers += decode_answers(tokenizer, out[:, width:].tolist(), end_ids)
    model.train(was_training)
    return answers


def decode_answers(tokenizer, rows: list[list[int]], end_ids: list[int]) -> list[str]:
    """Answer texts from generated token ids: cut at the first end token (every engine alike)."""
    answers = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def scored(examples: list[Example], predictions: list[str], metric: str, labels: list[str] | None) -> Evaluation:
    references = [e.target.strip() for e in examples]
    return Evaluation(score(metric, predictions, references, labels=labels), predictions,
                      score_examples(metric, predictions, references, labels=labels), references, metric, labels)


def evaluate(model, tokenizer, examples: list[Example], metric: str, labels: list[str] | None,
             max_new_tokens: int, end_ids: list[int], batch_size: int, desc: str | None = None) -> Evaluation:
    """HF `generate` on `model` (the base with its adapter applied), scored."""
    predictions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, end_ids, batch_size, desc)
    return scored(examples, predictions, metric, labels)
