"""QLoRA's quality cost on a real task: an SST-2 adapter trained on the full base vs on its 4-bit copy.

    .venv/bin/python bench/qlora_quality.py --data ../shared/data      # part of `make bench` (B6)

SmolLM2-135M, SST-2 (seeded subsamples of --train training and --eval test sentences from --data),
the same spec trained twice with `mtft-train adapters`: once plain, once with
`training.base_quantization: {bits: 4, type: nf4}`. Both adapters are then scored as they are
served: PEFT on the full-precision base, mtft's greedy evaluation on the same held-out sentences
(the 4-bit run's own score, on its 4-bit base, is shown beside it). Accuracy with its 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from multitask_real import TASKS, Dumper  # noqa: E402  (SST-2's reader and spec entry)
from report import save  # noqa: E402

QUANTIZED = {"bits": 4, "type": "nf4"}


def write_spec(args: argparse.Namespace, quantized: bool) -> Path:
    task = next(t for t in TASKS if t.name == "sst2")
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for role, name, count in (("train", task.files[0], args.train), ("eval", task.files[1], args.eval)):
        rows = task.read(args.data / name)
        picked = random.Random(f"0/sst2/{role}").sample(rows, min(count, len(rows)))
        (folder / f"sst2.{role}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    training = {"max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2,
                "max_length": 128, "checkpoint_every": 1000, "eval_engine": "hf", "seed": 0}
    if quantized:
        training["base_quantization"] = QUANTIZED
    spec = {"base_model": "smollm2-135m", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "training": training,
            "tasks": [{"name": "sst2", **task.spec,
                       "data": {"train": str(folder / "sst2.train.jsonl"), "eval": str(folder / "sst2.eval.jsonl")}}]}
    path = args.out / f"sst2-{'4bit' if quantized else 'full'}.yaml"
    path.write_text(f"# .venv/bin/mtft-train adapters --config {path}\n"
                    + yaml.dump(spec, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120))
    return path


def served_score(spec_path: Path, registry: Path):
    """The published adapter on the full-precision base (what vLLM serves), mtft's greedy evaluation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtft.registry import Registry
    from mtft.train import load_spec
    from mtft.train.check import RunOptions, check_run
    from mtft.train.evaluate import end_ids, evaluate
    from mtft.train.hardware import choose_dtype

    spec = load_spec(spec_path)
    checked = check_run(spec, RunOptions(output=spec_path.parent / "served", registry=registry))
    [task] = checked.tasks
    dtype = choose_dtype(spec.training.dtype, torch.device("cpu"))[0]  # what the run trained the base in
    base = AutoModelForCausalLM.from_pretrained(checked.base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, Registry(registry).version_dir("sst2", 1)).eval()
    return evaluate(model, checked.tokenizer, checked.data["sst2"].eval, task.metric, task.labels, task.max_new_tokens,
                    end_ids(checked.tokenizer, task.template.format), spec.training.eval_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BENCH.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/qlora-quality"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()
    args.out = args.out.resolve()
    from mtft.train import RunOptions, load_spec, train_adapters

    rows = {}
    for quantized in (False, True):
        spec_path = write_spec(args, quantized)
        label = "4-bit base (nf4)" if quantized else "full base (training.dtype auto)"
        out = args.out / ("4bit" if quantized else "full")
        [result] = train_adapters(load_spec(spec_path), RunOptions(output=out, registry=out / "registry"))
        served = served_score(spec_path, out / "registry")
        low, high = served.interval()
        rows[label] = {"zero_shot": result.base, "trained_on": result.adapter, "served": served.score,
                       "served_interval": [low, high]}
        print(f"{label}: served accuracy {served.score:.3f} [{low:.3f}, {high:.3f}]", flush=True)
    lines = ["| adapter trained on | base zero-shot | score in its run | served on the full base | 95 % interval |",
             "|---|---|---|---|---|"]
    lines += [f"| {label} | {r['zero_shot']:.3f} | {r['trained_on']:.3f} | {r['served']:.3f} | "
              f"[{r['served_interval'][0]:.3f}, {r['served_interval'][1]:.3f}] |" for label, r in rows.items()]
    setting = f"SST-2, {args.train} training sentences, {args.steps} steps of 8, {args.eval} test sentences, SmolLM2-135M"
    table = "\n".join(lines)
    print("", setting, table, sep="\n")
    save("B6-qlora-quality", "QLoRA's quality cost: SST-2 adapter trained on the full vs the 4-bit base", table,
         {"setting": setting, "rows": rows},
         [setting, "score in its run: mtft's evaluation on the base it trained on (the 4-bit one for QLoRA); "
          "served: PEFT on the full-precision base, as vLLM serves it"])


if __name__ == "__main__":
    main()
