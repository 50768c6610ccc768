"""`mtft-train adapters`: one LoRA per task on a frozen base, evaluated and published.

Each task trains alone (`plans.LoraPlan`, on the same LoRA layers as `--one-pass`) in the one
loop; `state.json` records which tasks are done, so `--resume` skips them and continues the
interrupted one from its checkpoint.
"""

from __future__ import annotations

from functools import partial

from . import loop
from .check import RunOptions, check_run
from .plans import LoraPlan
from .results import TaskResult
from .session import NOT_SHAPING, Session
from .spec import Spec, TaskSpec


def train_adapters(spec: Spec, options: RunOptions) -> list[TaskResult]:
    session = Session(spec, options, check_run(spec, options))
    session.score_base()
    for task in session.tasks:
        if session.state.task(task.name).version is None:
            _train(session, task)
    return session.finish("adapters", [session.result(t) for t in session.tasks])


def _train(session: Session, task: TaskSpec) -> None:
    training = session.spec.training_for(task)
    # eval_every changes nothing learnt here: evaluations only watch the run.
    resumable = session.claim([task.name], session.config_hash(NOT_SHAPING | {"eval_every"},
                                                               task=task.model_dump(mode="json")))
    log = session.log.scoped(task.name)
    with session.base.task_layers([task.name]) as layers:  # the same initial LoRA however many tasks ran before
        weights = partial(layers.export, task.name)

        def score(label: str) -> float:
            with layers.task(task.name):
                return session.score(layers.model, task, label, weights)

        plan = LoraPlan(layers, task.name, session.tokenized(task), training)
        setup = loop.Loop(training, session.options.output / task.name / "checkpoint", log,
                          session.accelerator, session.pad_id, lambda names, label: {task.name: score(label)})
        loop.train(plan, setup, resumable)
        session.state.task(task.name).adapter_score = score("adapter")
        exported = weights()
    session.publish(task, exported, "mtft-train adapters", log, plan.total_steps)
