"""Every model family users bring trains, exports and serves right: Llama, Qwen2 (attention biases),
Qwen3 (q/k norms), Mistral, Gemma 2, Gemma 3 (text), Phi-3 (fused projections) and OLMo 2.

Each family is a tiny random checkpoint from transformers' own config class (tests/families.py).
LoRA goes on every projection vLLM serves in the family (`target_modules: auto`), an adapter
names exactly the modules it has weights for, a chat template without a system role still gets
the task's system text, and vLLM's CPU build answers like HF + PEFT on every family.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtft.registry import (
    VLLM_LORA_MODULES,
    PromptTemplate,
    Registry,
    RegistryError,
    base_modules,
    render_prompt,
    weight_problems,
)
from mtft.registry.template import takes_system
from mtft.train.cli import app

from conftest import tiny_spec
from families import BY_NAME, FAMILIES, SPLIT, Family, build_family_base

NAMES = [f.name for f in FAMILIES]
SYSTEM = "Repeat the text exactly."


@pytest.fixture(scope="module")
def bases(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family's tiny checkpoint, built once for this module."""
    root = tmp_path_factory.mktemp("families")
    return {f.name: build_family_base(f, tiny_base, root / f.name) for f in FAMILIES}


def family_spec(folder: Path, base: Path, **changes) -> Path:
    """The tiny two-task spec on `base`, its chat task with a system text, trained 2 steps."""
    path = tiny_spec(folder, base, max_steps=2, eval_every=None)
    spec = yaml.safe_load(path.read_text())
    spec["tasks"][1]["template"]["system"] = SYSTEM
    spec["lora"] |= changes
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- target modules -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_auto_targets_every_projection_vllm_serves_in_the_family(bases, name):
    found = base_modules(bases[name])
    assert found.known and sorted(found.servable) == BY_NAME[name].modules
    assert set(found.servable) <= set(VLLM_LORA_MODULES[found.architecture])


def test_a_named_module_the_base_lacks_fails_check_with_the_other_problems_listing_the_bases_modules(bases, tmp_path):
    """Llama's projection names on Phi-3: PEFT would train o_proj and down_proj only, silently."""
    spec = family_spec(tmp_path, bases["phi3"], target_modules=SPLIT)
    with (tmp_path / "echo.jsonl").open("a") as rows:  # a second problem, reported in the same run
        rows.write('{"txt": "a misspelt field"}\n')
    result = cli("adapters", "--config", spec, "--registry", tmp_path / "registry", "--check")
    assert result.exit_code != 0
    assert f"{spec}: 2 problems" in result.output, result.output
    assert re.search(r"lora\.target_modules: target modules \['gate_proj', 'k_proj', 'q_proj', 'up_proj', "
                     r"'v_proj'\] are not modules of this Phi3ForCausalLM base; its decoder layers' linear modules "
                     r"are \['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj'\]", result.output), result.output
    assert "echo.jsonl:49" in result.output
    assert not (tmp_path / "registry").exists() or not Registry(tmp_path / "registry").tasks()


def test_check_passes_on_every_family_with_auto_and_with_the_familys_own_names(bases, tmp_path):
    for f in FAMILIES:
        for modules in ("auto", f.modules):
            result = cli("adapters", "--config", family_spec(tmp_path, bases[f.name], target_modules=modules),
                         "--registry", tmp_path / "registry", "--check")
            assert result.exit_code == 0, (f.name, modules, result.output)


def _peft_adapter(base: Path, modules: list[str], folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=modules, task_type="CAUSAL_LM")) \
        .save_pretrained(folder)
    return folder


def test_no_family_can_publish_an_adapter_whose_config_names_modules_without_weights(bases, tmp_path):
    """PEFT writes every name it was given, matched or not; publishing refuses the folder, naming both sides."""
    from mtft.registry import AdapterRecord, BaseModelRef

    record = AdapterRecord(task="t", prefix="t: ", template=PromptTemplate(input="{x}", target="{y}"),
                           base_model=BaseModelRef(name="phi3", path=str(bases["phi3"]), fingerprint="sha256:0"),
                           rank=8, alpha=16, target_modules=SPLIT, metric="exact_match", max_new_tokens=4)
    registry = Registry(tmp_path / "registry")
    llama_names = _peft_adapter(bases["phi3"], SPLIT, tmp_path / "llama-names")
    assert json.loads((llama_names / "adapter_config.json").read_text())["target_modules"]  # PEFT kept all seven
    with pytest.raises(RegistryError, match=r"names target modules \['gate_proj', 'k_proj', 'q_proj', 'up_proj', "
                       r"'v_proj'\] that carry no LoRA weights .*weights for \['down_proj', 'o_proj'\]"):
        registry.publish(llama_names, record)
    assert registry.tasks() == []
    own_names = _peft_adapter(bases["phi3"], BY_NAME["phi3"].modules, tmp_path / "own-names")  # the control
    assert registry.publish(own_names, record.model_copy(update={"target_modules": BY_NAME["phi3"].modules})).version == 1


