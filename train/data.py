"""Reading task data (JSONL, CSV/TSV, `datasets` folders) into rendered examples.

Every row is checked against the task's template; a bad row is reported with
its file and line, all of them at once, before any training starts.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from mtft.registry import PromptTemplate, render_input, render_prompt, render_target

from .spec import Spec, SpecError, TaskSpec

MAX_REPORTED = 20  # rows listed per file; the rest are counted


@dataclass(frozen=True)
class Row:
    values: dict[str, str]
    where: str  # "file:line" (or "folder#split row N")


@dataclass(frozen=True)
class Example:
    input: str  # what a client sends after the task prefix
    prompt: str  # the exact model text before the answer
    target: str
    where: str


@dataclass(frozen=True)
class TaskData:
    train: list[Example]
    eval: list[Example]


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """Rows of a data file or `datasets` folder, and problems reading it."""
    folder, _, split = str(path).partition("#")
    source = Path(folder)
    if source.is_dir():
        return _read_dataset(source, split)
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(source)
    if suffix in (".csv", ".tsv"):
        return _read_csv(source, "\t" if suffix == ".tsv" else ",")
    return [], [f"{source}: unknown data format {suffix!r}; use .jsonl, .csv, .tsv or a datasets folder"]


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _read_jsonl(path: Path) -> tuple[list[Row], list[str]]:
    rows, problems = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append(Row({k: _cell(v) for k, v in obj.items()}, f"{path}:{number}"))
    return rows, problems


def _read_csv(path: Path, delimiter: str) -> tuple[list[Row], list[str]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        for record in reader:
            values = {k: v for k, v in record.items() if k is not None and v is not None}
            rows.append(Row(values, f"{path}:{reader.line_num}"))
    return rows, []


def _read_dataset(folder: Path, split: str) -> tuple[list[Row], list[str]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        return [], [f"{folder}: not a datasets folder saved with save_to_disk ({exc})"]
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            return [], [f"{folder}: name a split as '{folder}#SPLIT'; it has {sorted(loaded)}"]
        loaded = loaded[split]
    label = f"{folder}#{split}" if split else str(folder)
    return [Row({k: _cell(v) for k, v in r.items()}, f"{label} row {i}") for i, r in enumerate(loaded)], []


def _examples(rows: list[Row], task: str, prefix: str, template: PromptTemplate) -> tuple[list[Example], list[str]]:
    needed = template.data_fields()
    out, problems = [], []
    for row in rows:
        missing = sorted(needed - row.values.keys())
        if missing:
            problems.append(
                f"{row.where}: row lacks {missing} used by task {task!r}'s template "
                f"(it has {sorted(row.values)})"
            )
            continue
        text = render_input(template, row.values)
        out.append(
            Example(
                input=text,
                prompt=render_prompt(template, prefix, text),
                target=render_target(template, row.values),
                where=row.where,
            )
        )
    return out, problems


def _load(path: Path, task: str, prefix: str, template: PromptTemplate, problems: list[str]) -> list[Example]:
    """A file's examples; its problems (at most MAX_REPORTED listed, the rest counted) go to `problems`."""
    rows, read_problems = read_rows(path)
    examples, row_problems = _examples(rows, task, prefix, template)
    for found in (read_problems, row_problems):
        problems.extend(found[:MAX_REPORTED])
        if len(found) > MAX_REPORTED:
            problems.append(f"... and {len(found) - MAX_REPORTED} more in {path}")
    return examples


def load_examples(path: Path, task: str, prefix: str, template: PromptTemplate) -> list[Example]:
    """One data file rendered with a task's template (`registry eval`); SpecError listing every bad row."""
    problems: list[str] = []
    examples = _load(path, task, prefix, template, problems)
    if not problems and not examples:
        problems.append(f"{path}: no rows")
    if problems:
        raise SpecError(str(path), problems)
    return examples


def load_task_data(spec: Spec, task: TaskSpec, template: PromptTemplate, seed: int) -> TaskData:
    """Train and eval examples of one task; raises SpecError listing every bad row."""
    problems: list[str] = []

    def load(path: Path) -> list[Example]:
        return _load(spec.resolve(path), task.name, task.prefix, template, problems)

    train = load(task.data.train)
    if task.data.eval is not None:
        held_out = load(task.data.eval)
    else:
        # A seeded shuffle keeps the held-out split stable across runs and resumes.
        shuffled = train[:]
        random.Random(seed).shuffle(shuffled)
        cut = max(1, round(len(shuffled) * task.data.eval_fraction))
        held_out, train = shuffled[:cut], shuffled[cut:]
    if task.limits.train_examples:
        train = train[: task.limits.train_examples]
    if task.limits.eval_examples:
        held_out = held_out[: task.limits.eval_examples]
    if not problems:
        for role, examples in (("train", train), ("eval", held_out)):
            if not examples:
                problems.append(f"task {task.name!r}: the {role} split is empty; add examples")
    if problems:
        raise SpecError(f"task {task.name!r} data", problems)
    return TaskData(train=train, eval=held_out)
