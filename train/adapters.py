"""`mtft-train adapters`: one LoRA per task on a frozen base, evaluated and published.

Each task trains alone (`plans.LoraPlan`, on the same LoRA layers as `--one-pass`) in the one
loop; `state.json` records which tasks are done, so `--resume` skips them and continues the
interrupted one from its checkpoint.
"""

from __future__ import annotations

from functools import partial

from . import loop
from .plans import LoraPlan
from .session import NOT_SHAPING, RunOptions, Session, TaskResult, check_run
from .spec import Spec, TaskSpec
from .tasklora import TaskLoRA


def train_adapters(spec: Spec, options: RunOptions) -> list[TaskResult]:
    session = Session(spec, options, check_run(spec, options))
    session.score_base()
    for task in session.tasks:
        if session.task_state(task.name).version is None:
            _train(session, task)
    return session.finish("adapters", [session.result(t) for t in session.tasks])


def _train(session: Session, task: TaskSpec) -> None:
    init = session.initial_lora()  # the same initial LoRA however many tasks ran before
    lora = session.spec.lora
    layers = TaskLoRA(session.model, [task.name], init, lora.rank, lora.alpha, lora.dropout, shared=False)
    training = session.spec.training_for(task)
    plan = LoraPlan(layers, task.name, session.tokenized(task), training)
    # eval_every changes nothing learnt here: evaluations only watch the run.
    resumable = session.claim([task.name], session.config_hash(NOT_SHAPING | {"eval_every"},
                                                               task=task.model_dump(mode="json")))
    log = session.log.scoped(task.name)
    weights = partial(layers.export, task.name)

    def score(label: str) -> float:
        with layers.task(task.name):
            return session.score(session.model, task, label, weights)

    setup = loop.Loop(training, session.options.output / task.name / "checkpoint", log,
                      session.accelerator, session.pad_id, lambda names, label: {task.name: score(label)})
    loop.train(plan, setup, resumable)
    session.task_state(task.name).adapter_score = score("adapter")
    exported = weights()
    session.model = layers.remove()
    session.publish(task, exported, "mtft-train adapters", log, plan.total_steps)
