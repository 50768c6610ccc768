"""Learned routing measured: held-out un-prefixed inputs of every available task, routed with no task named.

    .venv/bin/python bench/learned_routing.py --data ../shared/data --out runs/bench/learned-routing

Tasks (profiles from training inputs only; scored on held-out inputs never seen by the profile):
  demo      ticket, contact, isodate: train/demo/tasks.yaml, its train/eval files, rendered by the spec's templates
  real      sst2 (sentence), gsm8k (question), scitldr (first 3 abstract sentences): bench/multitask_real.py's
            tasks, --train rows seeded from each train split, --eval rows from each test split
  derived   gsm8k-solution (the worked solution without its '####' line -> the final number) and
            scitldr-expand (a TLDR -> the abstract's first sentence): real tasks with inputs of their own
            (two tasks with the same inputs could not be told apart by anyone, so none are made)
  synthetic only in the scaling rows: generated tasks (own 40-word vocabulary of pseudo-words, shared
            English function words), labelled as such
Methods, all over the same hashed character n-grams (`mtft.registry.routing_profile.featurize`):
  idf-centroid  the router's (`mtft.router.learned.LearnedIndex`): centroid cosine, IDF over served profiles
  centroid      no IDF: the highest gate score (3-5-gram cosine relative to the task's own inputs) wins
  naive-bayes   multinomial NB over the 1-5-gram buckets, the top 4,096 counts kept
Accuracy counts an abstention (default route) as an error. "Open set": a task's inputs while it is not served
(leave one out) should abstain; the share that did is shown. Latency: `LearnedIndex.classify` per request with
100 served tasks (the 8 tasks + 92 synthetic), p50/p99 over every held-out input. The PNG plots accuracy
against the number of served tasks. Nothing above needs vLLM or a model; two optional parts do:
  --embeddings BASE_DIR  a fourth method, centroids of the base model's (SmolLM2-135M) mean-pooled last hidden
            states, on a bounded sample (--embed-train / --embed-eval per task), beside idf-centroid on the same sample
  --downstream RUN=REGISTRY  (repeatable) the task metric when routed vs named on each training run's held-out
            predictions, routing among the tasks of those registries; see `downstream` for exactly what runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from multitask_real import TASKS as REAL  # noqa: E402  (the real-data tasks, shared with that bench)
from multitask_real import read_jsonl  # noqa: E402
from report import save  # noqa: E402

from mtft.registry import PromptTemplate, render_input  # noqa: E402
from mtft.registry.routing_profile import BITS, KEEP, build_profile, featurize  # noqa: E402
from mtft.router.learned import DEFAULT_THRESHOLD, LearnedIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Split = tuple[list[str], list[str]]  # training inputs, held-out inputs


def demo_tasks() -> dict[str, Split]:
    from mtft.train import load_spec
    from mtft.train.data import load_task_data

    spec = load_spec(ROOT / "train/demo/tasks.yaml")
    out = {}
    for task in spec.tasks:
        # Only the input is used; a chat template needs some chat_template to render prompts at all.
        template = task.template.model_copy(update={"chat_template": "{{ messages }}"})
        data = load_task_data(spec, task, template, spec.training.seed)
        out[task.name] = ([e.input for e in data.train], [e.input for e in data.eval])
    return out


def sample(rows: list, name: str, role: str, count: int, seed: int) -> list:
    return random.Random(f"{seed}/{name}/{role}").sample(rows, min(count, len(rows)))


def real_tasks(data: Path, train: int, held: int, seed: int) -> dict[str, Split]:
    out = {}
    for task in REAL:
        template = PromptTemplate(**task.spec["template"])
        rows = [task.read(data / f) for f in task.files]
        out[task.name] = tuple([render_input(template, r) for r in sample(rs, task.name, role, n, seed)]
                               for rs, role, n in zip(rows, ("train", "eval"), (train, held)))
    solutions = [[r["answer"].rsplit("####", 1)[0].strip() for r in read_jsonl(data / "gsm8k" / f)]
                 for f in ("train.jsonl", "test.jsonl")]
    tldrs = [[r["target"][0].strip() for r in read_jsonl(data / "scitldr" / f)] for f in ("train.jsonl", "test.jsonl")]
    for name, (tr, ev) in (("gsm8k-solution", solutions), ("scitldr-expand", tldrs)):
        out[name] = (sample(tr, name, "train", train, seed), sample(ev, name, "eval", held, seed))
    return out


def synthetic_tasks(count: int, train: int, held: int, seed: int) -> dict[str, Split]:
    rng = random.Random(f"{seed}/synthetic")
    syllables = [a + b for a in "bcdfghjklmnprstvz" for b in "aeiou"]
    lexicon = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 3))) for _ in range(6000)})
    common = ("the a of to and in is it that for on with as was at by this from or an be are my your we "
              "please can you how what when why which not have has will").split()
    out = {}
    for i in range(count):
        words = rng.sample(lexicon, 40)
        def line() -> str:
            return " ".join(rng.choice(words) if rng.random() < 0.4 else rng.choice(common)
                            for _ in range(rng.randint(6, 14)))
        out[f"synthetic-{i:03d}"] = ([line() for _ in range(train)], [line() for _ in range(held)])
    return out


# -- methods: fit(task -> training inputs) -> predict(text, threshold) -> task or None -----------------
def idf_centroid(tasks: dict[str, Split], profiles: dict) -> LearnedIndex:
    return LearnedIndex({t: profiles[t] for t in tasks})


class Plain:
    """No IDF: the task whose gate score (3-5-gram cosine relative to its own inputs') is highest."""

    def __init__(self, tasks: dict[str, Split], profiles: dict):
        self.tasks = sorted(tasks)
        self.index = {t: LearnedIndex({t: profiles[t]}) for t in self.tasks}

    def classify(self, text: str):
        decisions = [self.index[t].classify(text) for t in self.tasks]
        return max(decisions, key=lambda d: d.score)


class NaiveBayes:
    """Multinomial NB: per task the top KEEP bucket masses of its inputs, the rest spread evenly."""

    def __init__(self, tasks: dict[str, Split], profiles: dict):
        self.tasks = sorted(tasks)
        self.models = []
        for t in self.tasks:
            total = np.zeros(1 << BITS)
            for text in tasks[t][0]:
                b, w = featurize(text)[0]
                total[b] += w / w.sum()
            top = np.argsort(total)[::-1][:KEEP]
            floor = (total.sum() - total[top].sum() + 0.01) / ((1 << BITS) - len(top)) / total.sum()
            self.models.append((top, np.log(total[top] / total.sum() + floor), np.log(floor)))

    def classify(self, text: str):
        b, w = featurize(text)[0]
        w = w / w.sum()
        scores = []
        for top, logp, floor in self.models:
            _, xi, ci = np.intersect1d(b, top, assume_unique=True, return_indices=True)
            lp = np.full(len(b), floor)
            lp[xi] = logp[ci]
            scores.append(float(np.dot(w, lp)))
        best = int(np.argmax(scores))
        return _Pick(self.tasks[best])


class _Pick:
    score = float("inf")  # NB has no gate of its own here: it never abstains

    def __init__(self, task: str):
        self.task = task


METHODS = {"idf-centroid": idf_centroid, "centroid": Plain, "naive-bayes": NaiveBayes}


class BaseEmbedding:
    """Centroids of SmolLM2-135M's mean-pooled last hidden states (the served base: no download), cosine.

    What the router would have to run per request: a forward pass of the base model on the text.
    """

    def __init__(self, tasks: dict[str, Split], base: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).model.eval()
        self.tasks = sorted(tasks)
        self.centroids = np.stack([self._unit(self.embed(tasks[t][0]).mean(0)) for t in self.tasks])

    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def embed(self, texts: list[str], batch: int = 16) -> np.ndarray:
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                                     max_length=192)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1)
                out.append(self._unit(((hidden * mask).sum(1) / mask.sum(1)).numpy()))
        return np.concatenate(out)

    def classify(self, text: str):
        sims = self.centroids @ self.embed([text])[0]
        return _Pick(self.tasks[int(np.argmax(sims))])


