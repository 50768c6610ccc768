"""The task spec is validated up front: every problem at once, with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mtft.registry import PromptTemplate
from mtft.train.data import load_task_data
from mtft.train.spec import SpecError
from mtft.train.spec_file import load_spec

ROWS = [{"text": f"message {i}", "label": "yes" if i % 2 else "no"} for i in range(20)]


def write_spec(folder: Path, spec: dict | str, rows=ROWS) -> Path:
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "tasks.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def task(name="yesno", prefix="yesno: ", **extra) -> dict:
    return {
        "name": name,
        "prefix": prefix,
        "template": {"input": "{text}", "target": "{label}"},
        "data": {"train": "data.jsonl"},
        "metric": "accuracy",
        **extra,
    }


def test_a_valid_spec_loads_with_defaults(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"tasks": [task()]}))
    assert spec.base_model == "smollm2-135m"
    assert spec.lora.rank == 8 and spec.training.epochs == 1.0
    assert spec.resolve(spec.tasks[0].data.train) == tmp_path / "data.jsonl"


BAD_SPECS = [
    ("tasks: [\n  {name: x,\n", r"tasks.yaml:\d+: 1 problem:\n  - malformed YAML"),
    ({"tasks": [task(promt="typo")]}, r"tasks.yaml:10: tasks.0.promt: unknown key \(misspelt\?\)"),
    ({"tasks": [task()], "lora": {"rank": 12}}, r"rank 12 cannot be served by vLLM; use one of \[1, 8, 16"),
    ({"tasks": [task()], "lora": {"target_modules": ["lm_head"]}}, r"\['lm_head'\] cannot be served"),
    ({"tasks": [task(), task(prefix="other: ")]}, r"tasks.1.name: 'yesno' is also task 0's name"),
    ({"tasks": [task(), task(name="b")]}, r"tasks.1.prefix: 'yesno: ' is also the prefix of task 'yesno'"),
    ({"tasks": [task(metric="bleurt")]}, r"unknown metric 'bleurt'; choose from \["),
    ({"tasks": [task(data={"train": "missing.jsonl"})]}, r"data.train: .*missing.jsonl does not exist"),
    ({"tasks": []}, r"no tasks; add at least one"),
    ({"tasks": [task(name="Bad Name")]}, r"tasks.0.name: must be lowercase"),
    ({"tasks": [task(template={"input": "hello", "target": "{label}"})]}, r"input must use at least one data field"),
    ({"tasks": [task(template={"input": "{text}", "target": "{label}", "prompt": "{question}"})]},
     r"prompt may only use \{prefix\} and \{input\}"),
    ({"tasks": [task()], "training": {"schedule": "cosine_restarts"}}, r"training.schedule: Input should be"),
]

TWO = [task(), task(name="other", prefix="other: ")]
BAD_MULTITASK = [
    ({"mixing": {"strategy": "annealed"}}, r"multitask.mixing.strategy: Input should be 'proportional', 'uniform'"),
    ({"mixing": {"strategy": "temperature", "temperature": 0}}, r"multitask.mixing: temperature must be > 0, got 0"),
    ({"mixing": {"strategy": "temperature", "temperature": -2}}, r"temperature must be > 0, got -2"),
    ({"mixing": {"strategy": "capped"}}, r"strategy capped needs cap"),
    ({"mixing": {"strategy": "explicit"}}, r"strategy explicit needs weights"),
    ({"mixing": {"strategy": "explicit", "weights": {"yesno": 1}}},
     r"tasks.yaml:\d+: multitask.mixing.weights: no weight for tasks \['other'\]; give one per task"),
    ({"mixing": {"strategy": "explicit", "weights": {"yesno": 1, "other": 1, "typo": 2}}},
     r"multitask.mixing.weights: unknown tasks \['typo'\]; tasks are \['yesno', 'other'\]"),
    ({"mixing": {"strategy": "uniform", "weights": {"yesno": 1, "other": 1}}}, r"only used by strategy explicit"),
    ({"mixing": {"strategy": "dynamic", "signal": "eval"}}, r"signal eval needs training.eval_every"),
    ({"loss": {"weighting": "static"}}, r"weighting static needs weights"),
    ({"loss": {"weighting": "static", "weights": {"yesno": 2}}}, r"multitask.loss.weights: no weight for tasks \['other'\]"),
    ({"loss": {"averaging": "sentence"}}, r"multitask.loss.averaging: Input should be 'token' or 'example'"),
    ({"schedule": "sequential", "sequential": {"order": ["other", "nope"]}},
     r"multitask.sequential.order: unknown tasks \['nope'\]; tasks are \['yesno', 'other'\]"),
    ({"sequential": {"order_by": "vibes"}}, r"multitask.sequential.order_by: Input should be"),
    ({"sequential": {"replay": 1.0}}, r"multitask.sequential.replay: Input should be less than 1"),
]


@pytest.mark.parametrize("multitask, message", BAD_MULTITASK, ids=[m[:40] for _, m in BAD_MULTITASK])
def test_bad_multitask_settings_fail_with_a_located_message(tmp_path, multitask, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, {"tasks": TWO, "multitask": multitask}))


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[m[:40] for _, m in BAD_SPECS])
def test_bad_specs_fail_with_a_located_message(tmp_path, spec, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, spec))


def test_every_problem_is_reported_at_once(tmp_path):
    spec = {"tasks": [task(promt="x"), task(metric="nope")], "lora": {"rank": 3}}
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, spec))
    assert len(caught.value.problems) == 3, caught.value


def test_a_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"nowhere.yaml: 1 problem:\n  - cannot read the spec"):
        load_spec(tmp_path / "nowhere.yaml")


def load(tmp_path, rows, **task_extra):
    spec = load_spec(write_spec(tmp_path, {"tasks": [task(**task_extra)]}, rows))
    return load_task_data(spec, spec.tasks[0], spec.tasks[0].template, seed=0)


def test_rows_missing_a_template_field_are_named_by_file_and_line(tmp_path):
    rows = ROWS[:3] + [{"text": "no label here"}] + ROWS[3:5] + [{"label": "yes"}]
    with pytest.raises(SpecError) as caught:
        load(tmp_path, rows)
    message = str(caught.value)
    assert "data.jsonl:4: row lacks ['label']" in message
    assert "data.jsonl:7: row lacks ['text']" in message


def test_malformed_jsonl_rows_are_named_by_line(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"tasks": [task()]}))
    with (tmp_path / "data.jsonl").open("a") as handle:
        handle.write('{"text": "broken\n')
    with pytest.raises(SpecError, match=r"data.jsonl:21: not valid JSON"):
        load_task_data(spec, spec.tasks[0], spec.tasks[0].template, seed=0)


def test_an_empty_task_fails(tmp_path):
    with pytest.raises(SpecError, match=r"the train split is empty"):
        load(tmp_path, [])


def test_eval_fraction_splits_deterministically_and_disjointly(tmp_path):
    first = load(tmp_path, ROWS, data={"train": "data.jsonl", "eval_fraction": 0.25})
    again = load(tmp_path, ROWS, data={"train": "data.jsonl", "eval_fraction": 0.25})
    assert len(first.eval) == 5 and len(first.train) == 15
    assert first == again
    assert not {e.where for e in first.eval} & {e.where for e in first.train}


def test_csv_tsv_and_datasets_folders_read_like_jsonl(tmp_path):
    import datasets

    (tmp_path / "d.tsv").write_text("text\tlabel\nhello there\tyes\nbye\tno\n")
    (tmp_path / "d.csv").write_text('text,label\n"hello, there",yes\nbye,no\n')
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "ds"))
    for train in ("d.tsv", "d.csv", "ds#train"):
        data = load(tmp_path, ROWS, data={"train": train, "eval": "data.jsonl"})
        assert len(data.train) == 2, train
        assert data.train[0].prompt.startswith("yesno: ")
    with pytest.raises(SpecError, match=r"name a split as '.*ds#SPLIT'; it has \['train'\]"):
        load(tmp_path, ROWS, data={"train": "ds", "eval": "data.jsonl"})


def test_plain_template_frames_the_input_with_the_prefix(tmp_path):
    data = load(tmp_path, ROWS, template={"input": "Text: {text}", "target": " {label}", "prompt": "{prefix}{input}\nAnswer:"})
    example = data.train[0]
    assert example.prompt == f"yesno: {example.input}\nAnswer:"
    assert example.input.startswith("Text: message ")
    assert example.target in (" yes", " no")


def test_literal_braces_in_templates_stay_literal():
    template = PromptTemplate(input="{text}", target='{"answer": "{label}"}')
    from mtft.registry import render_target

    assert render_target(template, {"text": "x", "label": "yes"}) == '{"answer": "yes"}'
