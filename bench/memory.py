"""Memory of a training step on long rows: plain, gradient checkpointing, a 4-bit base, FSDP over 2 processes.

    .venv/bin/python bench/memory.py                      # part of `make bench` (B6)
    .venv/bin/python bench/memory.py --length 256 --steps 2

SmolLM2-135M (the embedded base), rank-8 LoRA on all seven projections, rows of --length tokens
(a long prompt and a 32-token answer, words drawn at random: memory and time do not depend on
what the words say), --batch rows per step, --steps steps. Each configuration runs in its own
process (peak RSS is that process's: the whole run with model load and a 2-example evaluation;
on a GPU also torch's max_memory_allocated): the plain HF+PEFT loop everyone writes first
(`peer.py`), then `mtft-train adapters` plain, with `training.gradient_checkpointing`, with
`training.base_quantization: {bits: 4, type: nf4}`, with `training.attention: sdpa` (the peer's
kernel; `auto` picks eager on CPU), and under `accelerate launch` with the base
sharded over 2 processes (deploy/accelerate/1node-cpu-fsdp.yaml; its peak RSS is the larger of
the two processes'). Step time is the median step after the first. Ratios are to the peer,
measured in this run; every config uses the dtype `training.dtype: auto` picks here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import peer  # noqa: E402  (the plain HF+PEFT loop)
from report import save  # noqa: E402

FSDP = ROOT / "deploy" / "accelerate" / "1node-cpu-fsdp.yaml"
CONFIGS = {  # name -> training keys over the spec's
    "mtft": {},
    "mtft + gradient checkpointing": {"gradient_checkpointing": True},
    # auto picks eager attention on CPU (faster backward on short rows); the peer runs transformers' sdpa.
    "mtft + sdpa attention": {"attention": "sdpa"},
    "mtft + 4-bit base (nf4)": {"base_quantization": {"bits": 4, "type": "nf4"}},
    "mtft FSDP, 2 processes": {},
}
ANSWER = 32


def write_spec(args: argparse.Namespace) -> Path:
    """One task of rows `--length` tokens long (by SmolLM2's tokenizer) and a spec training it."""
    from transformers import AutoTokenizer

    from mtft.train import resolve_base

    base = resolve_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3][:5000]

    def text(tokens: int) -> str:
        out = " ".join(rng.choice(words) for _ in range(tokens))
        ids = tokenizer(out, add_special_tokens=False).input_ids[:tokens]
        return tokenizer.decode(ids)

    rows = [{"input": text(args.length - ANSWER - 8), "output": text(ANSWER - 2)} for _ in range(args.batch * args.steps + 4)]
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"base_model": str(base), "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "max_length": args.length,
                         "learning_rate": 1e-4, "checkpoint_every": 1000, "eval_engine": "hf", "seed": 0},
            "tasks": [{"name": "long", "prefix": "long: ", "template": {"input": "{input}", "target": "{output}"},
                       "data": {"train": str(folder / "long.jsonl"), "eval_fraction": 0.2},
                       "limits": {"eval_examples": 2}, "max_new_tokens": 4}]}
    path = args.out / "memory.yaml"
    path.write_text(f"# .venv/bin/mtft-train adapters --config {path}\n" + yaml.safe_dump(spec, sort_keys=False))
    return path