def embedding_rows(tasks: dict[str, Split], base: Path, train: int, held: int, threshold: float) -> tuple[dict, dict]:
    """The base-embedding method on a bounded sample (`train` profile inputs, `held` held-out ones per task),
    with idf-centroid on the very same sample for comparison, and per-request latency of each."""
    small = {n: (tr[:train], ev[:held]) for n, (tr, ev) in tasks.items()}
    start = time.perf_counter()
    model = BaseEmbedding(small, base)
    fit_s = time.perf_counter() - start
    rows = {"base-embedding": evaluate(model, small, threshold),
            "idf-centroid (same sample)": evaluate(idf_centroid(small, {n: build_profile(tr, "sha256:bench")
                                                                     for n, (tr, _) in small.items()}), small, threshold)}
    texts = [t for _, ev in small.values() for t in ev][:60]
    times = []
    for text in texts:
        start = time.perf_counter()
        model.classify(text)
        times.append(time.perf_counter() - start)
    return rows, {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3),
                  "fit_s": fit_s}


def evaluate(model, tasks: dict[str, Split], threshold: float) -> dict[str, dict[str, float]]:
    rows = {}
    for name, (_, held) in tasks.items():
        picks = [model.classify(text) for text in held]
        routed = [p.task if p is not None and p.score >= threshold else None for p in picks]
        rows[name] = {"n": len(held), "accuracy": np.mean([r == name for r in routed]),
                      "abstain": np.mean([r is None for r in routed])}
    return rows


