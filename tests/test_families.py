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
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtft.registry import (
    FUSED_MODULES,
    VLLM_LORA_MODULES,
    PromptTemplate,
    Registry,
    RegistryError,
    base_modules,
    render_prompt,
    weight_problems,
)
from mtft.registry.template import takes_system
from mtft.train import RunOptions, load_spec
from mtft.train.check import check_run

from conftest import tiny_spec
from families import BY_NAME, FAMILIES, SPLIT, build_family_base
from helpers import NEW_TOKENS, hf_peft_greedy

ENGINE = Path(__file__).with_name("vllm_families.py")
RECIPES = (("adapters",), ("adapters", "--one-pass"), ("shared",))  # publish v1, v2, v3 of each task

NAMES = [f.name for f in FAMILIES]
DOC = Path(__file__).parents[1] / "docs" / "models.md"
TITLES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma2": "Gemma 2",
          "gemma3": "Gemma 3 (text)", "phi3": "Phi-3", "olmo2": "OLMo 2"}
SYSTEM = "Repeat the text exactly."


@pytest.fixture(scope="module")
def bases(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family's tiny checkpoint, built once for this module."""
    root = tmp_path_factory.mktemp("families")
    return {f.name: build_family_base(f, tiny_base, root / f.name) for f in FAMILIES}


def family_spec(folder: Path, base: Path, **changes) -> Path:
    """The tiny two-task spec on `base`, its chat task with a system text, trained 2 steps."""
    path = tiny_spec(folder, base, max_steps=2, eval_every=None, learning_rate=2e-2)
    spec = yaml.safe_load(path.read_text())
    spec["tasks"][1]["template"]["system"] = SYSTEM
    spec["lora"] |= changes
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args):
    from helpers import cli as run

    return run(*map(str, args))


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


def test_the_family_table_in_docs_models_md_is_what_the_code_computes(bases):
    """Each row: the class, the modules `auto` trains (in the base's order), the fused ones, the test template's
    system role; the vLLM column is what test_vllm_serves_every_family_token_for_token_like_hf_peft holds."""
    table = [[cell.strip() for cell in line.split("|")[1:-1]] for line in DOC.read_text().splitlines()
             if line.startswith("| ") and "ForCausalLM" in line]
    expected = []
    for f in FAMILIES:
        found = base_modules(bases[f.name])
        fused = [m for m in found.servable if m in FUSED_MODULES]
        expected.append([TITLES[f.name], f"`{found.architecture}`", f"`{' '.join(found.servable)}`",
                         f"`{' '.join(fused)}`" if fused else "none", "yes" if f.takes_system else "no: folded",
                         "serves, greedy = HF + PEFT"])
    assert table == expected


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


# -- the matrix: every recipe, PEFT and vLLM on every family --------------------------------------

@pytest.fixture(scope="module")
def trained_families(bases, tmp_path_factory) -> dict[str, Path]:
    """Every family through --check, `adapters`, `--one-pass` and `shared` into its own registry: its spec."""
    specs = {}
    for f in FAMILIES:
        folder = tmp_path_factory.mktemp(f"trained-{f.name}")
        spec = specs[f.name] = family_spec(folder, bases[f.name])
        for recipe in (("adapters", "--check"), *RECIPES):
            result = cli(*recipe, "--config", spec, "--registry", folder / "registry", "--output",
                         folder / "-".join(r.strip("-") for r in recipe))
            assert result.exit_code == 0, (f.name, recipe, result.output)
    return specs


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_publishes_adapters_naming_exactly_their_weights_on_every_family(trained_families, name):
    spec = load_spec(trained_families[name])
    registry = Registry(spec.source.parent / "registry")
    assert registry.tasks() == ["echo", "yesno"]
    for task in registry.tasks():
        records = [registry.read(task, v) for v in registry.versions(task)]
        assert [r.trained_by for r in records] == ["mtft-train adapters", "mtft-train adapters --one-pass",
                                                   "mtft-train shared"]
        for record in records:
            folder = registry.version_dir(task, record.version)
            config = json.loads((folder / "adapter_config.json").read_text())
            assert sorted(config["target_modules"]) == sorted(record.target_modules) == BY_NAME[name].modules
            assert weight_problems(config, folder / "adapter_model.safetensors") == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "phi3", "qwen2"])
def test_training_and_serving_render_the_same_prompt_with_the_system_text(trained_families, name):
    """Training's prompts (check_run) equal what serving renders from the published record, system text in."""
    spec = load_spec(trained_families[name])
    checked = check_run(spec, RunOptions(output=spec.source.parent / "check", registry=spec.source.parent / "registry"))
    record = Registry(spec.source.parent / "registry").latest()["echo"]
    examples = checked.data["echo"].train[:5]
    assert [render_prompt(record.template, record.prefix, e.input) for e in examples] == [e.prompt for e in examples]
    assert all(SYSTEM in e.prompt for e in examples)


