"""One command for a GPU machine: the recipes on CUDA, exported adapters vs the models that trained them, speed.

    python bench/gpu_check.py                      # CUDA; a machine with torch, transformers, peft, accelerate
    python bench/gpu_check.py --device cpu --parts parity   # the same checks on CPU (the test suite runs this)
    python bench/gpu_check.py --device cpu         # also the speed matrix's smoke mode (6 min on 2 cores)

For a GPU machine that has the project tree but not its venv, and cannot fetch models: this
script imports mtft's training package from the tree (no install) and never vLLM. Where the
machine's Python has torch, transformers, peft and accelerate but not pydantic or rouge-score,
bring those as wheels:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 nltk==3.10.4
    pip wheel --no-deps -w .whl rouge-score==0.1.2        # an sdist only: built here, pure Python
    # there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    #        PYTHONPATH=/tmp/site python3 bench/gpu_check.py

Part `parity`: the test suite's tiny random Llama and its two tiny tasks (tests/conftest.py),
trained a few steps on this device by mtft's own recipes through `mtft.train`'s public surface:
`mtft-train adapters` (one task after the other), `adapters --one-pass` and `shared`, each
publishing into a registry of its own. Then every published adapter is loaded with plain HF +
PEFT (`PeftModel.from_pretrained` on the registry folder) on the same device and compared with
mtft's in-training model for that task, rebuilt from the run's last checkpoint (the per-task
PEFT LoRA; the one-pass task layers; the shared adapter conditioned on that task): the logits
on the task's held-out prompts (max |diff| <= --atol), the greedy answers against the ones the
run's own final evaluation recorded, and the adapter must differ from the base (else the check
shows nothing). Prints training tokens/s of one pass vs one task after the other; exits 1 on a
parity failure. `--perturb RECIPE/TASK` adds noise to that exported adapter (a negative control
that must fail).

Part `speed`: a random-init Llama with SmolLM2-135M's shape (`--model tiny`: the test suite's
2-layer size) on synthetic token sequences of a prompt/answer shape like the demo tasks'. Random
weights cost exactly what trained ones cost, which is all a speed check measures. Each
configuration runs in its own process group (`--worker`; N processes through `accelerate
launch`), each trains both tasks for --steps steps of --batch examples:
- `peer`: the plain HF+PEFT loop everyone writes first (bench/train_speed.py's peer on CPU):
  shuffled batches padded to their longest row, logits over the whole vocabulary, 1 process;
- `adapters`: `mtft-train adapters`' plan, one task after the other;
- `one-pass`: `--one-pass`'s plan, every task's adapter in each step;
- `-packed`: the same with `training.packing: true`;
with the base in float32 and in bfloat16, on 1 process and on N (default: every GPU; skipped on
one GPU, where NCCL cannot place two ranks). Prints the median step time, tokens/s (real, non-pad
tokens) and ratios: to float32, to the peer and to `adapters` in the same dtype (the GPU
training-speed targets read off two of them: adapters vs the bf16 peer, one-pass-packed vs
adapters), and for N processes the largest adapter weight difference to the 1-process run (the
same global batch must train the same adapter). Both parts are sized to take under 5 minutes on
one H200 with the defaults.
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
               "numpy": "numpy", "jinja2": "jinja2", "sacrebleu": "sacrebleu", "rouge_score": "rouge-score",
               "matplotlib": "matplotlib", "tokenizers": "tokenizers", "pytest": "pytest"}  # tests/conftest.py's
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


# ---- part `parity`: the recipes on the tiny model; each exported adapter vs the model that trained it

def train_recipes(args: argparse.Namespace, folder: Path):
    """The tests' tiny base and tasks trained by each recipe on this device: (spec, recipe -> RunOptions)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_base, tiny_spec

    from mtft.train import RunOptions, load_spec, train_adapters, train_one_pass, train_shared

    base = build_tiny_base(folder / "base")
    spec = load_spec(tiny_spec(folder, base, max_steps=args.tiny_steps, eval_every=None,
                               checkpoint_every=args.tiny_steps, dtype="float32"))
    runs = {}
    for recipe, train in (("sequential", train_adapters), ("one-pass", train_one_pass), ("shared", train_shared)):
        runs[recipe] = RunOptions(output=folder / recipe, registry=folder / f"{recipe}-registry")
        train(spec, runs[recipe])
    return spec, runs


