"""vLLM (CPU build, offline engine) serves our adapters token for token like HF + PEFT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtft.registry import Registry, render_prompt

NEW_TOKENS = 8
ENGINE = Path(__file__).with_name("vllm_greedy.py")


def hf_greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """A plain argmax loop: no generate() options that could bend the comparison."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            new = []
            for _ in range(NEW_TOKENS):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            out.append(new)
    return out


def hf_peft_greedy(base_folder: Path, adapters: dict[str, Path], prompts: dict[str, list[str]]) -> dict:
    """HF greedy tokens for {"base" | name: prompts}, each name through its adapter folder with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    expected = {"base": hf_greedy(base, tokenizer, prompts["base"])}
    for name in prompts.keys() - {"base"}:
        model = PeftModel.from_pretrained(base, adapters[name]).eval()
        expected[name] = hf_greedy(model, tokenizer, prompts[name])
        base = model.unload()
    return expected


def latest_adapters(registry: Registry, prefix: str = "") -> dict[str, Path]:
    return {prefix + t: registry.version_dir(t, r.version) for t, r in registry.latest().items()}


@pytest.mark.slow
def test_vllm_greedy_tokens_equal_hf_peft_for_every_adapter(trained, shared_trained, tiny_base, tmp_path):
    """Per-task adapters and the shared adapter's per-task exports alike."""
    registry, shared = Registry(trained[1].registry), Registry(shared_trained[0] / "registry")
    words = ["the quick brown fox", "hello world paris", "a lazy dog jumps", "berlin london"]
    prompts = {prefix + task: [render_prompt(r.template, r.prefix, w) for w in words]
               for prefix, source in (("", registry), ("shared-", shared)) for task, r in source.latest().items()}
    adapters = latest_adapters(registry) | latest_adapters(shared, "shared-")
    assert {r.trained_by for r in shared.latest().values()} == {"mtft-train shared"}

    expected = hf_peft_greedy(tiny_base, adapters, {"base": prompts["yesno"], **prompts})

    request = {
        "model": str(tiny_base),
        "adapters": {name: str(path) for name, path in adapters.items()},
        "prompts": {"base": prompts["yesno"], **prompts},
        "max_tokens": NEW_TOKENS,
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    run = subprocess.run([sys.executable, str(ENGINE), str(tmp_path / "request.json"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads((tmp_path / "out.json").read_text())
    assert served == expected
    # The comparison means something only if the adapters change the output.
    assert expected["yesno"] != expected["base"] and expected["shared-yesno"] != expected["base"]
    assert expected["shared-echo"] != expected["echo"]
