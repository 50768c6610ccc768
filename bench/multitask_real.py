"""Per-task adapters vs one shared adapter on real data (SST-2, GSM8K, SciTLDR), SmolLM2-135M.

    .venv/bin/python bench/multitask_real.py --data ../shared/data --out runs/bench-real
    .venv/bin/python bench/multitask_real.py --dry-run      # write data + specs, check them, train nothing

Two settings, each with its own run folders and registry under --out:
  full          `mtft-train adapters` (one adapter per task), then `mtft-train shared` (one adapter, all tasks)
  low-resource  the same, but --low-task keeps only --low-train training examples; only its per-task
                adapter is retrained (the other tasks' are identical to the full setting's and reused)

Subsampling: each task's train and test files are sampled without replacement (seeded by --seed, task, split)
(--train / --eval examples per task) and written as JSONL under --out/data; the real data in --data is
only read, never copied into the project. The low-resource set is the first --low-train rows of that
same shuffled sample (`limits.train_examples` in its spec), so it is a subset of the full one.
  sst2     sentence -> " negative" / " positive"; accuracy.
  gsm8k    question -> the final number only (after '####', commas dropped); numeric. A full
           chain-of-thought target is out of reach for a 135M model trained on 2 CPU cores.
  scitldr  the first 3 abstract sentences -> the first TLDR; rouge_l. Three sentences keep 90% of examples
           under 160 tokens (median ~120); the ~2% over max_length 192 lose the start of their prompt.

Every run writes <output>/results.json; the script prints one markdown table (also --out/table.md) and
keeps each run's wall time in --out/times.json. --skip-existing skips runs whose results.json exists,
so an interrupted bench continues where it stopped. Logs: --out/logs/<setting>-<mode>.log.
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
MIXING = ("proportional", "uniform", "temperature", "sqrt", "dynamic")  # those needing no further settings

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
SETTINGS = ("full", "low-resource")


@dataclass(frozen=True)
class Run:
    setting: str
    mode: str  # adapters | shared
    argv: list[str]
    output: Path


def write_data(args: argparse.Namespace) -> dict[str, int]:
    """Seeded subsamples as JSONL under --out/data; returns each task's train size."""
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


def command(mode: str, spec: Path, setting: str, args: argparse.Namespace, extra: tuple[str, ...] = ()) -> list[str]:
    place = args.out / setting
    return [str(TRAINER), mode, "--config", show(spec), *extra, "--registry", show(place / "registry"),
            "--output", show(place / mode), "--threads", str(args.threads)]


def write_spec(setting: str, args: argparse.Namespace) -> tuple[Path, list[Run]]:
    """The setting's spec YAML (its commands in the first comments) and the runs it needs."""
    path = args.out / f"{setting}.yaml"
    low = setting == "low-resource"
    tasks = []
    for task in TASKS:
        entry = {"name": task.name, **task.spec,
                 "data": {"train": f"data/{task.name}.train.jsonl", "eval": f"data/{task.name}.eval.jsonl"}}
        if low and task.name == args.low_task:
            entry["limits"] = {"train_examples": args.low_train}
        tasks.append(entry)
    spec = {
        "base_model": "smollm2-135m",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
        "training": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-3, "schedule": "cosine",
                     "warmup_steps": 5, "max_length": 192, "eval_every": None, "checkpoint_every": 20,
                     "threads": args.threads, "seed": 0},
        "multitask": {"mixing": {"strategy": args.mixing}, "loss": {"weighting": "sum"}},
        "tasks": tasks,
    }
    adapters = command("adapters", path, setting, args, ("--task", args.low_task) if low else ())
    shared = command("shared", path, setting, args)
    head = "".join(f"# {' '.join([show(TRAINER), *argv[1:]])}\n" for argv in (adapters, shared))
    note = f"# low-resource: {args.low_task} keeps {args.low_train} training examples\n" if low else ""
    path.write_text(head + note + yaml.dump(spec, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120))
    return path, [Run(setting, "adapters", adapters, args.out / setting / "adapters"),
                  Run(setting, "shared", shared, args.out / setting / "shared")]


