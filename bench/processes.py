"""Training step time on one process vs several (`accelerate launch`), side by side, same global batch.

    .venv/bin/python bench/processes.py                   # demo task ticket, SmolLM2-135M, 10 steps
    .venv/bin/python bench/processes.py --steps 20 --processes 2 --cores 2

Runs `mtft-train adapters` on one demo task twice with the same spec (dropout 0, a small eval
split): once as one process with every core, once under `accelerate launch` with N processes of
cores / N threads each (deploy/accelerate/1node-cpu.yaml; gloo on CPU). Prints the whole run's
wall time (start-up, zero-shot and final evaluation on the main process, training, publishing),
the training steps' total and median (from the run log: the main process's step, the gradient
sum included), their ratios, and the largest weight difference between the two adapters (they train
the same global batch, so they should agree up to float error).
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report import save  # noqa: E402

CONFIG = ROOT / "deploy" / "accelerate" / "1node-cpu.yaml"


def bench_spec(source: Path, out: Path, task: str, steps: int, eval_examples: int) -> Path:
    """The demo spec with one task, `steps` steps, dropout 0, no evaluations during training."""
    from mtft.train import resolve_base

    spec = yaml.safe_load(source.read_text())
    spec["base_model"] = str(resolve_base(spec["base_model"]))  # a folder: each run gets its own MTFT_HOME
    spec["lora"]["dropout"] = 0.0
    spec["training"] |= {"max_steps": steps, "eval_every": None, "checkpoint_every": steps}
    [entry] = [t for t in spec["tasks"] if t["name"] == task]
    entry["data"] = {k: str((source.parent / v).resolve()) if k in ("train", "eval") else v
                     for k, v in entry["data"].items()}
    entry["limits"] = {**entry.get("limits", {}), "eval_examples": eval_examples}
    spec["tasks"] = [entry]
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], threads: int, folder: Path) -> tuple[float, list[float]]:
    """(wall seconds, per-step seconds) of one training command.

    Each run has its own MTFT_HOME, so both evaluate the base model (no zero-shot cache hit).
    """
    began = time.perf_counter()
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MTFT_HOME": str(folder / "home")}
    result = subprocess.run(command + ["--registry", str(folder / "reg"), "--output", str(folder / "run"),
                                       "--threads", str(threads)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return wall, [r["seconds"] for r in rows if "seconds" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "train/demo/tasks.yaml")
    parser.add_argument("--task", default="ticket")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--eval-examples", type=int, default=8)
    args = parser.parse_args()

    from safetensors.torch import load_file

    from mtft.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        spec = bench_spec(args.spec, Path(tmp) / "tasks.yaml", args.task, args.steps, args.eval_examples)
        train = ["-m", "mtft.train.cli", "adapters", "--config", str(spec)]
        configs = {
            f"1 process x {args.cores} threads": ([sys.executable, *train], args.cores),
            f"{args.processes} processes x {args.cores // args.processes} threads": (
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                 "--num_processes", str(args.processes), "--main_process_port", str(free_port()), *train],
                max(1, args.cores // args.processes)),
        }
        results = {}
        for i, (label, (command, threads)) in enumerate(configs.items()):
            folder = Path(tmp) / str(i)
            wall, steps = run(command, threads, folder)
            weights = load_file(Registry(folder / "reg").version_dir(args.task, 1) / "adapter_model.safetensors")
            results[label] = (wall, sum(steps), statistics.median(steps[1:] or steps), weights)
    (one_wall, one_steps, one_step, a), (many_wall, many_steps, many_step, b) = results.values()
    batch = yaml.safe_load(args.spec.read_text())["training"]["batch_size"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    lines = [f"{args.task}: {args.steps} steps of global batch {batch}, {args.cores} cores",
             f"{'':<26}{'whole run s':>12}{'steps s':>9}{'median step s':>15}"]
    lines += [f"{label:<26}{wall:>12.1f}{steps:>9.1f}{step:>15.3f}" for label, (wall, steps, step, _) in results.items()]
    lines += [f"{'speed-up':<26}{one_wall / many_wall:>11.2f}x{one_steps / many_steps:>8.2f}x{one_step / many_step:>14.2f}x",
              f"largest adapter weight difference between the two: {diff:.2e}"]
    print("\n" + "\n".join(lines))
    save("B4-training-processes", f"one process vs {args.processes} (accelerate launch), same global batch",
         "```\n" + "\n".join(lines) + "\n```",
         {"task": args.task, "steps": args.steps, "global_batch": batch, "cores": args.cores, "max_weight_diff": diff,
          "runs": {label: {"wall_s": wall, "steps_s": steps, "median_step_s": step}
                   for label, (wall, steps, step, _) in results.items()}},
         ["speed-up = 1 process / N processes, both runs in this benchmark, one after the other"])


if __name__ == "__main__":
    main()
