"""The training loop's pieces: the answer-only loss, the base model's dtype and attention, saved predictions,
zero-shot cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from mtft.train import RunOptions, load_spec, train_adapters
from mtft.train.batches import IGNORE, Tokenized, collate
from mtft.train.loop import answer_loss
from mtft.train.hardware import choose_attention, choose_dtype

from conftest import tiny_spec


def _full_logits_loss(model, batch, per_example: bool) -> torch.Tensor:
    """The obvious reference: logits at every position, prompt tokens masked in the loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                reduction="none").view(labels.shape)
    per_row = per_token.sum(dim=1)
    return per_row / (labels != IGNORE).sum(dim=1) if per_example else per_row


@pytest.mark.parametrize("per_example", [False, True])
def test_the_answer_only_loss_equals_the_full_logits_loss(tiny_base, per_example):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    # Rows of different lengths whose answers sit at different positions (right padding).
    items = [Tokenized(list(range(5, 5 + n)), [IGNORE] * (n - k) + list(range(5 + n - k, 5 + n)))
             for n, k in ((12, 3), (7, 2), (20, 6), (9, 1))]
    batch = collate(items, pad_id=0)
    fast, full = answer_loss(model, batch, per_example), _full_logits_loss(model, batch, per_example)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    fast.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full.sum().backward()
    for a, b in zip(fast_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The check can fail: counting the prompt tokens too gives another loss.
    everything = collate([Tokenized(t.input_ids, t.input_ids) for t in items], pad_id=0)
    assert (answer_loss(model, everything, per_example) - fast).abs().max() > 1e-2


def test_the_base_dtype_is_bfloat16_only_where_the_hardware_computes_it():
    cpu = torch.device("cpu")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtype, reason = choose_dtype("auto", cpu)
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert reason.startswith("auto: ") and ("AVX-512-bf16/AMX" in reason)
    assert choose_dtype("bfloat16", cpu) == (torch.bfloat16, "from training.dtype")
    assert choose_dtype("float32", cpu)[0] == torch.float32


def test_attention_is_eager_on_cpu_unless_the_spec_says_otherwise():
    assert choose_attention("auto", torch.device("cpu"))[0] == "eager"
    assert choose_attention("auto", torch.device("cuda"))[0] == "sdpa"
    assert choose_attention("sdpa", torch.device("cpu")) == ("sdpa", "from training.attention")


def test_a_bfloat16_base_trains_float32_adapters(tiny_base, tmp_path, caplog):
    spec = load_spec(tiny_spec(tmp_path, tiny_base, max_steps=2, eval_every=None, dtype="bfloat16", attention="sdpa"))
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg", tasks=["yesno"])
    with caplog.at_level(logging.INFO, logger="mtft"):
        [result] = train_adapters(spec, options)
    assert "attention: sdpa (from training.attention)" in caplog.text
    from safetensors.torch import load_file

    from mtft.registry import Registry

    weights = load_file(Registry(options.registry).version_dir("yesno", result.version) / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k), "the adapter never trained"


def test_every_evaluation_saves_its_predictions_and_zero_shot_scores_are_cached(trained, tmp_path, caplog):
    spec, options, results = trained
    for result in results:
        folder = options.output / "predictions" / result.task
        assert {p.name for p in folder.iterdir()} >= {"base.jsonl", "adapter.jsonl", "step-6.jsonl"}
        rows = [json.loads(line) for line in (folder / "adapter.jsonl").read_text().splitlines()]
        assert rows and set(rows[0]) == {"where", "input", "prediction", "reference", "score"}
        assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(result.adapter)
    # A second run of the same tasks on the same base does not evaluate the base again.
    with caplog.at_level("INFO", logger="mtft.train.session"):
        again = train_adapters(spec, RunOptions(output=tmp_path / "run", registry=tmp_path / "reg", tasks=["yesno"]))
    assert any("yesno: base model accuracy" in r.getMessage() and "(cached in " in r.getMessage()
               for r in caplog.records)
    assert again[0].base == results[0].base
    assert (tmp_path / "run" / "predictions" / "yesno" / "base.jsonl").read_text() == \
        (options.output / "predictions" / "yesno" / "base.jsonl").read_text()


def _items(lengths_and_answers):
    return [Tokenized(list(range(5 + j, 5 + j + n)), [IGNORE] * (n - k) + list(range(5 + j + n - k, 5 + j + n)))
            for j, (n, k) in enumerate(lengths_and_answers)]


def test_a_packed_forward_gives_each_example_the_loss_and_gradients_it_has_alone(tiny_base):
    from transformers import AutoModelForCausalLM

    from mtft.train.batches import pack

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    items = _items([(12, 3), (7, 2), (20, 6), (9, 1), (5, 5), (16, 4)])
    rows = pack([len(t.input_ids) for t in items], capacity=32)
    assert len(rows) < len(items) and all(sum(len(items[i].input_ids) for i in r) <= 32 for r in rows)
    losses = {}
    grads = {}
    for name, layout in (("alone", None), ("packed", rows)):
        model.zero_grad()
        losses[name] = answer_loss(model, collate(items, 0, layout), per_example=True)
        losses[name].sum().backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(losses["packed"], losses["alone"], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["packed"], grads["alone"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The check can fail: the same rows with one causal mask over each whole row leak between examples.
    leaky = {k: v for k, v in collate(items, 0, rows).items() if k != "position_ids"}
    assert (answer_loss(model, leaky, per_example=True) - losses["alone"]).abs().max() > 1e-3


def test_the_lm_head_runs_on_answer_tokens_only_even_in_packed_rows(tiny_base):
    from transformers import AutoModelForCausalLM

    from mtft.train.batches import pack

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    items = _items([(12, 3), (7, 2), (20, 6), (9, 1), (5, 5), (16, 4)])
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _, args, out: seen.append(args[0].shape[:-1].numel()))
    for layout in (None, pack([len(t.input_ids) for t in items], capacity=32)):
        batch = collate(items, 0, layout)
        answer_loss(model, batch)
        # Each answer token is predicted from the position before it; the head sees those alone,
        # not every column where some row has an answer (in packed rows, nearly all of them).
        targets = batch["labels"][:, 1:] != IGNORE
        assert seen.pop() == int(targets.sum()) < int(targets.any(dim=0).sum()) * len(targets)


@pytest.mark.parametrize("recipe", ["one-pass", "shared"])
def test_packing_trains_the_same_adapters_in_every_recipe(tiny_base, tmp_path, recipe):
    from safetensors.torch import load_file

    from mtft.registry import Registry
    from mtft.train import train_one_pass, train_shared

    trainer = train_one_pass if recipe == "one-pass" else train_shared
    weights = {}
    for packing in (False, True):
        spec = load_spec(tiny_spec(tmp_path, tiny_base, max_steps=4, eval_every=None, packing=packing))
        options = RunOptions(output=tmp_path / f"run-{packing}", registry=tmp_path / f"reg-{packing}")
        trainer(spec, options)
        weights[packing] = {t: load_file(Registry(options.registry).version_dir(t, 1) / "adapter_model.safetensors")
                            for t in ("yesno", "echo")}
    for task, alone in weights[False].items():
        for key, value in alone.items():
            # Float tolerance: another summation order, and Adam's step on a near-zero gradient
            # (AVX-512 kernels sum in other orders than AVX2 ones: 1.4 % of entries moved by 1-3e-6 there).
            diff = (weights[True][task][key] - value).abs()
            assert diff.max() < 1e-4 and (diff > 1e-5).float().mean() < 0.01, (task, key, diff.max())