def execute(run: Run, args: argparse.Namespace, times: dict[str, float]) -> None:
    key = f"{run.setting}/{run.mode}"
    if args.skip_existing and (run.output / "results.json").exists():
        print(f"{key}: skipped, {show(run.output / 'results.json')} exists")
        return
    log = args.out / "logs" / f"{run.setting}-{run.mode}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(run.argv, stdout=handle, stderr=subprocess.STDOUT).returncode
    times[key] = round(time.perf_counter() - start, 1)
    (args.out / "times.json").write_text(json.dumps(times, indent=2))
    print(f"{key}: {times[key]:.1f} s, exit {code}, log {show(log)}", flush=True)
    if code:
        sys.exit(f"{key} failed; the end of {show(log)}:\n" + "".join(log.read_text().splitlines(True)[-20:]))


def results(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text())["tasks"] if path.exists() else {}


def score(value: float | None, form: str = ".3f") -> str:
    return "-" if value is None else format(value, form)


def table(args: argparse.Namespace, sizes: dict[str, int]) -> str:
    full_adapters = results(args.out / "full" / "adapters" / "results.json")
    lines = ["| setting | task | metric | train examples | base (zero-shot) | per-task adapter | shared adapter "
             "| shared − per-task |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        # low-resource reuses the full setting's per-task adapters for every task but --low-task
        reused = {t: r for t, r in full_adapters.items() if t != args.low_task} if setting != "full" else {}
        separate = {**reused, **results(args.out / setting / "adapters" / "results.json")}
        shared = results(args.out / setting / "shared" / "results.json")
        for task in TASKS:
            one, joint = separate.get(task.name, {}), shared.get(task.name, {})
            base = joint.get("base", one.get("base"))
            n = args.low_train if setting == "low-resource" and task.name == args.low_task else sizes[task.name]
            gap = joint["adapter"] - one["adapter"] if "adapter" in one and "adapter" in joint else None
            cells = [setting, task.name, task.spec["metric"], str(min(n, sizes[task.name])),
                     score(base), score(one.get("adapter")), score(joint.get("adapter")), score(gap, "+.3f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the real data (read only)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-real", help="data, specs, runs, table")
    parser.add_argument("--train", type=int, default=400, help="training examples per task")
    parser.add_argument("--eval", type=int, default=40, help="eval examples per task (from the test split)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task (shared: × tasks)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per run")
    parser.add_argument("--mixing", choices=MIXING, default="sqrt", help="shared run's task mixing")
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
    args.data, args.out = args.data.resolve(), args.out.resolve()

    sizes = write_data(args)
    print(f"data: {sizes} train, {args.eval} eval per task, in {show(args.out / 'data')}")
    planned = [write_spec(setting, args) for setting in SETTINGS]
    if args.dry_run:
        failed = False
        for spec, runs in planned:
            check = [str(TRAINER), "adapters", "--check", "--config", show(spec), "--registry",
                     show(args.out / runs[0].setting / "registry"), "--threads", str(args.threads)]
            done = subprocess.run(check, capture_output=True, text=True)
            failed |= done.returncode != 0
            print(f"check {show(spec)}: " + (done.stdout.strip() if done.returncode == 0 else done.stderr.strip()))
            for run in runs:
                print("would run: " + " ".join([show(TRAINER), *run.argv[1:]]))
        sys.exit(1 if failed else 0)
    times_path = args.out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for _, runs in planned:
        for run in runs:
            execute(run, args, times)
    text = table(args, sizes)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    from report import save  # the bench folder is on sys.path: this script runs from it

    save("multitask-real", "real data: base vs per-task adapters vs one shared adapter", text,
         {"sizes": sizes, "times_s": times, "steps": args.steps, "eval": args.eval,
          "runs": {f"{run.setting}/{run.mode}": results(run.output / "results.json") for _, runs in planned
                   for run in runs}})


if __name__ == "__main__":
    main()
