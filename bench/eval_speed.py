"""Evaluation speed: HF `generate` (the default path before vLLM) vs vLLM's offline engine, same prompts and adapter.

    .venv/bin/python bench/eval_speed.py --data ../shared/data          # part of `make bench`

Real data (SST-2, GSM8K, SciTLDR from --data: --eval seeded test examples per task, their real
prompt lengths and each task's max_new_tokens), SmolLM2-135M in the dtype training picks here,
one rank-8 LoRA on all seven projections with random nonzero B (speed does not depend on what it
learnt). Both engines are the ones `mtft-train` evaluates with (`training.eval_engine`): HF
`generate` in batches of `eval_batch_size` (16) and `VllmEvaluator` (a worker process; its start
is timed apart). The table gives seconds per task and in all, the ratio HF / vLLM with and without
the engine's start, and how many answers agree (they should all).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from multitask_real import TASKS  # noqa: E402  (the real-data tasks, shared with that bench)
from report import save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--eval", type=int, default=100, help="test examples per task (3 tasks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.registry import PromptTemplate, render_input, render_prompt
    from mtft.train.base import resolve_base
    from mtft.train.evaluate import end_ids, generate
    from mtft.train.hardware import choose_dtype
    from mtft.train.vllm_eval import EngineConfig, VllmEvaluator

    torch.set_num_threads(args.threads)
    base = resolve_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    dtype, reason = choose_dtype("auto", torch.device("cpu"))
    workloads = []
    for task in TASKS:
        rows = task.read(args.data / task.files[1])
        rows = random.Random(f"{args.seed}/{task.name}").sample(rows, min(args.eval, len(rows)))
        template = PromptTemplate(**task.spec["template"])  # plain format: the real tasks' prompts
        prompts = [render_prompt(template, task.spec["prefix"], render_input(template, r)) for r in rows]
        workloads.append((task.name, prompts, task.spec["max_new_tokens"], end_ids(tokenizer, template.format)))

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    scratch = Path(tempfile.mkdtemp(prefix="mtft-eval-speed-"))
    model.save_pretrained(scratch / "adapter")

    longest = max(len(tokenizer(p).input_ids) + new for _, prompts, new, _ in workloads for p in prompts)
    evaluator = VllmEvaluator(EngineConfig(str(base), str(dtype).removeprefix("torch."), 8, longest + 8,
                                           threads=args.threads), scratch / "vllm-eval.log")
    began = time.perf_counter()
    evaluator.start()
    start_s = time.perf_counter() - began

    rows, data = [], []
    for name, prompts, new_tokens, ends in workloads:
        began = time.perf_counter()
        hf = generate(model, tokenizer, prompts, new_tokens, ends, 16)
        hf_s = time.perf_counter() - began
        began = time.perf_counter()
        fast = evaluator.answers(tokenizer, prompts, new_tokens, ends, scratch / "adapter")
        vllm_s = time.perf_counter() - began
        same = sum(a == b for a, b in zip(hf, fast))
        rows.append((name, len(prompts), new_tokens, hf_s, vllm_s, same))
        data.append({"task": name, "examples": len(prompts), "max_new_tokens": new_tokens, "hf_s": hf_s,
                     "vllm_s": vllm_s, "agree": same})
        print(f"{name}: hf {hf_s:.1f} s, vllm {vllm_s:.1f} s, {same}/{len(prompts)} answers agree", flush=True)
    evaluator.close()

    hf_total, vllm_total = sum(r[3] for r in rows), sum(r[4] for r in rows)
    lines = [f"Evaluation, SmolLM2-135M {str(dtype).removeprefix('torch.')} ({reason}), rank-8 LoRA, "
             f"{args.threads} threads; vLLM engine start {start_s:.1f} s (once per run)", "",
             "| task | examples | max new tokens | HF generate s | vLLM s | HF / vLLM | answers agree |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, n, new_tokens, hf_s, vllm_s, same in rows:
        lines.append(f"| {name} | {n} | {new_tokens} | {hf_s:.1f} | {vllm_s:.1f} | {hf_s / vllm_s:.2f}x | {same}/{n} |")
    n, same = sum(r[1] for r in rows), sum(r[5] for r in rows)
    lines.append(f"| all | {n} | | {hf_total:.1f} | {vllm_total:.1f} | {hf_total / vllm_total:.2f}x | {same}/{n} |")
    lines.append(f"| all, with the engine's start | {n} | | {hf_total:.1f} | {vllm_total + start_s:.1f} | "
                 f"{hf_total / (vllm_total + start_s):.2f}x | |")
    table = "\n".join(lines)
    print("\n" + table)
    save("B4-eval-speed", "Evaluation: HF generate vs vLLM offline engine", table,
         {"start_s": start_s, "tasks": data, "dtype": str(dtype)},
         notes=["Both engines are the ones mtft-train evaluates with; answers compared as strings."])


if __name__ == "__main__":
    main()
