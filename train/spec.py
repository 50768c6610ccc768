"""The task spec: a YAML file naming the base model, the tasks and how to train them.

The typed models of every section, with their defaults and per-field checks;
`spec_file.load_spec` reads a file into them, reporting every problem at once with its YAML line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mtft.registry import (
    PromptTemplate,
    module_problems,
    rank_problems,
)
from mtft.registry.record import TASK_NAME

from .metrics import METRICS
from .trackers import TRACKERS, Tracker, extra


class SpecError(Exception):
    """A task spec (or its data) is invalid; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    """Where a task's examples come from. Paths are relative to the spec file."""

    train: Path = Field(description="JSONL, CSV/TSV, or a `datasets` folder (`folder#split`)")
    eval: Path | None = Field(default=None, description="held-out examples; else eval_fraction")
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)


class Limits(Strict):
    train_examples: int | None = Field(default=None, gt=0)
    eval_examples: int | None = Field(default=None, gt=0)


class GateSpec(Strict):
    """What a new version must score on the eval split to be served; one that fails is still
    published, marked rejected with the numbers, and never served unless forced."""

    min: float | None = Field(default=None, description="the score it must reach")
    no_worse: float | None = Field(default=None, ge=0, description="how far below the serving version's score "
                                   "(on the same eval data) it may be")
    min_eval_examples: int = Field(default=10, gt=0, description="fewer eval examples cannot judge a version")

    @model_validator(mode="after")
    def _some_rule(self) -> GateSpec:
        if self.min is None and self.no_worse is None:
            raise ValueError("a gate needs min, no_worse or both (e.g. no_worse: 0.01)")
        return self


class PublishSpec(Strict):
    gate: GateSpec | None = None


class TaskTraining(Strict):
    """One task's own budget, over the spec's `training`: tasks differ in how much they need (one
    reaches its best in 30 steps, another needs 60). `mtft-train adapters` and `--one-pass` only:
    each task has its own optimizer and schedule there; a shared adapter has one schedule for all."""

    max_steps: int | None = Field(default=None, gt=0, description="this task's optimizer steps")
    epochs: float | None = Field(default=None, gt=0, description="this task's epochs (used where max_steps is unset)")
    learning_rate: float | None = Field(default=None, gt=0, description="this task's peak learning rate")


class TaskSpec(Strict):
    name: str
    prefix: str = Field(description="routing prefix the prompt starts with, e.g. 'ticket: '")
    template: PromptTemplate
    data: DataSpec
    metric: str = "exact_match"
    labels: list[str] | None = Field(default=None, description="accuracy only: the valid labels")
    max_new_tokens: int = Field(default=32, gt=0, le=2048)
    limits: Limits = Limits()
    publish: PublishSpec | None = Field(default=None, description="overrides the spec's top-level publish")
    training: TaskTraining | None = Field(default=None, description="this task's max_steps, epochs or learning_rate "
                                          "over the top-level training (adapters and --one-pass)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TASK_NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (at most 64)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty; the router matches requests on it")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"unknown metric {value!r}; choose from {sorted(METRICS)}")
        return value


class LoraSpec(Strict):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["auto"] | list[str] = Field(
        default="auto", description="auto: every linear projection in the base's decoder layers that vLLM serves "
        "LoRA on (fused ones such as Phi-3's qkv_proj included; docs/models.md); or a list of those names")

    @model_validator(mode="after")
    def _servable(self) -> LoraSpec:
        problems = rank_problems(self.rank)
        if isinstance(self.target_modules, list):
            problems += module_problems(self.target_modules)
            if not self.target_modules:
                problems.append("target_modules is empty; name modules or leave it auto")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class QuantizationSpec(Strict):
    """The frozen base loaded 4-bit by bitsandbytes (QLoRA); its compute dtype is `training.dtype`."""

    bits: Literal[4] = Field(default=4, description="4 (QLoRA); 8-bit bases are not supported")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="nf4: NormalFloat, QLoRA's choice for "
                                        "normally distributed weights; fp4: plain 4-bit float")
    double_quant: bool = Field(default=False, description="also quantize the per-block scales: about 0.4 bit "
                               "per parameter less (~3 GB on a 70B base)")