@pytest.mark.slow
def test_vllm_serves_every_family_token_for_token_like_hf_peft(trained_families, tmp_path):
    """One vLLM engine per family, in one process: per-task and shared adapters, and the base."""
    words = ["the quick brown fox", "hello world paris", "a lazy dog jumps"]
    requests, expected = [], {}
    for name, spec_path in trained_families.items():
        spec = load_spec(spec_path)
        registry = Registry(spec_path.parent / "registry")
        adapters, prompts = {}, {}
        for task in registry.tasks():
            for version, label in ((1, "adapters"), (3, "shared")):
                record = registry.read(task, version)
                adapters[f"{task}-{label}"] = str(registry.version_dir(task, version))
                prompts[f"{task}-{label}"] = [render_prompt(record.template, record.prefix, w) for w in words]
        prompts["base"] = prompts["echo-adapters"]
        expected[spec.base_model] = hf_peft_greedy(Path(spec.base_model), adapters, prompts)
        requests.append({"model": spec.base_model, "adapters": adapters, "prompts": prompts, "max_tokens": NEW_TOKENS})
    (tmp_path / "request.json").write_text(json.dumps(requests))
    run = subprocess.run([sys.executable, str(ENGINE), str(tmp_path / "request.json"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads((tmp_path / "out.json").read_text())
    for model, answers in expected.items():
        assert served[model] == answers, model
        # The comparison means something only where the adapters change the output.
        assert any(answers[name] != answers["base"] for name in answers if name != "base"), model


@pytest.mark.parametrize("head_dim, refused", [(48, True), (32, False)])
def test_mtft_serve_refuses_a_base_vllms_cpu_build_cannot_run_before_starting_vllm(tiny_base, tmp_path, head_dim,
                                                                                   refused):
    """A head size outside vLLM's CPU attention starts vLLM and then kills it at the first request."""
    from mtft.serve.plan import cpu_problems

    base = build_family_base(replace(BY_NAME["llama"], extra={"head_dim": head_dim}), tiny_base, tmp_path / "base")
    problems = cpu_problems(base)
    assert bool(problems) == refused
    if refused:
        assert "attention heads of size 48; vLLM's CPU build serves head sizes [32, 64" in problems[0]
        run = subprocess.run([str(Path(sys.executable).with_name("mtft-serve")), "--registry", str(tmp_path / "r"),
                              "--base-model", str(base), "--state-dir", str(tmp_path / "state")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "attention heads of size 48" in run.stdout + run.stderr
        assert not (tmp_path / "state" / "vllm.log").exists()  # refused before any vLLM started


def test_the_cpu_head_sizes_are_vllms_own():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from mtft.serve.plan import CPU_HEAD_SIZES

    assert list(CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi3", "gemma2"])
def test_mtft_serve_answers_through_the_router_like_hf_peft(trained_families, tmp_path, name):
    """The whole serving path on the families least like Llama: Phi-3 (fused qkv_proj and gate_up_proj)
    and Gemma 2 (no system role: the task's system text folded into the user turn, BOS in the template).
    mtft-serve's router renders each request from the record and vLLM answers under the adapter's name:
    the tokens equal HF + PEFT's on the same adapter, by completion and by chat."""
    import openai

    from serving import launch_stack, stop_stack, wait_started
    from mtft.serve.stack import free_port

    spec = load_spec(trained_families[name])
    registry = Registry(spec.source.parent / "registry")
    words = ["the quick brown fox", "hello world paris"]
    latest = registry.latest()
    prompts = {task: [render_prompt(r.template, r.prefix, w) for w in words] for task, r in latest.items()}
    adapters = {task: registry.version_dir(task, r.version) for task, r in latest.items()}
    expected = hf_peft_greedy(Path(spec.base_model), adapters, {"base": prompts["echo"], **prompts})
    stack = wait_started(launch_stack(registry.root, tmp_path, free_port()))
    try:
        stack.wait_ready()
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=0)
        exact = {"max_tokens": NEW_TOKENS, "stop": [], "extra_body": {"ignore_eos": True, "return_token_ids": True}}
        for task in latest:
            by_completion = [client.completions.create(model=task, prompt=w, **exact).choices[0].token_ids
                             for w in words]
            by_chat = [client.chat.completions.create(model=task, messages=[{"role": "user", "content": w}],
                                                      **exact).choices[0].token_ids for w in words]
            assert by_completion == by_chat == expected[task], (name, task)
        assert expected["echo"] != expected["base"]  # the adapter changes the answer: the check can tell
    finally:
        stop_stack(stack)
