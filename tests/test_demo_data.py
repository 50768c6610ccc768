"""The built-in demo data: generated, not hand-edited, with clean splits and valid targets."""

import json
import re
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

from mtft.train import demo
from mtft.train.demo.generate import EVAL_ROWS, MONTHS, TASKS, TRAIN_ROWS, generate

DATA = Path(demo.__file__).parent / "data"
TARGET = {"ticket": "label", "contact": "json", "isodate": "iso"}
TICKET_LABELS = {"billing", "shipping", "account", "bug"}


def rows(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{task}.{split}.jsonl").read_text().splitlines()]


def test_committed_files_are_the_generator_output(tmp_path):
    generate(tmp_path, seed=0)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in DATA.glob("*.jsonl")) == generated
    for name in generated:
        assert (DATA / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"{name} differs from the generator; rerun `python -m mtft.train.demo.generate`"
        )


def test_the_seed_changes_the_rows(tmp_path):
    generate(tmp_path, seed=1)
    for name in ("ticket.train.jsonl", "contact.eval.jsonl"):
        assert (tmp_path / name).read_text() != (DATA / name).read_text()


@pytest.mark.parametrize("task", TASKS)
def test_rows_have_the_task_fields_and_sizes(task):
    for split, size in (("train", TRAIN_ROWS), ("eval", EVAL_ROWS)):
        split_rows = rows(task, split)
        assert len(split_rows) == size
        assert all(list(row) == ["text", TARGET[task]] for row in split_rows)
        assert all(row["text"].strip() and row[TARGET[task]].strip() for row in split_rows)
        # Demo training budgets assume short inputs (at most ~40 tokens).
        assert max(len(row["text"].split()) for row in split_rows) <= 25


@pytest.mark.parametrize("task", TASKS)
def test_train_and_eval_are_disjoint(task):
    train, evaluation = rows(task, "train"), rows(task, "eval")
    train_texts = [row["text"] for row in train]
    assert len(set(train_texts)) == len(train_texts)
    assert not set(train_texts) & {row["text"] for row in evaluation}
    if task != "ticket":  # contact and isodate eval targets are unseen people and dates
        field = TARGET[task]
        assert not {row[field] for row in train} & {row[field] for row in evaluation}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_ticket_labels_are_the_four_and_balanced(split):
    counts = Counter(row["label"] for row in rows("ticket", split))
    assert set(counts) == TICKET_LABELS
    fair = sum(counts.values()) / len(counts)
    assert all(abs(n - fair) <= 0.1 * fair for n in counts.values()), counts


@pytest.mark.parametrize("split", ["train", "eval"])
def test_contact_targets_are_compact_json_read_from_the_text(split):
    for row in rows("contact", split):
        contact = json.loads(row["json"])
        assert list(contact) == ["name", "age", "city"]
        assert isinstance(contact["age"], int) and 18 <= contact["age"] <= 85
        assert row["json"] == json.dumps(contact, separators=(", ", ": "))
        for value in contact.values():
            assert str(value) in row["text"]


def test_contact_eval_people_are_made_of_train_vocabulary():
    train = [json.loads(row["json"]) for row in rows("contact", "train")]
    first_names = {c["name"].split()[0] for c in train}
    last_names = {c["name"].split()[1] for c in train}
    cities = {c["city"] for c in train}
    for row in rows("contact", "eval"):
        contact = json.loads(row["json"])
        first, last = contact["name"].split()
        assert first in first_names and last in last_names and contact["city"] in cities


@pytest.mark.parametrize("split", ["train", "eval"])
def test_isodate_targets_are_valid_dates_written_in_the_text(split):
    for row in rows("isodate", split):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["iso"])
        day = date.fromisoformat(row["iso"])
        text = row["text"].lower()
        assert str(day.year) in text and str(day.day) in text
        assert MONTHS[day.month - 1][:3].lower() in text
