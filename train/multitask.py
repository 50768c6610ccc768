"""`mtft-train shared` and `mtft-train adapters --one-pass`: every task trained in one run.

The base is loaded once and wrapped with task-conditioned LoRA layers (`tasklora`); the one loop
trains them under the shared plan (`shared.SharedPlan`) or the lockstep plan
(`plans.LockstepPlan`); every task is then evaluated and exported as an ordinary PEFT LoRA and
published like any adapter. Sequential shared runs also write `forgetting.txt`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Callable

from mtft.registry import BaseModelRef, Registry

from . import loop
from .batches import Tokenized
from .check import Checked, RunOptions, check_run
from .gate import eval_hash
from .loop import total_steps
from .plans import LockstepPlan
from .processes import Ranks
from .results import TaskResult
from .session import Session
from .shared import SharedPlan, check_shared, forgetting_table, plan_stages
from .spec import Spec, SpecError
from .tasklora import TaskLoRA

log = logging.getLogger(__name__)

LOW_SHARE = 0.5  # a task trained on less than this share of its own run's examples gets a warning
PlanMaker = Callable[[Session, dict[str, list[Tokenized]], TaskLoRA], "SharedPlan | LockstepPlan"]


def train_shared(spec: Spec, options: RunOptions) -> list[TaskResult]:
    """One adapter shared by every task, conditioned on task embeddings; each task exported."""
    session, plan = _train(spec, options, check_shared_run(spec, options), "shared", "mtft-train shared",
                           _shared_plan, shared=True)
    if plan.history and Ranks(session.accelerator).is_main:
        (options.output / "forgetting.txt").write_text(
            forgetting_table(plan.history, {t.name: t.metric for t in session.tasks}))
    t = spec.training
    results = []
    for task in session.tasks:
        seen = plan.sampler.counts[task.name]
        own = total_steps(len(plan.items[task.name]), t) * t.batch_size * t.grad_accum  # its own run's examples
        if seen < LOW_SHARE * own:
            log.warning("%s trained on %d examples, %.0f%% of the %d its own adapter would see: it may "
                        "fall behind its per-task adapter (the table compares them where the registry has one); "
                        "give it more weight (multitask.mixing) or more steps",
                        task.name, seen, 100 * seen / own, own)
        separate = per_task_adapter(session.registry, task.name, session.base.ref,
                                    eval_hash(session.checked.data[task.name].eval))
        results.append(session.result(task, separate=separate, seen=seen, share=seen / own))
    return session.finish("shared", results, plan.ends[:-1])


def train_one_pass(spec: Spec, options: RunOptions) -> list[TaskResult]:
    """Every task's own adapter in one run on mixed batches; each equals the adapter trained alone."""
    session, _ = _train(spec, options, check_run(spec, options), "one-pass", "mtft-train adapters --one-pass",
                        _lockstep_plan)
    return session.finish("one-pass", [session.result(t) for t in session.tasks])


def check_shared_run(spec: Spec, options: RunOptions) -> Checked:
    """`check_run` plus what only a shared run needs; every problem before any training."""
    checked = check_run(spec, options)
    problems = check_shared(spec, [t.name for t in checked.tasks])
    if problems:
        raise SpecError(str(spec.source), problems)
    if own := [t.name for t in checked.tasks if t.training is not None]:
        log.warning("tasks %s set their own training (tasks[].training), which `mtft-train adapters` and --one-pass "
                    "use; a shared adapter trains every task in one schedule from the top-level training, and a "
                    "task's share of it is multitask.mixing: ignored here", own)
    return checked


def _shared_plan(session: Session, items: dict[str, list[Tokenized]], lora: TaskLoRA) -> SharedPlan:
    spec = session.spec
    return SharedPlan(lora, items, spec.training, spec.multitask, plan_stages(spec, items, lora, session.pad_id))


def _lockstep_plan(session: Session, items: dict[str, list[Tokenized]], lora: TaskLoRA) -> LockstepPlan:
    return LockstepPlan(lora, items, session.spec.training,
                        {t.name: session.spec.training_for(t) for t in session.tasks})


def _train(spec: Spec, options: RunOptions, checked: Checked, mode: str, trained_by: str,
           make_plan: PlanMaker, shared: bool = False) -> tuple[Session, SharedPlan | LockstepPlan]:
    """Train every task in one run under `make_plan`'s plan; evaluate, export and publish each."""
    session = Session(spec, options, checked)
    tasks = session.tasks
    # eval_every shapes a run here: dynamic mixing can follow the evaluations.
    resumable = session.claim([t.name for t in tasks], session.config_hash(
        mode=mode, tasks=[t.model_dump(mode="json") for t in tasks], multitask=spec.multitask.model_dump(mode="json")))
    session.score_base()
    items = {t.name: session.tokenized(t) for t in tasks}
    # Layers from the initial LoRA `mtft-train adapters` starts every task from.
    with session.base.task_layers(list(items), shared=shared) as lora:

        def evaluate(names: list[str], label: str) -> dict[str, float]:
            scores = {}
            for name in names:
                with lora.task(name):
                    scores[name] = session.score(lora.model, spec.task(name), label, partial(lora.export, name))
            return scores

        plan = make_plan(session, items, lora)
        setup = loop.Loop(spec.training, options.output / "checkpoint", session.log, session.accelerator,
                          session.pad_id, evaluate)
        loop.train(plan, setup, resumable)
        pending = [t for t in tasks if session.state.task(t.name).version is None]
        scores = evaluate([t.name for t in pending], "adapter")
        exported = {t.name: lora.export(t.name) for t in pending}
    for task in pending:
        session.state.task(task.name).adapter_score = scores[task.name]
        session.publish(task, exported[task.name], trained_by, session.log, plan.steps(task.name))
    return session, plan


def per_task_adapter(registry: Registry, task: str, base: BaseModelRef, examples_hash: str) -> float | None:
    """The newest separately trained adapter's score for `task` on the same base, for comparison;
    one scored on the same eval examples first."""
    own = [r for r in registry.records() if r.task == task and r.trained_by.startswith("mtft-train adapters")
           and r.base_model.fingerprint == base.fingerprint and "adapter" in r.metrics]
    best = max(own, key=lambda r: (r.eval_hash == examples_hash, r.version), default=None)
    return best.metrics["adapter"] if best is not None else None
