"""One training run's shared preparation and bookkeeping, for every recipe.

`check_run` does everything that can fail on bad input (spec, data rows, base model, registry) before
any training, and is all `--check` runs. A `Session` then loads the frozen base once and owns the
run folder: `spec.json`, `state.json` (what a `--resume` can skip, and the config each task was
trained with), the run log, zero-shot scores, evaluation, publishing and `results.json`.
Under `accelerate launch` every process holds a session; only the main process writes files,
evaluates and publishes, and the others receive what they need from it (`processes.Ranks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jinja2.exceptions import TemplateError
from pydantic import BaseModel

from mtft.registry import AdapterRecord, BaseModelRef, PromptTemplate, Registry, fingerprint, render_prompt
from mtft.registry.rollout import Gate

from .base import mtft_home, resolve_base
from .batches import Tokenized, tokenize
from .data import TaskData, load_task_data
from .evaluate import end_ids, generate, scored
from .gate import baseline, eval_hash, judge, serving_record
from .processes import Ranks, check_processes, start_accelerator
from .runlog import RunLog, plot
from .spec import Spec, SpecError, TaskSpec
from .targets import target_modules
from .tasklora import peft_init, save_adapter
from .trackers import start_trackers
from .vllm_eval import Adapter, EngineConfig, EngineError, VllmEvaluator, vllm_installed, vllm_rank

log = logging.getLogger(__name__)

AUTO_VLLM_EXAMPLES = 100  # eval examples per run from which vLLM's ~25 s start pays off (bench/eval_speed.py)
NOT_SHAPING = {"checkpoint_every", "threads", "eval_batch_size", "eval_engine",  # settings that change nothing learnt
               "report_to", "report_project"}


@dataclass(frozen=True)
class RunOptions:
    output: Path
    registry: Path
    tasks: list[str] | None = None
    resume: bool = False


class TaskState(BaseModel):
    base_score: float | None = None
    adapter_score: float | None = None
    version: int | None = None
    base_interval: tuple[float, float] | None = None  # bootstrap 95 %
    adapter_interval: tuple[float, float] | None = None
    config_hash: str | None = None  # of the training that made (or makes) this task's adapter
    gate: Gate | None = None  # the publish gate's verdict on the published version


class RunState(BaseModel):
    """`state.json` in the run folder: what a resumed run can skip."""

    tasks: dict[str, TaskState] = {}

    @classmethod
    def load(cls, path: Path) -> RunState:
        return cls.model_validate_json(path.read_text()) if path.exists() else cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str
    base: float
    adapter: float  # the published adapter (shared runs: this task's export)
    version: int
    separate: float | None = None  # shared runs: the newest per-task adapter's score, for comparison
    base_interval: tuple[float, float] | None = None  # bootstrap 95 %
    adapter_interval: tuple[float, float] | None = None
    seen: int | None = None  # shared runs: examples trained on
    share: float | None = None  # shared runs: `seen` / what the task's own run would train on
    gate: Gate | None = None  # None: the task has no publish gate

    @property
    def rejected(self) -> bool:
        return self.gate is not None and not self.gate.passed

    @property
    def negative_transfer(self) -> bool:
        """Shared runs: the export scores below the per-task adapter beyond its 95 % interval."""
        interval, separate = self.adapter_interval, self.separate
        return separate is not None and interval is not None and interval[1] < separate


@dataclass(frozen=True)
class Checked:
    """Everything validated before training: the selected tasks and their data."""

    tasks: list[TaskSpec]
    base_dir: Path
    tokenizer: object
    templates: dict[str, PromptTemplate]
    data: dict[str, TaskData]
    target_modules: list[str]  # lora.target_modules resolved against the base (`targets.py`)


def check_run(spec: Spec, options: RunOptions) -> Checked:
    """Every check that can fail on bad input, before any training (also `--check`)."""
    from transformers import AutoTokenizer

    tasks = _select(spec, options.tasks)
    Registry(options.registry).check_writable()
    base_dir = resolve_base(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    templates = {t.name: _with_chat_template(t.template, tokenizer, t.name) for t in tasks}
    modules, problems = target_modules(spec, base_dir)
    data = {}
    for task in tasks:
        try:
            data[task.name] = load_task_data(spec, task, templates[task.name], spec.training.seed)
        except SpecError as exc:
            problems += exc.problems
    for task in tasks:
        gate = spec.gate(task)
        if gate is not None and task.name in data and len(data[task.name].eval) < gate.min_eval_examples:
            problems.append(
                f"task {task.name!r}: publish.gate judges versions on the eval split, which has "
                f"{len(data[task.name].eval)} examples (fewer than min_eval_examples: {gate.min_eval_examples}); "
                "give data.eval or a larger eval_fraction, or lower publish.gate.min_eval_examples")
    if problems:
        raise SpecError(str(spec.source), problems)
    return Checked(tasks, base_dir, tokenizer, templates, data, modules)


def set_threads(requested: int | None, processes: int = 1) -> int:
    """All cores (shared by this machine's training processes) by default; a server beside training
    should get an explicit lower count."""
    threads = requested or max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    reason = "from the spec" if requested else (
        f"all cores over {processes} processes" if processes > 1 else "all cores") + (
        " (set training.threads to share the machine)")
    log.info("using %d CPU threads: %s", threads, reason)
    return threads


def choose_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The frozen base's dtype and why: bfloat16 only where the hardware computes it natively."""
    if requested != "auto":
        return getattr(torch, requested), "from training.dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bfloat16 natively"
        return torch.float32, "auto: this GPU has no native bfloat16"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16, "auto: the CPU has AVX-512-bf16/AMX"
    # Measured on a 2-core AVX2 EPYC: a bf16 matmul took 64x as long as the fp32 one.
    return torch.float32, ("auto: this CPU has no AVX-512-bf16/AMX, where bfloat16 is emulated and many "
                           "times slower (set training.dtype: bfloat16 to force it)")


def choose_attention(requested: str, device: torch.device) -> tuple[str, str]:
    """transformers' `attn_implementation` for training and why."""
    if requested != "auto":
        return requested, "from training.attention"
    if device.type == "cpu":
        # bench/train_speed.py, SmolLM2-135M bf16, 4 rows x 100 tokens: 1.16 s vs 1.85 s per forward+backward.
        return "eager", "auto: on CPU the eager backward is faster than torch's flash attention"
    return "sdpa", "auto: not a CPU"


def choose_engine(requested: str, installed: bool, device: str, examples: int) -> tuple[str, str]:
    """("vllm" | "hf", why) for `training.eval_engine`; ValueError (the why) where vllm is forced and cannot run."""
    why_not = ("vLLM is not installed" if not installed else
               "vLLM beside training on one GPU is not set up" if device != "cpu" else None)
    if requested == "vllm":
        if why_not:
            raise ValueError(f"training.eval_engine: vllm, but {why_not}; use auto or hf")
        return "vllm", "training.eval_engine: vllm"
    if requested == "hf":
        return "hf", "training.eval_engine: hf"
    if why_not:
        return "hf", f"auto: {why_not}"
    if examples < AUTO_VLLM_EXAMPLES:
        return "hf", (f"auto: {examples} eval examples; vLLM's start pays off from about {AUTO_VLLM_EXAMPLES} "
                      "(training.eval_engine: vllm forces it)")
    return "vllm", f"auto: {examples} eval examples"


class Session:
    """A started run: the frozen base (loaded once), the registry, `state.json` and the run log."""

    def __init__(self, spec: Spec, options: RunOptions, checked: Checked):
        from transformers import AutoModelForCausalLM

        self.spec, self.options, self.checked, self.tasks = spec, options, checked, checked.tasks
        self.accelerator = start_accelerator(spec.training.report_to, options.output)
        self.ranks = ranks = Ranks(self.accelerator)
        problems = check_processes(spec.training.batch_size, ranks.count, str(self.accelerator.distributed_type.value))
        if problems:
            raise SpecError(str(spec.source), problems)
        if not ranks.is_main:  # every process runs the same program: the main one logs for all
            logging.getLogger("mtft").setLevel(logging.ERROR)
        self.tokenizer = checked.tokenizer
        self.base_ref = BaseModelRef(name=spec.base_model, path=str(checked.base_dir),
                                     fingerprint=fingerprint(checked.base_dir))
        self.registry = Registry(options.registry)
        self.state_path = options.output / "state.json"
        self.state = RunState.load(self.state_path) if options.resume else RunState()
        ranks.wait()  # every process has read state.json before the main one changes it
        self.log = RunLog(options.output, trackers=start_trackers(self.accelerator, spec, options.output)
                          if ranks.is_main else None)
        if ranks.is_main:
            options.output.mkdir(parents=True, exist_ok=True)
            (options.output / "spec.json").write_text(spec.model_dump_json(indent=2))
            if not options.resume:
                self.log.clear()
        set_threads(spec.training.threads, ranks.local_count)
        self.dtype, reason = choose_dtype(spec.training.dtype, self.accelerator.device)
        log.info("base model in %s: %s", str(self.dtype).removeprefix("torch."), reason)
        self.attention, reason = choose_attention(spec.training.attention, self.accelerator.device)
        log.info("attention: %s (%s)", self.attention, reason)
        torch.manual_seed(spec.training.seed)
        self.model = AutoModelForCausalLM.from_pretrained(checked.base_dir, dtype=self.dtype,
                                                          attn_implementation=self.attention)
        self.model.to(self.accelerator.device).requires_grad_(False)
        self._initial: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None  # see initial_lora
        self.evaluator = self._evaluator() if ranks.is_main else None
        if self.evaluator is not None:
            self.evaluator.launch()  # its start overlaps what the run does before its first evaluation

    def task_state(self, name: str) -> TaskState:
        return self.state.tasks.setdefault(name, TaskState())

    def save_state(self) -> None:
        if self.ranks.is_main:
            self.state.save(self.state_path)

    def config_hash(self, not_shaping: set[str] = NOT_SHAPING, **parts) -> str:
        """Hash of everything that shapes a training's result (`parts`: its tasks and mode)."""
        spec = self.spec
        shaping = {**parts, "lora": spec.lora.model_dump(mode="json"),
                   "training": spec.training.model_dump(mode="json", exclude=not_shaping),
                   "base": self.base_ref.fingerprint, "dtype": str(self.dtype)}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()

    def claim(self, names: list[str], config_hash: str) -> bool:
        """Record what trains `names`; True where a resume may continue from their checkpoint.

        The one place that refuses to resume a run made with another spec, task selection or base.
        """
        states = [self.task_state(n) for n in names]
        if self.options.resume and any(s.config_hash not in (None, config_hash) for s in states):
            raise SpecError(str(self.state_path), [
                "this run was made with a different spec, task selection or base model; "
                "rerun without --resume to start over, or restore the spec it was made with"])
        resumable = self.options.resume and all(s.config_hash == config_hash for s in states)
        for s in states:
            s.config_hash = config_hash
        self.save_state()
        return resumable

    def end_ids(self, task: TaskSpec) -> list[int]:
        return end_ids(self.tokenizer, task.template.format)

    @property
    def pad_id(self) -> int:
        """Padding is masked out of attention and loss, so any task's end token serves."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.end_ids(self.tasks[0])[0]

    def tokenized(self, task: TaskSpec) -> list[Tokenized]:
        items, truncated = tokenize(self.checked.data[task.name].train, self.tokenizer, self.end_ids(task)[0],
                                    self.spec.training.max_length)
        if truncated:
            log.warning("%s: %d examples longer than max_length=%d lost the start of their prompt",
                        task.name, truncated, self.spec.training.max_length)
        return items

    def initial_lora(self) -> dict[str, torch.Tensor]:
        """PEFT's initial LoRA for the spec, drawn from the seed, with torch's RNG left where drawing
        it leaves it: every training starts from the same LoRA and RNG state however many tasks ran
        before. Drawn once per session (wrapping the base in PEFT takes ~0.9 s); later calls only
        restore the RNG state."""
        if self._initial is None:
            torch.manual_seed(self.spec.training.seed)
            init, self.model = peft_init(self.model, self.lora_config())
            self._initial = init, torch.get_rng_state()
        torch.set_rng_state(self._initial[1])
        return self._initial[0]

    def lora_config(self):
        from peft import LoraConfig

        lora = self.spec.lora
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(self.checked.target_modules), task_type="CAUSAL_LM")

    def _evaluator(self) -> VllmEvaluator | None:
        """The vLLM evaluation engine where `training.eval_engine` picks it, else None."""
        examples = sum(len(self.checked.data[t.name].eval) for t in self.tasks)
        try:
            engine, reason = choose_engine(self.spec.training.eval_engine, vllm_installed(),
                                           self.accelerator.device.type, examples)
        except ValueError as error:
            raise SpecError(str(self.spec.source), [str(error)]) from None
        log.info("evaluation engine: %s (%s)", engine, reason)
        if engine == "hf":
            return None
        longest = max(len(self.tokenizer(e.prompt).input_ids) + t.max_new_tokens
                      for t in self.tasks for e in self.checked.data[t.name].eval)
        # A gate may rescore a serving version of another rank: the engine takes the largest.
        names = {t.name for t in self.tasks}
        rank = max([self.spec.lora.rank] + [r.rank for r in self.registry.records() if r.task in names])
        config = EngineConfig(str(self.checked.base_dir), str(self.dtype).removeprefix("torch."),
                              vllm_rank(rank), longest + 8, threads=self.spec.training.threads)
        return VllmEvaluator(config, self.options.output / "vllm-eval.log", self.lora_config())

    def score(self, model, task: TaskSpec, label: str, adapter: Adapter = None) -> float:
        """The task's metric on its held-out split, greedy, as the router would answer.

        `model` is the base with the adapter applied (for HF generate), `adapter` the same adapter
        as vLLM loads it (a folder or a function giving its PEFT weights; None: the base).
        The predictions go to `predictions/<task>/<label>.jsonl`, each with its own score. The
        main process evaluates; every process gets the score (dynamic mixing may follow it).
        """
        return self.ranks.from_main(lambda: self._score(model, task, label, adapter))

    def _answers(self, model, task: TaskSpec, label: str, adapter: Adapter) -> list[str]:
        prompts, desc = [e.prompt for e in self.checked.data[task.name].eval], f"eval {task.name} ({label})"
        if self.evaluator is not None:
            try:
                return self.evaluator.answers(self.tokenizer, prompts, task.max_new_tokens, self.end_ids(task),
                                              adapter, desc)
            except EngineError as error:
                if self.spec.training.eval_engine == "vllm":
                    raise
                log.warning("evaluation engine: falling back to hf for the rest of the run: %s", error)
                self.evaluator.close()
                self.evaluator = None
        return generate(model, self.tokenizer, prompts, task.max_new_tokens, self.end_ids(task),
                        self.spec.training.eval_batch_size, desc)

    def _score(self, model, task: TaskSpec, label: str, adapter: Adapter = None) -> float:
        examples = self.checked.data[task.name].eval
        result = scored(examples, self._answers(model, task, label, adapter), task.metric, task.labels)
        result.save(self.options.output / "predictions" / task.name / f"{label}.jsonl", examples)
        # The final table and state.json keep intervals of these two; evaluations during training skip it.
        if label == "base":
            self.task_state(task.name).base_interval = result.interval()
        elif label == "adapter":
            self.task_state(task.name).adapter_interval = result.interval()
        return result.score

    def score_base(self) -> None:
        """Zero-shot scores of every selected task not yet scored (kept across resumes and cached).

        The cache key is everything the score depends on (base, dtype, template, metric, eval data,
        batching), so a repeated run or another recipe on the same tasks does not evaluate again.
        The main process scores; every process gets its state.
        """
        if self.ranks.is_main:
            self._score_base()
        self.state = self.ranks.from_main(lambda: self.state)

    def _score_base(self) -> None:
        for task in self.tasks:
            state = self.task_state(task.name)
            if state.base_score is not None or state.version is not None:
                continue
            cached = mtft_home() / "cache" / "zero-shot" / f"{self._zero_shot_key(task)}.jsonl"
            predictions = self.options.output / "predictions" / task.name / "base.jsonl"
            if cached.exists():
                rows = [json.loads(line) for line in cached.read_text().splitlines()]
                state.base_score, state.base_interval = rows[0]["score"], tuple(rows[0]["interval"])
                predictions.parent.mkdir(parents=True, exist_ok=True)
                # The same examples (the key holds them), maybe from files elsewhere: this run's places.
                here = [{**r, "where": e.where} for r, e in zip(rows[1:], self.checked.data[task.name].eval)]
                predictions.write_text("".join(json.dumps(r) + "\n" for r in here))
                how = f"cached in {cached}"
            else:
                state.base_score = self._score(self.model, task, "base")
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                head = {"score": state.base_score, "interval": state.base_interval}
                tmp.write_text(json.dumps(head) + "\n" + predictions.read_text())
                os.replace(tmp, cached)
                how = "evaluated"
            self.save_state()
            log.info("%s: base model %s = %.3f (%s)", task.name, task.metric, state.base_score, how)

    def _zero_shot_key(self, task: TaskSpec) -> str:
        examples = [(e.prompt, e.target) for e in self.checked.data[task.name].eval]
        key = {"format": 2, "base": self.base_ref.fingerprint, "dtype": str(self.dtype), "end_ids": self.end_ids(task),
               "task": task.model_dump(mode="json", include={"metric", "labels", "max_new_tokens"}),
               "batch": self.spec.training.eval_batch_size, "examples": examples,
               "engine": "vllm" if self.evaluator is not None else f"hf/{self.attention}"}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def publish(self, task: TaskSpec, weights: dict[str, torch.Tensor], trained_by: str, log: RunLog, steps: int) -> None:
        """Write `weights` (a PEFT LoRA state dict on the bare base) as a PEFT adapter and publish it.

        Once, by the main process; every process learns the version.
        """
        state = self.task_state(task.name)
        state.version, state.gate = self.ranks.from_main(lambda: self._publish(task, weights, trained_by, log, steps))
        self.save_state()
        if state.gate is not None and not state.gate.passed:
            logging.getLogger(__name__).warning(  # `log` is the run log here
                "%s: v%d failed its publish gate (%s): published as rejected, not served",
                task.name, state.version, state.gate.reason)

    def _publish(self, task: TaskSpec, weights: dict[str, torch.Tensor], trained_by: str, log: RunLog,
                 steps: int) -> tuple[int, Gate | None]:
        state = self.task_state(task.name)
        log.append({"step": 0, "model": "base", "eval": {task.name: state.base_score}})
        log.append({"step": steps, "model": "adapter", "eval": {task.name: state.adapter_score}})
        adapter_dir = self.options.output / task.name / "adapter"
        save_adapter(adapter_dir, self.lora_config(), weights, self.checked.base_dir)
        lora = self.spec.lora
        examples = self.checked.data[task.name].eval
        gate = self._judge(task, state.adapter_score, eval_hash(examples))
        record = AdapterRecord(
            task=task.name, prefix=task.prefix, template=self.checked.templates[task.name], base_model=self.base_ref,
            rank=lora.rank, alpha=lora.alpha, target_modules=list(self.checked.target_modules), metric=task.metric,
            metrics={"base": state.base_score, "adapter": state.adapter_score},
            labels=task.labels, eval_examples=len(examples), eval_hash=eval_hash(examples),
            max_new_tokens=task.max_new_tokens,
            trained_by=trained_by, gate=gate,
        )
        # The routing profile: every training input as a client would send it (rendered, no prefix).
        inputs = [e.input for e in self.checked.data[task.name].train]
        return self.registry.publish(adapter_dir, record, routing_inputs=inputs).version, gate

    def _judge(self, task: TaskSpec, score: float, examples_hash: str) -> Gate | None:
        """The gate's verdict on a new version scoring `score`; None where the task has no gate."""
        rule = self.spec.gate(task)
        if rule is None:
            return None
        serving = serving_record(self.registry, task.name, self.base_ref.fingerprint) if rule.no_worse is not None \
            else None
        return judge(rule, score, baseline(serving, examples_hash, lambda record: self._score_published(task, record)))

    def _score_published(self, task: TaskSpec, record: AdapterRecord) -> float:
        """A published version's score on this run's eval split (the base model is left as it was)."""
        from peft import PeftModel

        log.info("%s: scoring the serving v%d on this run's eval data for the gate", task.name, record.version)
        folder = self.registry.version_dir(task.name, record.version)
        model = PeftModel.from_pretrained(self.model, folder)
        try:
            return self._score(model.eval(), task, f"serving-v{record.version}", folder)
        finally:
            self.model = model.unload()

    def result(self, task: TaskSpec, **shared) -> TaskResult:
        """The task's final row; shared runs add `separate`, `seen` and `share`."""
        s = self.state.tasks[task.name]
        return TaskResult(task.name, task.metric, s.base_score, s.adapter_score, s.version,
                          base_interval=s.base_interval, adapter_interval=s.adapter_interval, gate=s.gate, **shared)

    def finish(self, mode: str, results: list[TaskResult], stage_ends: list[int] | None = None) -> list[TaskResult]:
        """`curves.png` from the run log and `results.json`: the run's final per-task scores."""
        if self.evaluator is not None:
            self.evaluator.close()
        if not self.ranks.is_main:
            return results
        plot(self.log.rows(), self.options.output / "curves.png", {t.name: t.metric for t in self.tasks}, stage_ends)
        rows = {r.task: {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in asdict(r).items()
                         if k != "task" and v is not None} for r in results}
        (self.options.output / "results.json").write_text(json.dumps({"mode": mode, "tasks": rows}, indent=2))
        self.log.close()
        return results


def _select(spec: Spec, names: list[str] | None) -> list[TaskSpec]:
    if not names:
        return spec.tasks
    known = [t.name for t in spec.tasks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(str(spec.source), [f"--task {n!r} is not in the spec; tasks are {known}" for n in unknown])
    return [spec.task(n) for n in names]


def _with_chat_template(template: PromptTemplate, tokenizer, task: str) -> PromptTemplate:
    if template.format != "chat":
        return template
    if not tokenizer.chat_template:
        raise SpecError(task, [f"task {task!r} uses format: chat but the base model's tokenizer has no chat template"])
    filled = template.model_copy(update={"chat_template": tokenizer.chat_template})
    try:
        render_prompt(filled, "", "x")
    except TemplateError as exc:
        raise SpecError(task, [f"task {task!r} uses format: chat, but the base model's chat template cannot render "
                               f"one user message ({exc}); use format: plain with a prompt of your own"]) from None
    return filled
