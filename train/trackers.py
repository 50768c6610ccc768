"""Experiment trackers (`training.report_to`): the run log in TensorBoard, MLflow, W&B and the rest.

Through accelerate's trackers, not our own: the run's `Accelerator` is built with `log_with`
(`processes.start_accelerator`), `init_trackers` starts one tracker run with the spec as its
config, every row `RunLog` appends goes to `accelerator.log`, and `end_training` closes the run
after `results.json` (the final table) is logged. accelerate starts, logs and ends trackers on
the main process only, so a run under `accelerate launch` logs once.

Names are the row's JSON paths: `loss`, `lr`, `tokens_per_s`, `tasks/<task>/loss`,
`tasks/<task>/examples`, `tasks/<task>/tokens`, `seen/<task>`, `eval/<task>`, `mix/<task>`,
`loss_weights/<task>`; the end-of-training evaluations (rows with `model`) as `base/eval/<task>`
and `adapter/eval/<task>`; `results.json` as `results/<task>/<field>`, an interval as
`..._interval_low` / `..._interval_high`. Steps are the run log's, except that `mtft-train
adapters` trains its tasks one after another, each from step 1: there the trackers' step runs on
(the second task's step 1 is the first task's last step + 1), and a row logged for an earlier
step (the base's score, step 0) is logged at the latest step, because W&B's steps only go up.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Literal, get_args

log = logging.getLogger(__name__)

# accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS); tests hold the two equal.
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab"]
TRACKERS: tuple[str, ...] = get_args(Tracker)
FOLDER = "trackers"  # under the run folder: TensorBoard's event files (<FOLDER>/<project>/), Aim's repository


def extra(name: str) -> str:
    """The pip extra of mtft that installs a tracker's package: `pip install 'mtft[track-wandb]'`."""
    return "track-" + name.replace("_", "-")


def tracker_problems(report_to: list[str]) -> list[str]:
    """What keeps the named trackers from logging here: a package not installed (accelerate would drop
    that tracker without a word), MLflow with nowhere to log."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    problems = [f"{name}'s package is not installed; pip install 'mtft[{extra(name)}]'"
                for name in report_to if name not in available]
    if "mlflow" in report_to and "mlflow" in available and not os.environ.get("MLFLOW_TRACKING_URI") \
            and importlib.util.find_spec("sqlalchemy") is None:
        problems.append("mlflow: MLFLOW_TRACKING_URI is not set and its default here, sqlite:///<run folder>/mlflow.db, "
                        "needs the full mlflow package (mlflow-skinny is installed); set MLFLOW_TRACKING_URI to your "
                        "MLflow server, or pip install 'mtft[track-mlflow]'")
    return problems


def flat(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers in `tree` under their '/'-joined paths; strings, booleans and None are left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, name + "/")
        elif isinstance(value, (list, tuple)) and key.endswith("_interval") and len(value) == 2:
            out[name + "_low"], out[name + "_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def row_values(row: dict) -> dict[str, float]:
    """A run-log row as tracker values (its `step`, `task` tag and `model` become step and name)."""
    body = {k: v for k, v in row.items() if k not in ("step", "task", "model")}
    return flat(body, f"{row['model']}/" if "model" in row else "")


def run_config(spec_json: dict) -> dict[str, str | int | float | bool]:
    """The spec as a tracker run's config: flat dotted keys (`training.learning_rate`), tasks by name
    (`tasks.ticket.metric`), lists as JSON text; unset (None) keys are left out."""
    tree = {**spec_json, "tasks": {t["name"]: {k: v for k, v in t.items() if k != "name"} for t in spec_json["tasks"]}}

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif value is not None:
                yield f"{prefix}{key}", json.dumps(value) if isinstance(value, list) else value

    return dict(walk(tree, ""))


class Trackers:
    """One tracker run per training run, fed the run log's rows (main process only, by accelerate)."""

    def __init__(self, accelerator, project: str, run_name: str, config: dict, folder: Path):
        self.accelerator, self.folder = accelerator, folder
        folder.mkdir(parents=True, exist_ok=True)
        self._task: str | None = None  # the per-task training the last row belonged to
        self._offset = self._last = 0  # trackers' step where that training began; the latest logged
        init = {"mlflow": {"run_name": run_name}, "wandb": {"name": run_name}, "trackio": {"name": run_name}}
        if not os.environ.get("WANDB_DIR"):
            init["wandb"]["dir"] = str(folder)
        names = {str(t) for t in accelerator.log_with}
        if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(folder / 'mlflow.db').resolve()}")
        accelerator.init_trackers(project, config=config, init_kwargs=init)
        log.info("reporting to %s as %s/%s", ", ".join(sorted(names)), project, run_name)

    def log(self, row: dict) -> None:
        if row.get("task") != self._task:  # the next per-task training starts where the last ended
            self._task, self._offset = row.get("task"), self._last
        self._last = max(self._last, self._offset + row["step"])
        self.accelerator.log(row_values(row), step=self._last)

    def finish(self) -> None:
        """Log `results.json` (the final table), if written, and end the tracker run."""
        results = self.folder / "results.json"
        if results.exists():
            self.accelerator.log(flat(json.loads(results.read_text())["tasks"], "results/"), step=self._last)
        self.accelerator.end_training()


def start_trackers(accelerator, spec, folder: Path) -> Trackers | None:
    """The run's trackers where the spec names any (the accelerator was built with them), else None."""
    if not spec.training.report_to:
        return None
    return Trackers(accelerator, spec.training.report_project, folder.name,
                    run_config(spec.model_dump(mode="json")), folder)
