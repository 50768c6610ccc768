"""What `mtft-serve` starts vLLM with, decided from the registry, and the zero adapter, without vLLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtft.registry import Registry, adapter_config_problems
from mtft.serve import ZERO_ADAPTER, ServeConfig, ServeError, plan, vllm_command, write_zero_adapter
from mtft.serve.config import ServeConfigError, load_config


def test_plan_sizes_vllm_from_the_registry(trained):
    _, options, _ = trained
    chosen = plan(ServeConfig(registry=options.registry))
    assert sorted(a.name for a in chosen.adapters) == ["echo-v1", "yesno-v1"]
    assert (chosen.max_rank, chosen.max_loras, chosen.max_cpu_loras) == (8, 4, 8)  # tasks + zero + a swap
    argv, env = vllm_command(ServeConfig(registry=options.registry, kv_cache_gib=0.5, vllm_cpus="0",
                                         vllm_args=["--seed", "0"]), chosen, 8100, None)
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # runtime LoRA loading must stay off the network
    assert any(a.startswith("yesno-v1=") for a in argv) and argv[-2:] == ["--seed", "0"]
    assert (env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"], env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"]) == (
        "True", "0.5", "0")


def test_plan_leaves_out_adapters_that_cannot_be_served(trained, tmp_path):
    _, options, _ = trained
    shutil.copytree(options.registry, tmp_path / "registry")
    config_path = Registry(tmp_path / "registry").version_dir("echo", 1) / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    chosen = plan(ServeConfig(registry=tmp_path / "registry", max_lora_rank=16))
    assert [a.name for a in chosen.adapters] == ["yesno-v1"]
    assert any("checksum" in p for p in chosen.rejected["echo-v1"])
    assert chosen.max_rank == 16


def test_an_empty_registry_needs_a_base_model(tmp_path):
    with pytest.raises(ServeError, match="--base-model"):
        plan(ServeConfig(registry=tmp_path))


def test_config_reports_every_bad_option_at_once(tmp_path):
    (tmp_path / "serve.yaml").write_text("port: eighty\nkv_cache_gib: -1\ncolour: blue\n")
    with pytest.raises(ServeConfigError, match=r"3 problem") as caught:
        load_config(tmp_path / "serve.yaml", {"registry": tmp_path})
    assert "colour" in str(caught.value)


def test_zero_adapter_answers_exactly_like_the_base_model(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = write_zero_adapter(tiny_base, ["q_proj", "v_proj", "down_proj"], 8, tmp_path / ZERO_ADAPTER)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config_problems(config) == []
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        zero = PeftModel.from_pretrained(base, folder).eval()
        assert sum("lora_B" in n for n, _ in zero.named_parameters()) == 3 * 2  # 3 modules x 2 layers
        assert torch.equal(zero(input_ids=ids).logits, expected)


def test_an_adapter_file_symlinked_out_of_the_registry_is_not_servable(trained, tmp_path):
    from mtft.registry import fingerprint, servable_problems

    _, options, _ = trained
    registry = Registry(shutil.copytree(options.registry, tmp_path / "registry"))
    weights = registry.version_dir("yesno", 1) / "adapter_model.safetensors"
    outside = shutil.copy(weights, tmp_path / "elsewhere.safetensors")
    weights.unlink()
    weights.symlink_to(outside)
    record = registry.read("yesno", 1)
    _, problems = servable_problems(registry, "yesno", 1, record.base_model.fingerprint, 8)
    assert len(problems) == 1 and "outside the registry" in problems[0]
    _, problems = servable_problems(Registry(options.registry), "yesno", 1,
                                    fingerprint(Path(record.base_model.path)), 8)
    assert problems == []


def test_the_zero_adapter_is_used_only_where_the_cpu_lora_ops_plugin_does_not_fix_mixing(trained, monkeypatch):
    from mtft.serve.vllm_plugin import ENV, applies

    _, options, _ = trained
    monkeypatch.setenv(ENV, "1")
    assert applies(), "this environment's vLLM is the CPU build the plugin was written for"
    assert plan(ServeConfig(registry=options.registry)).zero_modules == []
    assert plan(ServeConfig(registry=options.registry, base_workaround=True)).zero_modules
    monkeypatch.setenv(ENV, "0")
    assert plan(ServeConfig(registry=options.registry)).zero_modules
    assert plan(ServeConfig(registry=options.registry, base_workaround=False)).zero_modules == []
