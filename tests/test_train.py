"""`mtft-train adapters` on the tiny model: masking, publishing, determinism, resume, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from mtft.registry import Registry
from mtft.train.batches import IGNORE, tokenize
from mtft.train.data import Example
from mtft.train import RunOptions, load_spec, train_adapters

from conftest import tiny_spec
from helpers import adapter_weights, cli, kill_at_random_step, run_log


def test_prompt_tokens_carry_no_loss_and_answers_end_with_the_end_token(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    example = Example(input="hello", prompt="yesno: hello\n", target="yes", where="x:1")
    [item], truncated = tokenize([example], tokenizer, end_id=7, max_length=64)
    prompt_len = len(tokenizer("yesno: hello\n").input_ids)
    assert truncated == 0
    assert item.labels[:prompt_len] == [IGNORE] * prompt_len
    assert item.labels[prompt_len:] == item.input_ids[prompt_len:]
    assert item.labels[-1] == 7
    [short], truncated = tokenize([example], tokenizer, end_id=7, max_length=prompt_len)
    assert truncated == 1 and short.labels[-1] == 7 and len(short.input_ids) == prompt_len


def test_training_publishes_one_evaluated_adapter_per_task(trained):
    spec, options, results = trained
    assert [r.task for r in results] == ["yesno", "echo"]
    latest = Registry(options.registry).latest()
    for result in results:
        record = latest[result.task]
        assert record.version == result.version == 1
        assert record.metrics == {"base": result.base, "adapter": result.adapter}
        assert record.base_model.fingerprint.startswith("sha256:")
        assert record.template.model_copy(update={"chat_template": None}) == spec.task(result.task).template
        assert (record.template.chat_template is not None) == (record.template.format == "chat")
        rows = [r for r in run_log(options.output) if r.get("task") == result.task]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == spec.training.max_steps
        assert sum(losses[-3:]) < sum(losses[:3]), "loss did not go down"
        assert any("eval" in r and "loss" in r for r in rows), "no evaluation during training"
        config = json.loads((Registry(options.registry).version_dir(result.task, 1) / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == record.base_model.path
    assert (options.output / "curves.png").stat().st_size > 10_000


def test_the_same_seed_gives_the_same_adapter(trained, tmp_path):
    spec, options, _ = trained
    again = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg", tasks=["yesno"])
    train_adapters(spec, again)
    first, second = adapter_weights(options.registry, "yesno"), adapter_weights(again.registry, "yesno")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_a_task_trains_the_same_after_others_as_alone(tmp_path, tiny_base, monkeypatch):
    """Every task of a run starts from the same initial LoRA and torch RNG state (dropout draws from
    it), whatever trained before it: `--task echo` alone publishes the adapter a full run does."""
    spec = load_spec(tiny_spec(tmp_path, tiny_base, max_steps=4, eval_every=None))
    spec.lora.dropout = 0.1

    def echo_after_yesno(name: str) -> dict:
        options = RunOptions(output=tmp_path / name, registry=tmp_path / f"{name}-reg")
        train_adapters(spec, options)
        return adapter_weights(options.registry, "echo")

    alone = RunOptions(output=tmp_path / "alone", registry=tmp_path / "alone-reg", tasks=["echo"])
    train_adapters(spec, alone)
    reference = adapter_weights(alone.registry, "echo")
    after = echo_after_yesno("both")
    assert all((after[k] == reference[k]).all() for k in reference)
    # The control: with the RNG state left as the first task left it, the dropout masks differ.
    monkeypatch.setattr("mtft.train.frozen_base.torch.set_rng_state", lambda state: None)
    unrestored = echo_after_yesno("unrestored")
    assert any((unrestored[k] != reference[k]).any() for k in reference)


def test_an_adapter_folder_is_the_one_peft_save_pretrained_writes(tmp_path, tiny_base):
    """mtft writes adapters without wrapping the base in PEFT; PEFT loads them as its own."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from mtft.train.tasklora import peft_init, save_adapter

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    init, model = peft_init(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), config)
    weights = {k: v + 0.05 * torch.randn_like(v) for k, v in init.items()}
    save_adapter(tmp_path / "ours", config, weights, tiny_base)
    peft_model = get_peft_model(model, config)
    set_peft_model_state_dict(peft_model, weights)
    peft_model.save_pretrained(tmp_path / "peft")

    def folder(name: str) -> tuple[dict, dict, dict]:
        found = json.loads((tmp_path / name / "adapter_config.json").read_text())
        found["target_modules"] = sorted(found["target_modules"])
        with safe_open(tmp_path / name / "adapter_model.safetensors", "pt") as f:
            return found, f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    (ours, ours_meta, ours_tensors), (theirs, theirs_meta, theirs_tensors) = folder("ours"), folder("peft")
    assert ours == theirs and ours["base_model_name_or_path"] == str(tiny_base)
    assert ours_meta == theirs_meta and ours_tensors.keys() == theirs_tensors.keys()
    assert all(torch.equal(ours_tensors[k], theirs_tensors[k]) for k in ours_tensors)
    ids = torch.randint(3, 900, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(peft_model.unload(), tmp_path / "ours")
        assert torch.equal(loaded(input_ids=ids).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_a_killed_run_resumes_where_it_stopped_and_ends_identical(tmp_path, tiny_base, packing):
    spec_path = tiny_spec(tmp_path, tiny_base, max_steps=300, checkpoint_every=1, eval_every=None, packing=packing)
    command = [sys.executable, "-m", "mtft.train.cli", "adapters", "--config", str(spec_path), "--task", "yesno",
               "--registry", str(tmp_path / "reg"), "--output", str(tmp_path / "run")]
    metrics = tmp_path / "run" / "metrics.jsonl"
    kill = kill_at_random_step(command, metrics, total=300)
    assert not Registry(tmp_path / "reg").versions("yesno"), f"a killed run published an adapter ({kill})"

    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{kill}: {result.stderr}"
    assert "resuming at step" in result.stderr, kill
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if "loss" in x]
    assert [r["step"] for r in rows] == list(range(1, 301)), kill

    reference = RunOptions(output=tmp_path / "ref", registry=tmp_path / "ref-reg", tasks=["yesno"])
    train_adapters(load_spec(spec_path), reference)
    resumed, straight = adapter_weights(tmp_path / "reg", "yesno"), adapter_weights(reference.registry, "yesno")
    assert all((resumed[k] == straight[k]).all() for k in straight), f"{kill}: the adapters differ"


def test_retraining_publishes_the_next_version(trained, tmp_path):
    spec, options, _ = trained
    registry = tmp_path / "reg"
    for _ in range(2):
        train_adapters(spec, RunOptions(output=tmp_path / "run", registry=registry, tasks=["echo"]))
    assert Registry(registry).versions("echo") == [1, 2]


def test_cli_bad_input_fails_before_training_and_leaves_the_registry_alone(trained, tmp_path, tiny_base):
    _, options, _ = trained
    before = sorted(p.relative_to(options.registry) for p in options.registry.rglob("*"))
    spec_path = tiny_spec(tmp_path, tiny_base)
    cases = {
        "unknown base": ({"base_model": "nobody/nothing"}, r"nobody/nothing"),
        "rank": ({"lora": {"rank": 5}}, r"rank 5 cannot be served by vLLM"),
        "typo": ({"trainig": {}}, r"trainig: unknown key"),
    }
    for name, (change, message) in cases.items():
        raw = yaml.safe_load(spec_path.read_text())
        raw.update(change)
        bad = tmp_path / f"{name.replace(' ', '_')}.yaml"
        bad.write_text(yaml.safe_dump(raw))
        result = cli("adapters", "--config", str(bad), "--registry", str(options.registry),
                     "--output", str(tmp_path / "out"))
        assert result.exit_code == 2, (name, result.output)
        assert re.search(message, result.output), (name, result.output)
        assert "Traceback" not in result.output
    result = cli("adapters", "--config", str(spec_path), "--task", "nope", "--registry", str(options.registry))
    assert result.exit_code == 2 and "--task 'nope' is not in the spec" in result.output
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = cli("adapters", "--config", str(spec_path), "--registry", str(blocked / "reg"))
    assert result.exit_code == 2 and "is not writable" in result.output
    assert sorted(p.relative_to(options.registry) for p in options.registry.rglob("*")) == before


def test_check_validates_without_training(tmp_path, tiny_base):
    result = cli("adapters", "--config", str(tiny_spec(tmp_path, tiny_base)), "--check",
                 "--registry", str(tmp_path / "reg"))
    assert result.exit_code == 0, result.output
    assert "OK (2 tasks)" in result.output
    assert not Registry(tmp_path / "reg").latest()


def test_registry_list_shows_published_adapters_with_metrics(trained):
    _, options, results = trained
    result = cli("registry", "list", "--registry", str(options.registry))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:6] == ["task", "version", "prefix", "metric", "base", "adapter"]
    assert {line.split()[0] for line in lines[1:]} == {"yesno", "echo"}
    as_json = [json.loads(x) for x in cli("registry", "list", "--json", "--registry", str(options.registry)).output.splitlines()]
    assert {r["task"]: r["metrics"]["adapter"] for r in as_json} == {r.task: r.adapter for r in results}
