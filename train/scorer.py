"""Scoring tasks during a run: the evaluation engine, saved predictions and the zero-shot cache.

Every score is the task's metric on its held-out split, greedy, as the router would answer. The
engine is vLLM (one worker for the run, `vllm_eval`) or HF generate, picked by
`training.eval_engine`; where the vLLM worker fails under `auto`, the rest of the run falls back to
HF with the same scores. Zero-shot scores are cached under `$MTFT_HOME/cache/zero-shot`, keyed by
everything they depend on, so another run or recipe on the same tasks does not evaluate the base again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from mtft.registry import Registry

from .base import mtft_home
from .check import Checked
from .evaluate import Evaluation, end_ids, generate, scored
from .frozen_base import FrozenBase
from .spec import Spec, SpecError, TaskSpec
from .vllm_eval import Adapter, EngineConfig, EngineError, VllmEvaluator, vllm_installed, vllm_rank

log = logging.getLogger(__name__)

AUTO_VLLM_EXAMPLES = 100  # eval examples per run from which vLLM's start pays off over HF (bench/eval_speed.py)


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


class Scorer:
    """The main process's evaluations: the engine (launched at once, so its start overlaps the run's
    setup), predictions under `<output>/predictions/<task>/<label>.jsonl`, the zero-shot cache."""

    def __init__(self, spec: Spec, checked: Checked, base: FrozenBase, output: Path, registry: Registry):
        self.spec, self.checked, self.base, self.output = spec, checked, base, output
        self.tokenizer = checked.tokenizer
        self.evaluator = self._evaluator(registry)
        if self.evaluator is not None:
            self.evaluator.launch()

    def _evaluator(self, registry: Registry) -> VllmEvaluator | None:
        """The vLLM evaluation engine where `training.eval_engine` picks it, else None."""
        tasks, data = self.checked.tasks, self.checked.data
        examples = sum(len(data[t.name].eval) for t in tasks)
        try:
            engine, reason = choose_engine(self.spec.training.eval_engine, vllm_installed(),
                                           self.base.model.device.type, examples)
        except ValueError as error:
            raise SpecError(str(self.spec.source), [str(error)]) from None
        log.info("evaluation engine: %s (%s)", engine, reason)
        if engine == "hf":
            return None
        longest = max(len(self.tokenizer(e.prompt).input_ids) + t.max_new_tokens
                      for t in tasks for e in data[t.name].eval)
        # A gate may rescore a serving version of another rank: the engine takes the largest.
        names = {t.name for t in tasks}
        rank = max([self.spec.lora.rank] + [r.rank for r in registry.records() if r.task in names])
        config = EngineConfig(str(self.checked.base_dir), self.base.dtype_name, vllm_rank(rank), longest + 8,
                              threads=self.spec.training.threads)
        return VllmEvaluator(config, self.output / "vllm-eval.log", self.base.lora_config())

    def end_ids(self, task: TaskSpec) -> list[int]:
        return end_ids(self.tokenizer, task.template.format)

    def evaluate(self, model, task: TaskSpec, label: str, adapter: Adapter = None) -> Evaluation:
        """`model` (the base with the adapter applied, for HF generate) or `adapter` (the same adapter as
        vLLM loads it: a folder, or a function giving its PEFT weights; None: the base) on the task's
        eval split; the predictions go to `predictions/<task>/<label>.jsonl`, each with its own score."""
        examples = self.checked.data[task.name].eval
        result = scored(examples, self._answers(model, task, label, adapter), task.metric, task.labels)
        result.save(self.output / "predictions" / task.name / f"{label}.jsonl", examples)
        return result

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

    def zero_shot(self, task: TaskSpec) -> tuple[float, tuple[float, float], str]:
        """The bare base's (score, 95 % interval, whence) on the task: from the cache, or evaluated and cached."""
        cached = mtft_home() / "cache" / "zero-shot" / f"{self._zero_shot_key(task)}.jsonl"
        predictions = self.output / "predictions" / task.name / "base.jsonl"
        if cached.exists():
            rows = [json.loads(line) for line in cached.read_text().splitlines()]
            predictions.parent.mkdir(parents=True, exist_ok=True)
            # The same examples (the key holds them), maybe from files elsewhere: this run's places.
            here = [{**r, "where": e.where} for r, e in zip(rows[1:], self.checked.data[task.name].eval)]
            predictions.write_text("".join(json.dumps(r) + "\n" for r in here))
            return rows[0]["score"], tuple(rows[0]["interval"]), f"cached in {cached}"
        result = self.evaluate(self.base.model, task, "base")
        head = {"score": result.score, "interval": result.interval()}
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(head) + "\n" + predictions.read_text())
        os.replace(tmp, cached)
        return head["score"], head["interval"], "evaluated"

    def _zero_shot_key(self, task: TaskSpec) -> str:
        examples = [(e.prompt, e.target) for e in self.checked.data[task.name].eval]
        quantization = self.spec.training.base_quantization
        key = {"format": 2, "base": self.base.ref.fingerprint, "dtype": str(self.base.dtype),
               **({"quantization": quantization.model_dump()} if quantization and self.evaluator is None else {}),
               "end_ids": self.end_ids(task),
               "task": task.model_dump(mode="json", include={"metric", "labels", "max_new_tokens"}),
               "batch": self.spec.training.eval_batch_size, "examples": examples,
               "engine": "vllm" if self.evaluator is not None else f"hf/{self.base.attention}"}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