def run_peer(spec_path: Path) -> dict:
    """The plain loop on the same rows, in mtft's chosen dtype: per-step seconds."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from mtft.train import load_spec
    from mtft.train.batches import tokenize
    from mtft.train.check import RunOptions, check_run
    from mtft.train.hardware import choose_dtype

    spec = load_spec(spec_path)
    checked = check_run(spec, RunOptions(output=spec_path.parent / "peer", registry=spec_path.parent / "peer-reg"))
    t, tokenizer = spec.training, checked.tokenizer
    dtype = choose_dtype(t.dtype, torch.device("cpu"))[0]
    model = AutoModelForCausalLM.from_pretrained(checked.base_dir, dtype=dtype)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=checked.target_modules, task_type="CAUSAL_LM")
    model, optimizer = peer.wrap(model, lora, t.learning_rate)
    items, _ = tokenize(checked.data["long"].train, tokenizer, tokenizer.eos_token_id, t.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seconds = []
    for step in range(t.max_steps):
        rows = [(x.input_ids, x.labels) for x in items[step * t.batch_size:(step + 1) * t.batch_size]]
        began = time.perf_counter()
        peer.step(model, optimizer, rows, pad)
        seconds.append(time.perf_counter() - began)
    return {"seconds": seconds}


def run_mtft(spec_path: Path, out: Path, training: dict) -> dict:
    from mtft.train import RunOptions, load_spec, train_adapters

    spec = load_spec(spec_path)
    spec.training = spec.training.model_validate(spec.training.model_dump() | training)
    train_adapters(spec, RunOptions(output=out, registry=out / "registry"))
    return {"seconds": steps_of(out)}


def steps_of(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"seconds"' in line]


def child(args: argparse.Namespace) -> None:
    """One configuration in this process; prints its JSON result on the last line."""
    import torch

    result = run_peer(args.spec) if args.run == "peer" else run_mtft(args.spec, args.out / "runs" / args.run,
                                                                      CONFIGS[args.run])
    if torch.cuda.is_available():
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def measure(argv: list[str], env: dict) -> tuple[int, str]:
    """(peak RSS in KiB of the process or its largest descendant, stdout) of one command."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed (status {status}); rerun it to see why")
    return usage.ru_maxrss, stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory"))
    parser.add_argument("--length", type=int, default=1024, help="tokens per row (training.max_length)")
    parser.add_argument("--batch", type=int, default=2, help="rows per step (divisible by 2 for FSDP)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--run", choices=("peer", *CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one configuration, in the child process the parent measures
        child(args)
        return
    args.out = args.out.resolve()
    spec = write_spec(args)
    env = os.environ | {"MTFT_HOME": os.environ.get("MTFT_HOME", str(Path.home() / ".cache" / "mtft"))}
    measured = {}
    for name in ("peer", *CONFIGS):
        if name.startswith("mtft FSDP"):
            out = args.out / "runs" / "fsdp"
            threads = max(1, (os.cpu_count() or 2) // 2)
            argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP),
                    "--main_process_port", str(free_port()), "-m", "mtft.train.cli", "adapters", "--config", str(spec),
                    "--registry", str(out / "registry"), "--output", str(out), "--threads", str(threads)]
            rss, _ = measure(argv, env | {"OMP_NUM_THREADS": str(threads)})
            result = {"seconds": steps_of(out)}
        else:
            rss, stdout = measure([sys.executable, __file__, "--run", name, "--spec", str(spec), "--out", str(args.out)],
                                  env)
            result = json.loads(stdout.strip().splitlines()[-1])
        result |= {"rss_mib": rss / 1024, "step_s": statistics.median(result["seconds"][1:] or result["seconds"])}
        measured[name] = result
        print(f"{name}: peak RSS {result['rss_mib']:.0f} MiB, step {result['step_s']:.2f} s", flush=True)
    reference = measured["peer"]
    cuda = "cuda_peak_mib" in reference
    head = ["config", "peak RSS MiB", "RSS vs peer", *(["CUDA peak MiB"] if cuda else []), "step s", "step vs peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in measured.items():
        label = "plain HF+PEFT loop (peer)" if name == "peer" else name + (" (per process)" if "FSDP" in name else "")
        lines.append("| " + " | ".join([label, f"{m['rss_mib']:.0f}", f"{m['rss_mib'] / reference['rss_mib']:.2f}x",
                                        *([f"{m.get('cuda_peak_mib', float('nan')):.0f}"] if cuda else []),
                                        f"{m['step_s']:.2f}", f"{m['step_s'] / reference['step_s']:.2f}x"]) + " |")
    table = "\n".join(lines)
    setting = (f"SmolLM2-135M, rank-8 LoRA on 7 projections, {args.batch} rows x {args.length} tokens per step, "
               f"{args.steps} steps, {os.cpu_count()} cores")
    notes = [setting, "peak RSS: the whole process (model load, training, a 2-example evaluation); FSDP: the larger "
             "of its 2 processes; step s: median step after the first; ratios to the peer in this run"]
    save("B6-memory", "peak memory and step time on long rows: checkpointing, 4-bit base, FSDP", table,
         {"setting": setting, "configs": measured}, notes)
    print(f"\n{setting}\n{table}")


if __name__ == "__main__":
    main()
