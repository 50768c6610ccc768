"""What `mtft-serve` starts vLLM with, decided from the registry, and the zero adapter, without vLLM."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from mtft.registry import Registry, adapter_config_problems
from mtft.serve import (
    ZERO_ADAPTER,
    ServeConfig,
    ServeError,
    cpu_binds,
    plan,
    router_config,
    vllm_command,
    write_zero_adapter,
)
from mtft.serve.config import ServeConfigError, load_config


def test_plan_sizes_vllm_from_the_registry(trained):
    _, options, _ = trained
    chosen = plan(ServeConfig(registry=options.registry))
    assert sorted(a.name for a in chosen.adapters) == ["echo-v1", "yesno-v1"]
    assert (chosen.max_rank, chosen.max_loras, chosen.max_cpu_loras) == (8, 4, 8)  # tasks + zero + a swap
    argv, env = vllm_command(ServeConfig(registry=options.registry, kv_cache_gib=2, vllm_args=["--seed", "0"]),
                             chosen, 8100, Path("zero"), "0")
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # runtime LoRA loading must stay off the network
    # Only the zero adapter is preloaded: the router places the task adapters on the backends it chooses.
    assert argv[argv.index("--lora-modules") + 1:][:1] == [f"{ZERO_ADAPTER}=zero"] and argv[-2:] == ["--seed", "0"]
    assert not any(a.startswith("yesno-v1=") for a in argv)
    assert (env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"], env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"]) == (
        "True", "2", "0")


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


@pytest.mark.parametrize("native,setting,expected", [
    (False, "auto", "float32"),     # AVX2: bf16 emulated, float32 decodes several times faster
    (True, "auto", "auto"),         # AVX-512-bf16/AMX: vLLM's choice (the checkpoint's bf16)
    (False, "bfloat16", "bfloat16"),  # what is asked for is what runs
    (True, "float16", "float16"),
])
def test_vllm_runs_float32_where_the_cpu_would_emulate_bfloat16(trained, monkeypatch, native, setting, expected):
    from mtft.serve.vllm_plugin import lora_ops

    _, options, _ = trained
    monkeypatch.setattr(lora_ops, "native_half", lambda: native)
    config = ServeConfig(registry=options.registry, dtype=setting)
    argv, _ = vllm_command(config, plan(config), 8001, None, "auto")
    assert argv[argv.index("--dtype") + 1] == expected


def test_the_router_config_passes_the_options_on_and_names_the_vllm_it_fronts(trained):
    from mtft.router import RouterConfig

    _, options, _ = trained
    config = ServeConfig(registry=options.registry, default="yesno", port=9001, poll_s=0.5, max_body_bytes=1000)
    chosen = plan(config)
    routing = router_config(config, chosen, ["http://127.0.0.1:8100", "http://10.0.0.2:8000"], None)
    assert (routing.default, routing.port, routing.poll_s, routing.max_body_bytes) == ("yesno", 9001, 0.5, 1000)
    assert routing.registry == options.registry.resolve() and routing.registry.is_absolute()
    assert (routing.backends, routing.base_fingerprint, routing.max_rank, routing.slots) == (
        ["http://127.0.0.1:8100", "http://10.0.0.2:8000"], chosen.base_fingerprint, 8, chosen.max_cpu_loras)
    assert routing.base_adapter is None
    with_zero = router_config(config, chosen, ["http://x"], Path("zero"))
    assert (with_zero.base_adapter, with_zero.base_adapter_path) == (ZERO_ADAPTER, Path("zero"))
    assert RouterConfig.model_validate_json(routing.model_dump_json()) == routing  # what router.json holds


@pytest.mark.parametrize(("setting", "replicas", "cores", "expected"), [
    ("auto", 0, [0, 1], []),                # --backend only
    ("auto", 1, [0, 1], ["auto"]),          # vLLM picks, as before
    ("auto", 2, [0, 1], ["0", "1"]),        # one core each on 2 cores
    ("auto", 2, [0, 1, 2, 3, 4], ["0,1", "2,3"]),
    ("auto", 3, [0, 1], ["0", "1", "0"]),   # more replicas than cores: they share
    ("nobind", 2, [0, 1], ["nobind", "nobind"]),
    ("0-3;4-7", 2, [0], ["0-3", "4-7"]),
    ("0-3", 1, [0], ["0-3"]),
])
def test_cores_are_split_between_replicas(setting, replicas, cores, expected):
    assert cpu_binds(setting, replicas, cores) == expected


def test_one_core_list_for_two_replicas_is_refused():
    with pytest.raises(ServeError, match=r"1 core list\(s\) for 2 replicas: give one per replica separated by ';'"):
        cpu_binds("0-3", 2, [0, 1])


@pytest.mark.parametrize(("options", "message"), [
    ({"replicas": 0}, "--replicas 0 needs at least one --backend"),
    ({"vllm_only": True, "backends": ["http://x"]}, "--vllm-only .* takes no --backend"),
    ({"vllm_only": True, "replicas": 2}, "--vllm-only starts one backend"),
    ({"replicas": -1}, "replicas: Input should be greater than or equal to 0"),
    ({"kv_cache_gib": 0.5}, r"--kv-cache-gib 0.5: vLLM's CPU build takes whole GiB"),
])
def test_where_to_serve_is_checked_with_the_options(tmp_path, options, message):
    with pytest.raises(ServeConfigError, match=message):
        load_config(None, {"registry": tmp_path, **options})


def invoke_serve(*args: str):
    """`mtft-serve ARGS` in this process, its signal handlers put back afterwards."""
    from typer.testing import CliRunner

    from mtft.serve.cli import app

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "240"})
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_every_config_field_is_a_flag_whose_help_is_its_description():
    shown = " ".join(invoke_serve("--help").output.split())
    for flag in ("--registry", "--config", "--poll-s", "--vllm-arg", "--base-workaround", "--no-base-workaround",
                 "--restart-vllm", "--no-restart-vllm", "--max-model-len", "--upstream-timeout-s", "--replicas",
                 "--backend", "--vllm-only", "--pin", "--copies", "--spill-inflight"):
        assert flag in shown
    assert "the router's port; default: 8000" in shown
    assert ServeConfig.model_fields["base_model"].description in shown


def test_flags_win_over_the_yaml_file_and_what_no_flag_names_is_kept(tmp_path):
    (tmp_path / "serve.yaml").write_text(f"registry: {tmp_path / 'empty'}\nport: 9001\nhost: 0.0.0.0\n"
                                         "base_workaround: true\nvllm_args: [--seed=1]\ndtype: float32\n")
    result = invoke_serve("--config", str(tmp_path / "serve.yaml"), "--port", "9002", "--no-base-workaround",
                          "--vllm-arg=--seed=0", "--vllm-arg=--enforce-eager", "--state-dir", str(tmp_path / "state"))
    assert result.exit_code == 1 and "--base-model" in result.output  # an empty registry: nothing to serve
    saved = ServeConfig.model_validate_json((tmp_path / "state" / "serve.json").read_text())
    assert (saved.port, saved.host, saved.base_workaround, saved.vllm_args, saved.dtype) == (
        9002, "0.0.0.0", False, ["--seed=0", "--enforce-eager"], "float32")
    assert saved.poll_s == ServeConfig.model_fields["poll_s"].default


def test_bad_flags_are_reported_like_a_bad_yaml_file(tmp_path):
    result = invoke_serve("--registry", str(tmp_path), "--poll-s", "-1", "--max-loras", "0")
    assert result.exit_code == 2
    assert "flags: 2 problem(s)" in result.output and "poll_s" in result.output and "max_loras" in result.output


def test_serve_uses_only_the_routers_config_and_the_router_nothing_of_serve():
    """The router is serve's child, started from a file whose schema is the router's; that is the one import."""
    root = Path(__file__).parents[1]

    def imported(folder: str) -> set[str]:
        lines = (line for path in (root / folder).rglob("*.py") for line in path.read_text().splitlines())
        return {line.split()[1] for line in lines if line.startswith(("from mtft.", "import mtft."))}

    assert {name for name in imported("serve") if not name.startswith("mtft.registry")} == {"mtft.router.config"}
    assert {name for name in imported("router") if not name.startswith("mtft.registry")} == set()
