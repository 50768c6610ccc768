"""One-pass training of every task's adapter vs one run per task, side by side, on the same examples.

    .venv/bin/python bench/one_pass.py                 # demo tasks on SmolLM2-135M, 20 steps each
    .venv/bin/python bench/one_pass.py --steps 40 --threads 2

Both runs use the demo spec (train/demo/tasks.yaml) with dropout 0 and a small eval split, so
they do the same work apart from how the steps are batched: `mtft-train adapters` trains the
three adapters one after another; `--one-pass` puts every task's batch of a step into one
forward/backward through per-example LoRA layers. Prints the wall time of each (whole run, and
the training steps alone), their ratio, and the largest weight difference between the two runs'
adapters (they should be equal up to float error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report import save  # noqa: E402


def step_seconds(run_log: Path) -> float:
    """Seconds spent in training steps (the run log's step rows), evaluations excluded."""
    return sum(json.loads(line).get("seconds", 0.0) for line in run_log.read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "train/demo/tasks.yaml")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per task")
    parser.add_argument("--eval-examples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from safetensors.torch import load_file

    from mtft.registry import Registry
    from mtft.train import RunOptions, load_spec, train_adapters, train_one_pass

    spec = load_spec(args.spec)
    spec.lora.dropout = 0.0
    spec.training.max_steps, spec.training.threads, spec.training.eval_every = args.steps, args.threads, None
    for task in spec.tasks:
        task.limits.eval_examples = args.eval_examples
        task.training = None  # --steps for every task (the demo gives isodate more of its own)
    names = [t.name for t in spec.tasks]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for label, trainer in (("one run per task", train_adapters), ("one pass", train_one_pass)):
            options = RunOptions(output=Path(tmp) / label.replace(" ", "-"), registry=Path(tmp) / f"{label}-reg")
            began = time.perf_counter()
            trainer(spec, options)
            runs[label] = (time.perf_counter() - began, step_seconds(options.output / "metrics.jsonl"), options.registry)
        (seq_wall, seq_steps, seq_reg), (one_wall, one_steps, one_reg) = runs.values()
        diff = 0.0
        for name in names:
            a = load_file(Registry(seq_reg).version_dir(name, 1) / "adapter_model.safetensors")
            b = load_file(Registry(one_reg).version_dir(name, 1) / "adapter_model.safetensors")
            diff = max(diff, max(float((a[k] - b[k]).abs().max()) for k in a))
    lines = [f"{len(names)} tasks x {args.steps} steps of batch {spec.training.batch_size}, {args.threads} threads, "
             f"base {spec.base_model}",
             f"{'':<18}{'whole run s':>12}{'training steps s':>18}",
             f"{'one run per task':<18}{seq_wall:>12.1f}{seq_steps:>18.1f}",
             f"{'one pass':<18}{one_wall:>12.1f}{one_steps:>18.1f}",
             f"{'speed-up':<18}{seq_wall / one_wall:>11.2f}x{seq_steps / one_steps:>17.2f}x",
             f"largest adapter weight difference between the two: {diff:.2e}"]
    print("\n" + "\n".join(lines))
    save("B4-training-one-pass", "one pass vs one run per task (demo tasks, same examples)",
         "```\n" + "\n".join(lines) + "\n```",
         {"tasks": names, "steps": args.steps, "batch": spec.training.batch_size, "threads": args.threads,
          "base": str(spec.base_model), "max_weight_diff": diff,
          "runs": {"one run per task": {"wall_s": seq_wall, "steps_s": seq_steps},
                   "one pass": {"wall_s": one_wall, "steps_s": one_steps}}},
         ["speed-up = one run per task / one pass, measured one after the other in this process"])


if __name__ == "__main__":
    main()
