"""`training.report_to`: a run's log in TensorBoard, MLflow and W&B, read back with each tool's own reader.

One `mtft-train adapters` run on the tiny tasks reports to all three at once (MLflow into a file
store, W&B offline); each tracker must hold every number of `metrics.jsonl` under its path at its
step, the final table (`results.json`) and the spec as the run's config.
"""

from __future__ import annotations

import json
import struct
import tomllib
import zlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtft.train.cli import app
from mtft.train.trackers import TRACKERS, extra

from conftest import tiny_spec
from helpers import run_log

ROOT = Path(__file__).parents[1]
STEPS = 6  # per task; yesno trains first, then echo
REPORTED = ["tensorboard", "mlflow", "wandb"]


def paths(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict under their '/'-joined paths."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= paths(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def expected_points(rows: list[dict], results: dict) -> dict[tuple[int, str], float]:
    """What every tracker must hold, as {(step, name): value}.

    `mtft-train adapters` trains yesno (steps 1-6), then echo (its steps 1-6 are the trackers' 7-12);
    a task's final scores (rows with `model`) land on its training's last step, the final table on
    the run's last step. An interval [low, high] is two values.
    """
    points = {}
    for row in rows:
        first = {"yesno": 0, "echo": STEPS}[row["task"]]
        step = first + (STEPS if "model" in row else row["step"])
        body = {k: v for k, v in row.items() if k not in ("step", "task", "model")}
        for name, value in paths(body, f"{row['model']}/" if "model" in row else "").items():
            points[step, name] = value
    for task, fields in results["tasks"].items():
        for key, value in fields.items():
            if key.endswith("_interval"):
                points[2 * STEPS, f"results/{task}/{key}_low"], points[2 * STEPS, f"results/{task}/{key}_high"] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                points[2 * STEPS, f"results/{task}/{key}"] = value
    return points


@pytest.fixture(scope="module")
def reported(tiny_base, tmp_path_factory):
    """The tiny tasks trained by `mtft-train adapters` reporting to TensorBoard, MLflow and W&B:
    (run folder, expected points, the spec file, the W&B folder)."""
    folder = tmp_path_factory.mktemp("reported")
    spec = tiny_spec(folder, tiny_base, max_steps=STEPS, eval_every=3, report_to=REPORTED)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"file:{folder / 'mlruns'}")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who ask
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(folder / "wandb-dir"))
        env.setenv("WANDB_SILENT", "true")
        (folder / "wandb-dir").mkdir()
        result = CliRunner().invoke(app, ["adapters", "--config", str(spec), "--registry", str(folder / "registry"),
                                          "--output", str(folder / "run")])
    assert result.exit_code == 0, result.output
    run = folder / "run"
    return run, expected_points(run_log(run), json.loads((run / "results.json").read_text())), spec, folder / "wandb-dir"


def test_tensorboard_shows_every_run_log_value_at_its_step(reported):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run, expected, _, _ = reported
    events = EventAccumulator(str(run / "trackers" / "mtft"), size_guidance={SCALARS: 0})
    events.Reload()
    shown = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert shown.keys() == expected.keys()
    for point, value in expected.items():  # TensorBoard keeps float32
        assert shown[point] == pytest.approx(value, rel=1e-6), point
    assert {"loss", "tasks/yesno/loss", "tasks/echo/tokens", "eval/echo", "adapter/eval/yesno",
            "results/echo/adapter_interval_high"} <= {name for _, name in shown}


