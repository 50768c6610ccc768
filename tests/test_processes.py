"""Training on several processes (`accelerate launch`, 2 CPU processes over gloo) equals one process,
with the frozen base whole on every process or sharded over them (FSDP2).

Each launch costs ~25 s on 2 cores (two interpreters importing torch); the 1-process references
are the session fixtures `trained` and `shared_trained`, made with the same specs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtft.registry import Registry
from mtft.train import RunOptions, load_spec, train_shared
from mtft.train import loop as train_loop
from mtft.train.processes import FSDP_NOT_APPLIED, Ranks, check_processes

from conftest import tiny_spec
from helpers import adapter_weights, run_log

CONFIG = Path(__file__).parents[1] / "deploy" / "accelerate" / "1node-cpu.yaml"
FSDP_CONFIG = CONFIG.with_name("1node-cpu-fsdp.yaml")  # the frozen base sharded over the 2 processes
# Summing two processes' partial gradients reorders float sums (~1e-7); Adam turns that into
# differences of ~1e-6 after a dozen steps (measured 1.3e-6), far below what training moves (>1e-2).
WEIGHT_TOLERANCE = 1e-4


def launch(*args: str, timeout: int = 300, config: Path = CONFIG) -> subprocess.CompletedProcess:
    """`accelerate launch` of mtft-train with 2 processes of 1 thread each, as a user would run it."""
    with socket.socket() as s:  # a free rendezvous port: other launches may run beside this one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(port), "-m", "mtft.train.cli", *args, "--threads", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def assert_same_adapters(registry: Path, reference: Path, tasks: list[str]) -> None:
    for task in tasks:
        assert Registry(registry).versions(task) == [1], "published more than once"
        mine, ref = adapter_weights(registry, task), adapter_weights(reference, task)
        assert mine.keys() == ref.keys()
        assert max((mine[k] - ref[k]).abs().max() for k in ref) < WEIGHT_TOLERANCE, task
        assert max(w.abs().max() for k, w in ref.items() if "lora_B" in k) > 100 * WEIGHT_TOLERANCE, "never trained"


def step_rows(output: Path) -> list[dict]:
    return [r for r in run_log(output) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG, FSDP_CONFIG], ids=["data-parallel", "fsdp"])
def test_two_processes_train_the_adapters_one_process_trains(trained, tmp_path, config):
    spec, options, _ = trained
    result = launch("adapters", "--config", str(spec.source), "--registry", str(tmp_path / "reg"),
                    "--output", str(tmp_path / "run"), config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("base model sharded over 2 processes (FSDP2" in result.stderr) == (config == FSDP_CONFIG)
    assert_same_adapters(tmp_path / "reg", options.registry, ["yesno", "echo"])
    assert result.stdout.count("adapters published to") == 1, "every process printed the table"
    mine, ref = step_rows(tmp_path / "run"), step_rows(options.output)
    assert [(r["task"], r["step"]) for r in mine] == [(r["task"], r["step"]) for r in ref], "rows written twice"
    for a, b in zip(mine, ref):  # the whole step's loss and counts, reduced over both processes
        [(task, stats)] = a["tasks"].items()
        assert stats["loss"] == pytest.approx(b["tasks"][task]["loss"], rel=1e-5)
        assert (stats["examples"], stats["tokens"], a["seen"]) == (b["tasks"][task]["examples"],
                                                                   b["tasks"][task]["tokens"], b["seen"])


@pytest.mark.slow
def test_one_pass_on_two_processes_equals_the_adapters_trained_alone(trained, tmp_path):
    spec, options, _ = trained
    result = launch("adapters", "--one-pass", "--config", str(spec.source), "--registry", str(tmp_path / "reg"),
                    "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapters(tmp_path / "reg", options.registry, ["yesno", "echo"])


class Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG, FSDP_CONFIG], ids=["data-parallel", "fsdp"])
def test_a_shared_run_stopped_on_one_process_resumes_on_two(shared_trained, tmp_path, monkeypatch, config):
    folder, spec_path, _ = shared_trained
    save = train_loop._save

    def save_then_die(ckpt, plan, optimizers, schedulers, step, seen):
        save(ckpt, plan, optimizers, schedulers, step, seen)
        if step == 8:
            raise Killed

    monkeypatch.setattr(train_loop, "_save", save_then_die)
    with pytest.raises(Killed):
        train_shared(load_spec(spec_path), RunOptions(output=tmp_path / "run", registry=tmp_path / "reg"))
    assert not Registry(tmp_path / "reg").versions("yesno")

    result = launch("shared", "--config", str(spec_path), "--registry", str(tmp_path / "reg"),
                    "--output", str(tmp_path / "run"), "--resume", config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shared: resuming at step 8" in result.stderr
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 25))
    # Steps 20 and 21 draw no echo rows: its task embedding must get no gradient at all (AdamW then
    # skips it, as in one process); a zero gradient would move it by momentum, far past the tolerance.
    assert [r["step"] for r in rows if set(r["tasks"]) == {"yesno"}] == [20, 21]
    assert_same_adapters(tmp_path / "reg", folder / "registry", ["yesno", "echo"])


@pytest.mark.slow
def test_a_batch_that_does_not_divide_by_the_processes_fails_before_training(tiny_base, tmp_path):
    spec_path = tiny_spec(tmp_path, tiny_base, batch_size=3)
    result = launch("adapters", "--config", str(spec_path), "--registry", str(tmp_path / "reg"),
                    "--output", str(tmp_path / "run"))
    assert result.returncode != 0
    assert f"{spec_path}" in result.stderr and "training.batch_size 3 does not divide into the 2 processes" in result.stderr
    assert not (tmp_path / "reg").exists() or not Registry(tmp_path / "reg").records()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_launch_mtft_cannot_run_is_refused_with_what_to_use():
    [deepspeed] = check_processes(8, 4, "DEEPSPEED")
    assert "DEEPSPEED is not supported" in deepspeed and "use FSDP (deploy/accelerate/1node-ngpu-fsdp.yaml" in deepspeed
    [fsdp1] = check_processes(8, 4, "FSDP", fsdp_version=1)
    assert "fsdp_version 1 is not supported" in fsdp1 and "set fsdp_version: 2" in fsdp1
    [quantized] = check_processes(8, 4, "FSDP", fsdp_version=2, quantized=True)
    assert quantized.startswith("training.base_quantization with FSDP is not supported") and "1node-ngpu.yaml" in quantized
    [other] = check_processes(8, 4, "XLA")
    assert "distributed_type XLA is not supported" in other and "MULTI_GPU" in other
    assert check_processes(8, 4, "MULTI_GPU") == [] and check_processes(8, 1, "NO") == []
    assert check_processes(8, 4, "FSDP", fsdp_version=2) == [] and check_processes(8, 4, "MULTI_GPU", quantized=True) == []
    assert check_processes(6, 4, "MULTI_CPU")[0].startswith("training.batch_size 6 does not divide into the 4")


def test_fsdp_settings_mtft_does_not_apply_are_refused_not_dropped():
    # mtft-train shards the frozen base itself, so accelerate's prepare-time FSDP settings would do nothing.
    from accelerate.utils import FullyShardedDataParallelPlugin

    checkpointing, loading = check_processes(8, 2, "FSDP", fsdp_version=2,
                                             fsdp_set=["activation_checkpointing", "cpu_ram_efficient_loading"])
    assert checkpointing == ("accelerate's fsdp_activation_checkpointing: true is not applied by mtft-train (use "
                             "training.gradient_checkpointing, which recomputes the frozen base's layers); set "
                             "fsdp_activation_checkpointing: false in the accelerate config")
    assert loading.startswith("accelerate's fsdp_cpu_ram_efficient_loading: true is not applied by mtft-train")
    # The names are the plugin's own attributes, which Session reads off the launch's plugin.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True)
    assert [name for name in FSDP_NOT_APPLIED if getattr(plugin, name, False)] == ["activation_checkpointing"]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_row_of_a_micro_batch_goes_to_exactly_one_process(count):
    rows = [("a", i) for i in range(7)]
    lengths = {row: (3 * row[1]) % 5 for row in rows}
    shards = [Ranks(SimpleNamespace(process_index=r, num_processes=count, is_main_process=r == 0))
              .shard(rows, lengths.__getitem__) for r in range(count)]
    assert sorted(row for shard in shards for row in shard) == rows
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if count == 1:
        assert shards == [rows], "one process keeps the micro-batch as it is"
    else:
        assert lengths[shards[0][0]] == max(lengths.values()), "the main process has the longest row"