def training_speed(output: Path) -> dict:
    """Tokens through the model per second of training steps; each training's first step (warm-up) left out."""
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "seconds" in r and r["step"] > 1]
    seconds = sum(r["seconds"] for r in steady)
    return {"steps": sum("seconds" in r for r in rows), "seconds": seconds,
            "tokens_per_s": sum(r["tokens_per_s"] * r["seconds"] for r in steady) / seconds}


def base_model(spec, device):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32).to(device).requires_grad_(False)


def in_training_logits(recipe: str, options, spec, task: str, batch: dict, device):
    """`task`'s logits from mtft's own in-training model, rebuilt from the run's last checkpoint
    (the loop saves the trainable tensors after the last step, the ones the recipe exports)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    from mtft.train.tasklora import TaskLoRA, peft_init

    from mtft.train.targets import target_modules

    lora = spec.lora  # from the spec, not the exported adapter_config.json: a wrong export must not agree
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=target_modules(spec, spec.base_model)[0], task_type="CAUSAL_LM")
    model = base_model(spec, device)
    init, model = peft_init(model, config)
    embedding = spec.multitask.task_embedding
    # sequential (plans.LoraPlan): the task's own layers alone, in its own checkpoint folder
    tasks, folder = ([task], options.output / task) if recipe == "sequential" else ([t.name for t in spec.tasks],
                                                                                   options.output)
    layers = TaskLoRA(model, tasks, init, lora.rank, lora.alpha, lora.dropout,
                      shared=recipe == "shared", up_projections=embedding.up_projections, tau=embedding.mix_temperature)
    state = load_file(folder / "checkpoint" / "adapter.safetensors")
    layers.load_state_dict({k: v for k, v in state.items() if not k.startswith("loss.")})  # shared.SharedPlan's
    # uncertainty weights sit beside the adapter in its checkpoint
    with torch.no_grad(), layers.task(task):  # one-pass: the task's own layers; shared: conditioned on it
        return model.eval()(**batch).logits


def parity(spec, runs: dict, device, atol: float, perturb: str | None) -> list[dict]:
    """Every published adapter through plain HF + PEFT vs the in-training model, on the task's held-out prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from mtft.registry import Registry, render_prompt
    from mtft.train import generate
    from mtft.train.evaluate import end_ids

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model, padding_side="left")
    rows = []
    for recipe, options in runs.items():
        registry = Registry(options.registry)
        for task in spec.tasks:
            record = registry.latest()[task.name]
            # The run's own final evaluation, by the in-training model: inputs and greedy answers.
            recorded = [json.loads(line) for line in
                        (options.output / "predictions" / task.name / "adapter.jsonl").read_text().splitlines()]
            prompts = [render_prompt(record.template, record.prefix, r["input"]) for r in recorded]
            batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            reference = in_training_logits(recipe, options, spec, task.name, batch, device)
            served = PeftModel.from_pretrained(base_model(spec, device), registry.version_dir(task.name, record.version))
            served.eval()
            label = f"{recipe}/{task.name}"
            with torch.no_grad():
                if perturb == label:  # the negative control: an export that is not what trained
                    for name, weight in served.named_parameters():
                        if "lora_B" in name:
                            weight.add_(0.05 * torch.randn_like(weight))
                logits = served(**batch).logits
                with served.disable_adapter():
                    base_logits = served(**batch).logits
            answers = generate(served, tokenizer, prompts, task.max_new_tokens, end_ids(tokenizer, record.template.format),
                               spec.training.eval_batch_size)
            mask = batch["attention_mask"].bool()
            row = {"adapter": label, "version": record.version, "max_diff": float((logits - reference)[mask].abs().max()),
                   "vs_base": float((logits - base_logits)[mask].abs().max()),
                   "greedy_same": sum(a == r["prediction"] for a, r in zip(answers, recorded)), "prompts": len(recorded)}
            # vs_base: an adapter that equals the base would pass the logits check vacuously.
            row["ok"] = row["max_diff"] <= atol and row["greedy_same"] == row["prompts"] and row["vs_base"] > 10 * atol
            rows.append(row)
    return rows


