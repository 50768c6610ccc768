"""Training speed on a GPU through our one loop: fp32 vs bf16 base, 1 vs N processes, per recipe.

    python bench/gpu_check.py                      # CUDA; a machine with torch, transformers, peft, accelerate
    python bench/gpu_check.py --device cpu         # smoke mode: tiny model, 6 steps, gloo (6 min on 2 cores)

For a lent GPU machine: the project tree is there, its venv is not, and no model can be fetched.
So this script imports mtft's training package from the tree (no install), builds a random-init
Llama with SmolLM2-135M's shape (`--model tiny`: the test suite's 2-layer size), and trains it on
synthetic token sequences of a prompt/answer shape like the demo tasks'. Random weights cost
exactly what trained ones cost, which is all a speed check measures.

Each configuration runs in its own process group (`--worker`; N processes through
`accelerate launch`): `mtft-train adapters`' plan (one PEFT LoRA) and `--one-pass`'s (every
task's adapter in one pass), with the base in float32 and in bfloat16, on 1 process and on N
(default: every GPU; skipped on one GPU, where NCCL cannot place two ranks). Prints the median
step time, training tokens/s and the ratios, and for N processes the largest adapter weight
difference to the 1-process run (the same global batch must train the same adapter). Under 5
minutes on one H200 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"registry": "registry", "train": "train"}  # mtft.<name> -> folder in the tree
SHAPES = {  # LlamaConfig fields
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1000),
}
TASKS = {"short": (40, 3), "long": (120, 24)}  # task: (prompt tokens, answer tokens), around which lengths vary


def importable_tree() -> Path:
    """A folder that makes `import mtft.train` load this tree's code, without installing it."""
    folder = Path(tempfile.gettempdir()) / "mtft-gpu-check-path"
    (folder / "mtft").mkdir(parents=True, exist_ok=True)
    for name, source in PACKAGES.items():
        link = folder / "mtft" / name
        if not link.exists():
            link.symlink_to(ROOT / source)
    return folder


def missing_packages() -> list[str]:
    """Distributions `import mtft.train` needs that this Python lacks (a GPU box may have only torch & co)."""
    import importlib.util

    modules = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
               "pydantic": "pydantic", "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm",
               "numpy": "numpy", "jinja2": "jinja2", "sacrebleu": "sacrebleu", "rouge_score": "rouge-score"}
    return [dist for module, dist in modules.items() if importlib.util.find_spec(module) is None]


