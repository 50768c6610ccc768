"""Publishing a trained task adapter: its PEFT folder, the publish gate's verdict, its registry record.

The main process writes and publishes; `Session.publish` hands every process the version.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mtft.registry import AdapterRecord, Registry
from mtft.registry.rollout import Gate

from .check import Checked
from .frozen_base import FrozenBase
from .gate import baseline, eval_hash, judge, serving_record
from .runlog import RunLog
from .scorer import Scorer
from .spec import Spec, TaskSpec
from .state import TaskState
from .tasklora import save_adapter

log = logging.getLogger(__name__)


class Publisher:
    """Writes adapters under `<output>/<task>/adapter`, judges them with the task's gate (rescoring the
    serving version on this run's eval data where its record was scored on other data) and publishes."""

    def __init__(self, spec: Spec, checked: Checked, base: FrozenBase, registry: Registry, scorer: Scorer,
                 output: Path):
        self.spec, self.checked, self.base, self.registry, self.scorer, self.output = (
            spec, checked, base, registry, scorer, output)

    def publish(self, task: TaskSpec, state: TaskState, weights: dict[str, torch.Tensor], trained_by: str,
                run_log: RunLog, steps: int) -> tuple[int, Gate | None]:
        """`weights` (a PEFT LoRA state dict on the bare base) published as the task's next version."""
        run_log.append({"step": 0, "model": "base", "eval": {task.name: state.base_score}})
        run_log.append({"step": steps, "model": "adapter", "eval": {task.name: state.adapter_score}})
        adapter_dir = self.output / task.name / "adapter"
        save_adapter(adapter_dir, self.base.lora_config(), weights, self.checked.base_dir)
        lora = self.spec.lora
        examples = self.checked.data[task.name].eval
        gate = self._judge(task, state.adapter_score, eval_hash(examples))
        record = AdapterRecord(
            task=task.name, prefix=task.prefix, template=self.checked.templates[task.name], base_model=self.base.ref,
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
        serving = serving_record(self.registry, task.name, self.base.ref.fingerprint) if rule.no_worse is not None \
            else None
        return judge(rule, score, baseline(serving, examples_hash, lambda record: self._score_published(task, record)))

    def _score_published(self, task: TaskSpec, record: AdapterRecord) -> float:
        """A published version's score on this run's eval split (the base is bare again afterwards)."""
        log.info("%s: scoring the serving v%d on this run's eval data for the gate", task.name, record.version)
        folder = self.registry.version_dir(task.name, record.version)
        with self.base.adapter(folder) as model:
            return self.scorer.evaluate(model, task, f"serving-v{record.version}", folder).score