def test_weights_a_config_does_not_name_are_refused_too(bases, tmp_path):
    folder = _peft_adapter(bases["llama"], ["q_proj", "v_proj"], tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert weight_problems(config, folder / "adapter_model.safetensors") == []
    assert weight_problems(config | {"target_modules": ["q_proj"]}, folder / "adapter_model.safetensors") == [
        "adapter_model.safetensors has LoRA weights for ['v_proj'], which adapter_config.json's target_modules "
        "['q_proj'] does not name"]


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_the_zero_adapter_names_the_bases_own_modules(bases, tmp_path, name):
    """Base traffic's zero adapter on a base with no adapters yet: the base's servable modules, nothing else."""
    from mtft.serve.plan import _zero_modules
    from mtft.serve.zero import write_zero_adapter

    modules = _zero_modules(bases[name], [])
    assert sorted(modules) == BY_NAME[name].modules
    folder = write_zero_adapter(bases[name], modules, 8, tmp_path / "zero")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(modules)
    assert weight_problems(config, folder / "adapter_model.safetensors") == []
    with pytest.raises(ValueError, match=r"has no linear modules named"):
        write_zero_adapter(bases[name], ["qkv_proj", "q_proj"], 8, tmp_path / "wrong")


# -- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True], ids=["adapters", "shared"])
@pytest.mark.parametrize("name", NAMES)
def test_an_exported_adapter_loads_in_peft_to_the_trained_logits(bases, tmp_path, name, shared):
    """What training holds (TaskLoRA, per task or shared) equals its published folder loaded by PEFT."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from mtft.train.tasklora import TaskLoRA, peft_init, save_adapter

    modules = list(base_modules(bases[name]).servable)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=modules, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    init, model = peft_init(AutoModelForCausalLM.from_pretrained(bases[name], dtype=torch.float32).eval(), config)
    lora = TaskLoRA(model, ["a", "b"], init, 8, 16, 0.0, shared=shared, up_projections=2 if shared else 1)
    with torch.no_grad():  # every weight away from its init, as training leaves them
        for p in lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 900, (2, 10))
    with torch.no_grad(), lora.task("b"):
        trained = model(input_ids=ids).logits
    save_adapter(tmp_path / "b", config, lora.export("b"), bases[name])
    model = lora.remove()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(model, tmp_path / "b")(input_ids=ids).logits
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)
    assert (trained - base).abs().max() > 1e-3  # the adapter changes the answer: the check can fail
    assert sorted(json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"]) == sorted(modules)


# -- chat templates -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_a_system_text_reaches_the_prompt_on_every_familys_template(name):
    """Rendered as a system turn where the template has one, else first in the user turn; never lost."""
    family = BY_NAME[name]
    template = PromptTemplate(format="chat", input="{text}", target="{text}", system=SYSTEM,
                              chat_template=family.chat_template)
    prompt = render_prompt(template, "echo: ", "hello world")
    assert takes_system(family.chat_template) == family.takes_system
    assert prompt.count(SYSTEM) == 1 and prompt.index(SYSTEM) < prompt.index("echo: hello world")
    if not family.takes_system:
        assert f"{SYSTEM}\n\necho: hello world" in prompt
    assert render_prompt(template.model_copy(update={"system": None}), "echo: ", "hello world").count(SYSTEM) == 0


def test_a_chat_template_that_cannot_render_one_user_turn_fails_check_saying_what_to_change(bases, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bases["llama"])
    tokenizer.chat_template = "{{ raise_exception('Conversations must start with an assistant turn') }}"
    tokenizer.save_pretrained(bases["llama"].parent / "bad-template")
    base = bases["llama"].parent / "bad-template"
    for file in bases["llama"].iterdir():
        if not (base / file.name).exists():
            (base / file.name).symlink_to(file)
    result = cli("adapters", "--config", family_spec(tmp_path, base), "--registry", tmp_path / "r", "--check")
    assert result.exit_code != 0
    assert "chat template cannot render one user message (Conversations must start with an assistant turn); use " \
           "format: plain" in result.output, result.output
