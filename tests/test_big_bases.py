"""Bases too big for one device: gradient checkpointing, a 4-bit base (QLoRA) and a sharded base (FSDP).

Each must train what plain training trains (or, for the 4-bit base, publish an ordinary LoRA), or
be refused before training with what to do instead.
"""

from __future__ import annotations

import re

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


@pytest.mark.slow
def test_a_4bit_base_trains_and_publishes_an_ordinary_lora_served_on_the_full_base(tmp_path, tiny_base, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtft.registry import Registry, fingerprint, servable_problems

    path = tiny_spec(tmp_path, tiny_base, base_quantization={"bits": 4, "type": "nf4"}, max_steps=12, eval_every=None)
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg", tasks=["yesno"])
    [result] = train_adapters(load_spec(path), options)
    losses = [r["loss"] for r in run_log(options.output) if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3]), "loss did not go down on the 4-bit base"

    # An ordinary LoRA: the full-precision base's module names, float32, the shapes plain training publishes.
    _, plain_options, _ = trained
    qlora, plain = adapter_weights(options.registry, "yesno"), adapter_weights(plain_options.registry, "yesno")
    assert qlora.keys() == plain.keys()
    assert all(qlora[k].dtype == torch.float32 and qlora[k].shape == plain[k].shape for k in plain)
    record, problems = servable_problems(Registry(options.registry), "yesno", 1, fingerprint(tiny_base), 8)
    assert problems == [] and record.metrics["adapter"] == result.adapter

    # It loads with PEFT on the unquantized base and changes what that base computes.
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    bare = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, Registry(options.registry).version_dir("yesno", 1))(input_ids=ids).logits
    assert (adapted - bare).abs().max() > 1e-3


def test_a_base_that_is_already_quantized_is_refused_at_check(tmp_path, tiny_base):
    import json
    import shutil

    from helpers import cli

    quantized = tmp_path / "gptq-base"
    shutil.copytree(tiny_base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    path = tiny_spec(tmp_path, quantized, base_quantization={"bits": 4})
    result = cli("adapters", "--config", str(path), "--check", "--registry", str(tmp_path / "reg"))
    assert result.exit_code == 2, result.output
    assert "training.base_quantization: base model" in result.output and "is already quantized (gptq)" in result.output
    assert "point base_model at the unquantized checkpoint" in result.output


@pytest.mark.parametrize("quantization, message", [
    ({"bits": 8}, r"training\.base_quantization\.bits.*Input should be 4"),
    ({"type": "int4"}, r"training\.base_quantization\.type.*'nf4' or 'fp4'"),
    ({"bits": 4, "group": 64}, r"training\.base_quantization\.group.*unknown key"),
])
def test_a_bad_quantization_is_refused_with_its_line(tmp_path, tiny_base, quantization, message):
    from mtft.train import SpecError

    with pytest.raises(SpecError, match=message):
        load_spec(tiny_spec(tmp_path, tiny_base, base_quantization=quantization))


def test_a_4bit_run_without_bitsandbytes_says_which_extra_to_install(tmp_path, tiny_base):
    import subprocess
    import sys

    from helpers import blocking_env

    path = tiny_spec(tmp_path, tiny_base, base_quantization={"bits": 4})
    result = subprocess.run([sys.executable, "-m", "mtft.train.cli", "adapters", "--config", str(path), "--check",
                             "--registry", str(tmp_path / "reg")], capture_output=True, text=True,
                            env=blocking_env(tmp_path / "site", ("bitsandbytes",)))
    assert result.returncode == 2, result.stderr
    assert re.search(r"tasks\.yaml:\d+: training\.base_quantization: needs bitsandbytes, which is not installed: "
                     r"pip install 'mtft\[qlora\]'", result.stdout + result.stderr)


def test_a_backend_that_cannot_run_the_4bit_product_is_refused_with_its_reason(tiny_base):
    from mtft.train.quantization import base_problems
    from mtft.train.spec import QuantizationSpec

    assert base_problems(QuantizationSpec(), tiny_base, torch.float32, torch.device("cpu")) == []
    assert base_problems(QuantizationSpec(type="fp4", double_quant=True), tiny_base, torch.bfloat16,
                         torch.device("cpu")) == []
    # The meta device computes nothing: the product fails there as an unusable backend would.
    [problem] = base_problems(QuantizationSpec(), tiny_base, torch.float32, torch.device("meta"))
    assert problem.startswith("training.base_quantization: bitsandbytes cannot run a 4-bit nf4 product in float32 "
                              "on meta (") and "set training.dtype to one it runs" in problem