def open_set(tasks: dict[str, Split], profiles: dict, threshold: float) -> dict[str, float]:
    """Share of each task's inputs that abstain while that task is not served."""
    out = {}
    for name in tasks:
        index = LearnedIndex({t: profiles[t] for t in tasks if t != name})
        picks = [index.classify(text) for text in tasks[name][1]]
        out[name] = float(np.mean([p.score < threshold for p in picks]))
    return out


def overall(rows: dict[str, dict[str, float]], key: str = "accuracy") -> float:
    return sum(r[key] * r["n"] for r in rows.values()) / sum(r["n"] for r in rows.values())


def scaling(tasks: dict[str, Split], synthetic: dict[str, Split], profiles: dict, threshold: float,
            seed: int) -> list[dict]:
    """Accuracy against served tasks: subsets of the real+demo tasks, then all of them plus synthetic ones."""
    rng, names, points = random.Random(seed), sorted(tasks), []
    for k in range(2, len(names) + 1):
        subsets = list(itertools.combinations(names, k))
        accs = [overall(evaluate(idf_centroid(dict((n, tasks[n]) for n in s), profiles),
                                 {n: tasks[n] for n in s}, threshold)) for s in rng.sample(subsets, min(6, len(subsets)))]
        points.append({"tasks": k, "kind": "subsets of the 8 tasks", "accuracy": float(np.mean(accs))})
    for extra in (8, 17, 42, 92):
        served = {**tasks, **dict(itertools.islice(synthetic.items(), extra))}
        rows = evaluate(idf_centroid(served, profiles), served, threshold)
        points.append({"tasks": len(served), "kind": "the 8 + synthetic: all inputs", "accuracy": overall(rows)})
        points.append({"tasks": len(served), "kind": "the 8 + synthetic: the 8 tasks' inputs",
                       "accuracy": overall({n: rows[n] for n in tasks})})
    return points