def examples(vocab: int, count: int, seed: int):
    """Synthetic tokenized examples per task: prompt tokens masked, answer tokens learnt."""
    import random

    from mtft.train.batches import IGNORE, Tokenized

    rng = random.Random(seed)
    out = {}
    for task, (prompt, answer) in TASKS.items():
        items = []
        for _ in range(count):
            p, a = rng.randint(prompt // 2, prompt * 3 // 2), rng.randint(max(1, answer // 2), answer * 3 // 2)
            ids = [rng.randrange(3, vocab) for _ in range(p + a)]
            items.append(Tokenized(ids, [IGNORE] * p + ids[p:]))
        out[task] = items
    return out


def worker(args: argparse.Namespace) -> None:
    """One configuration, on this process (and its peers under accelerate launch)."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtft.train import loop
    from mtft.train.plans import LockstepPlan, LoraPlan
    from mtft.train.runlog import RunLog
    from mtft.train.spec import TrainingSpec
    from mtft.train.tasklora import TaskLoRA, peft_init

    accelerator = Accelerator(cpu=args.device == "cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes) if args.device == "cpu" else 4)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.model], max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(config).to(dtype).to(accelerator.device).requires_grad_(False)
    items = examples(config.vocab_size, 64 * args.batch, seed=0)
    training = TrainingSpec(max_steps=args.steps, batch_size=args.batch, learning_rate=1e-3, warmup_steps=0,
                            checkpoint_every=10 * args.steps, max_length=512, dtype=args.dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.plan == "adapters":  # one task's PEFT LoRA, as `mtft-train adapters` trains each task
        peft_model = get_peft_model(model, lora)
        plan = LoraPlan("long", items["long"], peft_model, training)
        weights = lambda: get_peft_model_state_dict(peft_model)  # noqa: E731
    else:  # every task's adapter in one pass, as `--one-pass`
        init, model = peft_init(model, lora)
        task_lora = TaskLoRA(model, list(items), init, 16, 32, 0.0, shared=False)
        plan = LockstepPlan(task_lora, items, training)
        weights = task_lora.state_dict
    setup = loop.Loop(training, out / "checkpoint", RunLog(out), accelerator, pad_id=0)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    loop.train(plan, setup, resume=False)
    if accelerator.is_main_process:
        rows = [r for r in RunLog(out).rows() if "seconds" in r]
        steady = rows[2:] or rows  # the first steps warm up kernels and the allocator
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in weights().items()}, out / "adapter.safetensors")
        (out / "result.json").write_text(json.dumps({
            "wall": time.perf_counter() - began, "step": statistics.median(r["seconds"] for r in steady),
            # every token through the model (the run log's rate), not only the answer tokens learnt from
            "tokens_per_s": sum(r["tokens_per_s"] * r["seconds"] for r in steady) / sum(r["seconds"] for r in steady),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(args: argparse.Namespace, plan: str, dtype: str, processes: int, out: Path) -> dict:
    command = [str(Path(__file__).resolve()), "--worker", "--plan", plan, "--dtype", dtype, "--out", str(out),
               "--device", args.device, "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch)]
    if processes == 1:
        command = [sys.executable, *command]
    else:  # MULTI_GPU is what makes accelerate launch start N processes; without CUDA they run on CPU (gloo)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), *command]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(importable_tree()), os.environ.get("PYTHONPATH", "")]),
                        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{plan} {dtype} x{processes} failed:\n{result.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=list(SHAPES), help="default: smollm2 on cuda, tiny on cpu")
    parser.add_argument("--processes", type=int, help="N of the N-process runs (default: GPUs; cpu: 2)")
    parser.add_argument("--steps", type=int, help="default: 30 on cuda, 6 on cpu")
    parser.add_argument("--batch", type=int, default=16, help="global micro-batch (examples per step)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    parser.add_argument("--plans", default="adapters,one-pass", help="comma-separated: adapters, one-pass")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated base dtypes (float32 first)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="adapters", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.model = args.model or ("tiny" if cpu else "smollm2")
    args.steps = args.steps or (6 if cpu else 30)
    if args.worker:
        sys.path.insert(0, str(importable_tree()))
        return worker(args)

    missing = missing_packages()
    if missing:
        sys.exit(f"missing Python packages for mtft.train on this machine: {' '.join(missing)} (pip install them; "
                 "without an index, bring wheels: pip download <names> -d wheels, then pip install --no-index -f wheels)")
    import torch

    if not cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for the smoke mode")
    gpus = 0 if cpu else torch.cuda.device_count()
    processes = args.processes or (2 if cpu else gpus)
    rows = []
    print(f"{args.model} model, {args.steps} steps of global batch {args.batch}, device "
          f"{'cpu' if cpu else torch.cuda.get_device_name(0)} x{gpus or 1}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for plan in args.plans.split(","):
            for dtype in args.dtypes.split(","):
                counts = [1] + ([processes] if processes > 1 and (cpu or processes <= gpus) else [])
                for n in counts:
                    out = Path(tmp) / f"{plan}-{dtype}-{n}"
                    result = run_config(args, plan, dtype, n, out)
                    if n > 1:
                        from safetensors.torch import load_file

                        one = load_file(Path(tmp) / f"{plan}-{dtype}-1" / "adapter.safetensors")
                        many = load_file(out / "adapter.safetensors")
                        result["max_diff_to_1"] = max(float((one[k] - many[k]).abs().max()) for k in one)
                    rows.append({"plan": plan, "dtype": dtype, "processes": n, **result})
                    print(json.dumps(rows[-1]), flush=True)
    if processes <= 1 or (not cpu and processes > gpus):
        print(f"N-process runs skipped: {gpus} GPU(s); NCCL needs one GPU per process")
    base = {(r["plan"], r["processes"]): r for r in rows if r["dtype"] == rows[0]["dtype"]}
    print(f"\n{'plan':<10}{'dtype':<10}{'procs':>6}{'step s':>9}{'tokens/s':>11}{'vs ' + rows[0]['dtype']:>13}"
          f"{'vs 1 proc':>11}"
          f"{'max |dw| vs 1':>15}")
    for r in rows:
        one = next(x for x in rows if (x["plan"], x["dtype"], x["processes"]) == (r["plan"], r["dtype"], 1))
        fp32 = base[(r["plan"], r["processes"])]
        diff = f"{r['max_diff_to_1']:.1e}" if "max_diff_to_1" in r else "-"
        print(f"{r['plan']:<10}{r['dtype']:<10}{r['processes']:>6}{r['step']:>9.3f}{r['tokens_per_s']:>11,.0f}"
              f"{r['tokens_per_s'] / fp32['tokens_per_s']:>12.2f}x{r['tokens_per_s'] / one['tokens_per_s']:>10.2f}x"
              f"{diff:>15}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