class TrainingSpec(Strict):
    max_steps: int | None = Field(default=None, gt=0, description="optimizer steps per task (shared: × tasks in all)")
    epochs: float | None = Field(default=None, gt=0, description="used when max_steps is unset")
    learning_rate: float = Field(default=2e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    max_length: int = Field(default=256, gt=8)
    batching: Literal["length", "random"] = Field(
        default="length", description="length: batches of similar length (less padding)"
    )
    seed: int = 0
    eval_every: int | None = Field(default=None, gt=0, description="steps between evaluations")
    checkpoint_every: int = Field(default=25, gt=0)
    threads: int | None = Field(default=None, gt=0, description="CPU threads; default: all cores")
    eval_batch_size: int = Field(default=16, gt=0)
    packing: bool = Field(default=False, description="pack a micro-batch's examples into rows of max_length "
                          "tokens (per-example positions and attention); off: one example per row")
    eval_engine: Literal["auto", "vllm", "hf"] = Field(
        default="auto", description="what generates evaluation answers: vllm (offline engine, same answers, "
        "faster on large evaluations), hf (transformers generate); auto: vllm where installed and the run "
        "evaluates enough examples to pay for its start")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="the frozen base's dtype (adapters and optimizer stay float32); "
        "auto: bfloat16 where the hardware computes it natively, else float32")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute the frozen base's activations in backward instead of keeping them: "
        "the same gradients for a second forward of every decoder layer, and activation memory of one layer at a time "
        "instead of all of them; turn it on when long rows (max_length) or large micro-batches run out of memory "
        "(docs/training.md#memory)")
    base_quantization: QuantizationSpec | None = Field(
        default=None, description="load the frozen base 4-bit with bitsandbytes (QLoRA, pip install 'mtft[qlora]'): "
        "a quarter of bf16's memory for the base; the adapter is an ordinary LoRA served on the full-precision base "
        "(docs/training.md#memory)")
    attention: Literal["auto", "eager", "sdpa"] = Field(
        default="auto", description="the base's attention kernel in training and HF evaluation; auto: eager "
        "on CPU (its backward is faster there than torch's CPU flash attention), sdpa on GPU")
    report_to: list[Tracker] = Field(
        default_factory=list, description="experiment trackers that get every run-log row, the spec as config and "
        f"the final table, through accelerate's trackers: {', '.join(TRACKERS)}; each needs its package "
        f"(pip install 'mtft[{extra('<name>')}]')")
    report_project: str = Field(default="mtft", min_length=1, description="the trackers' project (W&B, trackio) or "
                                "experiment (MLflow; MLFLOW_EXPERIMENT_NAME overrides); runs are named after the run folder")

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


MIXING = ("proportional", "uniform", "temperature", "sqrt", "capped", "explicit", "dynamic")


class MixingSpec(Strict):
    """How often each task is sampled in joint training (docs/task-spec.md#mixing)."""

    # temperature 5 by default: a small task keeps most of the examples its own run would see
    # (a 1:29 size ratio still gets 66 %) and large ones lose nothing measurable (docs/task-spec.md#mixing).
    strategy: Literal[MIXING] = "temperature"  # type: ignore[valid-type]
    temperature: float = Field(default=5.0, description="temperature: P(task) ∝ size^(1/T)")
    cap: int | None = Field(default=None, gt=0, description="capped: P(task) ∝ min(size, cap)")
    weights: dict[str, float] | None = Field(default=None, description="explicit: one weight per task")
    update_every: int = Field(default=10, gt=0, description="dynamic: steps between re-weightings")
    signal: Literal["loss", "eval"] = Field(default="loss", description="dynamic: what 'learns slowly' means")
    floor: float = Field(default=0.05, ge=0, lt=1, description="dynamic: every task keeps at least this share / N")

    @model_validator(mode="after")
    def _fields(self) -> MixingSpec:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; 1 = proportional, large = uniform")
        if self.strategy == "capped" and self.cap is None:
            raise ValueError("strategy capped needs cap: the most examples any one task counts with")
        if self.strategy == "explicit" and not self.weights:
            raise ValueError("strategy explicit needs weights: {task: weight} for every task")
        if self.weights is not None and self.strategy != "explicit":
            raise ValueError(f"weights is only used by strategy explicit, not {self.strategy}")
        if self.weights and (min(self.weights.values()) < 0 or not sum(self.weights.values()) > 0):
            raise ValueError("weights must be >= 0 and not all 0")
        return self


