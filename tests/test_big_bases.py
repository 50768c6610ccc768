"""Bases too big for one device: gradient checkpointing, a 4-bit base (QLoRA) and a sharded base (FSDP).

Each must train what plain training trains (or, for the 4-bit base, publish an ordinary LoRA), or
be refused before training with what to do instead.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from mtft.train import RunOptions, load_spec, train_adapters
from mtft.train.batches import collate, tokenize
from mtft.train.data import Example
from mtft.train.frozen_base import checkpoint_activations
from mtft.train.loop import answer_loss
from mtft.train.tasklora import TaskLoRA, peft_init

from conftest import tiny_spec
from helpers import adapter_weights, run_log


def lora_gradients(base, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward and backward of four rows through rank-8 LoRA (dropout on) on the tiny base:
    (loss, the LoRA gradients, how many times the first decoder layer's MLP ran)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).requires_grad_(False)
    if checkpointing:
        checkpoint_activations(model)
    torch.manual_seed(0)
    init, model = peft_init(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = TaskLoRA(model, ["t"], init, rank=8, alpha=16, dropout=0.3, shared=False)
    with torch.no_grad():  # PEFT starts B at zero, where A gets no gradient: give B some weight
        for p in layers.parameters("t"):
            p.add_(0.05 * torch.randn_like(p))
    examples = [Example(input=str(i), prompt=f"Q: what is {i} + {i}?", target=f" {2 * i}", where=f"x:{i}")
                for i in range(4)]
    items, _ = tokenize(examples, tokenizer, tokenizer.eos_token_id, 64)
    batch = collate(items, tokenizer.eos_token_id)
    calls = []
    # A pre-hook: the recompute stops as soon as it has every tensor backward needs (torch's early
    # stop), before a forward hook at the module's end would run.
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    torch.manual_seed(1)
    with layers.rows([("t", 4)]):
        loss = answer_loss(model, batch).sum()
        loss.backward()
    names = [f"{name}.{i}" for name in layers.layers for i in "AB"]
    grads = [g for layer in layers.layers.values() for g in (layer.lora_A[0].grad, layer.lora_B[0].grad)]
    return loss.item(), dict(zip(names, grads)), len(calls)


def test_gradient_checkpointing_recomputes_the_base_and_gives_the_same_lora_gradients(tiny_base):
    loss, grads, runs = lora_gradients(tiny_base, checkpointing=False)
    loss_ckpt, grads_ckpt, runs_ckpt = lora_gradients(tiny_base, checkpointing=True)
    assert (runs, runs_ckpt) == (1, 2), "checkpointing did not recompute the layer in backward"
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads_ckpt.values())
    # The recompute replays the layer's RNG state: dropout draws the same masks, so the gradients agree.
    assert max((grads[k] - grads_ckpt[k]).abs().max() for k in grads) < 1e-6
    assert min(g.abs().max() for g in grads.values()) > 1e-4, "some LoRA weight got no gradient"


@pytest.mark.slow
def test_a_run_with_gradient_checkpointing_publishes_the_adapter_a_run_without_does(tmp_path, tiny_base):
    published = {}
    for checkpointing in (False, True):
        folder = tmp_path / str(checkpointing)
        folder.mkdir()
        path = tiny_spec(folder, tiny_base, max_steps=4, eval_every=None, gradient_checkpointing=checkpointing)
        raw = yaml.safe_load(path.read_text())
        raw["lora"]["dropout"] = 0.1  # the recompute must draw the dropout masks the forward drew
        path.write_text(yaml.safe_dump(raw))
        options = RunOptions(output=folder / "run", registry=folder / "reg", tasks=["echo"])
        train_adapters(load_spec(path), options)
        published[checkpointing] = (adapter_weights(options.registry, "echo"),
                                    [r["loss"] for r in run_log(options.output) if "loss" in r])
    (plain, plain_losses), (checkpointed, checkpointed_losses) = published[False], published[True]
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-6)
    assert max((plain[k] - checkpointed[k]).abs().max() for k in plain) < 1e-5
    assert max(w.abs().max() for k, w in plain.items() if "lora_B" in k) > 1e-3, "never trained"
