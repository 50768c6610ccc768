"""Training speed: `mtft-train adapters` and `--one-pass` against a plain HF+PEFT loop, same examples and steps.

    .venv/bin/python bench/train_speed.py --data ../shared/data            # part of `make bench`

Real data (SST-2, GSM8K, SciTLDR from --data, seeded subsamples written under --out; mixed
lengths: 10 to 190 tokens), SmolLM2-135M, rank-8 LoRA on all seven projections. Every
configuration trains every task for --steps optimizer steps of --batch examples and then scores
--eval held-out examples per task with the same greedy evaluation, in its own process (peak RSS is
that process's). The peer is the loop everyone writes first: shuffled batches padded to their
longest row, `model(labels=...)` computing logits over the whole vocabulary at every position,
float32 (and bfloat16 where the CPU or GPU computes it natively; elsewhere it is skipped and the
matmul ratio that rules it out is printed). mtft runs `adapters` and `--one-pass`, each with
`training.packing` off and on (`-packed`). Tokens/s counts real (non-pad) tokens of the training
steps; "train s" is the time in training steps only, "wall s" the whole process (imports, model
load and final evaluation included). mtft caches zero-shot scores per (base, task, eval data) and
the peer scores no base model, so an untimed run fills that cache before the mtft configs: every
timed run does the same work. Ratios are to the float32 peer, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import peer  # noqa: E402  (the plain HF+PEFT loop, shared with gpu_check.py)
from multitask_real import TASKS, Dumper  # noqa: E402  (the real-data tasks, shared with that bench)
from report import save  # noqa: E402

CONFIGS = ("peer-fp32", "peer-bf16", "adapters", "adapters-packed", "one-pass", "one-pass-packed")
WARM = "zero-shot"  # an untimed run before the mtft configs: see warm_zero_shot


def write_spec(args: argparse.Namespace) -> Path:
    """Seeded subsamples of each task and a spec over them (also what the peer trains on)."""
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for task in TASKS:
        for role, name, count in (("train", task.files[0], args.train), ("eval", task.files[1], args.eval)):
            rows = task.read(args.data / name)
            picked = random.Random(f"{args.seed}/{task.name}/{role}").sample(rows, min(count, len(rows)))
            (folder / f"{task.name}.{role}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
        tasks.append({"name": task.name, **task.spec,
                      "data": {"train": f"data/{task.name}.train.jsonl", "eval": f"data/{task.name}.eval.jsonl"}})
    spec = {"base_model": "smollm2-135m", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1e-3,
                         "warmup_steps": 2, "max_length": 192, "checkpoint_every": 1000, "threads": args.threads,
                         "seed": args.seed},
            "tasks": tasks}
    path = args.out / "speed.yaml"
    path.write_text(f"# .venv/bin/mtft-train adapters --config {path}\n"
                    + yaml.dump(spec, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120))
    return path


def run_peer(spec_path: Path, out: Path, dtype_name: str) -> dict:
    """The plain HF+PEFT loop, one task after another, then the same evaluation as mtft's."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from mtft.train import load_spec
    from mtft.train.evaluate import evaluate
    from mtft.train.check import RunOptions, check_run

    spec = load_spec(spec_path)
    checked = check_run(spec, RunOptions(output=out, registry=out / "registry"))
    torch.set_num_threads(spec.training.threads)
    dtype, t = getattr(torch, dtype_name), spec.training
    tokenizer = checked.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores, tokens, train_s = {}, 0, 0.0
    for task in checked.tasks:
        torch.manual_seed(t.seed)
        model = AutoModelForCausalLM.from_pretrained(checked.base_dir, dtype=dtype)
        lora = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=0.0,
                          target_modules=checked.target_modules, task_type="CAUSAL_LM")
        model, optimizer = peer.wrap(model, lora, t.learning_rate)
        examples = checked.data[task.name].train
        rng = random.Random(t.seed)
        order = []
        began = time.perf_counter()
        for _ in range(t.max_steps):
            if len(order) < t.batch_size:
                order += rng.sample(range(len(examples)), len(examples))
            batch, order = [examples[i] for i in order[:t.batch_size]], order[t.batch_size:]
            rows = []
            for e in batch:
                prompt = tokenizer(e.prompt).input_ids
                answer = tokenizer(e.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                ids = (prompt + answer)[-t.max_length:]
                rows.append((ids, ([-100] * len(prompt) + answer)[-t.max_length:]))
            tokens += peer.step(model, optimizer, rows, pad)
        train_s += time.perf_counter() - began
        # mtft's evaluation: the same prompts, greedy decoding, metric and batching.
        scores[task.name] = evaluate(model, tokenizer, checked.data[task.name].eval, task.metric, task.labels,
                                     task.max_new_tokens, [tokenizer.eos_token_id], t.eval_batch_size).score
    return {"train_s": train_s, "tokens": tokens, "scores": scores}


def run_mtft(spec_path: Path, out: Path, config: str) -> dict:
    from mtft.train import RunOptions, load_spec, train_adapters, train_one_pass

    trainer = train_one_pass if config.startswith("one-pass") else train_adapters
    spec = load_spec(spec_path)
    spec.training.packing = config.endswith("-packed")
    results = trainer(spec, RunOptions(output=out, registry=out / "registry"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tasks" in r]
    return {"train_s": sum(r["seconds"] for r in steps), "tokens": sum(r["tokens_per_s"] * r["seconds"] for r in steps),
            "scores": {r.task: r.adapter for r in results}}


def warm_zero_shot(spec_path: Path, out: Path) -> dict:
    """Fill mtft's zero-shot cache for these tasks: the peer scores no base model, so no timed mtft run should."""
    from mtft.train import RunOptions, load_spec
    from mtft.train.check import check_run
    from mtft.train.session import Session

    spec = load_spec(spec_path)
    options = RunOptions(output=out, registry=out / "registry")
    session = Session(spec, options, check_run(spec, options))
    session.score_base()
    session.close()
    return {}


def child(args: argparse.Namespace) -> None:
    """One configuration in this process; prints its JSON result on the last line."""
    os.environ.setdefault("MTFT_HOME", str(Path.home() / ".cache" / "mtft"))
    out = args.out / args.run
    began = time.perf_counter()
    if args.run == WARM:
        result = warm_zero_shot(args.spec, out)
    elif args.run.startswith("peer-"):
        result = run_peer(args.spec, out, "float32" if args.run == "peer-fp32" else "bfloat16")
    else:
        result = run_mtft(args.spec, out, args.run)
    print(json.dumps({**result, "wall_s": time.perf_counter() - began}))


def matmul_ratio() -> float:
    """How much longer a bf16 matmul takes than fp32 on this CPU (AVX2-only machines emulate bf16)."""
    import torch

    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(256, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        began = time.perf_counter()
        for _ in range(5):
            a @ b
        times[dtype] = time.perf_counter() - began
    return times[torch.bfloat16] / times[torch.float32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BENCH.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train-speed"))
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per task")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int, default=400, help="training examples sampled per task")
    parser.add_argument("--eval", type=int, default=40, help="held-out examples scored per task")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset to run (peer-fp32 is the ratios' reference)")
    parser.add_argument("--run", choices=(*CONFIGS, WARM), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    args.out = args.out.resolve()
    spec = write_spec(args)
    import torch

    from mtft.train.hardware import choose_dtype

    native_bf16 = choose_dtype("auto", torch.device("cpu"))[0] == torch.bfloat16
    measured = {}
    chosen = args.configs.split(",")
    if unknown := set(chosen) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    runs = [c for c in CONFIGS if c in chosen]
    if any(not c.startswith("peer-") for c in runs):
        runs.insert(next(i for i, c in enumerate(runs) if not c.startswith("peer-")), WARM)
    for config in runs:
        if config == "peer-bf16" and not native_bf16:
            print(f"peer-bf16: skipped; no native bf16 here (a bf16 matmul takes {matmul_ratio():.0f}x the fp32 one)")
            continue
        argv = [sys.executable, __file__, "--run", config, "--spec", str(spec), "--out", str(args.out)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            sys.exit(f"{config} failed (status {status}); rerun: {' '.join(argv)}")
        result = json.loads(stdout.strip().splitlines()[-1]) | {"rss_mib": usage.ru_maxrss / 1024}
        print(f"{config}: {result['wall_s']:.0f} s", flush=True)
        if config != WARM:
            measured[config] = result
    peer = measured.get("peer-fp32") or next(iter(measured.values()))
    tasks = list(peer["scores"])
    setting = (f"{len(tasks)} tasks x {args.steps} steps x batch {args.batch}, {args.threads} threads, "
               f"SmolLM2-135M; eval on {args.eval} held-out examples per task")
    print(f"\n{setting}; resource self max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (parent)")
    sequential = measured.get("adapters") or peer
    # Where bf16 is native the training-speed target is against the bf16 peer: its own column then.
    bf16_peer = measured.get("peer-bf16")
    head = ["config", "train s", "wall s", "tok/s", "train speed-up", "wall speed-up",
            *(["wall vs peer-bf16"] if bf16_peer else []), "wall vs adapters", "peak RSS MiB"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, m in measured.items():
        lines.append("| " + " | ".join([config, f"{m['train_s']:.1f}", f"{m['wall_s']:.1f}",
                                        f"{m['tokens'] / m['train_s']:.0f}", f"{peer['train_s'] / m['train_s']:.2f}x",
                                        f"{peer['wall_s'] / m['wall_s']:.2f}x",
                                        *([f"{bf16_peer['wall_s'] / m['wall_s']:.2f}x"] if bf16_peer else []),
                                        f"{sequential['wall_s'] / m['wall_s']:.2f}x", f"{m['rss_mib']:.0f}"]
                                       + [f"{m['scores'][t]:.3f}" for t in tasks]) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    save("B4-training-speed", "mtft-train vs a plain HF+PEFT loop, same examples and steps", table,
         {"setting": setting, "native_bf16": native_bf16, "configs": measured},
         [setting, "speed-ups are to peer-fp32 (the plain loop), each config in its own process in this run; "
          "peak RSS is that process's", "wall vs adapters: one run per task (`mtft-train adapters`, packing off) "
          "over this config's wall time; the one-pass target is one-pass-packed >= 1.0x"])


if __name__ == "__main__":
    main()