class LossSpec(Strict):
    """How the tasks' losses combine on shared parameters (docs/task-spec.md#loss-weighting)."""

    weighting: Literal["sum", "static", "uncertainty"] = "sum"
    weights: dict[str, float] | None = Field(default=None, description="static: one weight per task")
    averaging: Literal["token", "example"] = Field(
        default="token", description="token: every answer token weighs the same; example: every example does"
    )

    @model_validator(mode="after")
    def _fields(self) -> LossSpec:
        if self.weighting == "static" and not self.weights:
            raise ValueError("weighting static needs weights: {task: weight} for every task")
        if self.weights is not None and self.weighting != "static":
            raise ValueError(f"weights is only used by weighting static, not {self.weighting}")
        if self.weights and any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0")
        return self


class SequentialSpec(Strict):
    """Stages of one task each, in order; `replay` mixes earlier tasks back in."""

    order: list[str] | None = Field(default=None, description="task order; default: order_by")
    order_by: Literal["spec", "size", "base_loss"] = Field(
        default="spec", description="base_loss: easiest first (lowest zero-shot loss), a curriculum"
    )
    replay: float = Field(default=0.0, ge=0, lt=1, description="share of each batch drawn from earlier tasks")
    rounds: int = Field(default=1, gt=0, description="task rotation: go through the order this many times")
    stage_steps: int | None = Field(default=None, gt=0, description="steps per stage; default: total / stages")


class TaskEmbeddingSpec(Strict):
    """The shared adapter's per-task conditioning (docs/task-spec.md#shared-adapter)."""

    up_projections: int = Field(default=1, gt=0, le=8, description="shared B matrices mixed per task")
    mix_temperature: float = Field(default=1.0, gt=0, description="softmax temperature over up-projections")


class MultitaskSpec(Strict):
    """Joint training: `mtft-train shared` (and the mixing of `adapters --one-pass`)."""

    schedule: Literal["joint", "sequential"] = "joint"
    mixing: MixingSpec = MixingSpec()
    loss: LossSpec = LossSpec()
    sequential: SequentialSpec = SequentialSpec()
    task_embedding: TaskEmbeddingSpec = TaskEmbeddingSpec()


class Spec(Strict):
    """A whole task spec. `source` is the YAML file it was loaded from."""

    base_model: str = "smollm2-135m"
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    multitask: MultitaskSpec = MultitaskSpec()
    publish: PublishSpec = Field(default_factory=PublishSpec, description="every task's, unless it sets its own")
    tasks: list[TaskSpec]
    source: Path = Field(default=Path("."), exclude=True)

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def gate(self, task: TaskSpec) -> GateSpec | None:
        return (task.publish or self.publish).gate

    def training_for(self, task: TaskSpec) -> TrainingSpec:
        """The top-level training with the task's own budget over it."""
        own = task.training.model_dump(exclude_none=True) if task.training else {}
        if "max_steps" in own or "epochs" in own:  # the task's budget replaces the spec's whole
            own = {"max_steps": None, "epochs": None} | own
        return self.training.model_copy(update=own)

    def resolve(self, path: Path) -> Path:
        """Data paths are relative to the spec file, so a spec folder can move as a whole."""
        return path if path.is_absolute() else self.source.parent / path
