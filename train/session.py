"""One started training run, shared by every recipe: its processes, files and the steps around training.

A recipe checks its input (`check.check_run`), starts a `Session` (which loads the frozen base
once, `frozen_base.FrozenBase`), trains, scores and publishes through it, and ends with
`finish`. The session owns the run folder: `spec.json`, `state.json` (`state.RunState`), the run
log, `curves.png` and `results.json`; scoring is the `scorer.Scorer`'s and publishing the
`publisher.Publisher`'s. Under `accelerate launch` every process holds a session; only the main
process writes files, evaluates and publishes, and the others receive what they need from it
(`processes.Ranks`).
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from mtft.registry import Registry

from .batches import Tokenized, tokenize
from .check import Checked, RunOptions
from .evaluate import end_ids
from .frozen_base import FrozenBase
from .hardware import set_threads
from .processes import FSDP_NOT_APPLIED, Ranks, check_processes, fsdp_plugin, start_accelerator
from .publisher import Publisher
from .results import TaskResult, write_results
from .runlog import RunLog, plot
from .scorer import Scorer
from .spec import Spec, SpecError, TaskSpec
from .state import RunState
from .trackers import start_trackers
from .vllm_eval import Adapter

log = logging.getLogger(__name__)

NOT_SHAPING = {"checkpoint_every", "threads", "eval_batch_size", "eval_engine",  # settings that change nothing learnt
               "report_to", "report_project", "gradient_checkpointing"}


class Session:
    """A started run: its processes, the frozen base, the registry, `state.json` and the run log; on the
    main process also the scorer and the publisher."""

    def __init__(self, spec: Spec, options: RunOptions, checked: Checked):
        self.spec, self.options, self.checked, self.tasks = spec, options, checked, checked.tasks
        self.accelerator = start_accelerator(spec.training.report_to, options.output)
        plugin = fsdp_plugin(self.accelerator)  # before Ranks, which reads it
        self.ranks = ranks = Ranks(self.accelerator)
        problems = check_processes(spec.training.batch_size, ranks.count,
                                   "FSDP" if plugin else str(self.accelerator.distributed_type.value),
                                   plugin.fsdp_version if plugin else None, spec.training.base_quantization is not None,
                                   [name for name in FSDP_NOT_APPLIED if plugin and getattr(plugin, name, False)])
        if problems:
            raise SpecError(str(spec.source), problems)
        if not ranks.is_main:  # every process runs the same program: the main one logs for all
            logging.getLogger("mtft").setLevel(logging.ERROR)
        self.tokenizer = checked.tokenizer
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
        self.base = FrozenBase(spec, checked, self.accelerator.device)
        if plugin is not None:
            self.base.shard(self.accelerator)
        self.scorer = Scorer(spec, checked, self.base, options.output, self.registry) if ranks.is_main else None
        self.publisher = (Publisher(spec, checked, self.base, self.registry, self.scorer, options.output)
                          if ranks.is_main else None)

    def save_state(self) -> None:
        if self.ranks.is_main:
            self.state.save(self.state_path)

    def config_hash(self, not_shaping: set[str] = NOT_SHAPING, **parts) -> str:
        """Hash of everything that shapes a training's result (`parts`: its tasks and mode)."""
        spec = self.spec
        shaping = {**parts, "lora": spec.lora.model_dump(mode="json"),
                   "training": spec.training.model_dump(mode="json", exclude=not_shaping),
                   "base": self.base.ref.fingerprint, "dtype": str(self.base.dtype)}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()

    def claim(self, names: list[str], config_hash: str) -> bool:
        """Record what trains `names` in `state.json`; True where a resume may continue from their checkpoint."""
        resumable = self.state.claim(names, config_hash, self.options.resume, self.state_path)
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

    def score_base(self) -> None:
        """Zero-shot scores of every selected task not yet scored (kept across resumes; `Scorer.zero_shot`
        caches them across runs). The main process scores; every process gets its state."""
        with self.base.whole():
            if self.ranks.is_main:
                for task in self.tasks:
                    state = self.state.task(task.name)
                    if state.base_score is not None or state.version is not None:
                        continue
                    state.base_score, state.base_interval, how = self.scorer.zero_shot(task)
                    self.save_state()
                    log.info("%s: base model %s = %.3f (%s)", task.name, task.metric, state.base_score, how)
            self.state = self.ranks.from_main(lambda: self.state)

    def score(self, model, task: TaskSpec, label: str, adapter: Adapter = None) -> float:
        """The task's metric on its held-out split, greedy, as the router would answer (`Scorer.evaluate`).

        The main process evaluates; every process gets the score (dynamic mixing may follow it).
        """
        with self.base.whole():
            return self.ranks.from_main(lambda: self._score(model, task, label, adapter))

    def _score(self, model, task: TaskSpec, label: str, adapter: Adapter) -> float:
        result = self.scorer.evaluate(model, task, label, adapter)
        # The final table and state.json keep intervals of these two; evaluations during training skip it.
        if label in ("base", "adapter"):
            setattr(self.state.task(task.name), f"{label}_interval", result.interval())
        return result.score

    def publish(self, task: TaskSpec, weights: dict[str, torch.Tensor], trained_by: str, run_log: RunLog,
                steps: int) -> None:
        """Write `weights` (a PEFT LoRA state dict on the bare base) as a PEFT adapter and publish it.

        Once, by the main process; every process learns the version.
        """
        state = self.state.task(task.name)
        with self.base.whole():  # the gate may score the serving version
            state.version, state.gate = self.ranks.from_main(
                lambda: self.publisher.publish(task, state, weights, trained_by, run_log, steps))
        self.save_state()
        if state.gate is not None and not state.gate.passed:
            log.warning("%s: v%d failed its publish gate (%s): published as rejected, not served",
                        task.name, state.version, state.gate.reason)

    def result(self, task: TaskSpec, **shared) -> TaskResult:
        """The task's final row; shared runs add `separate`, `seen` and `share`."""
        s = self.state.tasks[task.name]
        return TaskResult(task.name, task.metric, s.base_score, s.adapter_score, s.version,
                          base_interval=s.base_interval, adapter_interval=s.adapter_interval, gate=s.gate, **shared)

    def close(self) -> None:
        """Stop the evaluation engine, if one runs."""
        if self.scorer is not None:
            self.scorer.close()

    def finish(self, mode: str, results: list[TaskResult], stage_ends: list[int] | None = None) -> list[TaskResult]:
        """`curves.png` from the run log and `results.json`: the run's final per-task scores."""
        self.close()
        if not self.ranks.is_main:
            return results
        plot(self.log.rows(), self.options.output / "curves.png", {t.name: t.metric for t in self.tasks}, stage_ends)
        write_results(self.options.output / "results.json", mode, results)
        self.log.close()
        return results
