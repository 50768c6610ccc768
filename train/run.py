"""`mtft-train adapters`: one LoRA per task on a frozen base, evaluated and published.

Each task trains alone (`plans.LoraPlan`) in the one loop; `state.json` records which tasks are
done, so `--resume` skips them and continues the interrupted one from its checkpoint.
"""

from __future__ import annotations

import torch

from . import loop
from .plans import LoraPlan
from .session import NOT_SHAPING, RunOptions, Session, TaskResult, check_run
from .spec import Spec, TaskSpec


def train_adapters(spec: Spec, options: RunOptions) -> list[TaskResult]:
    session = Session(spec, options, check_run(spec, options))
    session.score_base()
    for task in session.tasks:
        if session.task_state(task.name).version is None:
            _train(session, task)
    return session.finish("adapters", [session.result(t) for t in session.tasks])


def _train(session: Session, task: TaskSpec) -> None:
    from peft import get_peft_model, get_peft_model_state_dict

    torch.manual_seed(session.spec.training.seed)  # the same initial LoRA however many tasks ran before
    model = get_peft_model(session.model, session.lora_config())
    training = session.spec.training_for(task)
    plan = LoraPlan(task.name, session.tokenized(task), model, training)
    # eval_every changes nothing learnt here: evaluations only watch the run.
    resumable = session.claim([task.name], session.config_hash(NOT_SHAPING | {"eval_every"},
                                                               task=task.model_dump(mode="json")))
    log = session.log.scoped(task.name)
    def weights() -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(model)

    setup = loop.Loop(training, session.options.output / task.name / "checkpoint", log,
                      session.accelerator, session.pad_id,
                      lambda names, label: {task.name: session.score(model, task, label, weights)})
    loop.train(plan, setup, resumable)
    session.task_state(task.name).adapter_score = session.score(model, task, "adapter", weights)
    weights = weights()
    session.model = model.unload()
    session.publish(task, weights, "mtft-train adapters", log, plan.total_steps)
