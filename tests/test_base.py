"""Resolving a task spec's base model name to a local checkpoint folder."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtft.train.base import EMBEDDED_BASE, BaseModelError, resolve_base


def test_tiny_base_loads_and_renders_chatml(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS added in front
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size // model.config.num_attention_heads == 32


def test_tiny_base_generation_config_stops_at_chat_end(tiny_base):
    generation = json.loads((tiny_base / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    assert tokenizer.eos_token_id in generation["eos_token_id"]


def test_a_folder_with_config_resolves_to_itself(tiny_base):
    assert resolve_base(str(tiny_base)) == tiny_base.resolve()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/no/such/folder", r"'/no/such/folder' is not a folder or a hub id.*smollm2-135m"),
        ("nobody/nothing", r"'nobody/nothing' is not in the local Hugging Face cache"),
        ("", r"'' is not a folder or a hub id"),
    ],
)
def test_unresolvable_names_say_what_to_do(name, match):
    with pytest.raises(BaseModelError, match=match):
        resolve_base(name)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(BaseModelError, match="has no config.json"):
        resolve_base(str(tmp_path))


@pytest.mark.slow
def test_embedded_base_stops_chat_replies_at_im_end():
    folder = resolve_base(EMBEDDED_BASE)  # converts the GGUF on first use (~30 s), then cached
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert json.loads((folder / "mtft-base.json").read_text())["fingerprint"].startswith("sha256:")