def latency(tasks: dict[str, Split], synthetic: dict[str, Split], profiles: dict) -> dict[str, float]:
    served = {**tasks, **synthetic}
    start = time.perf_counter()
    index = idf_centroid(served, profiles)
    build_ms = (time.perf_counter() - start) * 1e3
    texts = [t for _, held in tasks.values() for t in held]
    for text in texts[:50]:  # warm up
        index.classify(text)
    times = []
    for text in texts:
        start = time.perf_counter()
        index.classify(text)
        times.append(time.perf_counter() - start)
    return {"tasks": len(index), "p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3), "build_ms": build_ms, "requests": len(times)}


# -- downstream: the task's metric when routed vs when named, with the real adapters -------------------
def downstream(runs: list[str], profiles: dict, threshold: float) -> list[dict]:
    """Per task of each `RUN=REGISTRY` pair: its metric on the run's held-out predictions when named, and
    when routed by learned routing among every task of those registries (the served set).

    Named answers are the training run's saved evaluation predictions (greedy; the router renders and
    answers a named request the same way). A request routed to its own task is that very computation, so
    it keeps its answer; one routed to another task is generated again with that adapter and template
    (HF + PEFT, greedy, as the router would send it); one that abstains would get a 404 (no default) and
    scores 0.
    """
    from mtft.registry import Registry
    from mtft.train.metrics import score

    tasks = {}
    for pair in runs:
        run, _, registry = pair.partition("=")
        labels = {t["name"]: t.get("labels") for t in json.loads((Path(run) / "spec.json").read_text())["tasks"]}
        for task, record in Registry(registry).latest().items():
            rows = [json.loads(line) for line in (Path(run) / "predictions" / task / "adapter.jsonl").open()]
            tasks[task] = (record, Path(registry) / task / f"v{record.version}", labels.get(task), rows)
    index = LearnedIndex({t: profiles[t] for t in tasks})
    routed = {t: [index.classify(r["input"]) for r in rows] for t, (_, _, _, rows) in tasks.items()}
    again = [(t, i, d.task) for t, ds in routed.items() for i, d in enumerate(ds)
             if d.score >= threshold and d.task != t]
    answers = _generate_with(again, tasks)
    out = []
    for task, (record, _, labels, rows) in tasks.items():
        refs = [r["reference"] for r in rows]
        named = [r["prediction"] for r in rows]
        mine = [named[i] if d.task == task and d.score >= threshold else answers.get((task, i), "")
                for i, d in enumerate(routed[task])]
        a, b = score(record.metric, named, refs, labels=labels), score(record.metric, mine, refs, labels=labels)
        out.append({"task": task, "metric": record.metric, "n": len(rows), "named": a, "routed": b,
                    "misrouted": sum(1 for t, _, _ in again if t == task),
                    "abstained": sum(1 for d in routed[task] if d.score < threshold)})
    return out


def _generate_with(jobs: list[tuple[str, int, str]], tasks: dict) -> dict[tuple[str, int], str]:
    """Greedy answers of misrouted inputs from the adapter they were routed to."""
    if not jobs:
        return {}
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtft.registry import render_prompt
    from mtft.train import generate
    from mtft.train.evaluate import end_ids

    base_dir = next(iter(tasks.values()))[0].base_model.path
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    out = {}
    for target in sorted({j[2] for j in jobs}):
        record, folder = tasks[target][0], tasks[target][1]
        model = PeftModel.from_pretrained(base, folder)
        mine = [(t, i) for t, i, to in jobs if to == target]
        prompts = [render_prompt(record.template, record.prefix, tasks[t][3][i]["input"]) for t, i in mine]
        answers = generate(model, tokenizer, prompts, record.max_new_tokens, end_ids(tokenizer, record.template.format), 8)
        out.update(zip(mine, answers))
        base = model.unload()
    return out


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind in dict.fromkeys(p["kind"] for p in points):
        xs = [p["tasks"] for p in points if p["kind"] == kind]
        ax.plot(xs, [p["accuracy"] for p in points if p["kind"] == kind], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("served tasks (log scale)")
    ax.set_ylabel("routing accuracy (held-out, un-prefixed)")
    ax.set_title("learned routing (idf-centroid): accuracy vs tasks")
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "learned-routing")
    parser.add_argument("--train", type=int, default=400, help="training inputs per real task")
    parser.add_argument("--eval", type=int, default=200, help="held-out inputs per real task")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", type=Path, default=None, metavar="BASE_DIR",
                        help="also measure SmolLM2 mean-hidden-state centroids (a base model folder; slow, bounded "
                        "to --embed-train/--embed-eval inputs per task)")
    parser.add_argument("--embed-train", type=int, default=100)
    parser.add_argument("--embed-eval", type=int, default=40)
    parser.add_argument("--downstream", action="append", default=[], metavar="RUN=REGISTRY",
                        help="a training run folder (its predictions/) and the registry it published to; repeatable")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    tasks = {**demo_tasks(), **real_tasks(args.data, args.train, args.eval, args.seed)}
    synthetic = synthetic_tasks(92, 200, 50, args.seed)
    start = time.perf_counter()
    profiles = {name: build_profile(train, "sha256:bench") for name, (train, _) in {**tasks, **synthetic}.items()}
    build_s = (time.perf_counter() - start) / len(profiles)

    lines = [f"## learned routing: {len(tasks)} tasks, held-out un-prefixed inputs, threshold {args.threshold}", "",
             "| task | held-out | " + " | ".join(f"{m} acc" for m in METHODS) + " | idf-centroid abstain | "
             "open set: abstains when not served |", "|---|---:|" + "---:|" * (len(METHODS) + 2)]
    results = {m: evaluate(make(tasks, profiles), tasks, args.threshold) for m, make in METHODS.items()}
    unserved = open_set(tasks, profiles, args.threshold)
    for name in tasks:
        accs = " | ".join(f"{results[m][name]['accuracy']:.3f}" for m in METHODS)
        lines.append(f"| {name} | {results['idf-centroid'][name]['n']} | {accs} | "
                     f"{results['idf-centroid'][name]['abstain']:.3f} | {unserved[name]:.3f} |")
    accs = " | ".join(f"**{overall(results[m]):.3f}**" for m in METHODS)
    lines.append(f"| all | {sum(r['n'] for r in results['idf-centroid'].values())} | {accs} | "
                 f"{overall(results['idf-centroid'], 'abstain'):.3f} | {np.mean(list(unserved.values())):.3f} |")
    lines += ["", "| threshold | accuracy | abstain (held-out) | open set: abstains when not served |",
              "|---:|---:|---:|---:|"]
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7):
        rows = evaluate(idf_centroid(tasks, profiles), tasks, threshold)
        lines.append(f"| {threshold} | {overall(rows):.3f} | {overall(rows, 'abstain'):.3f} | "
                     f"{np.mean(list(open_set(tasks, profiles, threshold).values())):.3f} |")
    points = scaling(tasks, synthetic, profiles, args.threshold, args.seed)
    lines += ["", "| served tasks | kind | idf-centroid accuracy |", "|---:|---|---:|"]
    lines += [f"| {p['tasks']} | {p['kind']} | {p['accuracy']:.3f} |" for p in points]
    speed = latency(tasks, synthetic, profiles)
    lines += ["", f"decision latency (`LearnedIndex.classify`, {speed['tasks']} served tasks, {speed['requests']} "
              f"requests): p50 {speed['p50_ms']:.3f} ms, p99 {speed['p99_ms']:.3f} ms; index built in "
              f"{speed['build_ms']:.0f} ms; a profile built in {build_s * 1e3:.0f} ms per task at publish"]
    quality = downstream(args.downstream, profiles, args.threshold) if args.downstream else []
    if quality:
        lines += ["", "| task | metric | held-out | named | routed | routed / named | misrouted | abstained |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {q['task']} | {q['metric']} | {q['n']} | {q['named']:.3f} | {q['routed']:.3f} | "
                  f"{q['routed'] / q['named'] * 100:.1f} % | {q['misrouted']} | {q['abstained']} |" if q["named"] else
                  f"| {q['task']} | {q['metric']} | {q['n']} | {q['named']:.3f} | {q['routed']:.3f} | n/a | "
                  f"{q['misrouted']} | {q['abstained']} |" for q in quality]
        scored = [q for q in quality if q["named"]]
        lines.append(f"| all with a non-zero named score | | {sum(q['n'] for q in scored)} | | | **"
                     f"{np.mean([q['routed'] / q['named'] for q in scored]) * 100:.1f} %** (mean over tasks) | "
                     f"{sum(q['misrouted'] for q in quality)} | {sum(q['abstained'] for q in quality)} |")
    if args.embeddings:
        rows, cost = embedding_rows(tasks, args.embeddings, args.embed_train, args.embed_eval, args.threshold)
        lines += ["", f"bounded sample ({args.embed_train} profile inputs, {args.embed_eval} held-out per task):",
                  "", "| method | " + " | ".join(tasks) + " | all |", "|---|" + "---:|" * (len(tasks) + 1)]
        lines += [f"| {m} | " + " | ".join(f"{r[n]['accuracy']:.3f}" for n in tasks) + f" | **{overall(r):.3f}** |"
                  for m, r in rows.items()]
        lines += ["", f"base-embedding: centroids in {cost['fit_s']:.0f} s; per request (one forward of the base, "
                  f"{len(tasks)} tasks) p50 {cost['p50_ms']:.1f} ms, p99 {cost['p99_ms']:.1f} ms"]
    plot(points, args.out / "accuracy_vs_tasks.png")
    raw = {"methods": {m: {t: {k: float(v) for k, v in r.items()} for t, r in rows.items()} for m, rows in results.items()},
           "open_set": unserved, "scaling": points, "latency": speed, "downstream": quality}
    (args.out / "results.json").write_text(json.dumps(raw, indent=2))
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    save("learned-routing", "learned routing: held-out un-prefixed inputs, no task named", text, raw,
         ["the three methods share the same hashed character n-grams and are scored on the same held-out inputs"],
         [args.out / "accuracy_vs_tasks.png"])
    print(text)
    print(f"\nwrote {args.out / 'table.md'}, {args.out / 'accuracy_vs_tasks.png'}")


if __name__ == "__main__":
    main()
