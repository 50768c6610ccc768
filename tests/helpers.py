"""What several test modules share: records and route tables, a saved adapter, training-run probes,
HF + PEFT greedy references, and an environment that hides packages from Python processes.

Heavy libraries (torch, transformers, peft, the training CLI) are imported where used, so that
test modules without them stay quick to import. Deploy checks live in deploy_checks.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mtft.registry import AdapterRecord, BaseModelRef, PromptTemplate, Registry
from mtft.router import RouteTable

# ---- records, route tables and a saved adapter ------------------------------------------------

@pytest.fixture(scope="session")
def adapter_dir(tiny_base, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter saved from the tiny base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


def record(task="yesno") -> AdapterRecord:
    return AdapterRecord(
        task=task, prefix=f"{task}: ", template=PromptTemplate(input="{text}", target="{label}"),
        base_model=BaseModelRef(name="tiny", path="/tiny", fingerprint="sha256:0"),
        rank=8, alpha=16, target_modules=["q_proj", "v_proj"], metric="accuracy",
        metrics={"base": 0.1, "adapter": 0.9}, max_new_tokens=4,
    )


BASE_REF = BaseModelRef(name="tiny", path="/models/tiny", fingerprint="sha256:" + "1" * 64)


def routed_record(task: str, prefix: str, version: int = 1, **extra) -> AdapterRecord:
    """A record for routing tests: a prompt template that shows the prefix and the input."""
    return AdapterRecord(task=task, version=version, prefix=prefix, base_model=BASE_REF, rank=8, alpha=16,
                         target_modules=["q_proj"], metric="exact_match", max_new_tokens=5,
                         template=PromptTemplate(input="{text}", target="{label}", prompt="{prefix}{input}\nA:"),
                         **extra)


def table(default: str | None = None, base_target: str = "mtft-base-zero") -> RouteTable:
    records = [routed_record("summarize", "summarize: "), routed_record("summarize-de", "summarize: de: ", version=3),
               routed_record("yesno", "yesno: ", version=2)]
    return RouteTable(current={r.task: r for r in records}, base_names=frozenset({"base", "tiny"}),
                      base_target=base_target, default=default)


# ---- training runs ------------------------------------------------------------------------------

def run_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(registry: Path, task: str, version: int = 1) -> dict:
    from safetensors.torch import load_file

    return load_file(Registry(registry).version_dir(task, version) / "adapter_model.safetensors")


def kill_at_random_step(command: list[str], metrics: Path, total: int) -> str:
    """Start a training run of `total` steps and SIGKILL it once it has logged a step drawn at random.

    The draw stops at two thirds, so the kill lands mid-way however fast steps are, and the killed
    run and its resume together take one run's time whatever is drawn. Returns what to put in
    assertion messages: the drawn step, the last one logged, and how to rerun with that draw."""
    drawn = int(os.environ.get("MTFT_KILL_STEP") or random.randint(2, total * 2 // 3))
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.time() < started + 300 and proc.poll() is None and logged_steps(metrics) < drawn:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = logged_steps(metrics)
    kill = (f"killed after step {reached} of {total} ({time.time() - started:.0f} s), drawn {drawn}: "
            f"rerun with MTFT_KILL_STEP={drawn}")
    assert drawn <= reached < total, f"the run was not killed mid-way ({kill})"
    return kill


def logged_steps(metrics: Path) -> int:
    """Step rows in a run log (they carry a loss; the final evaluation rows do not)."""
    return sum('"loss"' in row for row in metrics.read_text().splitlines()) if metrics.exists() else 0


def cli(*args: str):
    from typer.testing import CliRunner

    from mtft.train.cli import app

    return CliRunner().invoke(app, list(args))


# ---- HF + PEFT greedy references for vLLM -------------------------------------------------------

NEW_TOKENS = 8
ENGINE = Path(__file__).with_name("vllm_greedy.py")


def hf_greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """A plain argmax loop: no generate() options that could bend the comparison."""
    import torch

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
    import torch
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


# ---- processes that cannot import some packages -------------------------------------------------

# Put first on sys.path by PYTHONPATH: hides IMPORT_BLOCK's packages and, with IMPORT_DUMP set,
# writes <IMPORT_DUMP>/<pid>.json with argv and sys.modules at exit and every 0.2 s before
# (uvicorn re-raises SIGTERM after its shutdown, so the router never runs its atexit hooks).
SITECUSTOMIZE = '''
import atexit, json, os, sys, threading, time

BLOCKED = set(filter(None, os.environ.get("IMPORT_BLOCK", "").split(",")))


class Hide:
    """A finder that does not see BLOCKED: to import and to importlib.util.find_spec they are not installed."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
folder = os.environ.get("IMPORT_DUMP")


def write():
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump({"argv": sys.argv, "modules": sorted(sys.modules)}, handle)
    os.replace(path + ".tmp", path)


def every_moment():
    while True:
        write()
        time.sleep(0.2)


if folder:
    atexit.register(write)
    threading.Thread(target=every_moment, daemon=True).start()
'''


def blocking_env(folder: Path, blocked: tuple[str, ...], dump: Path | None = None) -> dict[str, str]:
    """An environment whose Python processes (children too) cannot import `blocked`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
           "IMPORT_BLOCK": ",".join(blocked)}
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        env["IMPORT_DUMP"] = str(dump)
    return env
