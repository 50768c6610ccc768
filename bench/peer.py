"""The plain HF+PEFT training loop everyone writes first: the peer mtft's training speed is measured
against, on CPU (bench/train_speed.py, real data) and on a GPU (bench/gpu_check.py, synthetic).

One copy, so both benchmarks measure the same loop: PEFT's LoRA on the base, AdamW over the
adapter, batches padded to their longest row, `model(labels=...)` computing logits over the whole
vocabulary at every position, the loss read every step.
"""

from __future__ import annotations


def wrap(model, lora_config, learning_rate: float):
    """(PEFT model, its AdamW optimizer) for `model`."""
    import torch
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    return peft_model, torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=learning_rate)


def step(model, optimizer, rows: list[tuple[list[int], list[int]]], pad: int, device=None) -> int:
    """One optimizer step on `rows` (input ids, labels with -100 where no loss); the real (non-pad) tokens."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device)
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss.item()
    return int(mask.sum())
