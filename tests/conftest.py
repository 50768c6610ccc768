"""Shared test fixtures: a tiny offline base model that transformers and vLLM's CPU build both load.

Tests never reach a model hub: the tiny base gets its own byte-level BPE tokenizer trained
on a built-in corpus, and random Llama weights from a fixed seed.
"""

import os
from pathlib import Path

import pytest

# Helper modules test modules import by name: their asserts are rewritten too.
pytest.register_assert_rewrite("serving", "fake_vllm")
# Offline by default; setdefault so a developer can still override them for a one-off run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tokenizers Rust pool would otherwise warn (or deadlock) after vLLM/pytest forks.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS = "<|endoftext|>"
CHAT_START = "<|im_start|>"
CHAT_END = "<|im_end|>"
# ChatML like SmolLM2's, without its default system prompt so rendered prompts stay short.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Short English, digits, punctuation and JSON: what the task specs in tests feed the model."""
    words = (
        "the quick brown fox jumps over a lazy dog while we translate summarize classify answer "
        "question input output label positive negative neutral english french german hello world "
        "paris london berlin capital city of france is yes no true false name value task text"
    ).split()
    lines = []
    for i in range(400):
        a, b, c = words[i % len(words)], words[(i * 7) % len(words)], words[(i * 13) % len(words)]
        lines.append(f"{a.capitalize()} {b} {c}, {i} and {i * 37 % 1000}.")
        lines.append(f'{{"{a}": "{b} {c}", "id": {i}, "ok": {str(i % 2 == 0).lower()}}}')
        lines.append(f"Q: What is {i} + {i % 9}? A: {i + i % 9}! ({b}; {c}) [{a}]")
    return lines


def build_tiny_base(folder: Path) -> Path:
    """Write a tiny random Llama checkpoint with its own tokenizer into `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=[EOS, CHAT_START, CHAT_END],  # ids 0, 1, 2 as in SmolLM2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # byte-level: no unknown tokens
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        extra_special_tokens=[CHAT_START, CHAT_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )
    eos, chat_end = tokenizer.convert_tokens_to_ids([EOS, CHAT_END])

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: one that vLLM's CPU attention supports
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # like SmolLM2, so tests cover tied embeddings
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    # vLLM stops chat replies only at ids listed in generation_config.json.
    model.generation_config = GenerationConfig(eos_token_id=[eos, chat_end], pad_token_id=eos)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint folder (float32 safetensors, own tokenizer, ChatML)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def tiny_spec(folder: Path, base: Path, **training) -> Path:
    """A two-task spec on the tiny base: a plain-format label task and a chat-format copy task."""
    import json
    import random

    import yaml

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog paris london berlin hello world".split()
    label_rows = [{"text": " ".join(rng.choices(words, k=4)), "label": "yes" if i % 2 else "no"} for i in range(48)]
    echo_rows = [{"text": " ".join(rng.choices(words, k=3))} for _ in range(48)]
    for name, rows in (("yesno", label_rows), ("echo", echo_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "base_model": str(base),
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        # float32 on every machine: the tests pin exact equalities (packed == unpacked, one pass ==
        # alone, 1 process == 2) that hold in fp32 and only to bf16 rounding in bf16, which `auto`
        # picks on CPUs with AVX-512-bf16. bf16 training has its own tests (dtype="bfloat16").
        "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                     "eval_every": 6, "checkpoint_every": 4, "max_length": 64, "threads": 2, "dtype": "float32",
                     **training},
        "tasks": [
            {"name": "yesno", "prefix": "yesno: ",
             "template": {"input": "{text}", "target": "{label}", "prompt": "{prefix}{input}\nAnswer:"},
             "data": {"train": "yesno.jsonl", "eval_fraction": 0.25}, "metric": "accuracy",
             "labels": ["yes", "no"], "max_new_tokens": 4},
            {"name": "echo", "prefix": "echo: ",
             "template": {"format": "chat", "input": "{text}", "target": "{text}"},
             "data": {"train": "echo.jsonl", "eval_fraction": 0.25}, "metric": "exact_match",
             "max_new_tokens": 8},
        ],
    }
    path = folder / "tasks.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """Both tiny tasks trained once per session: (spec, options, results)."""
    from mtft.train import RunOptions, load_spec, train_adapters

    folder = tmp_path_factory.mktemp("trained")
    spec = load_spec(tiny_spec(folder, tiny_base))
    options = RunOptions(output=folder / "run", registry=folder / "registry")
    return spec, options, train_adapters(spec, options)


@pytest.fixture(scope="session")
def shared_trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """`mtft-train shared` on both tiny tasks through the CLI, once per session: (folder, spec, output)."""
    from typer.testing import CliRunner

    from mtft.train.cli import app

    folder = tmp_path_factory.mktemp("shared")
    spec_path = tiny_spec(folder, tiny_base, max_steps=12, learning_rate=1e-2, eval_every=8)
    result = CliRunner().invoke(app, ["shared", "--config", str(spec_path), "--registry", str(folder / "registry"),
                                      "--output", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder, spec_path, result.output
