"""Per-task adapters vs one shared adapter per mixing strategy on real data (SST-2, GSM8K, SciTLDR).

    .venv/bin/python bench/multitask_real.py --data ../shared/data --out runs/bench-real
    .venv/bin/python bench/multitask_real.py --dry-run      # write data + specs, check them, train nothing

The question it answers: which mixing keeps a small task within noise of its own adapter at
equal compute, without giving up the large tasks' gains. One set of tasks of unequal size:
--low-task keeps only --low-train training examples (`limits.train_examples`), the others
--train. Runs, all on SmolLM2-135M-Instruct and one registry under --out:
  adapters           `mtft-train adapters`: one adapter per task, --steps steps each
  shared-<mixing>    `mtft-train shared` with that mixing, --steps × 3 steps (the same examples in all)
Every run evaluates on the same --eval test examples per task, with bootstrap 95 % intervals;
each shared run compares its exports with the per-task adapters in the registry.

Subsampling: each task's train and test files are sampled without replacement (seeded by --seed, task, split)
and written as JSONL under --out/data; the real data in --data is only read, never copied into the project.
The low-resource set is the first --low-train rows of that shuffled sample.
  sst2     sentence -> " negative" / " positive"; accuracy.
  gsm8k    question -> the final number only (after '####', commas dropped); numeric. A full
           chain-of-thought target is out of reach for a 135M model trained on 2 CPU cores.
  scitldr  the first 3 abstract sentences -> the first TLDR; rouge_l. Three sentences keep 90% of examples
           under 160 tokens (median ~120); the ~2% over max_length 192 lose the start of their prompt.

Every run writes <output>/results.json; the script prints one markdown table (also --out/table.md) and
keeps each run's wall time in --out/times.json. --skip-existing skips runs whose results.json exists,
so an interrupted bench continues where it stopped. Logs: --out/logs/<run>.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINER = Path(sys.executable).parent / "mtft-train"

Row = dict[str, str]


class Dumper(yaml.SafeDumper):
    """Writes a string with a newline on one line, double-quoted: "{prefix}{input}\\nTLDR:"."""


Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def read_sst2(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [{"text": r["sentence"].strip(), "label": ("negative", "positive")[int(r["label"])]} for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:  # scitldr's last line has no newline: iteration copes
        return [json.loads(line) for line in handle if line.strip()]


def read_gsm8k(path: Path) -> list[Row]:
    def final(answer: str) -> str:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")  # "1,000" -> "1000"

    return [{"question": r["question"], "answer": final(r["answer"])} for r in read_jsonl(path)]


def read_scitldr(path: Path) -> list[Row]:
    return [{"abstract": " ".join(s.strip() for s in r["source"][:3]), "tldr": r["target"][0].strip()}
            for r in read_jsonl(path)]


@dataclass(frozen=True)
class Task:
    name: str
    files: tuple[str, str]  # train, eval under --data
    read: Callable[[Path], list[Row]]
    spec: dict  # this task's entry in the spec, less name and data


TASKS = (
    Task("sst2", ("sst2/train.tsv", "sst2/test.tsv"), read_sst2, {
        "prefix": "sst2: ", "template": {"input": "{text}", "prompt": "{prefix}{input}\nSentiment:", "target": " {label}"},
        "metric": "accuracy", "labels": ["negative", "positive"], "max_new_tokens": 3}),
    Task("gsm8k", ("gsm8k/train.jsonl", "gsm8k/test.jsonl"), read_gsm8k, {
        "prefix": "gsm8k: ", "template": {"input": "{question}", "prompt": "{prefix}{input}\nAnswer:", "target": " {answer}"},
        "metric": "numeric", "max_new_tokens": 8}),
    Task("scitldr", ("scitldr/train.jsonl", "scitldr/test.jsonl"), read_scitldr, {
        "prefix": "scitldr: ", "template": {"input": "{abstract}", "prompt": "{prefix}{input}\nTLDR:", "target": " {tldr}"},
        "metric": "rouge_l", "max_new_tokens": 40}),
)
# temperature=2 is sqrt exactly; capped, uniform, dynamic and dynamic-eval can be added with --mixing
# (docs/task-spec.md, Mixing, compares them); each is one more shared run, and all of them would
# take make bench-real past an hour on 2 cores.
DEFAULT_MIXING = "proportional,sqrt,temperature=5"
STATIC = ("proportional", "uniform", "sqrt", "dynamic")  # named without a value
BATCH = 8


@dataclass(frozen=True)
class Mixing:
    """One shared run's mixing, named on the command line: `temperature=5`, `capped` (cap: the
    examples a per-task run sees), `dynamic` (loss signal), `dynamic-eval` (eval signal)."""

    name: str
    spec: dict  # multitask.mixing
    eval_every: int | None = None

    @classmethod
    def parse(cls, name: str, args: argparse.Namespace) -> Mixing:
        strategy, _, value = name.partition("=")
        if strategy == "temperature":
            return cls(name, {"strategy": "temperature", "temperature": float(value or 2)})
        if strategy == "capped":
            return cls(name, {"strategy": "capped", "cap": int(value or args.steps * BATCH)})
        if strategy == "dynamic-eval":  # eval signal: scores every update, so the run evaluates as often
            return cls(name, {"strategy": "dynamic", "signal": "eval"}, eval_every=args.steps)
        if strategy in STATIC and not value:
            return cls(name, {"strategy": strategy})
        raise argparse.ArgumentTypeError(
            f"--mixing {name!r}: use {', '.join(STATIC)}, temperature=T, capped[=K] or dynamic-eval")


@dataclass(frozen=True)
class Run:
    name: str  # adapters | shared-<mixing>
    argv: list[str]
    output: Path


def write_data(args: argparse.Namespace) -> dict[str, int]:
    """Seeded subsamples as JSONL under --out/data; returns each task's train size (before limits)."""
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for task in TASKS:
        for role, name, count in (("train", task.files[0], args.train), ("eval", task.files[1], args.eval)):
            rows = task.read(args.data / name)
            picked = random.Random(f"{args.seed}/{task.name}/{role}").sample(rows, min(count, len(rows)))
            with (folder / f"{task.name}.{role}.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in picked)
            if role == "train":
                sizes[task.name] = len(picked)
    return sizes


def show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_spec(name: str, mode: str, args: argparse.Namespace, mixing: Mixing | None = None) -> Run:
    """One run's spec YAML under --out (its command in the first comment); every run shares the
    data, the registry (so shared runs find the per-task adapters to compare with) and the training."""
    path = args.out / f"{name}.yaml"
    tasks = []
    for task in TASKS:
        entry = {"name": task.name, **task.spec,
                 "data": {"train": f"data/{task.name}.train.jsonl", "eval": f"data/{task.name}.eval.jsonl"}}
        if task.name == args.low_task:
            entry["limits"] = {"train_examples": args.low_train}
        tasks.append(entry)
    spec = {
        "base_model": "smollm2-135m",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
        "training": {"max_steps": args.steps,  # shared: × tasks (equal compute)
                     "batch_size": BATCH, "learning_rate": 1e-3, "schedule": "cosine",
                     "warmup_steps": 5, "max_length": 192, "eval_every": mixing.eval_every if mixing else None,
                     "checkpoint_every": 20, "threads": args.threads, "seed": 0},
        "tasks": tasks,
    }
    if mixing is not None:
        spec["multitask"] = {"mixing": mixing.spec, "loss": {"weighting": "sum"}}
    output = args.out / "runs" / name
    argv = [str(TRAINER), mode, "--config", show(path), "--registry", show(args.out / "registry"),
            "--output", show(output), "--threads", str(args.threads)]
    head = f"# {' '.join([show(TRAINER), *argv[1:]])}\n# {args.low_task} keeps {args.low_train} training examples\n"
    path.write_text(head + yaml.dump(spec, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120))
    return Run(name, argv, output)


def execute(run: Run, args: argparse.Namespace, times: dict[str, float]) -> None:
    if args.skip_existing and (run.output / "results.json").exists():
        print(f"{run.name}: skipped, {show(run.output / 'results.json')} exists")
        return
    log = args.out / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(run.argv, stdout=handle, stderr=subprocess.STDOUT).returncode
    times[run.name] = round(time.perf_counter() - start, 1)
    (args.out / "times.json").write_text(json.dumps(times, indent=2))
    print(f"{run.name}: {times[run.name]:.1f} s, exit {code}, log {show(log)}", flush=True)
    if code:
        sys.exit(f"{run.name} failed; the end of {show(log)}:\n" + "".join(log.read_text().splitlines(True)[-20:]))


def results(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text())["tasks"] if path.exists() else {}


def cell(row: dict, key: str) -> str:
    """A score with its 95 % interval: 0.850 [0.800, 0.895]."""
    if key not in row:
        return "-"
    low, high = row.get(f"{key}_interval") or (float("nan"), float("nan"))
    return f"{row[key]:.3f} [{low:.3f}, {high:.3f}]"


def verdict(joint: dict, own: dict) -> str:
    """Where the per-task adapter's score falls against the shared export's 95 % interval."""
    if "adapter" not in own or "adapter_interval" not in joint:
        return "-"
    low, high = joint["adapter_interval"]
    return "worse (negative transfer)" if high < own["adapter"] else "better" if low > own["adapter"] else "within noise"


def table(args: argparse.Namespace, runs: list[Run], sizes: dict[str, int]) -> str:
    """One row per shared run and task, beside the task's base and per-task adapter."""
    separate = results(runs[0].output / "results.json")
    lines = ["| mixing | task | metric | train examples | base (zero-shot) | per-task adapter | shared export "
             "| shared − per-task | examples seen (share of per-task) | per-task vs shared |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs[1:]:
        shared = results(run.output / "results.json")
        for task in TASKS:
            own, joint = separate.get(task.name, {}), shared.get(task.name, {})
            n = min(args.low_train, sizes[task.name]) if task.name == args.low_task else sizes[task.name]
            gap = f"{joint['adapter'] - own['adapter']:+.3f}" if "adapter" in own and "adapter" in joint else "-"
            seen = f"{joint['seen']} ({joint['share']:.0%})" if "seen" in joint else "-"
            cells = [run.name.removeprefix("shared-"), task.name, task.spec["metric"], str(n),
                     cell(joint or own, "base"), cell(own, "adapter"), cell(joint, "adapter"), gap, seen,
                     verdict(joint, own)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the real data (read only)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-real", help="data, specs, runs, table")
    parser.add_argument("--train", type=int, default=400, help="training examples per task")
    parser.add_argument("--eval", type=int, default=200, help="eval examples per task (from the test split)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per task (shared: × tasks)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per run")
    parser.add_argument("--mixing", default=DEFAULT_MIXING,
                        help="the shared runs' mixings, comma-separated (temperature=T, capped=K, dynamic-eval too)")
    parser.add_argument("--low-task", choices=[t.name for t in TASKS], default="sst2")
    parser.add_argument("--low-train", type=int, default=100, help="low-resource task's training examples")
    parser.add_argument("--seed", type=int, default=0, help="subsampling seed")
    parser.add_argument("--dry-run", action="store_true", help="write data + specs, run --check, train nothing")
    parser.add_argument("--skip-existing", action="store_true", help="skip runs whose results.json exists")
    args = parser.parse_args()
    if not 0 < args.low_train < args.train:
        parser.error(f"--low-train must be between 1 and --train ({args.train}), got {args.low_train}")
    if not (args.data / "sst2" / "train.tsv").exists():
        parser.error(f"--data {args.data} lacks sst2/train.tsv; point it at the shared data folder")
    try:
        mixings = [Mixing.parse(name.strip(), args) for name in args.mixing.split(",") if name.strip()]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    args.data, args.out = args.data.resolve(), args.out.resolve()

    sizes = write_data(args)
    print(f"data: {sizes} train ({args.low_task} limited to {args.low_train}), {args.eval} eval per task, "
          f"in {show(args.out / 'data')}")
    runs = [write_spec("adapters", "adapters", args)]
    runs += [write_spec(f"shared-{m.name.replace('=', '-')}", "shared", args, m) for m in mixings]
    if args.dry_run:
        failed = False
        for run in runs:
            check = [*run.argv[:-4], "--check", "--threads", str(args.threads)]  # less --output
            done = subprocess.run(check, capture_output=True, text=True)
            failed |= done.returncode != 0
            print(f"{run.name}: " + (done.stdout.strip() if done.returncode == 0 else done.stderr.strip()))
            print("  would run: " + " ".join([show(TRAINER), *run.argv[1:]]))
        sys.exit(1 if failed else 0)
    times_path = args.out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for run in runs:
        execute(run, args, times)
    text = table(args, runs, sizes)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nwall time: {sum(times.get(r.name, 0) for r in runs) / 60:.1f} min ({json.dumps(times)})")
    from report import save  # the bench folder is on sys.path: this script runs from it

    save("multitask-real", "real data: base vs per-task adapters vs one shared adapter per mixing strategy", text,
         {"sizes": sizes, "low_task": args.low_task, "low_train": args.low_train, "times_s": times,
          "steps": args.steps, "eval": args.eval, "runs": {r.name: results(r.output / "results.json") for r in runs}},
         notes=[f"{args.low_task} keeps {args.low_train} of {args.train} training examples; each per-task run "
                f"takes {args.steps} steps of {BATCH}, each shared run {args.steps} × {len(TASKS)} (equal compute)",
                "per-task vs shared: where the per-task adapter's score lies against the shared export's 95 % "
                "bootstrap interval over the eval examples"])


if __name__ == "__main__":
    main()