def test_mlflow_holds_every_run_log_value_and_the_spec_as_parameters(reported):
    from mlflow.tracking import MlflowClient

    run, expected, _, _ = reported
    client = MlflowClient(tracking_uri=f"file:{run.parent / 'mlruns'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "mtft"]
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run"
    logged = {(m.step, name): m.value for name in found.data.metrics
              for m in client.get_metric_history(found.info.run_id, name)}
    assert logged == expected
    params = found.data.params
    assert params["training.learning_rate"] == "0.005" and params["training.max_steps"] == str(STEPS)
    assert params["tasks.yesno.metric"] == "accuracy" and json.loads(params["tasks.yesno.labels"]) == ["yes", "no"]
    assert json.loads(params["training.report_to"]) == REPORTED


def wandb_records(run_file: Path):
    """The records of a W&B run file (`run-<id>.wandb`): W&B's LevelDB-style log of 32 KiB blocks, each
    record a 7-byte header (CRC-32 seeded with its type, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, at, pending = run_file.read_bytes(), 32768, 7, b""  # 7: the file's ':W&B' header
    assert raw[:4] == b":W&B"
    while at + 7 <= len(raw):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[at:at + 7])
        data = raw[at + 7:at + 7 + length]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"corrupt record at byte {at}"
        at += 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_writes_a_run_holding_every_run_log_value_and_the_spec_as_config(reported):
    run, expected, _, wandb_dir = reported
    [run_file] = (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history |= {(step, key): value for key, value in items.items() if not key.startswith("_")}
        elif record.WhichOneof("record_type") == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
    assert history == expected
    assert config["training.learning_rate"] == 0.005 and config["tasks.echo.template.format"] == "chat"


def test_a_tracker_without_its_package_is_a_check_problem_naming_its_extra(tiny_base, tmp_path):
    from accelerate.tracking import get_available_trackers

    missing = next(t for t in ("aim", "clearml", "comet_ml", "swanlab") if t not in map(str, get_available_trackers()))
    spec = tiny_spec(tmp_path, tiny_base, report_to=["tensorboard", missing])
    result = CliRunner().invoke(app, ["adapters", "--config", str(spec), "--check", "--registry", str(tmp_path / "r")])
    assert result.exit_code != 0
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if "report_to" in text)
    assert f"{spec}:{line}: training.report_to: {missing}'s package is not installed; " \
           f"pip install 'mtft[{extra(missing)}]'" in result.output
    assert "tensorboard" not in result.output.split("report_to:", 1)[1], "an installed tracker was named"


def test_an_unknown_tracker_is_refused_with_the_choices(tiny_base, tmp_path):
    spec = tiny_spec(tmp_path, tiny_base, report_to=["tensorbored"])
    result = CliRunner().invoke(app, ["adapters", "--config", str(spec), "--check", "--registry", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "training.report_to.0: Input should be 'tensorboard', 'mlflow'" in result.output


def test_every_tracker_accelerate_offers_can_be_named_and_has_an_extra():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {extra(t) for t in TRACKERS} <= extras.keys()
    assert {"tensorboard", "mlflow-skinny", "wandb"} <= {d.split(">")[0].split("=")[0] for d in extras["dev"]}


def test_a_run_without_report_to_starts_no_tracker(trained):
    _, options, _ = trained
    assert not (options.output / "trackers").exists() and not (options.output / "wandb").exists()


def test_a_shared_run_reports_its_mixing_shares_and_loss_weights(tiny_base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    spec = tiny_spec(tmp_path, tiny_base, max_steps=4, eval_every=None, report_to=["tensorboard"])
    data = yaml.safe_load(spec.read_text())
    data["multitask"] = {"loss": {"weighting": "uncertainty"}}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(app, ["shared", "--config", str(spec), "--registry", str(tmp_path / "registry"),
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / "mtft"), size_guidance={SCALARS: 0})
    events.Reload()
    shown = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    steps = [r for r in run_log(tmp_path / "run") if "loss" in r]
    assert len(steps) == 8  # max_steps per task: a shared run takes max_steps x tasks
    for row in steps:
        for name in ("mix", "loss_weights"):
            for task, value in row[name].items():
                assert shown[row["step"], f"{name}/{task}"] == pytest.approx(value, rel=1e-6)
    assert len({row["loss_weights"]["echo"] for row in steps}) > 1, "uncertainty weights never moved"