def run_parity(args: argparse.Namespace, folder: Path) -> tuple[list[dict], list[dict]]:
    """Part `parity`: train, print the one-pass vs sequential speed and the parity table."""
    import torch

    device = torch.device(args.device)
    spec, runs = train_recipes(args, folder)
    speed = [{"recipe": recipe, **training_speed(options.output)} for recipe, options in runs.items()]
    print(f"\ntiny model, {args.tiny_steps} steps of batch {spec.training.batch_size} per task, "
          f"{len(spec.tasks)} tasks, float32, {device}")
    print(f"{'recipe':<12}{'steps':>6}{'train s':>9}{'tokens/s':>11}{'vs sequential':>15}")
    sequential = speed[0]["tokens_per_s"]
    for r in speed:
        print(f"{r['recipe']:<12}{r['steps']:>6}{r['seconds']:>9.2f}{r['tokens_per_s']:>11,.0f}"
              f"{r['tokens_per_s'] / sequential:>14.2f}x")
    checks = parity(spec, runs, device, args.atol, args.perturb)
    print(f"\nexported adapter (HF + PEFT from the registry) vs the in-training model, on the task's "
          f"held-out prompts, atol {args.atol:g}")
    print(f"{'adapter':<20}{'version':>8}{'max |dlogit|':>14}{'vs base':>10}{'greedy same':>13}  verdict")
    for r in checks:
        print(f"{r['adapter']:<20}{r['version']:>8}{r['max_diff']:>14.1e}{r['vs_base']:>10.2f}"
              f"{str(r['greedy_same']) + '/' + str(r['prompts']):>13}  {'ok' if r['ok'] else 'FAIL'}")
    return speed, checks


# ---- part `speed`: the training loop's speed on a SmolLM2-sized model, 1 vs N processes, fp32 vs bf16

PLANS = ("peer", "adapters", "adapters-packed", "one-pass", "one-pass-packed")


def peer_task(model, lora, items: list, steps: int, batch: int, device) -> list[dict]:
    """The plain HF+PEFT loop (bench/peer.py, train_speed.py's peer) on one task's shuffled batches.
    Per step: seconds and real (non-pad) tokens, timed as mtft's loop times its steps."""
    import random

    import peer

    peft_model, optimizer = peer.wrap(model, lora, 1e-3)
    rng, rows = random.Random(0), []
    for _ in range(steps):
        began = time.perf_counter()
        chosen = rng.sample(items, batch)
        tokens = peer.step(peft_model, optimizer, [(t.input_ids, t.labels) for t in chosen], 0, device)
        rows.append({"seconds": time.perf_counter() - began, "tokens": tokens, "examples": batch})
    peft_model.unload()
    return rows


