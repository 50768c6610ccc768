"""Tiny random checkpoints of the model families users bring, for tests (no download).

Each family is built from transformers' own config class with the tiny base's tokenizer and
a chat template written for these tests that behaves like the family's own: Llama 3 opens with
a system header and date line, Qwen2 adds a default system prompt, Qwen3 a thinking switch,
Mistral and Gemma 2 refuse a system message, Gemma 3 folds it into the first user turn itself,
Phi-3 drops it unseen, OLMo 2 frames every role with a tag. Head size 32: one that vLLM's CPU
attention supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLIT = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


LLAMA3 = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}<|eot_id|>"
    "{% for message in messages if message['role'] != 'system' %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN2 = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3 = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ first if loop.first else '' }}{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] in ['user', 'assistant'] %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    chat_template: str
    takes_system: bool  # the template renders a system message (else mtft folds it into the user turn)
    modules: list[str]  # the LoRA target modules `auto` must pick, sorted
    extra: dict = field(default_factory=dict)  # the config's family-specific settings


FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", LLAMA3, True, SPLIT, {"tie_word_embeddings": True}),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", QWEN2, True, SPLIT),  # q/k/v with biases
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3, True, SPLIT, {"head_dim": 32}),  # q/k norms
    Family("mistral", "MistralConfig", "MistralForCausalLM", MISTRAL, False, SPLIT, {"head_dim": 32}),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", GEMMA2, False, SPLIT,
           {"head_dim": 32, "query_pre_attn_scalar": 32}),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3, True, SPLIT,
           {"head_dim": 32, "query_pre_attn_scalar": 32}),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", PHI3, False, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", OLMO2, True, SPLIT),
]
BY_NAME = {f.name: f for f in FAMILIES}


def build_family_base(family: Family, tokenizer_dir: Path, folder: Path) -> Path:
    """A tiny random `family` checkpoint in `folder`, with the tokenizer of `tokenizer_dir` and the family's template."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = family.chat_template
    eos, chat_end = tokenizer.convert_tokens_to_ids([tokenizer.eos_token, "<|im_end|>"])
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                    bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    config = getattr(transformers, family.config)(**settings | family.extra)
    torch.manual_seed(0)
    model = getattr(transformers, family.model)(config).to(torch.float32)
    # vLLM stops chat replies only at ids listed in generation_config.json.
    model.generation_config = GenerationConfig(eos_token_id=[eos, chat_end], pad_token_id=eos)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
