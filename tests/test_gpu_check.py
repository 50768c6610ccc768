"""bench/gpu_check.py's parity part on CPU: the three recipes train the tiny model, every exported
adapter loaded with plain HF + PEFT matches the in-training model it came from, and a perturbed
export fails the check (the negative control). The script runs where vLLM is absent (the GPU
machine has none): here it runs with vLLM's import refused, and its modules at exit hold none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import blocking_env

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("sequential", "one-pass", "shared")


def gpu_check(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict, list[list[str]]]:
    dump = tmp_path / "modules"
    out = tmp_path / "result.json"
    flags = flags if "--parts" in flags else ("--parts", "parity", "--tiny-steps", "4", *flags)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                             "--json", str(out), *flags],
                            env=blocking_env(tmp_path / "site", ("vllm",), dump) | {"OMP_NUM_THREADS": "2"},
                            capture_output=True, text=True, timeout=300)
    modules = [json.loads(p.read_text())["modules"] for p in dump.glob("*.json")]
    return result, json.loads(out.read_text()) if out.exists() else {}, modules


@pytest.mark.slow
def test_every_exported_adapter_matches_the_model_that_trained_it_on_cpu(tmp_path):
    result, found, modules = gpu_check(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["recipe"] for r in found["recipes"]] == list(RECIPES)
    assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in found["recipes"])
    assert [r["adapter"] for r in found["parity"]] == [f"{r}/{t}" for r in RECIPES for t in ("yesno", "echo")]
    for row in found["parity"]:
        assert row["ok"] and row["max_diff"] <= 1e-4 and row["greedy_same"] == row["prompts"] > 0, row
        assert row["vs_base"] > 1e-3, row  # the adapters trained: the comparison can tell them from the base
    assert "one-pass" in result.stdout and "parity: all 6 exported adapters match" in result.stdout
    assert modules and not any(m.partition(".")[0] == "vllm" for ms in modules for m in ms)


@pytest.mark.slow
def test_a_perturbed_export_fails_the_parity_check(tmp_path):
    result, found, _ = gpu_check(tmp_path, "--perturb", "shared/echo")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "parity FAILED for shared/echo" in result.stderr
    verdicts = {r["adapter"]: r["ok"] for r in found["parity"]}
    assert verdicts.pop("shared/echo") is False and all(verdicts.values())


@pytest.mark.slow
def test_the_speed_part_trains_the_peer_and_mtft_plans_on_the_same_work(tmp_path):
    """Issue 15's GPU readings: the plain HF+PEFT loop and mtft's plans, each over both tasks for the
    same steps of the same batch, and the ratios printed are the measured tokens/s over each other."""
    steps, batch = 3, 4
    result, found, _ = gpu_check(tmp_path, "--parts", "speed", "--plans", "peer,adapters,one-pass-packed",
                                 "--dtypes", "float32", "--processes", "1", "--steps", str(steps),
                                 "--batch", str(batch))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["plan"]: r for r in found["speed"]}
    assert list(rows) == ["peer", "adapters", "one-pass-packed"]
    tasks = 2  # gpu_check.TASKS
    # one task after the other: a step per task; one pass: every task in each step
    assert [rows[p]["steps"] for p in rows] == [tasks * steps, tasks * steps, steps]
    assert {rows[p]["examples"] for p in rows} == {tasks * steps * batch}
    assert all(r["tokens_per_s"] > 0 and r["step"] > 0 for r in rows.values())
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| plan")}
    for plan, row in rows.items():  # vs peer, vs adapters
        assert table[plan][6:8] == [f"{row['tokens_per_s'] / rows[other]['tokens_per_s']:.2f}x"
                                    for other in ("peer", "adapters")], table[plan]


def test_an_unknown_plan_is_refused_by_name(tmp_path):
    result, found, _ = gpu_check(tmp_path, "--parts", "speed", "--plans", "peer,fast")
    assert result.returncode == 1 and not found
    assert "--plans: unknown fast; choose from peer, adapters, adapters-packed, one-pass, one-pass-packed" \
        in result.stderr