def worker(args: argparse.Namespace) -> None:
    """One configuration, on this process (and its peers under accelerate launch).

    Every plan trains the same tasks for the same steps of the same batch size on the same example
    pools (`steps` and `examples` in its result count them): `peer` and `adapters` one task after
    the other (as `mtft-train adapters` does), `one-pass` every task in each step; `-packed` turns
    `training.packing` on.
    """
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig
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
                            checkpoint_every=10 * args.steps, max_length=512, dtype=args.dtype,
                            packing=args.plan.endswith("-packed"))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights, steps = {}, []  # steps: per training, its steps' seconds, tokens and examples
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    if args.plan == "peer":
        for task in TASKS:
            torch.manual_seed(0)
            steps.append(peer_task(model, lora, items[task], args.steps, args.batch, accelerator.device))
    # adapters: one training per task; one-pass: one training of every task (None)
    for task in [] if args.plan == "peer" else list(TASKS) if args.plan.startswith("adapters") else [None]:
        torch.manual_seed(0)  # every task's initial LoRA is PEFT's, as in mtft-train adapters
        init, model = peft_init(model, lora)
        names = [task] if task else list(items)
        task_lora = TaskLoRA(model, names, init, 16, 32, 0.0, shared=False)
        plan = (LoraPlan(task_lora, task, items[task], training) if task
                else LockstepPlan(task_lora, items, training))
        folder = out / (task or "all")
        folder.mkdir(exist_ok=True)
        loop.train(plan, loop.Loop(training, folder / "checkpoint", RunLog(folder), accelerator, pad_id=0), resume=False)
        weights |= {f"{task or 'all'}.{k}": v.detach().float().cpu().contiguous() for k, v in task_lora.state_dict().items()}
        steps.append([{"seconds": r["seconds"], "tokens": r["tokens_per_s"] * r["seconds"],
                       "examples": sum(t["examples"] for t in r["tasks"].values())}
                      for r in RunLog(folder).rows() if "seconds" in r])
        model = task_lora.remove()
    if accelerator.is_main_process:
        wall = time.perf_counter() - began
        steady = [r for rows in steps for r in (rows[2:] or rows)]  # each training's first steps warm up kernels
        from safetensors.torch import save_file

        save_file(weights or {"none": torch.zeros(1)}, out / "adapter.safetensors")
        (out / "result.json").write_text(json.dumps({
            "wall": wall, "step": statistics.median(r["seconds"] for r in steady),
            "steps": sum(len(rows) for rows in steps), "examples": sum(r["examples"] for rows in steps for r in rows),
            # real (non-pad) tokens through the model per second, not only the answer tokens learnt from
            "tokens_per_s": sum(r["tokens"] for r in steady) / sum(r["seconds"] for r in steady),
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


def run_speed(args: argparse.Namespace, folder: Path) -> list[dict]:
    """Part `speed`: each plan x base dtype x process count in its own process group; prints the table."""
    import torch

    cpu = args.device == "cpu"
    gpus = 0 if cpu else torch.cuda.device_count()
    processes = args.processes or (2 if cpu else gpus)
    rows = []
    print(f"\n{args.model} model, tasks {', '.join(TASKS)} x {args.steps} steps of global batch {args.batch}, device "
          f"{'cpu' if cpu else torch.cuda.get_device_name(0)} x{gpus or 1}", flush=True)
    for plan in args.plans.split(","):
        for dtype in args.dtypes.split(","):
            # The peer is the plain single-process loop.
            several = plan != "peer" and processes > 1 and (cpu or processes <= gpus)
            for n in [1] + ([processes] if several else []):
                out = folder / f"{plan}-{dtype}-{n}"
                result = run_config(args, plan, dtype, n, out)
                if n > 1:
                    from safetensors.torch import load_file

                    one = load_file(folder / f"{plan}-{dtype}-1" / "adapter.safetensors")
                    many = load_file(out / "adapter.safetensors")
                    result["max_diff_to_1"] = max(float((one[k] - many[k]).abs().max()) for k in one)
                rows.append({"plan": plan, "dtype": dtype, "processes": n, **result})
                print(json.dumps(rows[-1]), flush=True)
    if processes <= 1 or (not cpu and processes > gpus):
        print(f"N-process runs skipped: {gpus} GPU(s); NCCL needs one GPU per process")
    print(speed_table(rows))
    return rows


def speed_table(rows: list[dict]) -> str:
    """Tokens/s ratios: to the first dtype, to the peer and to `adapters` (same dtype, the peer's
    and `adapters`' single process), and to the same config on 1 process. The training-speed targets
    read off `vs peer` (adapters, bf16) and `vs adapters` (one-pass-packed)."""
    def rate(plan: str, dtype: str, processes: int = 1) -> float | None:
        found = [r for r in rows if (r["plan"], r["dtype"], r["processes"]) == (plan, dtype, processes)]
        return found[0]["tokens_per_s"] if found else None

    def ratio(r: dict, other: float | None) -> str:
        return f"{r['tokens_per_s'] / other:.2f}x" if other else "-"

    first = rows[0]["dtype"]
    head = ["plan", "dtype", "procs", "step s", "tokens/s", f"vs {first}", "vs peer", "vs adapters", "vs 1 proc",
            "max |dw| vs 1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["plan"], r["dtype"], str(r["processes"]), f"{r['step']:.3f}", f"{r['tokens_per_s']:,.0f}",
                 ratio(r, rate(r["plan"], first, r["processes"])), ratio(r, rate("peer", r["dtype"])),
                 ratio(r, rate("adapters", r["dtype"])), ratio(r, rate(r["plan"], r["dtype"])),
                 f"{r['max_diff_to_1']:.1e}" if "max_diff_to_1" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--parts", default="parity,speed", help="comma-separated: parity, speed")
    parser.add_argument("--tiny-steps", type=int, default=8, help="parity: training steps per task")
    parser.add_argument("--atol", type=float, default=1e-4, help="parity: largest logit difference allowed (fp32)")
    parser.add_argument("--perturb", metavar="RECIPE/TASK", help="parity: add noise to this exported adapter "
                        "(a negative control: must fail), e.g. shared/echo")
    parser.add_argument("--model", choices=list(SHAPES), help="speed: default smollm2 on cuda, tiny on cpu")
    parser.add_argument("--processes", type=int, help="speed: N of the N-process runs (default: GPUs; cpu: 2)")
    parser.add_argument("--steps", type=int, help="speed: default 30 on cuda, 6 on cpu")
    parser.add_argument("--batch", type=int, default=16, help="speed: global micro-batch (examples per step)")
    parser.add_argument("--timeout", type=int, default=240, help="speed: seconds per configuration")
    parser.add_argument("--plans", default=",".join(PLANS), help=f"speed: comma-separated: {', '.join(PLANS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="speed: comma-separated base dtypes (float32 first)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="adapters", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.model = args.model or ("tiny" if cpu else "smollm2")
    args.steps = args.steps or (6 if cpu else 30)
    if cpu:  # before torch is imported: the recipes take CUDA wherever they see it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, str(importable_tree()))
    if args.worker:
        return worker(args)

    parts = set(args.parts.split(","))
    if not parts or parts - {"parity", "speed"}:
        sys.exit(f"--parts {args.parts!r}: choose from parity, speed (comma-separated)")
    if unknown := set(args.plans.split(",")) - set(PLANS):
        sys.exit(f"--plans: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PLANS)} (comma-separated)")
    missing = missing_packages()
    if missing:
        sys.exit(f"missing Python packages for mtft.train on this machine: {' '.join(missing)} (pip install them; "
                 "without an index, bring wheels: pip download <names> -d wheels, then pip install --no-index -f wheels)")
    import torch

    if not cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MTFT_HOME"] = str(Path(tmp) / "home")  # the zero-shot cache stays in here
        if "parity" in parts:
            results["recipes"], results["parity"] = run_parity(args, Path(tmp) / "parity")
        if "speed" in parts:
            results["speed"] = run_speed(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [r["adapter"] for r in results.get("parity", []) if not r["ok"]]
    if failed:
        sys.exit(f"\nparity FAILED for {', '.join(failed)}")
    if "parity" in parts:
        print(f"\nparity: all {len(results['parity'])} exported adapters match the models that trained them")


if __name__ == "__main__":
    main()
