"""vLLM (CPU build, offline engine) serves our adapters token for token like HF + PEFT."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENGINE, NEW_TOKENS, hf_peft_greedy, latest_adapters

from mtft.registry import Registry, render_prompt


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
